"""Reading a finished (or growing) run: :class:`CorpusRun` and :func:`load_run`."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tl_strace.ablation import attention_label, attention_mode
from tl_strace.corpus._base import CONFIG_FILE, ISSUES_FILE, SHARD_GLOB, UNIGRAM_FILE
from tl_strace.corpus._store import _Schema, _merge, _read_issues, _read_meta, _read_shard, _read_unigram
from tl_strace.errors import InputError, ResultsError


@dataclass(frozen=True)
class CorpusRun:
    """A run directory read back: one row per traced passage, in data order.

    ``table`` has the scalar columns (``id``, ``density``, ``full_entropy``, ``recovery_1``, ...) and
    per-stratum list columns (``sizes``, ``tv``, ``nucleus``, ``share_attn``, ``top_ids``, ...);
    ``skipped`` lists the passages and lines that could not be traced, with the reason. An
    every-position run (``run_corpus(..., every_position=True)``) also has ``profile``: one row per
    passage and position (``index``, ``id``, ``position``, ``density``, ``full_entropy``, ``tv``, ...),
    the density along each passage; ``None`` for other runs.
    """

    path: Path
    config: dict[str, Any]
    versions: dict[str, Any]
    table: pd.DataFrame
    skipped: pd.DataFrame
    unigram: dict[int, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    profile: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        """A short label: the model name, plus what differs from the paper defaults."""
        label = self.model_name
        if self.context_words is not None:
            label += f", {self.context_words} words"
        if self.attention != "faithful":
            label += f", {attention_label(self.attention)}"
        if self.config.get("ablation") == "mean":
            label += " (mean abl.)"
        if self.config.get("granularity") == "component":
            label += " (components)"
        return label

    @property
    def model_name(self) -> str:
        """The traced model's name as run.json records it (else the argument it was loaded from, else
        the directory's name)."""
        m = self.config.get("model", {})
        return str(m.get("model_name") or m.get("argument") or self.path.name)

    @property
    def attention(self) -> str:
        """The run's attention mode (:data:`tl_strace.ablation.ATTENTION_MODES`); run.json stores it as
        ``ablate_attention`` (true: ``"faithful"``), as every run since 0.1 has."""
        return attention_mode(self.config)

    @property
    def context_words(self) -> int | None:
        """The passages' context length in words when it is the same for all of them."""
        if "context_words" not in self.table:
            return None
        cw = self.table["context_words"].dropna().unique()
        return int(cw[0]) if len(cw) == 1 else None

    def curves(self, column: str = "tv") -> np.ndarray:
        """A per-stratum column as a ``[passage, stratum]`` array (strata of different lengths,
        e.g. threshold runs, are padded with NaN)."""
        if column not in self.table:
            raise InputError(f"This run has no column {column!r}.")
        rows = self.table[column].tolist()
        n = max((len(r) for r in rows), default=0)
        out = np.full((len(rows), n), np.nan)
        for i, r in enumerate(rows):
            out[i, :len(r)] = np.asarray(r, dtype=np.float64)
        return out

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return (f"CorpusRun({str(self.path)!r}, model={self.name!r}, passages={len(self.table)}, "
                f"skipped={len(self.skipped)})")


def load_run(path: str | os.PathLike[str]) -> CorpusRun:
    """Read a run directory written by :func:`run_corpus` (all shards as one table).

    Torn last lines (a run still going, or killed) are left out and noted in ``notes``. Every file
    is validated (schema, and checksums where the run has them): a damaged or edited field, or a
    passage recorded twice, raises :class:`~tl_strace.errors.ResultsError` naming the file, the
    line and the field.
    """
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
        raise InputError(f"load_run takes the path of a run directory (str or os.PathLike); got {path!r} "
                         f"({type(path).__name__}).")
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ResultsError(f"{path} is not a corpus run directory (no {CONFIG_FILE}).")
    meta = _read_meta(cfg_path)
    schema = _Schema.of(meta)
    shards = []
    notes: list[str] = []
    for shard in sorted(path.glob(SHARD_GLOB)):
        r, note = _read_shard(shard, repair=False, schema=schema)
        shards.append((shard, r))
        if note:
            notes.append(note)
    ok, skipped = [], []
    for r in sorted(_merge(shards).values(), key=lambda r: r["index"]):
        (ok if r["status"] == "ok" else skipped).append(r)
    issues_path = path / ISSUES_FILE
    data_issues = []
    if issues_path.is_file():
        data_issues = [{**i, "index": None} for i in _read_issues(issues_path)]
    profile = None
    if schema.every_position:
        parts = [pd.DataFrame({"index": r["index"], "id": r["id"], **r["profile"]}) for r in ok]
        profile = (pd.concat(parts, ignore_index=True) if parts else
                   pd.DataFrame(columns=["index", "id", "position", "density", "full_entropy", "tv"]))
    table = pd.DataFrame(ok).reset_index(drop=True)
    table = table.drop(columns=[c for c in ("status", "sha256", "profile") if c in table])
    skipped_df = pd.DataFrame(data_issues + [{k: r.get(k) for k in ("index", "id", "line", "reason")} for r in skipped],
                              columns=["index", "id", "line", "reason"])
    unigram: dict[int, int] = {}
    up = path / UNIGRAM_FILE
    if up.is_file():
        unigram = _read_unigram(up)
    for n in notes:
        warnings.warn(f"{path}: {n}", stacklevel=2)
    return CorpusRun(path=path, config=meta.get("config", {}), versions=meta.get("versions", {}), table=table,
                     skipped=skipped_df, unigram=unigram, notes=tuple(notes), profile=profile)
