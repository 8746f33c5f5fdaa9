"""Corpus runs: density over thousands of passages, resumable, sharded over ``torchrun`` ranks.

:func:`run_corpus` traces every passage of a data set with :func:`tl_strace.strace` and appends one
JSON record per passage, as soon as it finishes, to a shard file of the output directory. The
record holds everything the analyses of :mod:`tl_strace.analysis` need (curves, shares of edge
types and layer groups per stratum, the components in the trace at chosen sizes, top tokens), so
no analysis reruns the model. :func:`load_run` reads the shards back as one table.

>>> summary = run_corpus("smollm2-135m", "austen-40", "runs/smol", limit=200)   # doctest: +SKIP
>>> run = load_run("runs/smol")                                                   # doctest: +SKIP
>>> run.table[["id", "density", "full_entropy"]].head()                           # doctest: +SKIP

The output directory::

    run.json              configuration (compared on restart), versions, data source
    data_issues.jsonl     lines of the data that could not be read (line, reason)
    unigram.json          token counts of the corpus under the model's tokenizer
    shard-00000.jsonl     one record per passage (``"status": "ok"`` or ``"skipped"`` with a reason)
    shard-00001.jsonl     ... one shard per torchrun rank

**Resuming.** Each record is one line written with a single ``write`` and ``fsync``. On start,
every rank cuts a torn last line off its own shard (a line without its newline, or that does not
parse) and redoes that passage; passages with a complete record in any shard are not redone. So a
run killed at any point (``kill -9`` included) and restarted with the same command loses and
duplicates nothing. A different configuration pointed at the same directory raises
:class:`~tl_strace.errors.ResultsError`; ``limit`` may change (a larger limit extends the run).

**Passages skipped for memory.** A passage that cannot fit in memory (over ``memory_budget``, or
over the memory available on the machine when there is no budget) is recorded as skipped with the
bytes one call on it needs (``"memory_needed"``) and a reason that says to rerun with a larger
``memory_budget`` (or on a machine with more memory) to retry it. A resume retries it when those
bytes now fit the budget (or the memory available); the shard is append-only, so its new record is
appended and *supersedes* the skip: the loader keeps, per passage, the record that is not a memory
skip, and allows a passage to be recorded twice only in that way (any other duplicate is a
:class:`~tl_strace.errors.ResultsError`). A retry that still does not fit writes nothing. Every
other skip (too long for the context, a data problem) is final.

**Scale-out.** Started by ``torchrun --nproc-per-node N``, rank ``r`` of ``N`` takes the passages
with ``index % N == r`` and writes ``shard-<r>.jsonl`` (a gloo process group is used for barriers
only, so the same code runs on CPU and GPU). When the model is given by name, rank ``r`` loads it
on ``cuda:<LOCAL_RANK>`` when CUDA is available. A model too big for one GPU: load it spread over
several GPUs (``device_map="auto"`` through Accelerate, then ``TransformerBridge.boot_transformers``)
in one process and pass the model object.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tl_strace._version import __version__
from tl_strace.ablation import CONDITIONS
from tl_strace.components import component_strace
from tl_strace import memory as _memory
from tl_strace import options
from tl_strace.errors import DecompositionError, InputError, ResultsError, StraceError
from tl_strace.fsutil import OutputPathError, atomic_write
from tl_strace.io.datasets import DataIssue, Passage, PassageSet, load_passages
from tl_strace.io.models import load_model
from tl_strace.mean import compute_means
from tl_strace.model import describe_model, model_dtype, prepare_tokens, weights_fingerprint
from tl_strace.pipeline import strace
from tl_strace.search import DEFAULT_SIZES

logger = logging.getLogger(__name__)

__all__ = [
    "GRANULARITIES",
    "ABLATIONS",
    "CorpusRun",
    "RunSummary",
    "load_run",
    "run_corpus",
]

GRANULARITIES = ("token", "component")
ABLATIONS = ("zero", "mean")
CONFIG_FILE = "run.json"
ISSUES_FILE = "data_issues.jsonl"
UNIGRAM_FILE = "unigram.json"
SHARD_GLOB = "shard-*.jsonl"
RECORD_VERSION = 1
MEAN_REFERENCE = 256
"""Mean ablation averages over the first this many passages of the data that fit the model's context
(whatever ``limit``)."""
DEFAULT_RECORD_SIZES = (1e-3, 1e-2, 0.1, 0.4)
"""Sizes at which the components (heads, MLPs) of each trace are recorded (Lorenz curves)."""

_METRICS = ("tv", "kl", "nucleus", "entropy", "ce", "target_rank", "reaches_input")
# Keys that may differ between invocations of the same run.
_FREE_KEYS = ("limit",)


# ============================================================================ small utilities
def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.jsonl"


def _atomic_write(path: Path, text: str) -> None:
    """Write a run file with :func:`tl_strace.fsutil.atomic_write` (no temporary left on failure)."""
    atomic_write(path, text, what="run file")


def _digest(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj`` (sorted keys, no spaces, NaN as ``NaN``).

    Python's JSON writes floats with ``repr``, which reads back to the same float, so a record
    read back from its line hashes to the same digest as when it was written."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sealed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its checksum added under ``"sha256"`` (see :func:`_digest`)."""
    return {**obj, "sha256": _digest({k: v for k, v in obj.items() if k != "sha256"})}


def _versions() -> dict[str, str]:
    out = {"tl_strace": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    for mod in ("transformer_lens", "transformers", "numpy", "pandas"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def _jsonable(x: Any) -> Any:
    """Floats as JSON numbers (NaN kept as NaN: Python's json reads it back)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


# ============================================================================ distributed
@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> "_Dist":
        """Rank and world size from torchrun's environment; start a gloo group when needed."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
            owns = True
        return cls(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

    def agree(self, msg: str | None) -> str | None:
        """Every rank's error message (or None) → the first one, on every rank (rank-prefixed).

        Each step where one rank alone may fail (its shard is locked by another process, its disk
        is full, the ranks were started with different options) ends with this call instead of a
        barrier, so that every rank raises the same one-line error and exits, instead of the others
        waiting at the next barrier for a rank that has gone (a gloo traceback, or a hang)."""
        if self.world <= 1:
            return msg
        import torch.distributed as dist

        box: list[str | None] = [None] * self.world
        dist.all_gather_object(box, msg)
        for r, m in enumerate(box):
            if m is not None:
                return m if m.startswith("rank ") else f"rank {r} of {self.world}: {m}"
        return None

    def broadcast_error(self, msg: str | None) -> str | None:
        """Share rank 0's error message (or None) with every rank, so all fail together."""
        if self.world <= 1:
            return msg
        import torch.distributed as dist

        box = [msg]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ============================================================================ configuration
def _model_identity(model: Any, name: str | None) -> dict[str, Any]:
    """What identifies a model for resuming: shape, dtype, and the fingerprint of every weight
    tensor (:func:`tl_strace.model.weights_fingerprint`), so two checkpoints of one architecture
    never share a run directory."""
    cfg = getattr(model, "cfg", None)
    ident: dict[str, Any] = {"argument": name}
    for k in ("model_name", "n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
        v = getattr(cfg, k, None)
        ident[k] = v if isinstance(v, (int, float, str, type(None))) else str(v)
    params = list(model.parameters())
    ident["dtype"] = str(params[0].dtype) if params else None
    ident["weights_fingerprint"] = weights_fingerprint(model)
    return ident


def _legacy_weights_hash(model: Any) -> str:
    """The identity run directories stored before weight fingerprints (``weights_sha256``: the first
    64k values of the first and last parameter only); computed to compare with such a directory."""
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in (params[:1] + params[-1:]) if params else []:
        h.update(p.detach().flatten()[:65536].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def _model_diff(model: Any, ident: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """How the model now differs from the one a run directory was made with ([] when the same).

    The name it was loaded under may differ (a hub name, then its local copy); the weights may
    not. A directory from before weight fingerprints is compared by its weaker hash."""
    now = dict(ident)
    if "weights_fingerprint" not in stored and "weights_sha256" in stored:
        now.pop("weights_fingerprint")
        now["weights_sha256"] = _legacy_weights_hash(model)
    diff = [d for d in _diff(now, stored) if not d.startswith(("argument:", "model_name:"))]
    if any(d.startswith(("weights_fingerprint:", "weights_sha256:")) for d in diff):
        diff.insert(0, "other weights (another checkpoint of this architecture?)")
    return diff


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)  # a key absent on one side equals None (keys added later)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {vb!r} in the directory, {va!r} now")
    return out


# ============================================================================ backends
def _make_tracer(granularity: str, ablation: str, ablate_attention: bool,
                 opts: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The function that traces one passage, and its keyword arguments.

    Token granularity with zero ablation is the core pipeline, :func:`tl_strace.strace`. Component
    granularity (zero or mean ablation) is :func:`tl_strace.components.component_strace`, with the
    keyword arguments of ``strace`` it shares, plus ``ablation`` (and ``means``, added by the runner).
    """
    kw = {k: v for k, v in opts.items() if v is not None or k in ("prepend_bos",)}
    if granularity == "token":
        if ablation == "mean":
            raise InputError("ablation='mean' is not available at token granularity: tl_strace.strace zero-ablates "
                             "edges only. Mean ablation of heads and MLPs: --granularity component --ablation mean.")
        if not ablate_attention:
            kw["ablate_attention"] = False
        return strace, kw
    if not ablate_attention:
        raise InputError("ablate_attention=False applies to token granularity (attention edges); component "
                         "granularity ablates whole heads.")
    if opts.get("method") != "strace" or opts.get("weights") != "l1":
        raise InputError("Component granularity ranks components with its L1 scorer; method and weights apply to "
                         "token granularity only (leave them at 'strace' and 'l1').")
    params = set(inspect.signature(component_strace).parameters)
    kw = {k: v for k, v in kw.items() if k in params and k not in ("method", "weights", "taus")}
    kw["ablation"] = ablation
    return component_strace, kw


def _means(model: Any, passages: PassageSet, path: Path, dist: "_Dist") -> Any:
    """Mean activations over the first :data:`MEAN_REFERENCE` passages that fit the model's
    context, cached in the run directory (rank 0 computes them; the other ranks load that file)."""
    n_ctx = int(getattr(getattr(model, "cfg", None), "n_ctx", 0) or 0)
    texts = []
    for p in passages:
        if len(texts) == MEAN_REFERENCE:
            break
        if not n_ctx or model.to_tokens(p.text, truncate=False).shape[-1] <= n_ctx:
            texts.append(p.text)
    means, exc = None, None
    if dist.rank == 0:
        try:
            means = compute_means(model, texts, path=path)
        except (StraceError, OSError) as e:
            exc = e
    _sync(dist, exc)  # the barrier: rank 0 has written the file (or every rank stops)
    return means if means is not None else compute_means(model, texts, path=path)


# ============================================================================ one record
def _shares(res: Any) -> dict[str, list[float]]:
    """Per stratum: shares of attention / MLP / residual edges and of four equal layer groups."""
    K = len(res.sizes)
    labels = res.labels
    ids = torch.nonzero(labels < K).flatten()
    lab = labels[ids]
    d = res.layout.decode(ids)
    kind, layer = d["type"], d["layer"]
    L = int(res.model["n_layers"])
    total = torch.bincount(lab, minlength=K).cumsum(0).double()

    def share(mask: torch.Tensor) -> list[float]:
        c = torch.bincount(lab[mask], minlength=K).cumsum(0).double()
        return torch.where(total > 0, c / total.clamp(min=1), torch.full_like(c, float("nan"))).tolist()

    out = {"share_attn": share(kind == 0), "share_mlp": share(kind == 2),
           "share_residual": share((kind == 1) | (kind == 3))}
    group = torch.div(layer * 4, L, rounding_mode="floor")
    for g in range(4):
        out[f"share_layers_{g}"] = share(group == g)
    return out


def _record(res: Any, p: Passage, index: int, record_sizes: Sequence[float], seconds: float) -> dict[str, Any]:
    s = res.summary()
    rec: dict[str, Any] = {
        "status": "ok", "index": index, "id": p.id, "text": p.text, "next_word": p.next_word,
        "context_words": p.context_words if p.context_words is not None else len(p.text.split()),
        "line": p.line, "target_id": res.target, "n_tokens": s["n_tokens"], "n_edges": s["n_edges"],
        "density": s["density"], "density_linear": s["density_linear"],
        **{k: v for k, v in s.items() if k.startswith("recovery_")},
        "full_entropy": s["full_entropy"], "full_top_token": s["full_top_token"],
        "full_top_id": int(res.full_top_ids[0]), "full_top_prob": float(res.full_top_probs[0]),
        "full_ce": s["full_ce"], "full_target_rank": float(res.full_target_rank),
        "sizes": res.sizes.tolist(), "counts": res.counts.tolist(),
    }
    for c, cond in enumerate(res.conditions):
        suffix = "" if cond == "only" else f"_{cond}"
        for m in _METRICS:
            rec[f"{m}{suffix}"] = getattr(res, f"{m}_all")[c].tolist()
    only = list(res.conditions).index("only")
    rec["top_ids"] = res.top_ids[only, :, 0].tolist()
    rec["top_tokens"] = [t[0] for t in res.top_strs[only]]
    rec["top_probs"] = res.top_probs[only, :, 0].tolist()
    comps: dict[str, dict[str, int]] = {}
    if res.config.get("granularity", "token") == "component":
        from tl_strace.components import component_table

        table = component_table(res)
        for size in record_sizes:  # the components kept at size s (presence: 1)
            comps[f"{size:g}"] = {str(n): 1 for n in table.loc[table["first_size"] <= size + 1e-12, "name"]}
    else:
        rec.update(_shares(res))
        if res.config.get("method") == "strace":
            for size in record_sizes:
                try:
                    df = res.subgraph(size).components()
                except InputError:
                    continue
                comps[f"{size:g}"] = {str(n): int(e) for n, e in zip(df["component"], df["n_edges"])}
    rec["components"] = comps
    rec["seconds"] = seconds
    return _jsonable(rec)


# ============================================================================ validation
# Every file of a run directory is checked when it is read (load_run, and a resume): its schema
# (types, lengths, ranges, consistency between fields) and, where the file carries one, its
# checksum. A record of a shard carries ``"sha256"``: the digest of its canonical JSON without that
# field (:func:`_digest`); run.json and unigram.json carry one over their whole content, each line
# of data_issues.jsonl over itself. Directories written before checksums existed have none and are
# checked by schema only; run.json says ``"checksums": "sha256"`` when every record must have one.
_METHODS = ("strace", "threshold", "nucleus")
_FIX_SHARD = "Delete that line to have its passage redone (or use another output directory)."
_FIX_RUN = "It is not a tl_strace run directory, or it was damaged; use another output directory."
_FIX_UNIGRAM = "Delete the file and rerun the run command to rebuild it."
_FIX_ISSUES = "Delete the file and rerun the run command to rewrite it."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_Check = tuple[Any, str]  # (predicate, what it expects)
_NAT: _Check = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")
_INT: _Check = (_is_int, "an integer")
_NUM: _Check = (_is_num, "a number")
_STR: _Check = (lambda v: isinstance(v, str), "a string")
_BOOL: _Check = (lambda v: isinstance(v, bool), "true or false")
_OPT_INT: _Check = (lambda v: v is None or _is_int(v), "an integer or null")
_OPT_NUM: _Check = (lambda v: v is None or _is_num(v), "a number or null")
_OPT_STR: _Check = (lambda v: v is None or isinstance(v, str), "a string or null")
_OPT_BOOL: _Check = (lambda v: v is None or isinstance(v, bool), "true, false or null")


def _list_of(item: _Check) -> _Check:
    return (lambda v: isinstance(v, list) and all(item[0](x) for x in v), f"a list of {item[1].split(' or ')[0]}s")


def _show(v: Any) -> str:
    text = json.dumps(v, allow_nan=True, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class _Bad:
    """Builds the one-line ResultsError of one file (and line): where, which field, how to fix."""

    def __init__(self, where: str, fix: str) -> None:
        self.where, self.fix = where, fix

    def __call__(self, what: str) -> ResultsError:
        return ResultsError(f"{self.where}: {what}. {self.fix}")

    def check(self, obj: dict[str, Any], fields: dict[str, _Check], prefix: str = "") -> None:
        for name, (ok, expected) in fields.items():
            if name not in obj:
                raise self(f"field {prefix + name!r} is missing")
            if not ok(obj[name]):
                raise self(f"field {prefix + name!r} is {_show(obj[name])}, expected {expected}")

    def checksum(self, obj: dict[str, Any], required: bool) -> None:
        if "sha256" not in obj:
            if required:
                raise self("field 'sha256' (the checksum every record of this run carries) is missing")
            return
        if obj["sha256"] != _digest({k: v for k, v in obj.items() if k != "sha256"}):
            raise self("the content does not match its checksum (field 'sha256'): it was edited or damaged")


_RUN_CONFIG: dict[str, _Check] = {
    "data": (lambda v: isinstance(v, dict) and isinstance(v.get("source"), str)
             and isinstance(v.get("fingerprint"), str), "an object with a source and a fingerprint"),
    "granularity": (lambda v: v in GRANULARITIES, f"one of {list(GRANULARITIES)}"),
    "ablation": (lambda v: v in ABLATIONS, f"one of {list(ABLATIONS)}"),
    "ablate_attention": _BOOL,
    "method": (lambda v: v in _METHODS, f"one of {list(_METHODS)}"),
    "weights": (lambda v: v in ("l1", "ifr"), "one of ['l1', 'ifr']"),
    "sizes": (lambda v: v is None or (isinstance(v, list) and bool(v) and all(_is_num(s) and 0 < s <= 1 for s in v)),
              "null or a list of sizes in (0, 1]"),
    "taus": (lambda v: v is None or _list_of(_NUM)[0](v), "null or a list of numbers"),
    "conditions": (lambda v: isinstance(v, list) and "only" in v and all(c in CONDITIONS for c in v),
                   f"a list of conditions among {list(CONDITIONS)} with 'only'"),
    "seed": _INT,
    "top_k": _NAT,
    "prepend_bos": _OPT_BOOL,
    "record_sizes": _list_of(_NUM),
    "record_version": _INT,
    "model": (lambda v: isinstance(v, dict), "an object"),
}


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """Validate a parsed run.json; return it."""
    bad = _Bad(str(path), _FIX_RUN)
    if not isinstance(meta, dict):
        raise bad(f"the file is not a JSON object (it is {_show(meta)})")
    obj = (lambda v: isinstance(v, dict), "an object")
    bad.check(meta, {"config": obj, "versions": obj})
    bad.check(meta["config"], _RUN_CONFIG, "config.")
    for name, chk in (("n_passages", _NAT), ("checksums", (lambda v: v == "sha256", "'sha256'"))):
        if name in meta:
            bad.check(meta, {name: chk})
    bad.checksum(meta, required=False)
    return meta


def _read_meta(path: Path) -> dict[str, Any]:
    """Read and validate run.json."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({e}); it is not a tl_strace run directory, "
                           "or it was damaged. Use another output directory.") from e
    return _check_meta(meta, path)


@dataclass(frozen=True)
class _Schema:
    """What every record of one run must look like (from its run.json)."""

    granularity: str = "token"
    conditions: tuple[str, ...] = ("only",)
    n_strata: int | None = None
    """The strata of every record (s-Trace with given sizes: those, plus the full graph)."""
    n_passages: int | None = None
    """Passages in the data (an index must be below it), when run.json says."""
    checksums: bool = False

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "_Schema":
        cfg = meta["config"]
        sizes, k = cfg.get("sizes"), None
        if cfg.get("method") == "strace" and cfg.get("granularity") == "token" and sizes:
            k = len(sizes) + (0 if float(sizes[-1]) == 1.0 else 1)
        return cls(granularity=cfg["granularity"], conditions=tuple(cfg["conditions"]), n_strata=k,
                   n_passages=meta.get("n_passages"), checksums=meta.get("checksums") == "sha256")


_OK_FIELDS: dict[str, _Check] = {
    "index": _NAT, "id": _STR, "text": _STR, "next_word": _OPT_STR, "context_words": _OPT_INT, "line": _OPT_INT,
    "target_id": _OPT_INT, "n_tokens": _NAT, "n_edges": _NAT, "density": _NUM, "density_linear": _NUM,
    "full_entropy": _NUM, "full_top_token": _STR, "full_top_id": _NAT, "full_top_prob": _NUM, "full_ce": _OPT_NUM,
    "full_target_rank": _OPT_NUM, "seconds": _NUM,
    "components": (lambda v: isinstance(v, dict) and all(
        isinstance(c, dict) and all(isinstance(n, str) and _is_int(e) for n, e in c.items()) for c in v.values()),
        "an object of {component: edge count} objects"),
}
_SKIPPED_FIELDS: dict[str, _Check] = {"index": _NAT, "id": _STR, "line": _OPT_INT, "text": _STR,
                                      "next_word": _OPT_STR, "reason": _STR}
_SHARE_FIELDS = ("share_attn", "share_mlp", "share_residual", *(f"share_layers_{g}" for g in range(4)))


def _check_record(rec: Any, schema: _Schema, bad: _Bad) -> dict[str, Any]:
    """Validate one parsed shard record (schema, then checksum); return it."""
    if not isinstance(rec, dict):
        raise bad(f"the line is not a JSON object (it is {_show(rec)})")
    bad.check(rec, {"status": (lambda v: v in ("ok", "skipped"), "'ok' or 'skipped'")})
    bad.check(rec, _OK_FIELDS if rec["status"] == "ok" else _SKIPPED_FIELDS)
    if rec["status"] == "skipped" and "memory_needed" in rec:  # a memory skip (retried once it fits)
        bad.check(rec, {"memory_needed": _NAT})
    if schema.n_passages is not None and rec["index"] >= schema.n_passages:
        raise bad(f"field 'index' is {rec['index']}, but the run's data has {schema.n_passages} passages")
    if rec["status"] == "ok":
        bad.check(rec, {k: _NUM for k in rec if k.startswith("recovery_")})
        bad.check(rec, {"sizes": _list_of(_NUM)})
        K = len(rec["sizes"])
        if schema.n_strata is not None and K != schema.n_strata:
            raise bad(f"field 'sizes' has {K} strata, but the run's sizes make {schema.n_strata}")
        curves: dict[str, _Check] = {"counts": _list_of(_NAT), "top_ids": _list_of(_NAT),
                                     "top_tokens": _list_of(_STR), "top_probs": _list_of(_NUM)}
        for cond in schema.conditions:
            suffix = "" if cond == "only" else f"_{cond}"
            curves.update({f"{m}{suffix}": _list_of(_BOOL if m == "reaches_input" else _NUM) for m in _METRICS})
        if schema.granularity == "token":
            curves.update({k: _list_of(_NUM) for k in _SHARE_FIELDS})
        bad.check(rec, curves)
        for name in curves:
            if len(rec[name]) != K:
                raise bad(f"field {name!r} has {len(rec[name])} values, but the record has {K} strata")
    bad.checksum(rec, required=schema.checksums)
    return rec


def _check_unigram(obj: Any, path: Path) -> dict[int, int]:
    """Validate a parsed unigram.json; return its counts."""
    bad = _Bad(str(path), _FIX_UNIGRAM)
    if not isinstance(obj, dict):
        raise bad(f"the file is not a JSON object (it is {_show(obj)})")
    counts_ok = (lambda v: isinstance(v, dict) and all(isinstance(k, str) and k.isdigit() and _NAT[0](c)
                                                        for k, c in v.items()),
                 "an object of {token id: non-negative integer count}")
    bad.check(obj, {"total": _NAT, "counts": counts_ok})
    if obj["total"] != sum(obj["counts"].values()):
        raise bad(f"field 'total' is {obj['total']}, but the counts sum to {sum(obj['counts'].values())}")
    bad.checksum(obj, required=False)
    return {int(k): int(v) for k, v in obj["counts"].items()}


def _read_unigram(path: Path) -> dict[int, int]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({e}). {_FIX_UNIGRAM}") from e
    return _check_unigram(obj, path)


def _read_issues(path: Path) -> list[dict[str, Any]]:
    """The validated lines of data_issues.jsonl (line, id, reason)."""
    out = []
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        bad = _Bad(f"{path} line {n}", _FIX_ISSUES)
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the line is not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise bad(f"the line is not a JSON object (it is {_show(obj)})")
        bad.check(obj, {"line": _OPT_INT, "id": _OPT_STR, "reason": _STR})
        bad.checksum(obj, required=False)
        out.append({k: obj[k] for k in ("line", "id", "reason")})
    return out


def _merge(shards: list[tuple[Path, list[tuple[int, dict[str, Any]]]]]) -> dict[str, dict[str, Any]]:
    """The records of all shards by passage id; a passage (index or id) recorded twice is an error,
    except a memory skip (:func:`_is_memory_skip`) of the same passage (same index and id): any
    other record of it supersedes the skip (a resume retried the passage and it fit), whatever the
    order; of several memory skips the last one read counts."""
    by_index: dict[int, tuple[Path, int, str]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    where_id: dict[str, tuple[Path, int]] = {}
    for path, recs in shards:
        for n, rec in recs:
            i, pid = rec["index"], rec["id"]
            first = by_index.get(i) or ((*where_id[pid], pid) if pid in where_id else None)
            if first is not None and first[2] == pid and by_id[pid]["index"] == i \
                    and (_is_memory_skip(by_id[pid]) or _is_memory_skip(rec)):
                if _is_memory_skip(rec) and not _is_memory_skip(by_id[pid]):
                    continue  # the passage was retried and recorded; this skip is superseded
                first = None
            if first is not None:
                raise ResultsError(
                    f"{path} line {n}: passage index {i} ({pid}) is also recorded in {first[0]} line {first[1]} "
                    f"(passage {first[2]}); each passage is recorded once, so the directory was edited or two runs "
                    "wrote into it. Delete one of the two lines (or use another output directory).")
            by_index[i] = (path, n, pid)
            where_id[pid] = (path, n)
            by_id[pid] = rec
    return by_id


# ============================================================================ shards
def _read_shard(path: Path, *, repair: bool,
                schema: _Schema | None = None) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
    """The complete records of a shard, as ``(line number, record)``, each validated against
    ``schema`` (:func:`_check_record`).

    A torn last line (no newline, or not JSON: what a kill during the write leaves) is ignored, and
    cut off the file when ``repair``: that passage is redone. A line before the last that is not
    JSON, and any line that is JSON but not a valid record, is corruption: a ResultsError naming
    the file, the line and the field."""
    schema = schema or _Schema()
    if path.exists() and not path.is_file():
        raise ResultsError(f"{path} is not a regular file (a directory or a special file has a shard's name); "
                           "remove it or move it out of the run directory.")
    data = path.read_bytes() if path.exists() else b""
    if not data:
        return [], None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    recs: list[tuple[int, dict[str, Any]]] = []
    keep = 0
    note = None
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(lines) - 1 and not tail:
                note = f"{path.name}: the last record (line {i + 1}) is corrupt; it is redone"
                break
            raise ResultsError(f"{path} line {i + 1} is corrupt (not a complete record) and is not the last line; "
                               "delete that line to have its passage redone.") from None
        recs.append((i + 1, _check_record(obj, schema, _Bad(f"{path} line {i + 1}", _FIX_SHARD))))
        keep += len(line) + 1
    if tail:
        note = f"{path.name}: the last record was torn ({len(tail)} bytes without a newline); it is redone"
    if note and repair:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return recs, note


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the OS even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise ResultsError(f"Another process is writing {path.with_suffix('.jsonl').name} of this run "
                               f"(lock {path} is held); wait for it or stop it first.") from e
        yield
    finally:
        os.close(fd)


def _append(f: Any, rec: dict[str, Any]) -> None:
    """Append ``rec`` with its checksum as one line: one unbuffered write (repeated only if the OS
    writes part of it), then ``fsync``. A failure (full disk) leaves at most a torn last line,
    which the next start cuts off and redoes."""
    data = memoryview((json.dumps(_sealed(rec), ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8"))
    while data:
        n = f.write(data)
        data = data[n:] if n is not None else data[len(data):]
    f.flush()
    os.fsync(f.fileno())


# ============================================================================ the run: checks before work
def _check_out_dir(out: Path) -> None:
    """Refuse a run directory that cannot be used, before any work: a file, a path under a file, or
    a directory this process cannot write (checked by creating a file, since ``os.access`` says
    yes to root even on a read-only directory)."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"The run directory {str(out)!r} is not a directory (it is a file); give --out a "
                              "directory path (created if needed).")
    anc = out
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputPathError(f"Cannot create the run directory {str(out)!r}: {str(anc)!r} is not a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tl-strace-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"Cannot write the run directory {str(out)!r}: {str(anc)!r} is not writable "
                              f"({e.strerror or e}); give --out a writable directory.") from e


def _message(e: BaseException) -> str:
    """One line for an error: our messages as they are, an OSError as ``path: reason``."""
    if isinstance(e, OSError) and not isinstance(e, StraceError):
        return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    return str(e)


def _sync(dist: "_Dist", exc: BaseException | None) -> None:
    """End a step that one rank alone may fail: all ranks agree (:meth:`_Dist.agree`); a rank that
    failed raises its own error, the others a ResultsError with its message, so every rank exits
    with the same one line instead of waiting for a rank that has gone."""
    msg = dist.agree(_message(exc) if exc is not None else None)
    if exc is not None:
        raise exc
    if msg is not None:
        raise ResultsError(msg)


_RETRY = "rerun with a larger memory_budget (or on a machine with more memory) to retry it"


class _MemorySkip(InputError):
    """A passage that does not fit in memory now; ``needed`` is the bytes one call on it needs
    (stored in its skip record as ``memory_needed``, so a resume retries it once it fits)."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = int(needed)


def _is_memory_skip(rec: dict[str, Any]) -> bool:
    """A skip record of a passage that did not fit in memory (it may be superseded by a later record)."""
    return rec.get("status") == "skipped" and "memory_needed" in rec


class _MemoryCheck:
    """Before each passage is traced: can one call fit in memory?

    With a ``memory_budget``, the call must fit it (:func:`tl_strace.memory.rows_for_budget`).
    Without one, the smallest call (its fixed part and one masked row,
    :func:`tl_strace.memory.estimate_memory`) must fit the memory available on this machine
    (:func:`tl_strace.memory.available_memory`); when the default batching of the masked forwards
    would not, the call gets the available memory as its budget (fewer rows per forward). A passage
    that cannot fit raises InputError, which the runner records as skipped with that reason, so a
    run (and every resume) goes on instead of running out of memory on it. Host memory is checked
    (where the edge space lives, whatever the model's device).
    """

    def __init__(self, model: Any, *, granularity: str, random: bool, prepend_bos: bool | None,
                 memory_budget: int | None, batch_size: int | None) -> None:
        self.model, self.spec, self.dtype = model, describe_model(model), model_dtype(model)
        self.est_kw = {"edge_space": granularity == "token", "random": random}
        self.prepend_bos, self.memory_budget, self.batch_size = prepend_bos, memory_budget, batch_size

    def limit(self) -> int | None:
        """The memory a call may use now: the ``memory_budget``, else what is available (None: unknown)."""
        return self.memory_budget if self.memory_budget is not None else _memory.available_memory()

    def __call__(self, text: str, kw: dict[str, Any]) -> dict[str, Any]:
        """The tracer's keyword arguments for ``text`` (``kw``, or with a memory budget added).

        Raises :class:`_MemorySkip` (with the bytes the passage needs) when it cannot fit."""
        T = int(prepare_tokens(self.model, self.spec, text, prepend_bos=self.prepend_bos).numel())
        need = _memory.estimate_memory(self.spec, T, 1, dtype=self.dtype, **self.est_kw)
        if self.memory_budget is not None:
            if self.batch_size is not None:  # batch_size rows per forward must fit the budget too
                need = _memory.estimate_memory(self.spec, T, int(self.batch_size), dtype=self.dtype, **self.est_kw)
            if need.total > self.memory_budget:
                raise _MemorySkip(
                    f"This passage ({T} tokens) needs at least {need.total / 2**20:,.0f} MiB for one call on "
                    f"{self.spec.name} ({need.describe()}), over memory_budget={self.memory_budget / 2**20:,.0f} "
                    f"MiB; {_RETRY}.", need.total)
            _memory.rows_for_budget(self.spec, T, self.dtype, memory_budget=self.memory_budget,
                                    batch_size=self.batch_size, n_rows=1, **self.est_kw)
            return kw
        avail = _memory.available_memory()
        if avail is None:
            return kw
        if need.total > avail:
            raise _MemorySkip(
                f"This passage ({T} tokens) needs at least {need.total / 2**20:,.0f} MiB for one call on "
                f"{self.spec.name} ({need.describe()}), but only {avail / 2**20:,.0f} MiB are available on this "
                f"machine; {_RETRY} (or free memory, or shorten the passage).", need.total)
        rows = int(self.batch_size) if self.batch_size else _memory.DEFAULT_ROWS_BUDGET // max(need.per_row, 1)
        if need.fixed + rows * need.per_row > avail:
            return {**kw, "memory_budget": int(avail)}
        return kw


# ============================================================================ the run
@dataclass(frozen=True)
class RunSummary:
    """What one invocation of :func:`run_corpus` did (on this rank)."""

    out: Path
    rank: int
    world_size: int
    n_passages: int
    """Passages in the run (after ``limit``), over all ranks."""
    n_done_before: int
    """Passages of this rank already recorded when it started."""
    n_new: int
    """Passages this invocation recorded (traced or skipped)."""
    n_skipped: int
    """Passages of this rank skipped with a reason (see ``issues``), before and now."""
    issues: tuple[DataIssue, ...]
    """Every unusable line of the data, and every passage skipped by this rank."""
    repaired: tuple[str, ...] = ()
    """Torn records found at start (and redone)."""
    seconds: float = 0.0

    def report(self) -> str:
        lines = [f"{self.out}: rank {self.rank}/{self.world_size}: {self.n_new} passage(s) recorded now, "
                 f"{self.n_done_before} before, of {self.n_passages} in the run; {len(self.issues)} skipped "
                 f"({self.seconds:.1f} s)."]
        lines += [f"  {r}" for r in self.repaired]
        lines += [f"  skipped {i}" for i in self.issues[:50]]
        if len(self.issues) > 50:
            lines.append(f"  ... and {len(self.issues) - 50} more (see {ISSUES_FILE} and the shards)")
        return "\n".join(lines)


def run_corpus(
    model: str | Any,
    data: str | os.PathLike[str] | PassageSet,
    out: str | os.PathLike[str],
    *,
    granularity: str = "token",
    ablation: str = "zero",
    conditions: Iterable[str] = ("only",),
    limit: int | None = None,
    sizes: Iterable[float] | None = None,
    method: str = "strace",
    taus: Iterable[float] | None = None,
    weights: str = "l1",
    seed: int = 0,
    top_k: int = 5,
    ablate_attention: bool = True,
    record_sizes: Iterable[float] | None = DEFAULT_RECORD_SIZES,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Trace every passage of ``data`` with ``model`` and record the results in ``out``, resumably.

    Args:
        model: a loaded TransformerLens model, or a name/directory for :func:`tl_strace.load_model`
            (loaded on ``cuda:<LOCAL_RANK>`` when CUDA is available).
        data: a shipped set (``"austen-40"``), a .jsonl/.tsv/.txt file, ``"wikitext"``, or a
            :class:`~tl_strace.io.datasets.PassageSet`.
        out: the run directory (created if needed). Rerun the same call to resume.
        granularity: ``"token"`` (paper default) or ``"component"`` (needs ``tl_strace.components``).
        ablation: ``"zero"`` (paper default) or ``"mean"`` (needs ``tl_strace.components``).
        conditions: evaluation conditions passed to :func:`tl_strace.strace` (``"only"`` always).
        limit: trace only the first ``limit`` passages (may change between invocations).
        sizes, method, taus, weights, seed, top_k, prepend_bos, batch_size, memory_budget: as in
            :func:`tl_strace.strace`.
        ablate_attention: False evaluates every subgraph with all attention edges kept (what a
            pipeline whose attention mask silently fails computes), for comparison.
        record_sizes: sizes at which each trace's heads and MLPs are recorded.
        progress: show a tqdm bar (passages/s, ETA) on rank 0.

    Returns:
        A :class:`RunSummary` of this invocation; read the results with :func:`load_run`.

    Raises:
        ResultsError: ``out`` holds a run with another configuration, or a shard is corrupt
            before its last line, or another process is writing the same shard.
        InputError: invalid options.
    """
    t0 = time.perf_counter()

    # ------------------------------------------------------------------ the arguments, before any work
    if isinstance(model, (str, os.PathLike)):
        if os.fspath(model) == "":
            raise InputError("model is empty; give a model name (e.g. 'smollm2-135m'), a directory, or a loaded model.")
    elif not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a TransformerLens model (TransformerBridge or HookedTransformer) or a model "
                         f"name or directory such as 'smollm2-135m'; got {options.describe(model)}.")
    if isinstance(data, (str, os.PathLike)):
        if os.fspath(data) == "":
            raise InputError("data is empty; give a shipped set (e.g. 'austen-40'), a .jsonl/.tsv/.txt file or "
                             "'wikitext'.")
    elif not isinstance(data, PassageSet):
        raise InputError(f"data must be a shipped set name (e.g. 'austen-40'), a file path, 'wikitext' or a PassageSet; "
                         f"got {options.describe(data)}.")
    if not isinstance(out, (str, os.PathLike)):
        raise InputError(f"out must be the run directory's path (str or os.PathLike); got {options.describe(out)}.")
    if os.fspath(out) == "":
        raise InputError("out is empty (it would be the current directory); give the run directory's path, "
                         "e.g. 'runs/smol'.")

    # ------------------------------------------------------------------ options, before anything runs
    # The rules of tl_strace.strace / component_strace (tl_strace.options), so that an option every
    # passage would refuse is refused here, once, and not recorded as thousands of skipped passages.
    granularity = options.check_choice("granularity", granularity, GRANULARITIES)
    ablation = options.check_choice("ablation", ablation, ABLATIONS)
    # One options object checks them all, by the rules strace applies ("only" first, then the other
    # conditions in the given order, as run.json has stored them since 0.1).
    o = options.TraceOptions(sizes=sizes, method=method, taus=taus, weights=weights, conditions=conditions,
                             seed=seed, top_k=top_k, batch_size=batch_size, memory_budget=memory_budget,
                             prepend_bos=prepend_bos, ablate_attention=ablate_attention)
    conds, method, weights, seed, top_k, taus = o.conditions, o.method, o.weights, o.seed, o.top_k, o.taus
    batch_size, memory_budget, ablate_attention, prepend_bos = o.batch_size, o.memory_budget, o.ablate_attention, o.prepend_bos
    sizes_l = None if o.sizes is None else list(o.sizes)
    limit = options.check_int("limit", limit, minimum=0, optional=True)
    progress = options.check_bool("progress", progress)
    rec_sizes = [] if record_sizes is None else list(options.check_fractions("record_sizes", record_sizes,
                                                                             example="[1e-3, 0.01, 0.1, 0.4]"))
    if method == "strace" and sizes_l is None and granularity == "token":
        sizes_l = [float(s) for s in DEFAULT_SIZES]
    opts: dict[str, Any] = {"sizes": sizes_l if method == "strace" else None, "method": method, "weights": weights,
                            "conditions": conds, "seed": seed, "top_k": top_k, "prepend_bos": prepend_bos,
                            "batch_size": batch_size, "memory_budget": memory_budget}
    if taus is not None:
        opts["taus"] = list(taus)
    tracer, trace_kw = _make_tracer(granularity, ablation, ablate_attention, opts)

    passages_all = load_passages(data)
    if not len(passages_all.passages):
        raise InputError(f"The data {passages_all.source!r} holds no passages; give a file with at least one "
                         "passage (TSV, JSONL or text) or a shipped set such as 'austen-40'.")
    passages = passages_all.with_limit(limit)
    out = Path(out)
    config: dict[str, Any] = {
        "data": {"source": passages_all.source, "fingerprint": passages_all.fingerprint},
        "granularity": granularity, "ablation": ablation, "ablate_attention": bool(ablate_attention),
        "method": method, "weights": weights, "sizes": sizes_l, "taus": opts.get("taus"),
        "conditions": list(conds), "seed": int(seed), "top_k": int(top_k), "prepend_bos": prepend_bos,
        "record_sizes": rec_sizes, "record_version": RECORD_VERSION,
    }
    if ablation == "mean":
        config["mean_reference"] = f"the first {MEAN_REFERENCE} passages of the data that fit the model's context"

    _check_out_dir(out)  # before the model is loaded: a file, a read-only or missing parent
    dist = _Dist.from_env()
    try:
        # -------------------------------------------------------------- config check, before loading the model
        exc: BaseException | None = None
        stored = None
        cfg_path = out / CONFIG_FILE
        try:
            out.mkdir(parents=True, exist_ok=True)
            if cfg_path.exists():
                stored = _read_meta(cfg_path)
                old = {k: v for k, v in stored["config"].items() if k != "model"}
                diff = _diff(config, old)
                if diff:
                    raise ResultsError(f"{out} holds a run with another configuration ({'; '.join(diff)}). "
                                       "Use another output directory, or rerun with the stored configuration.")
            elif any(out.glob(SHARD_GLOB)):
                raise ResultsError(f"{out} has result shards but no {CONFIG_FILE}; it was not written by this "
                                   "runner or was damaged. Use another output directory.")
        except (StraceError, OSError) as e:
            exc = e
        if dist.world > 1 and exc is None:  # every rank must run the same configuration
            box: list[Any] = [None] * dist.world
            import torch.distributed as tdist

            tdist.all_gather_object(box, json.dumps(config, sort_keys=True, default=str))
            if any(b != box[0] for b in box):
                exc = ResultsError(f"the {dist.world} ranks were started with different configurations (rank 0: "
                                   f"{box[0]}); start every rank with the same arguments.")
        _sync(dist, exc)

        # -------------------------------------------------------------- model
        model_name = None if not isinstance(model, (str, os.PathLike)) else os.fspath(model)
        try:
            if model_name is not None:
                device = None
                if torch.cuda.is_available():
                    device = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
                model = load_model(model_name, device=device)
            config["model"] = _model_identity(model, model_name)
            if dist.rank == 0:
                if stored is not None:
                    diff = _model_diff(model, config["model"], stored["config"]["model"])
                    if diff:
                        raise ResultsError(f"{out} holds a run of another model ({'; '.join(diff)}). "
                                           "Use another output directory.")
                else:
                    _atomic_write(cfg_path, json.dumps(_sealed({
                        "config": config, "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "tool": "tl_strace.corpus", "n_passages": len(passages_all), "checksums": "sha256"}),
                        indent=1) + "\n")
                _atomic_write(out / ISSUES_FILE, "".join(json.dumps(_sealed(i.to_json())) + "\n"
                                                         for i in passages_all.issues))
                if not (out / UNIGRAM_FILE).exists():
                    _write_unigram(model, passages_all, out / UNIGRAM_FILE)
                else:
                    _read_unigram(out / UNIGRAM_FILE)
        except (StraceError, OSError) as e:
            exc = e
        _sync(dist, exc)
        if stored is not None and stored.get("versions", {}).get("tl_strace") != __version__ and dist.rank == 0:
            warnings.warn(f"{out} was started with tl_strace {stored.get('versions', {}).get('tl_strace')}; "
                          f"resuming with {__version__}.", stacklevel=2)
        if ablation == "mean":
            trace_kw["means"] = _means(model, passages_all, out / "means.safetensors", dist)
        if dist.rank == 0 and passages_all.issues and progress:
            logger.warning("%s", passages_all.report())
        schema = _Schema.of(stored if stored is not None else {"config": config, "n_passages": len(passages_all),
                                                               "checksums": "sha256"})

        # -------------------------------------------------------------- resume
        shard = out / _shard_name(dist.rank)
        with contextlib.ExitStack() as stack:
            repaired: tuple[str, ...] = ()
            try:
                stack.enter_context(_locked(out / f"{shard.stem}.lock"))
                _, note = _read_shard(shard, repair=True, schema=schema)
                repaired = (note,) if note else ()
                if note and progress:
                    logger.warning("tl-strace: %s", note)
            except (StraceError, OSError) as e:
                exc = e
            _sync(dist, exc)  # every rank has repaired its own shard (or all stop)
            try:
                done = _merge([(path, _read_shard(path, repair=False, schema=schema)[0])
                               for path in sorted(out.glob(SHARD_GLOB))])
                for pid, rec in done.items():
                    i = rec["index"]
                    if i < len(passages_all) and passages_all[i].id != pid:
                        raise ResultsError(f"{out}: the record of passage {pid} has index {i}, but passage {i} of "
                                           f"the data is {passages_all[i].id}; the directory was edited. "
                                           f"{_FIX_SHARD}")
            except (StraceError, OSError) as e:
                exc = e
            _sync(dist, exc)
            mine = [(i, p) for i, p in enumerate(passages) if i % dist.world == dist.rank]
            fits = _MemoryCheck(model, granularity=granularity, random="random" in conds, prepend_bos=prepend_bos,
                                memory_budget=trace_kw.get("memory_budget"), batch_size=trace_kw.get("batch_size"))
            # A passage skipped for memory is retried when the bytes it needed now fit (a larger
            # memory_budget, more memory available); its new record supersedes the skip (_merge).
            mem_skips = [p.id for _, p in mine if p.id in done and _is_memory_skip(done[p.id])]
            limit_now = fits.limit() if mem_skips else None
            retried = {pid for pid in mem_skips if limit_now is None or done[pid]["memory_needed"] <= limit_now}
            todo = [(i, p) for i, p in mine if p.id not in done or p.id in retried]
            skipped = [DataIssue(done[p.id].get("line"), done[p.id].get("reason", ""), p.id)
                       for _, p in mine if p.id in done and done[p.id].get("status") == "skipped"
                       and p.id not in retried]
            n_before = len(mine) - len(todo)
            n_written = 0

            # ---------------------------------------------------------- trace
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=n_before, unit="passage", desc=f"s-Trace {out.name}",
                       disable=not progress or dist.rank != 0, dynamic_ncols=True, smoothing=0.1)
            try:
                with open(shard, "ab", buffering=0) as f, bar:
                    for i, p in todo:
                        t1 = time.perf_counter()
                        try:
                            kw = fits(p.text, trace_kw)  # before any work: can the call fit in memory?
                            res = tracer(model, p.text, target=p.target, **kw)
                            rec = _record(res, p, i, rec_sizes, time.perf_counter() - t1)
                        except (InputError, DecompositionError) as e:  # this passage cannot be traced: say so
                            issue = DataIssue(p.line, str(e), p.id)
                            skipped.append(issue)
                            if progress:
                                bar.write(f"tl-strace: skipped {issue}")
                            if isinstance(e, _MemorySkip) and p.id in retried:
                                bar.update(1)  # still does not fit: its skip record stands (no second one)
                                continue
                            rec = {"status": "skipped", "index": i, "id": p.id, "line": p.line, "text": p.text,
                                   "next_word": p.next_word, "reason": str(e)}
                            if isinstance(e, _MemorySkip):
                                rec["memory_needed"] = e.needed
                        try:
                            _append(f, rec)
                        except OSError as e:
                            raise OutputPathError(
                                f"Writing the record of passage {p.id} to {shard} failed: {e.strerror or e}. The "
                                "records written so far are kept: fix that (e.g. free disk space), then rerun the "
                                "same command to resume.") from e
                        n_written += 1
                        bar.update(1)
                        if rec["status"] == "ok":
                            bar.set_postfix(density=f"{rec['density']:.3f}", refresh=False)
            except (StraceError, OSError) as e:
                exc = e
        _sync(dist, exc)  # the last barrier: every rank has finished (or one failed: all say so)
        return RunSummary(out=out, rank=dist.rank, world_size=dist.world, n_passages=len(passages),
                          n_done_before=n_before, n_new=n_written, n_skipped=len(skipped),
                          issues=tuple(passages_all.issues) + tuple(skipped), repaired=repaired,
                          seconds=time.perf_counter() - t0)
    finally:
        dist.close()


def _write_unigram(model: Any, passages: PassageSet, path: Path) -> None:
    """Token counts over the whole corpus (text and next word) under the model's tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return
    counts: Counter[int] = Counter()
    texts = [p.text + (" " + p.next_word if p.next_word else "") for p in passages]
    for i in range(0, len(texts), 256):
        for ids in tok(texts[i:i + 256], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    _atomic_write(path, json.dumps(_sealed({"tokenizer": getattr(tok, "name_or_path", ""),
                                            "total": sum(counts.values()),
                                            "counts": {str(k): v for k, v in sorted(counts.items())}})) + "\n")


# ============================================================================ reading a run
@dataclass(frozen=True)
class CorpusRun:
    """A run directory read back: one row per traced passage, in data order.

    ``table`` has the scalar columns (``id``, ``density``, ``full_entropy``, ``recovery_1``, ...) and
    per-stratum list columns (``sizes``, ``tv``, ``nucleus``, ``share_attn``, ``top_ids``, ...);
    ``skipped`` lists the passages and lines that could not be traced, with the reason.
    """

    path: Path
    config: dict[str, Any]
    versions: dict[str, Any]
    table: pd.DataFrame
    skipped: pd.DataFrame
    unigram: dict[int, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A short label: the model name, plus what differs from the paper defaults."""
        m = self.config.get("model", {})
        label = str(m.get("model_name") or m.get("argument") or self.path.name)
        if self.context_words is not None:
            label += f", {self.context_words} words"
        if not self.config.get("ablate_attention", True):
            label += " (attention kept)"
        if self.config.get("ablation") == "mean":
            label += " (mean abl.)"
        if self.config.get("granularity") == "component":
            label += " (components)"
        return label

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
    table = pd.DataFrame(ok).reset_index(drop=True)
    table = table.drop(columns=[c for c in ("status", "sha256") if c in table])
    skipped_df = pd.DataFrame(data_issues + [{k: r.get(k) for k in ("index", "id", "line", "reason")} for r in skipped],
                              columns=["index", "id", "line", "reason"])
    unigram: dict[int, int] = {}
    up = path / UNIGRAM_FILE
    if up.is_file():
        unigram = _read_unigram(up)
    for n in notes:
        warnings.warn(f"{path}: {n}", stacklevel=2)
    return CorpusRun(path=path, config=meta.get("config", {}), versions=meta.get("versions", {}), table=table,
                     skipped=skipped_df, unigram=unigram, notes=tuple(notes))
