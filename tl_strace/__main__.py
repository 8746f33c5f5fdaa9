"""``python -m tl_strace ...``: the ``tl-strace`` command (:func:`tl_strace.cli.main`), same exit status."""

import sys

from tl_strace.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised by a subprocess in tests/unit/test_hostile_cli.py
    sys.exit(main())
