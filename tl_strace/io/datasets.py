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

import os
from dataclasses import replace
from typing import Any

# The module is split by job: passages (the types), passage_files (reading and writing files, the
# shipped sets), passage_builders (windows of running text, WikiText). These names are its interface.
from tl_strace.io.passage_builders import _HEADING, _WORD, passages_from_words, wikitext_passages
from tl_strace.io.passage_files import (  # noqa: F401  (the private helpers: re-exported)
    _SUFFIXES,
    FORMATS,
    SHIPPED_SETS,
    _clean_str,
    _decode,
    _format_of,
    _parse_jsonl,
    read_passages,
    shipped_path,
    write_passages,
)
from tl_strace.io.passages import DataIssue, Passage, PassageSet

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
