"""Saved results and mean caches are checked when read back (issue 12, defects 2 and 3).

A damaged or edited file must never load as a plausible result: a flipped byte fails the SHA-256
checksum stored in the file, and an edited field fails the schema check even when the checksum was
recomputed to match (a deliberate edit). A mean cache is tied to the weights it was computed on, so
another checkpoint of the same architecture never reuses it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tl_strace as ts
from tl_strace.errors import InputError, ResultsError
from tl_strace.mean import MeanCache, compute_means
from tl_strace.model import describe_model, weights_fingerprint
from tl_strace.store import CHECKSUM_KEY, content_checksum

TOKENS = torch.tensor([0, 5, 17, 3, 42, 8])
SEQS = [torch.tensor([0, 5, 17, 3, 42, 8]), torch.tensor([0, 9, 23]), torch.tensor([0, 61, 4, 4, 7, 2])]


# ------------------------------------------------------------------------------------------ helpers
def _read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path: Path, key: str, edit_meta=None, edit_tensors=None, *, recompute: bool) -> Path:
    """Rewrite ``path`` with its JSON metadata and/or tensors edited. ``recompute``: the checksum is
    recomputed over the edited content (what a deliberate editor would do); else left stale."""
    raw, tensors = _read_raw(path)
    meta = json.loads(raw[key])
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    out = {key: json.dumps(meta)}
    out[CHECKSUM_KEY] = content_checksum(tensors, meta) if recompute else raw[CHECKSUM_KEY]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=out)
    return path


def _flip_data_byte(path: Path, tensor: str) -> None:
    """Flip one byte inside ``tensor``'s data (the file stays a readable safetensors file)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    start, end = header[tensor]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ results
@pytest.fixture(scope="module")
def res(gpt2_model):
    return ts.strace(gpt2_model, TOKENS, conditions=("only", "inverse"), sizes=[0.05, 0.2])


@pytest.fixture()
def saved(res, tmp_path) -> Path:
    path = tmp_path / "r.safetensors"
    res.save(path)
    return path


def test_untouched_result_round_trips_exactly(res, saved):
    raw, _ = _read_raw(saved)
    assert len(raw[CHECKSUM_KEY]) == 64
    back = ts.TraceResult.load(saved)
    assert back.density == res.density and back.conditions == res.conditions
    for s in (0.05, 0.2, 1.0):
        a, b = res.subgraph(s), back.subgraph(s)
        assert torch.equal(a.edge_id, b.edge_id) and torch.equal(a.weight, b.weight)
    for name in ("tv_all", "labels", "rank", "weights", "tokens"):
        assert torch.equal(getattr(res, name), getattr(back, name)), name


@pytest.mark.parametrize("tensor", ["tv_all", "weights", "labels", "rank", "tokens", "sizes"])
def test_flipped_byte_in_tensor_data_is_refused(saved, tensor):
    _flip_data_byte(saved, tensor)
    with pytest.raises(ResultsError, match="modified or damaged"):
        ts.TraceResult.load(saved)


def _set(key, value):
    def edit(meta):
        meta[key] = value(meta[key]) if callable(value) else value
    return edit


META_EDITS = {
    "n_edges": (_set("n_edges", lambda n: n + 1), None, "n_edges"),
    "labels_shorter": (None, lambda t: t.update(labels=t["labels"][:-3]), "labels"),
    "fewer_conditions": (_set("conditions", ["only"]), None, "conditions"),
    "str_tokens_shorter": (_set("str_tokens", lambda s: s[:-1]), None, "str_tokens"),
    "method_unknown": (lambda m: m["config"].update(method="bogus"), None, "method"),
    "method_other": (lambda m: m["config"].update(method="threshold"), None, "method"),
    "target_type": (_set("target", "seven"), None, "target"),
    "timings_type": (_set("timings", [1, 2]), None, "timings"),
    "top_strs_shorter": (_set("top_strs", lambda t: [c[:-1] for c in t]), None, "top_strs"),
    "counts_edit": (None, lambda t: t.update(counts=t["counts"] + 1), "counts"),
    "sizes_order": (None, lambda t: t.update(sizes=t["sizes"].flip(0)), "sizes"),
    "labels_dtype": (None, lambda t: t.update(labels=t["labels"].float()), "labels"),
    "labels_moved": (None, lambda t: t["labels"].__setitem__(int(torch.nonzero(t["labels"] == 0)[0]), 1), "labels"),
    "rank_duplicate": (None, lambda t: t["rank"].__setitem__(t["rank"] == 1, 0), "rank"),
    "model_type": (_set("model", ["gpt2"]), None, "model"),
    "config_missing": (lambda m: m.pop("config"), None, "config"),
    "n_layers": (lambda m: m["model"].update(n_layers=m["model"]["n_layers"] + 1), None, "n_edges"),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["stale_checksum", "recomputed_checksum"])
@pytest.mark.parametrize("edit", sorted(META_EDITS))
def test_edited_result_is_refused_naming_the_field(saved, edit, recompute):
    edit_meta, edit_tensors, field = META_EDITS[edit]
    _rewrite(saved, "tl_strace", edit_meta, edit_tensors, recompute=recompute)
    with pytest.raises(ResultsError) as exc:
        ts.TraceResult.load(saved)
    msg = str(exc.value)
    assert "\n" not in msg and str(saved) in msg
    assert ("modified or damaged" in msg) if not recompute else (field in msg), msg


def test_file_without_checksum_is_schema_checked_and_loads(res, saved):
    """Files written before checksums existed load (schema-checked only); inconsistent ones fail."""
    raw, tensors = _read_raw(saved)
    meta = json.loads(raw["tl_strace"])
    meta["format_version"] = 1  # what 0.1.0 wrote: format 1, no checksum (format 2 always has one)
    save_file(tensors, str(saved), metadata={"tl_strace": json.dumps(meta)})
    back = ts.TraceResult.load(saved)
    assert back.density == res.density
    meta["n_edges"] += 1
    save_file(tensors, str(saved), metadata={"tl_strace": json.dumps(meta)})
    with pytest.raises(ResultsError, match="n_edges"):
        ts.TraceResult.load(saved)


def test_validate_accepts_every_kind_of_result(gpt2_model, tmp_path):
    """No false alarm: every method, condition set and the component level save and load."""
    runs = [ts.strace(gpt2_model, TOKENS, method=m, conditions=("only", "random", "inverse")) for m in
            ("strace", "threshold", "nucleus")]
    runs.append(ts.strace(gpt2_model, TOKENS, target=7))
    from tl_strace.components import component_strace

    runs.append(component_strace(gpt2_model, TOKENS, conditions=("only", "random", "inverse")))
    runs.append(component_strace(gpt2_model, TOKENS, scorer="greedy", greedy_steps=3, sizes=[0.1, 0.3]))
    runs.append(component_strace(gpt2_model, TOKENS, per_position=True, ablation="mean",
                                 means=compute_means(gpt2_model, SEQS)))
    for i, r in enumerate(runs):
        r.validate()
        r.save(tmp_path / f"{i}.safetensors")
        back = ts.TraceResult.load(tmp_path / f"{i}.safetensors")
        assert torch.equal(back.tv_all, r.tv_all) and back.config == r.config


def test_write_refuses_a_directory_and_leaves_no_temporary(res, tmp_path):
    from tl_strace.fsutil import OutputPathError

    (tmp_path / "d").mkdir()
    with pytest.raises(OutputPathError, match="is a directory"):
        res.save(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ------------------------------------------------------------------------------------------ mean caches
@pytest.fixture(scope="module")
def two_checkpoints(tiny_tokenizer_dir):
    """Two GPT-2s with the same config and name but different weights (two checkpoints)."""
    from tests.tiny import tiny_bridge

    return tiny_bridge("gpt2", tiny_tokenizer_dir, seed=0), tiny_bridge("gpt2", tiny_tokenizer_dir, seed=1)


def test_mean_cache_of_another_checkpoint_is_not_reused(two_checkpoints, tmp_path):
    a, b = two_checkpoints
    assert describe_model(a) == describe_model(b)
    path = tmp_path / "means.safetensors"
    ma = compute_means(a, SEQS, path=path)
    assert ma.model_fingerprint == weights_fingerprint(a) and ma.describe()["model_fingerprint"] == ma.model_fingerprint
    # the file is refused for b (it holds a's means), and kept for a
    with pytest.raises(InputError, match=f"another model.*{weights_fingerprint(a)[:12]}"):
        compute_means(b, SEQS, path=path)
    assert MeanCache.load(path).model_fingerprint == weights_fingerprint(a)
    mb = compute_means(b, SEQS)
    assert not torch.equal(mb.means["z"], ma.means["z"])
    # applying a's means to b is refused, whether given as a cache or as its file
    with pytest.raises(InputError, match="other weights"):
        ma.check_model(describe_model(b), model=b)
    from tl_strace.components import component_strace

    for means in (ma, path):
        with pytest.raises(InputError, match="other weights"):
            component_strace(b, TOKENS, ablation="mean", means=means)
    ma.check_model(describe_model(a), model=a)  # its own model is fine


@pytest.fixture()
def saved_means(gpt2_model, tmp_path) -> tuple[MeanCache, Path]:
    path = tmp_path / "m.safetensors"
    return compute_means(gpt2_model, SEQS, path=path), path


def test_untouched_mean_cache_round_trips_exactly(saved_means):
    cache, path = saved_means
    back = MeanCache.load(path)
    assert back.describe() == cache.describe() and back.model == cache.model
    for r in cache.means:
        assert torch.equal(back.means[r], cache.means[r]) and torch.equal(back.pos_means[r], cache.pos_means[r])


@pytest.mark.parametrize("tensor", ["mean.z", "pos_mean.mlp_out", "pos_counts"])
def test_flipped_byte_in_mean_cache_is_refused(saved_means, tensor):
    _, path = saved_means
    _flip_data_byte(path, tensor)
    with pytest.raises(ResultsError, match="modified or damaged"):
        MeanCache.load(path)


MEAN_EDITS = {
    "n_sequences": (_set("n_sequences", 0), None, "n_sequences"),
    "n_tokens": (_set("n_tokens", lambda n: n + 1), None, "n_tokens"),
    "hooks": (lambda m: m["hooks"].update(z="blocks.{l}.hook_mlp_out"), None, "hooks"),
    "model_shape": (lambda m: m["model"].update(d_model=m["model"]["d_model"] * 2), None, "mlp_out"),
    "fingerprint_type": (_set("model_fingerprint", 12), None, "model_fingerprint"),
    "nan_mean": (None, lambda t: t["mean.z"].view(-1).__setitem__(0, float("nan")), "finite"),
    "pos_counts": (None, lambda t: t.update(pos_counts=t["pos_counts"] - 5), "pos_counts"),
    "missing_role": (None, lambda t: t.pop("pos_mean.z"), "pos_mean.z"),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["stale_checksum", "recomputed_checksum"])
@pytest.mark.parametrize("edit", sorted(MEAN_EDITS))
def test_edited_mean_cache_is_refused_naming_the_field(saved_means, edit, recompute):
    _, path = saved_means
    edit_meta, edit_tensors, field = MEAN_EDITS[edit]
    _rewrite(path, "tl_strace_means", edit_meta, edit_tensors, recompute=recompute)
    with pytest.raises(ResultsError) as exc:
        MeanCache.load(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    assert ("modified or damaged" in msg) if not recompute else (field in msg), msg


def test_damaged_mean_cache_is_recomputed_by_compute_means(gpt2_model, saved_means):
    cache, path = saved_means
    _flip_data_byte(path, "mean.z")
    again = compute_means(gpt2_model, SEQS, path=path)
    assert torch.equal(again.means["z"], cache.means["z"])
    assert torch.equal(MeanCache.load(path).means["z"], cache.means["z"])


def test_mean_cache_without_checksum_or_fingerprint_still_loads(gpt2_model, saved_means):
    """A cache written before checksums and weight fingerprints: schema-checked, loads, and
    compute_means recomputes it (it cannot tell which weights made it)."""
    cache, path = saved_means
    raw, tensors = _read_raw(path)
    meta = json.loads(raw["tl_strace_means"])
    del meta["model_fingerprint"]
    meta["format_version"] = 1  # 0.1.0: format 1, no checksum (format 2 always has one)
    save_file(tensors, str(path), metadata={"tl_strace_means": json.dumps(meta)})
    old = MeanCache.load(path)
    assert old.model_fingerprint is None and torch.equal(old.means["z"], cache.means["z"])
    fresh = compute_means(gpt2_model, SEQS, path=path)
    assert fresh.model_fingerprint == weights_fingerprint(gpt2_model)
    assert MeanCache.load(path).model_fingerprint == fresh.model_fingerprint
    assert not math.isnan(float(fresh.means["z"].sum()))


def test_compute_means_never_overwrites_a_file_that_is_not_a_mean_cache(gpt2_model, tmp_path):
    """A path holding the user's other data (a saved result, any file) is refused, not replaced;
    a damaged mean cache of ours is recomputed in place (it is a cache)."""
    import tl_strace as ts

    toks = torch.tensor([0, 5, 17, 3, 42, 8])
    res = ts.strace(gpt2_model, toks, conditions=("only",))
    p = tmp_path / "result.safetensors"
    res.save(p)
    before = p.read_bytes()
    other = tmp_path / "notes.safetensors"
    other.write_text("my notes")
    for path in (p, other):
        with pytest.raises(ts.InputError, match="not a tl_strace mean cache"):
            ts.compute_means(gpt2_model, [toks], path=path)
    assert p.read_bytes() == before and other.read_text() == "my notes"
    cache = tmp_path / "means.safetensors"
    ts.compute_means(gpt2_model, [toks], path=cache)
    raw = bytearray(cache.read_bytes())
    raw[-3] ^= 0xFF  # damage the tensor data: the checksum no longer matches
    cache.write_bytes(bytes(raw))
    again = ts.compute_means(gpt2_model, [toks], path=cache)
    assert ts.MeanCache.load(cache).fingerprint == again.fingerprint


def test_saved_files_get_the_usual_permissions(gpt2_model, tmp_path):
    """Results are written through a temporary file; the final file has the umask's permissions
    (0644 under the usual umask), not the 0600 of a private temporary file."""
    import os

    res = ts.strace(gpt2_model, torch.tensor([0, 5, 17, 3]), conditions=("only",))
    res.save(tmp_path / "r.safetensors")
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(tmp_path / "r.safetensors").st_mode & 0o777 == 0o666 & ~umask
