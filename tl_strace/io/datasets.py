"""Passages (a text and the word that follows it) from files, the shipped sets, and WikiText.

Paper B measures density on 40-word passages whose next word is the target. A :class:`Passage` is
that pair, with a stable id. :func:`read_passages` reads them from JSONL, TSV or plain text and
**never drops a line silently**: every line it cannot use (empty, not UTF-8, bad JSON, a missing
field, a duplicate id) becomes a :class:`DataIssue` with its line number, and
:attr:`PassageSet.n_skipped` counts them. Passages too long for a model are found later, by the
corpus runner, which has the tokenizer.

>>> ps = load_passages("austen-40")                     # the shipped set, offline
>>> len(ps) >= 2000, ps[0].context_words
(True, 40)
>>> p = ps[0]; len(p.text.split()), p.next_word, p.target
(40, 'to', ' to')
>>> ps.with_limit(3).ids
['sense-2204', 'sense-2005', 'emma-1151']

File formats (chosen from the suffix, or ``format=``):

* ``.jsonl`` — one object per line: ``{"text": ..., "next_word": ..., "id": ..., "context_words": ...}``;
  only ``text`` is required.
* ``.tsv`` — ``text<TAB>next_word`` or ``id<TAB>text<TAB>next_word``; a first line naming the
  columns (``id``, ``text``, ``next_word``) is read as a header.
* ``.txt`` — one passage per line, no target (cross-entropy and rank are then NaN).

Ids default to ``"<file stem>:<line>"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from tl_strace.errors import InputError

__all__ = [
    "DataIssue",
    "Passage",
    "PassageSet",
    "SHIPPED_SETS",
    "load_passages",
    "passages_from_words",
    "read_passages",
    "wikitext_passages",
    "write_passages",
]

SHIPPED_SETS: dict[str, str] = {
    "austen-40": "40-word passages from Jane Austen's six novels, with the next word (paper B's setup)",
    "austen-20": "the same passages cut to their last 20 words (same ids and next words)",
    "austen-10": "the same passages cut to their last 10 words (same ids and next words)",
}
"""Passage sets shipped in ``tl_strace/data`` (built by ``scripts/build_passages.py``)."""

FORMATS = ("jsonl", "tsv", "txt")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".txt": "txt", ".text": "txt"}
_WORD = re.compile(r"^[\"'(\[_]*([A-Za-z][A-Za-z'-]*)")


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


# ------------------------------------------------------------------------------------- reading
def _format_of(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise InputError(f"Unknown passage format {format!r}; choose one of {list(FORMATS)}.")
        return format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"Cannot tell the format of {str(path)!r} from its suffix; name it .jsonl, .tsv or .txt, "
                         f"or pass format= one of {list(FORMATS)}.")
    return fmt


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def _clean_str(v: Any, name: str) -> tuple[str | None, str | None]:
    if v is None:
        return None, None
    if not isinstance(v, str):
        return None, f"field {name!r} must be a string, got {type(v).__name__}"
    return v, None


def _parse_jsonl(line: str, lineno: int, stem: str) -> tuple[Passage | None, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if "text" not in obj:
        return None, "no 'text' field"
    text, err = _clean_str(obj.get("text"), "text")
    if err:
        return None, err
    nxt, err = _clean_str(obj.get("next_word"), "next_word")
    if err:
        return None, err
    pid = obj.get("id", f"{stem}:{lineno}")
    cw = obj.get("context_words")
    if cw is not None and not isinstance(cw, int):
        return None, f"field 'context_words' must be an integer, got {cw!r}"
    return Passage(id=str(pid), text=text or "", next_word=nxt, context_words=cw, line=lineno), None


def read_passages(path: str | os.PathLike[str], *, format: str | None = None) -> PassageSet:
    """Read passages from a JSONL, TSV or plain-text file (format from the suffix or ``format``).

    Lines that cannot be used are skipped and recorded in :attr:`PassageSet.issues` with their line
    number and reason: empty lines (blank lines at the very end of the file are not counted), bytes
    that are not UTF-8, invalid JSON or missing fields, empty text, duplicate ids. Nothing is
    dropped without a record, and nothing here raises for a bad line.

    Raises:
        InputError: the file does not exist, or its format cannot be told.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"No passage file at {str(p)!r}; pass a .jsonl/.tsv/.txt file or one of the shipped sets "
                         f"{list(SHIPPED_SETS)}.")
    fmt = _format_of(p, format)
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():  # trailing blank lines: the end of the file, not data
        lines.pop()
    passages: list[Passage] = []
    issues: list[DataIssue] = []
    seen: dict[str, int] = {}
    header: list[str] | None = None
    for lineno, rawline in enumerate(lines, start=1):
        rawline = rawline.rstrip(b"\r")
        line, err = _decode(rawline)
        if err:
            issues.append(DataIssue(lineno, err))
            continue
        assert line is not None
        if line.startswith("\ufeff") and lineno == 1:
            line = line[1:]
        if not line.strip():
            issues.append(DataIssue(lineno, "empty line"))
            continue
        passage: Passage | None
        if fmt == "jsonl":
            passage, err = _parse_jsonl(line, lineno, p.stem)
        elif fmt == "tsv":
            cols = line.split("\t")
            if lineno == 1 and "text" in [c.strip().lower() for c in cols]:
                header = [c.strip().lower() for c in cols]
                continue
            if header is not None:
                if len(cols) != len(header):
                    passage, err = None, f"expected {len(header)} tab-separated columns, got {len(cols)}"
                else:
                    row = dict(zip(header, cols))
                    passage, err = Passage(id=row.get("id") or f"{p.stem}:{lineno}", text=row["text"],
                                           next_word=row.get("next_word") or None, line=lineno), None
            elif len(cols) == 2:
                passage, err = Passage(id=f"{p.stem}:{lineno}", text=cols[0], next_word=cols[1] or None,
                                       line=lineno), None
            elif len(cols) == 3:
                passage, err = Passage(id=cols[0], text=cols[1], next_word=cols[2] or None, line=lineno), None
            else:
                passage, err = None, f"expected 2 (text, next_word) or 3 (id, text, next_word) tab-separated " \
                                     f"columns, got {len(cols)}"
        else:
            passage, err = Passage(id=f"{p.stem}:{lineno}", text=line, line=lineno), None
        if passage is not None and not err:
            if not passage.text.strip():
                err = "empty text"
            elif passage.next_word is not None and not passage.next_word.strip():
                err = "empty next_word"
            elif passage.id in seen:
                err = f"duplicate id {passage.id!r} (first on line {seen[passage.id]})"
        if err or passage is None:
            issues.append(DataIssue(lineno, err or "unreadable", passage.id if passage else None))
            continue
        seen[passage.id] = lineno
        passages.append(passage)
    return PassageSet(tuple(passages), tuple(issues), source=str(p),
                      fingerprint=hashlib.sha256(raw).hexdigest())


def shipped_path(name: str) -> Path:
    """Path of a shipped passage set (see :data:`SHIPPED_SETS`)."""
    if name not in SHIPPED_SETS:
        raise InputError(f"Unknown shipped passage set {name!r}; choose one of {list(SHIPPED_SETS)}.")
    return Path(str(resources.files("tl_strace") / "data" / f"{name}.jsonl"))


def load_passages(spec: str | os.PathLike[str] | PassageSet, *, format: str | None = None) -> PassageSet:
    """Passages from a shipped set name (``"austen-40"``), a file path, or ``"wikitext"`` /
    ``"wikitext:<config>:<split>"`` (needs the internet or a ``datasets`` cache; see
    :func:`wikitext_passages`). A :class:`PassageSet` is returned unchanged."""
    if isinstance(spec, PassageSet):
        return spec
    s = os.fspath(spec)
    if s in SHIPPED_SETS:
        ps = read_passages(shipped_path(s), format="jsonl")
        return replace(ps, source=s)
    if s == "wikitext" or s.startswith("wikitext:"):
        parts = s.split(":")
        kw: dict[str, Any] = {}
        if len(parts) > 1 and parts[1]:
            kw["config"] = parts[1]
        if len(parts) > 2 and parts[2]:
            kw["split"] = parts[2]
        return wikitext_passages(**kw)
    return read_passages(s, format=format)


def write_passages(passages: Iterable[Passage], path: str | os.PathLike[str]) -> None:
    """Write passages as JSONL (UTF-8, one object per line), atomically."""
    from tl_strace.fsutil import atomic_write

    atomic_write(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in passages),
                 what="passage file")


# ------------------------------------------------------------------------------------- building
def passages_from_words(words: Sequence[str] | Sequence[Sequence[str]], *, n_words: int = 40,
                        n: int | None = None, seed: int = 0, id_prefix: str = "p") -> list[Passage]:
    """Non-overlapping ``n_words``-word windows of running text, each with the word after it.

    ``words`` is one word sequence or several (segments: chapters, articles); windows never cross
    a segment boundary. Only windows followed by an alphabetic word are kept; that word, without
    surrounding punctuation, is the target. ``n`` windows are drawn at random (``seed``) and
    returned in text order; ids are ``f"{id_prefix}-{k:04d}"`` with ``k`` the window's position
    among all candidates, so they are stable when ``n`` changes.

    >>> ws = "a b c d e f g h i j".split()
    >>> [(p.text, p.next_word) for p in passages_from_words(ws, n_words=3)]
    [('a b c', 'd'), ('e f g', 'h')]
    """
    if n_words < 1:
        raise InputError(f"n_words must be ≥ 1; got {n_words}.")
    one = not words or isinstance(words[0], str)
    segments: list[Sequence[str]] = [words] if one else list(words)  # type: ignore[list-item]
    cands: list[Passage] = []
    k = 0
    for seg in segments:
        for start in range(0, len(seg) - n_words, n_words + 1):
            m = _WORD.match(seg[start + n_words])
            k += 1
            if m is None:
                continue
            cands.append(Passage(id=f"{id_prefix}-{k:04d}", text=" ".join(seg[start:start + n_words]),
                                 next_word=m.group(1).rstrip("'-"), context_words=n_words))
    if n is not None and n < len(cands):
        keep = sorted(random.Random(seed).sample(range(len(cands)), n))
        cands = [cands[i] for i in keep]
    return cands


_HEADING = re.compile(r"^\s*=( =)* .* =( =)*\s*$")


def wikitext_passages(*, config: str = "wikitext-103-raw-v1", split: str = "test", n_words: int = 40,
                      n: int | None = 5000, seed: int = 0, path: str = "Salesforce/wikitext",
                      data_files: str | Sequence[str] | None = None) -> PassageSet:
    """Paper B's inputs: 40-word WikiText passages with their next word, through ``datasets``.

    Articles are split at their ``= Title =`` headings; windows never cross an article. With
    ``data_files`` (local raw WikiText lines, ``.txt`` or ``.parquet``), nothing is downloaded.

    Raises:
        InputError: ``datasets`` cannot load the data (offline without a cache, say); the message
            says how to get it.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets comes with transformer-lens
        raise InputError("wikitext_passages needs the `datasets` package: pip install datasets") from e
    try:
        if data_files is not None:
            files = [data_files] if isinstance(data_files, str) else list(data_files)
            kind = "parquet" if str(files[0]).endswith(".parquet") else "text"
            ds = datasets.load_dataset(kind, data_files=files, split="train")
            source = f"wikitext({', '.join(map(str, files))})"
        else:
            ds = datasets.load_dataset(path, config, split=split)
            source = f"{path}/{config}/{split}"
    except Exception as e:
        raise InputError(f"Could not load WikiText ({type(e).__name__}: {e}). Offline, pass data_files= a local copy "
                         "(raw WikiText lines, .txt or .parquet) or use the shipped set 'austen-40'.") from e
    articles: list[list[str]] = []
    cur: list[str] = []
    for line in ds["text"]:
        if _HEADING.match(line) and not line.strip().startswith("= ="):
            if cur:
                articles.append(cur)
            cur = []
        elif line.strip() and not _HEADING.match(line):
            cur.extend(line.split())
    if cur:
        articles.append(cur)
    ps = passages_from_words(articles, n_words=n_words, n=n, seed=seed, id_prefix="wiki")
    fp = hashlib.sha256(json.dumps([p.to_json() for p in ps]).encode()).hexdigest()
    return PassageSet(tuple(ps), (), source=source, fingerprint=fp)
