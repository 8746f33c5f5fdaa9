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
import math
import os
import platform
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tl_strace._version import __version__
from tl_strace.ablation import CONDITIONS
from tl_strace.components import component_strace
from tl_strace.errors import DecompositionError, InputError, ResultsError
from tl_strace.io.datasets import DataIssue, Passage, PassageSet, load_passages
from tl_strace.io.models import load_model
from tl_strace.mean import compute_means
from tl_strace.pipeline import strace
from tl_strace.search import DEFAULT_SIZES

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
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    """What identifies a model for resuming: shape, dtype, and a hash of some of its weights."""
    cfg = getattr(model, "cfg", None)
    ident: dict[str, Any] = {"argument": name}
    for k in ("model_name", "n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
        v = getattr(cfg, k, None)
        ident[k] = v if isinstance(v, (int, float, str, type(None))) else str(v)
    params = list(model.parameters())
    ident["dtype"] = str(params[0].dtype) if params else None
    h = hashlib.sha256()
    for p in (params[:1] + params[-1:]) if params else []:
        h.update(p.detach().flatten()[:65536].to("cpu", torch.float32).numpy().tobytes())
    ident["weights_sha256"] = h.hexdigest()[:16]
    return ident


def _check_sizes(sizes: Sequence[float] | None, name: str) -> list[float] | None:
    if sizes is None:
        return None
    out = [float(s) for s in sizes]
    if not out or any(not (0.0 < s <= 1.0) or not math.isfinite(s) for s in out):
        raise InputError(f"{name} must be sizes in (0, 1]; got {list(sizes)}.")
    return out


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
    means = compute_means(model, texts, path=path) if dist.rank == 0 else None
    dist.barrier()
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


# ============================================================================ shards
def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and "id" in obj and "status" in obj else None


def _read_shard(path: Path, *, repair: bool) -> tuple[list[dict[str, Any]], str | None]:
    """The complete records of a shard. A torn last line (no newline, or unparsable) is ignored, and
    cut off the file when ``repair``; a corrupt line before the last is an error."""
    data = path.read_bytes() if path.exists() else b""
    if not data:
        return [], None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    recs: list[dict[str, Any]] = []
    keep = 0
    note = None
    for i, line in enumerate(lines):
        obj = _parse_line(line)
        if obj is None:
            if i == len(lines) - 1 and not tail:
                note = f"{path.name}: the last record (line {i + 1}) is corrupt; it is redone"
                break
            raise ResultsError(f"{path} line {i + 1} is corrupt (not a complete record) and is not the last line; "
                               "delete that line to have its passage redone.")
        recs.append(obj)
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
    f.write((json.dumps(rec, ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


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
    conditions: Sequence[str] = ("only",),
    limit: int | None = None,
    sizes: Sequence[float] | None = None,
    method: str = "strace",
    taus: Sequence[float] | None = None,
    weights: str = "l1",
    seed: int = 0,
    top_k: int = 5,
    ablate_attention: bool = True,
    record_sizes: Sequence[float] = DEFAULT_RECORD_SIZES,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
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

    # ------------------------------------------------------------------ options, before anything runs
    if granularity not in GRANULARITIES:
        raise InputError(f"Unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}.")
    if ablation not in ABLATIONS:
        raise InputError(f"Unknown ablation {ablation!r}; choose one of {list(ABLATIONS)}.")
    conds = tuple(dict.fromkeys(("only", *conditions)))
    if any(c not in CONDITIONS for c in conds):
        raise InputError(f"Conditions must be among {list(CONDITIONS)}; got {list(conditions)}.")
    if method not in ("strace", "threshold", "nucleus"):
        raise InputError(f"Unknown method {method!r}; choose one of ['nucleus', 'strace', 'threshold'].")
    if weights not in ("l1", "ifr"):
        raise InputError(f"Unknown weights {weights!r}; choose one of ['ifr', 'l1'].")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be ≥ 0; got {limit}.")
    sizes_l = _check_sizes(sizes, "sizes")
    if method == "strace" and taus is not None:
        raise InputError("taus apply to method='threshold' or 'nucleus'; s-Trace takes sizes.")
    if method != "strace" and sizes is not None:
        raise InputError(f"method={method!r} builds strata from taus; pass taus=..., not sizes.")
    rec_sizes = _check_sizes(record_sizes, "record_sizes") or []
    if method == "strace" and sizes_l is None and granularity == "token":
        sizes_l = [float(s) for s in DEFAULT_SIZES]
    opts: dict[str, Any] = {"sizes": sizes_l if method == "strace" else None, "method": method, "weights": weights,
                            "conditions": conds, "seed": seed, "top_k": top_k, "prepend_bos": prepend_bos,
                            "batch_size": batch_size, "memory_budget": memory_budget}
    if taus is not None:
        opts["taus"] = [float(t) for t in taus]
    tracer, trace_kw = _make_tracer(granularity, ablation, ablate_attention, opts)

    passages_all = load_passages(data)
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

    dist = _Dist.from_env()
    try:
        # -------------------------------------------------------------- config check, before loading the model
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / CONFIG_FILE
        stored = None
        if cfg_path.exists():
            try:
                stored = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ResultsError(f"{cfg_path} is not valid JSON ({e}); it is not a tl_strace run directory, "
                                   "or it was damaged. Use another --out.") from e
            old = {k: v for k, v in stored.get("config", {}).items() if k != "model"}
            diff = _diff(config, old)
            if diff:
                raise ResultsError(f"{out} holds a run with another configuration ({'; '.join(diff)}). "
                                   "Use another output directory, or rerun with the stored configuration.")
        elif any(out.glob(SHARD_GLOB)):
            raise ResultsError(f"{out} has result shards but no {CONFIG_FILE}; it was not written by this runner "
                               "or was damaged. Use another output directory.")

        # -------------------------------------------------------------- model
        model_name = None if not isinstance(model, (str, os.PathLike)) else os.fspath(model)
        if model_name is not None:
            device = None
            if torch.cuda.is_available():
                device = f"cuda:{dist.local_rank % torch.cuda.device_count()}"
            model = load_model(model_name, device=device)
        config["model"] = _model_identity(model, model_name)
        err = None
        if dist.rank == 0:
            if stored is not None:
                diff = _diff(config["model"], stored["config"].get("model", {}))
                # the name it was loaded under may differ (a hub name, then its local copy); the weights may not
                diff = [d for d in diff if not d.startswith(("argument:", "model_name:"))]
                if diff:
                    err = (f"{out} holds a run of another model ({'; '.join(diff)}). Use another output directory.")
            else:
                _atomic_write(cfg_path, json.dumps({"config": config, "versions": _versions(),
                                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                    "tool": "tl_strace.corpus"}, indent=1) + "\n")
            if err is None:
                _atomic_write(out / ISSUES_FILE, "".join(json.dumps(i.to_json()) + "\n" for i in passages_all.issues))
                if not (out / UNIGRAM_FILE).exists():
                    _write_unigram(model, passages_all, out / UNIGRAM_FILE)
        err = dist.broadcast_error(err)
        if err:
            raise ResultsError(err)
        if stored is not None and stored.get("versions", {}).get("tl_strace") != __version__ and dist.rank == 0:
            warnings.warn(f"{out} was started with tl_strace {stored.get('versions', {}).get('tl_strace')}; "
                          f"resuming with {__version__}.", stacklevel=2)
        if ablation == "mean":
            trace_kw["means"] = _means(model, passages_all, out / "means.safetensors", dist)
        if dist.rank == 0 and passages_all.issues and progress:
            print(passages_all.report(), file=sys.stderr)

        # -------------------------------------------------------------- resume
        shard = out / _shard_name(dist.rank)
        with _locked(out / f"{shard.stem}.lock"):
            _, note = _read_shard(shard, repair=True)
            repaired = (note,) if note else ()
            if note and progress:
                print(f"tl-strace: {note}", file=sys.stderr)
            dist.barrier()  # every rank has repaired its own shard
            done: dict[str, dict[str, Any]] = {}
            for path in sorted(out.glob(SHARD_GLOB)):
                for rec in _read_shard(path, repair=False)[0]:
                    done.setdefault(rec["id"], rec)
            mine = [(i, p) for i, p in enumerate(passages) if i % dist.world == dist.rank]
            todo = [(i, p) for i, p in mine if p.id not in done]
            skipped = [DataIssue(done[p.id].get("line"), done[p.id].get("reason", ""), p.id)
                       for _, p in mine if p.id in done and done[p.id].get("status") == "skipped"]
            n_before = len(mine) - len(todo)

            # ---------------------------------------------------------- trace
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), initial=n_before, unit="passage", desc=f"s-Trace {out.name}",
                       disable=not progress or dist.rank != 0, dynamic_ncols=True, smoothing=0.1)
            with open(shard, "ab") as f, bar:
                for i, p in todo:
                    t1 = time.perf_counter()
                    try:
                        res = tracer(model, p.text, target=p.target, **trace_kw)
                        rec = _record(res, p, i, rec_sizes, time.perf_counter() - t1)
                    except (InputError, DecompositionError) as e:  # this passage cannot be traced: say so, go on
                        issue = DataIssue(p.line, str(e), p.id)
                        skipped.append(issue)
                        rec = {"status": "skipped", "index": i, "id": p.id, "line": p.line, "text": p.text,
                               "next_word": p.next_word, "reason": str(e)}
                        if progress:
                            bar.write(f"tl-strace: skipped {issue}")
                    _append(f, rec)
                    bar.update(1)
                    if rec["status"] == "ok":
                        bar.set_postfix(density=f"{rec['density']:.3f}", refresh=False)
        dist.barrier()
        return RunSummary(out=out, rank=dist.rank, world_size=dist.world, n_passages=len(passages),
                          n_done_before=n_before, n_new=len(todo), n_skipped=len(skipped),
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
    _atomic_write(path, json.dumps({"tokenizer": getattr(tok, "name_or_path", ""), "total": sum(counts.values()),
                                    "counts": {str(k): v for k, v in sorted(counts.items())}}) + "\n")


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

    Torn last lines (a run still going, or killed) are left out and noted in ``notes``; a passage
    recorded twice (only possible if the directory was edited by hand) keeps its first record.
    """
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise ResultsError(f"{path} is not a corpus run directory (no {CONFIG_FILE}).")
    meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    recs: list[dict[str, Any]] = []
    notes: list[str] = []
    for shard in sorted(path.glob(SHARD_GLOB)):
        r, note = _read_shard(shard, repair=False)
        recs += r
        if note:
            notes.append(note)
    seen: set[str] = set()
    ok, skipped = [], []
    for r in sorted(recs, key=lambda r: r.get("index", 0)):
        if r["id"] in seen:
            notes.append(f"passage {r['id']} recorded twice; the first record is used")
            continue
        seen.add(r["id"])
        (ok if r["status"] == "ok" else skipped).append(r)
    issues_path = path / ISSUES_FILE
    data_issues = []
    if issues_path.is_file():
        for line in issues_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                data_issues.append({**json.loads(line), "index": None})
    table = pd.DataFrame(ok).reset_index(drop=True)
    if "status" in table:
        table = table.drop(columns=["status"])
    skipped_df = pd.DataFrame(data_issues + [{k: r.get(k) for k in ("index", "id", "line", "reason")} for r in skipped],
                              columns=["index", "id", "line", "reason"])
    unigram: dict[int, int] = {}
    up = path / UNIGRAM_FILE
    if up.is_file():
        unigram = {int(k): int(v) for k, v in json.loads(up.read_text(encoding="utf-8"))["counts"].items()}
    for n in notes:
        warnings.warn(f"{path}: {n}", stacklevel=2)
    return CorpusRun(path=path, config=meta.get("config", {}), versions=meta.get("versions", {}), table=table,
                     skipped=skipped_df, unigram=unigram, notes=tuple(notes))
