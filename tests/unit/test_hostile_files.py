"""What a hostile tester found in results, mean caches and their arguments (issue 12).

Each test failed before its fix: a checksum stripped to load an edited file, an intact file with a
large ``top_k`` refused, ``compute_means`` coercing or failing late on bad arguments, schema holes
(NaN KL, negative entropy, probabilities above 1, ids outside the vocabulary, wrongly typed config),
``load(42)``, a FIFO that hung ``load`` forever, an empty token list reported as float32, and a
target word outside the vocabulary silently traced as the unknown token.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tl_strace as ts
from tl_strace.components import component_strace
from tl_strace.errors import InputError, ResultsError
from tl_strace.mean import MeanCache, compute_means
from tl_strace.store import CHECKSUM_KEY, FORMAT_KEY, content_checksum

# The suite runs tl_strace under beartype (pyproject: --jaxtyping-packages), which refuses values of
# the wrong type by their annotations before tl_strace's own checks run. Users run without it, so
# the entry points given wrongly typed values are called unwrapped (as in test_input_validation).
compute_means_raw = inspect.unwrap(compute_means)
component_strace_raw = inspect.unwrap(component_strace)
load_result_raw = functools.partial(inspect.unwrap(ts.TraceResult.load.__func__), ts.TraceResult)
load_means_raw = functools.partial(inspect.unwrap(MeanCache.load.__func__), MeanCache)

TOKENS = torch.tensor([0, 5, 17, 3, 42, 8])
SEQS = [torch.tensor([0, 5, 17, 3]), torch.tensor([0, 9, 23])]
HANG_GUARD_S = 20.0  # a hang guard only: a load of a tiny file takes milliseconds; this is no timing assertion


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def _reseal(path: Path, key: str, edit_meta=None, edit_tensors=None) -> None:
    """Edit the JSON metadata / tensors and recompute the checksum (a deliberate editor)."""
    raw, tensors = _raw(path)
    meta = json.loads(raw[key])
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={**raw, key: json.dumps(meta), CHECKSUM_KEY: content_checksum(tensors, meta)})


@pytest.fixture(scope="module")
def res(gpt2_model):
    return ts.strace(gpt2_model, TOKENS, conditions=("only",), sizes=[0.05, 0.2])


@pytest.fixture(scope="module")
def res_target(gpt2_model):
    return ts.strace(gpt2_model, TOKENS, conditions=("only",), sizes=[0.05, 0.2], target=7)


@pytest.fixture(scope="module")
def means(gpt2_model):
    return compute_means(gpt2_model, SEQS)


# ------------------------------------------------------------------ 1. a stripped checksum
def test_a_removed_checksum_on_a_new_result_is_damage(res, tmp_path):
    p = tmp_path / "r.st"
    res.save(p)
    raw, tensors = _raw(p)
    assert raw[FORMAT_KEY] == "2" and json.loads(raw["tl_strace"])["format_version"] == 4
    meta = json.loads(raw["tl_strace"])
    meta["str_tokens"][1] = "edited"  # a half-edit: the content changed and the checksum dropped
    for metadata in ({"tl_strace": json.dumps(meta)}, {"tl_strace": json.dumps(meta), FORMAT_KEY: "2"}):
        save_file(tensors, str(p), metadata=metadata)
        with pytest.raises(ResultsError, match="checksum was removed"):
            ts.TraceResult.load(p)


def test_a_genuine_format1_result_without_checksum_still_loads(res, tmp_path):
    p = tmp_path / "old.st"
    res.save(p)
    raw, tensors = _raw(p)
    meta = json.loads(raw["tl_strace"])
    meta["format_version"] = 1  # what 0.1.0 wrote: no marker, no checksum
    save_file(tensors, str(p), metadata={"tl_strace": json.dumps(meta)})
    assert ts.TraceResult.load(p).density == res.density


def test_a_removed_checksum_on_a_new_mean_cache_is_damage(means, tmp_path):
    p = tmp_path / "m.st"
    means.save(p)
    raw, tensors = _raw(p)
    save_file(tensors, str(p), metadata={"tl_strace_means": raw["tl_strace_means"]})
    with pytest.raises(ResultsError, match="checksum was removed"):
        MeanCache.load(p)
    meta = json.loads(raw["tl_strace_means"])
    meta["format_version"] = 1
    save_file(tensors, str(p), metadata={"tl_strace_means": json.dumps(meta)})
    assert torch.equal(MeanCache.load(p).means["z"], means.means["z"])


# ------------------------------------------------------------------ 2. top_k above the vocabulary
def test_top_k_above_the_vocabulary_is_stored_as_the_effective_value(gpt2_model, tmp_path):
    V = gpt2_model.cfg.d_vocab
    for i, r in enumerate((ts.strace(gpt2_model, TOKENS, conditions=("only",), sizes=[0.2], top_k=10**6),
                           component_strace(gpt2_model, TOKENS, top_k=10**6))):
        assert r.config["top_k"] == V == r.top_ids.shape[-1]
        r.save(tmp_path / f"{i}.st")
        assert ts.TraceResult.load(tmp_path / f"{i}.st").config["top_k"] == V


# ------------------------------------------------------------------ 3. compute_means arguments
@pytest.mark.parametrize("bs", [0, -1, 2.5, "a", None, True])
def test_compute_means_refuses_a_bad_batch_size(gpt2_model, bs):
    with pytest.raises(InputError, match="batch_size"):
        compute_means_raw(gpt2_model, SEQS, batch_size=bs)


def test_compute_means_checks_roles_and_path_before_any_forward(gpt2_model, tmp_path, monkeypatch):
    import tl_strace.mean.compute as mean_compute  # where compute_means looks up run_hooked

    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran before the arguments were checked")

    monkeypatch.setattr(mean_compute, "run_hooked", no_forward)
    for roles in (None, 5, "z", [1]):
        with pytest.raises(InputError, match="roles"):
            compute_means_raw(gpt2_model, SEQS, roles=roles)
    with pytest.raises(InputError, match="str or os.PathLike"):
        compute_means_raw(gpt2_model, SEQS, path=42)
    with pytest.raises(InputError, match="is a directory"):
        compute_means(gpt2_model, SEQS, path=tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        compute_means(gpt2_model, SEQS, path=tmp_path / "missing" / "m.st")
    with pytest.raises(InputError, match="prepend_bos"):
        compute_means_raw(gpt2_model, SEQS, prepend_bos="no")


# ------------------------------------------------------------------ 4. schema holes (resealed edits)
def _fill(name, value, index=(0, 0)):
    def edit(t):
        t[name] = t[name].clone()
        t[name][index] = value
    return edit


HOLES = {
    "kl_nan": (None, _fill("kl_all", float("nan")), "kl_all"),
    "entropy_negative": (None, _fill("entropy_all", -0.5), "entropy_all"),
    "ce_negative": (None, _fill("ce_all", -0.5), "ce_all"),  # with a target (res_target)
    "top_prob_above_1": (None, _fill("top_probs", 1.5, (0, 0, 0)), "top_probs"),
    "top_prob_negative": (None, _fill("top_probs", -0.1, (0, 0, 0)), "top_probs"),
    "top_id_outside_vocab": (None, _fill("top_ids", 10**6, (0, 0, 0)), "top_ids"),
    "full_top_id_negative": (None, _fill("full_top_ids", -3, 0), "full_top_ids"),
    "full_entropy_negative": (lambda m: m.update(full_entropy=-1.0), None, "full_entropy"),
    "seed_not_int": (lambda m: m["config"].update(seed="zero"), None, "config.seed"),
    "seed_float": (lambda m: m["config"].update(seed=1.5), None, "config.seed"),
    "ablate_attention_not_bool": (lambda m: m["config"].update(ablate_attention="no"), None,
                                  "config.ablate_attention"),
    "attention_unknown": (lambda m: m["config"].update(attention="kept"), None, "config.attention"),
    "attention_a_list": (lambda m: m["config"].update(attention=["x"]), None, "config.attention"),
    "attention_disagrees": (lambda m: m["config"].update(attention="never-ablated"), None, "config.attention"),
    "mean_ablation_on_tokens": (lambda m: m["config"].update(ablation="mean"), None, "config.ablation"),
    "ce_without_target": (lambda m: m.update(target=None), None, "ce_all"),
}


@pytest.mark.parametrize("case", sorted(HOLES))
def test_resealed_schema_holes_are_refused(res, res_target, tmp_path, case):
    edit_meta, edit_tensors, field = HOLES[case]
    p = tmp_path / "r.st"
    (res_target if case.startswith("ce_") else res).save(p)
    ts.TraceResult.load(p)  # intact: loads
    _reseal(p, "tl_strace", edit_meta, edit_tensors)
    with pytest.raises(ResultsError) as exc:
        ts.TraceResult.load(p)
    assert field in str(exc.value) and "\n" not in str(exc.value)


def test_component_result_may_be_mean_ablated_but_not_attention_flagged(gpt2_model, means, tmp_path):
    r = component_strace(gpt2_model, TOKENS, ablation="mean", means=means)
    p = tmp_path / "c.st"
    r.save(p)
    assert ts.TraceResult.load(p).config["ablation"] == "mean"
    _reseal(p, "tl_strace", lambda m: m["config"].update(ablation="max"))
    with pytest.raises(ResultsError, match="config.ablation"):
        ts.TraceResult.load(p)


# ------------------------------------------------------------------ 5. a path that is not a path
@pytest.mark.parametrize("bad", [42, None, 1.5, b"r.st"])
def test_load_of_a_non_path_is_one_clear_line(bad):
    for load in (load_result_raw, load_means_raw):
        with pytest.raises(InputError, match=r"str or os\.PathLike") as exc:
            load(bad)
        assert "\n" not in str(exc.value)


def test_means_of_the_wrong_type_is_refused(gpt2_model, res):
    for bad in (42, res, [1.0]):
        with pytest.raises(InputError, match="means must be a MeanCache or the path of a saved one"):
            component_strace_raw(gpt2_model, TOKENS, ablation="mean", means=bad)


# ------------------------------------------------------------------ 6. a FIFO never blocks load
@contextlib.contextmanager
def _fifo(path: Path):
    """A FIFO at ``path`` that cannot block a reader forever: a daemon thread keeps opening it for
    writing (each open waits for a reader, then closes at once, so a reader sees end-of-file instead
    of waiting). Old code that opened the FIFO thus fails instead of hanging the suite (a thread
    join timeout cannot guard it: safetensors blocks in open() without releasing the GIL). At exit
    a non-blocking reader releases the writer and the thread is joined (a guard, not a timing)."""
    os.mkfifo(path)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY))
            except OSError:
                return

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        while t.is_alive():
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            t.join(0.05)
            os.close(fd)
        t.join(HANG_GUARD_S)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("load", [ts.TraceResult.load, MeanCache.load], ids=["result", "means"])
def test_loading_a_fifo_is_refused_without_opening_it(tmp_path, load):
    with _fifo(tmp_path / "pipe.st") as fifo:
        with pytest.raises(ResultsError, match="not a regular file"):
            load(fifo)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_compute_means_refuses_a_fifo_path_without_opening_it(gpt2_model, tmp_path):
    with _fifo(tmp_path / "pipe.st") as fifo:
        with pytest.raises(InputError, match="not a regular file"):
            compute_means(gpt2_model, SEQS, path=fifo)


# ------------------------------------------------------------------ 7. an empty token list
@pytest.mark.parametrize("empty", [[], [[]], torch.tensor([])], ids=["list", "nested", "float_tensor"])
def test_an_empty_token_list_says_it_is_empty(gpt2_model, empty):
    for call in (inspect.unwrap(ts.strace), inspect.unwrap(ts.check_model)):
        with pytest.raises(InputError, match="empty"):
            call(gpt2_model, empty)


# ------------------------------------------------------------------ 8. a target outside the vocabulary
def test_a_target_word_the_tokenizer_does_not_know_is_refused(gpt2_model):
    with pytest.raises(InputError, match="unknown token"):
        ts.strace(gpt2_model, "w2 w3 w4", target=" Paris", conditions=("only",), sizes=[0.5])
    r = ts.strace(gpt2_model, "w2 w3 w4", target="<unk>", conditions=("only",), sizes=[0.5])  # the unk token itself
    assert r.target == gpt2_model.tokenizer.unk_token_id
    assert ts.strace(gpt2_model, "w2 w3 w4", target="w5", conditions=("only",), sizes=[0.5]).target == 5
    assert not math.isnan(r.full_ce)


# ------------------------------------------------------------------ format 4: full_graph_tv
def test_full_graph_tv_is_required_from_format_4_and_nan_before(res, tmp_path):
    """Format 4 added ``full_graph_tv``: a format-3 file without it loads (NaN, it was not kept),
    a format-4 file without it, or with a value that is no probability mass, is damage."""
    p = tmp_path / "r.st"
    res.save(p)
    assert 0.0 <= load_result_raw(p).full_graph_tv <= 1e-5  # the full graph is the model (float32 rounding)

    def drop(version):
        def edit(meta):
            meta.pop("full_graph_tv")
            meta["format_version"] = version
        return edit

    _reseal(p, "tl_strace", edit_meta=drop(3))
    assert math.isnan(load_result_raw(p).full_graph_tv)
    res.save(p)
    _reseal(p, "tl_strace", edit_meta=drop(4))
    with pytest.raises(ResultsError, match="full_graph_tv"):
        load_result_raw(p)
    for bad in (-0.1, 1.5, "0.1"):
        res.save(p)
        _reseal(p, "tl_strace", edit_meta=lambda meta, bad=bad: meta.update(full_graph_tv=bad))
        with pytest.raises(ResultsError, match="full_graph_tv"):
            load_result_raw(p)
