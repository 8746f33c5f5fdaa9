"""The package version, in one place (read by pyproject and stored in every result)."""

__version__ = "0.1.0"
