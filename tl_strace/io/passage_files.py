"""Passage files: reading JSONL / TSV / plain text without dropping a line silently, the shipped
sets, and writing JSONL (formats: see :mod:`tl_strace.io.datasets`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from tl_strace.errors import InputError
from tl_strace.io.passages import DataIssue, Passage, PassageSet

SHIPPED_SETS: dict[str, str] = {
    "austen-40": "40-word passages from Jane Austen's six novels, with the next word (paper B's setup)",
    "austen-20": "the same passages cut to their last 20 words (same ids and next words)",
    "austen-10": "the same passages cut to their last 10 words (same ids and next words)",
}
"""Passage sets shipped in ``tl_strace/data`` (built by ``scripts/build_passages.py``)."""

FORMATS = ("jsonl", "tsv", "txt")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".txt": "txt", ".text": "txt"}


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


def write_passages(passages: Iterable[Passage], path: str | os.PathLike[str]) -> None:
    """Write passages as JSONL (UTF-8, one object per line), atomically."""
    from tl_strace.fsutil import atomic_write

    atomic_write(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in passages),
                 what="passage file")
