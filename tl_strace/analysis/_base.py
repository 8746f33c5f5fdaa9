"""The runs an analysis reads (a run or its directory), their names, and paper B's constants."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tl_strace.corpus import CorpusRun, load_run
from tl_strace.errors import InputError


BOUNDARY = 1e-2


MINIMAL_CORE = 1e-3


SHARE_COLUMNS = ("share_attn", "share_mlp", "share_residual")


LAYER_COLUMNS = ("share_layers_0", "share_layers_1", "share_layers_2", "share_layers_3")


RunLike = CorpusRun | str | os.PathLike


def _run(r: RunLike) -> CorpusRun:
    return r if isinstance(r, CorpusRun) else load_run(r)


def _runs(rs: RunLike | Sequence[RunLike]) -> list[CorpusRun]:
    if isinstance(rs, (CorpusRun, str, os.PathLike)):
        return [_run(rs)]
    return [_run(r) for r in rs]


def _need(run: CorpusRun, *cols: str) -> None:
    missing = [c for c in cols if c not in run.table]
    if len(run.table) == 0:
        raise InputError(f"{run.path} has no traced passages yet.")
    if missing:
        raise InputError(f"{run.path} lacks the column(s) {missing} (written by another runner version or method).")


def _labels(runs: Sequence[CorpusRun]) -> list[str]:
    """Run names, made unique by appending the directory name when two coincide."""
    names = [r.name for r in runs]
    return [f"{n} [{r.path.name}]" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def weights_key(r: CorpusRun) -> str:
    """The identity of a run's model weights (run.json: ``weights_fingerprint``; before 0.3
    ``weights_sha256``): two checkpoints of one architecture, even under one name, differ here."""
    m = r.config.get("model", {})
    ident = m.get("weights_fingerprint") or m.get("weights_sha256")
    if ident is None:
        raise InputError(f"{r.path}: run.json names no weights fingerprint, so its model cannot be told from "
                         "another's; rerun it with this version of tl_strace.")
    return str(ident)


def model_labels(runs: Sequence[CorpusRun]) -> dict[str, str]:
    """A label per weights key (:func:`weights_key`): the model's name, with the start of its
    fingerprint added where two different weights share a name (so neither hides the other)."""
    names: dict[str, str] = {}
    for r in runs:
        names.setdefault(weights_key(r), r.model_name)
    count: dict[str, int] = {}
    for n in names.values():
        count[n] = count.get(n, 0) + 1
    return {k: (n if count[n] == 1 else f"{n} (weights {k[:8]})") for k, n in names.items()}


def group_runs(runs: Sequence[CorpusRun]) -> dict[str, Any]:
    """Which runs go together in a report: by model weights, context length and attention ablation.

    Returns ``{"faithful": [...], "attention_pairs": [(faithful, kept)], "context_groups": [[...]],
    "cross_model": {mode: [...]}}``: for each attention mode, one run per model (its longest context).
    """
    key = weights_key
    faithful = [r for r in runs if r.attention == "faithful"]
    kept = [r for r in runs if r.attention != "faithful"]
    pairs = []
    for k in kept:
        for f in faithful:
            if key(f) == key(k) and f.context_words == k.context_words and \
                    set(f.table.get("id", [])) & set(k.table.get("id", [])):
                pairs.append((f, k))
                break
    ctx = []
    cross: dict[str, list[CorpusRun]] = {}
    for mode, of_mode in (("faithful", faithful), ("never-ablated", kept)):  # within one attention mode
        by_model: dict[str, list[CorpusRun]] = {}
        for r in of_mode:
            by_model.setdefault(key(r), []).append(r)
        for g in by_model.values():  # the context-length comparison: one run per length
            one_per_length: dict[int, CorpusRun] = {}
            for r in g:
                if r.context_words is not None:
                    one_per_length.setdefault(r.context_words, r)
            runs_ = list(one_per_length.values())
            if len(runs_) > 1 and set.intersection(*(set(r.table["id"]) for r in runs_)):
                ctx.append(runs_)
        if len(by_model) > 1:  # across models: one run per model, the longest context
            cross[mode] = [max(g, key=lambda r: r.context_words or 0) for g in by_model.values()]
    return {"faithful": faithful, "attention_pairs": pairs, "context_groups": ctx, "cross_model": cross}


def as_runs(items: Sequence[RunLike] | Mapping[str, RunLike]) -> list[CorpusRun]:
    """Load run directories (or pass runs through)."""
    vals = list(items.values()) if isinstance(items, Mapping) else list(items)
    return [_run(v) for v in vals]
