"""The corpus runner, :func:`run_corpus`: checks before work, resume, the loop over passages."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_strace import options
from tl_strace._version import __version__
from tl_strace.corpus._base import (
    ABLATIONS,
    CONFIG_FILE,
    DEFAULT_RECORD_SIZES,
    GRANULARITIES,
    ISSUES_FILE,
    MEAN_REFERENCE,
    RECORD_VERSION,
    SHARD_GLOB,
    UNIGRAM_FILE,
    _atomic_write,
    _jsonable,
    _sealed,
    _shard_name,
    _versions,
    logger,
)
from tl_strace.corpus._dist import _Dist, _sync
from tl_strace.corpus._records import (
    _MemoryCheck,
    _diff,
    _make_tracer,
    _means,
    _model_diff,
    _model_identity,
    _record,
    _trace_every_position,
)
from tl_strace.corpus._store import (
    _FIX_SHARD,
    _MemorySkip,
    _Schema,
    _append,
    _is_memory_skip,
    _locked,
    _merge,
    _read_meta,
    _read_shard,
    _read_unigram,
)
from tl_strace.errors import DecompositionError, InputError, ResultsError, StraceError
from tl_strace.fsutil import OutputPathError
from tl_strace.io.datasets import DataIssue, PassageSet, load_passages
from tl_strace.io.models import load_model
from tl_strace.search import DEFAULT_SIZES


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
    attention: str | None = None,
    ablate_attention: bool | None = None,
    record_sizes: Iterable[float] | None = DEFAULT_RECORD_SIZES,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    every_position: bool = False,
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
        attention: ``"faithful"`` (default) or ``"never-ablated"``: every subgraph is evaluated with
            all its attention edges kept, as the authors' published pipeline does (its masks are never
            applied), to reproduce its numbers; the run is labelled so in every table and plot.
        ablate_attention: the older spelling: ``False`` is ``attention="never-ablated"``.
        record_sizes: sizes at which each trace's heads and MLPs are recorded.
        every_position: also trace the prediction after every token of each passage (not just its
            last), from one clean forward per passage (:func:`tl_strace.profile.for_each_position`),
            exactly as :func:`tl_strace.density_profile` does; each record gets a ``profile`` (density,
            recovery sizes, full-model entropy and top token, TV curve per position), read back as
            :attr:`CorpusRun.profile`. The passage's own record (its last position) is unchanged.
            Token granularity only; a run directory is one or the other (it is in its configuration).
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
                             prepend_bos=prepend_bos, attention=attention,
                             ablate_attention=ablate_attention)
    conds, method, weights, seed, top_k, taus = o.conditions, o.method, o.weights, o.seed, o.top_k, o.taus
    batch_size, memory_budget, ablate_attention, prepend_bos = o.batch_size, o.memory_budget, o.ablate_attention, o.prepend_bos
    sizes_l = None if o.sizes is None else list(o.sizes)
    limit = options.check_int("limit", limit, minimum=0, optional=True)
    progress = options.check_bool("progress", progress)
    every_position = options.check_bool("every_position", every_position)
    if every_position and granularity != "token":
        raise InputError("every_position traces each position's edges (token granularity); component "
                         "granularity traces the passage's last position only. Drop --every-position or use "
                         "--granularity token.")
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
    if every_position:  # only when set: directories from before the option compare equal (absent = None)
        config["positions"] = "every"
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
                model = load_model(model_name, device=device, progress=None if progress else False)
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
                            if every_position:
                                res, prof = _trace_every_position(model, p, kw)
                            else:
                                res = tracer(model, p.text, target=p.target, **kw)
                            rec = _record(res, p, i, rec_sizes, time.perf_counter() - t1)
                            if every_position:
                                rec["profile"] = _jsonable(prof)
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
