"""The passage types: :class:`Passage` (a text and the word that follows it), :class:`DataIssue` (a
line that could not be used, and why) and :class:`PassageSet` (the passages of one source with every
issue met reading it). See :mod:`tl_strace.io.datasets`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tl_strace.errors import InputError


@dataclass(frozen=True)
class Passage:
    """One input: ``text`` (the context) and ``next_word`` (the word that follows it, or None).

    ``context_words`` is the context length in words when the set was built that way; ``line`` is
    the line of the file it came from (1-based), for messages.
    """

    id: str
    text: str
    next_word: str | None = None
    context_words: int | None = None
    line: int | None = None

    @property
    def target(self) -> str | None:
        """The target as text for :func:`tl_strace.strace` (``" " + next_word``: words are
        separated by spaces, and tokenizers mark that space on the word's first token)."""
        return None if self.next_word is None else " " + self.next_word

    def with_context(self, n_words: int) -> "Passage":
        """The same passage (same id and next word) keeping only the last ``n_words`` words."""
        words = self.text.split()
        if n_words < 1 or n_words > len(words):
            raise InputError(f"Passage {self.id!r} has {len(words)} words; cannot keep the last {n_words}.")
        return replace(self, text=" ".join(words[-n_words:]), context_words=n_words)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "text": self.text, "next_word": self.next_word}
        if self.context_words is not None:
            d["context_words"] = self.context_words
        return d


@dataclass(frozen=True)
class DataIssue:
    """A line that could not be used, and why (the passage on it is skipped)."""

    line: int | None
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "passage"
        return f"{where}{f' ({self.id})' if self.id else ''}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "reason": self.reason}


@dataclass(frozen=True)
class PassageSet(Sequence[Passage]):
    """The passages read from one source, with every problem met on the way.

    ``source`` names where they came from; ``fingerprint`` identifies the content (a corpus run
    refuses to resume over different data). Indexing and iteration give :class:`Passage` objects.
    """

    passages: tuple[Passage, ...]
    issues: tuple[DataIssue, ...] = ()
    source: str = ""
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, i):  # type: ignore[override]
        return self.passages[i]

    def __iter__(self) -> Iterator[Passage]:
        return iter(self.passages)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.passages]

    @property
    def n_skipped(self) -> int:
        """How many lines of the source were skipped (each one is in :attr:`issues`)."""
        return len(self.issues)

    def with_limit(self, limit: int | None) -> "PassageSet":
        """The first ``limit`` passages (all when None); issues are kept."""
        if limit is None:
            return self
        if limit < 0:
            raise InputError(f"limit must be ≥ 0; got {limit}.")
        return replace(self, passages=self.passages[:limit])

    def report(self, max_lines: int = 20) -> str:
        """A human-readable account of the skipped lines (empty string when none)."""
        if not self.issues:
            return ""
        lines = [f"{self.source}: skipped {self.n_skipped} line(s):"]
        lines += [f"  {i}" for i in self.issues[:max_lines]]
        if self.n_skipped > max_lines:
            lines.append(f"  ... and {self.n_skipped - max_lines} more")
        return "\n".join(lines)

    def to_dataframe(self):  # -> pd.DataFrame
        import pandas as pd

        return pd.DataFrame([{**p.to_json(), "line": p.line} for p in self.passages],
                            columns=["id", "text", "next_word", "context_words", "line"])
