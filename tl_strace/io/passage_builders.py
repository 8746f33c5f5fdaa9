"""Building passages from running text: fixed-length windows with the word after them
(:func:`passages_from_words`), and paper B's WikiText passages (:func:`wikitext_passages`)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence

from tl_strace.errors import InputError
from tl_strace.io.passages import Passage, PassageSet

_WORD = re.compile(r"^[\"'(\[_]*([A-Za-z][A-Za-z'-]*)")


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
