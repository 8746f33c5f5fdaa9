"""Mean-ablation reference caches: the means are the hand-computed averages, they are saved and
reused, and a cache that does not fit the model or the input is refused with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import tl_strace.mean.compute as mean_compute  # where compute_means looks up run_hooked
from tl_strace.errors import InputError, ResultsError
from tl_strace.mean import MeanCache, compute_means
from tl_strace.model import _attached_hooks, describe_model
from tests.unit.test_components import gpt2_reference, peaked_gpt2  # noqa: F401  (fixture)

SEQS = [torch.tensor([0, 5, 17, 3, 42, 8]), torch.tensor([0, 9, 23]), torch.tensor([0, 61, 4, 4, 7, 2]),
        torch.tensor([0, 30, 31, 32, 33])]


def _hand_means(hf, seqs):
    """Per-position and position-agnostic means of z and mlp_out, from the hand-written GPT-2."""
    L = len(hf.transformer.h)
    P = max(len(s) for s in seqs)
    zs, ms, cnt = None, None, torch.zeros(P)
    for s in seqs:
        T = len(s)
        with torch.no_grad():
            _, z = gpt2_reference(hf, s, torch.ones(L, 4), torch.ones(L), return_z=True)  # z [L, T, H, dh]
            mlp = _mlp_outs(hf, s)
        if zs is None:
            zs = torch.zeros(L, P, *z.shape[2:], dtype=torch.float64)
            ms = torch.zeros(L, P, mlp.shape[-1], dtype=torch.float64)
        zs[:, :T] += z.double()
        ms[:, :T] += mlp.double()
        cnt[:T] += 1
    n = cnt.sum()
    return (zs / cnt[None, :, None, None], ms / cnt[None, :, None], zs.sum(1) / n, ms.sum(1) / n, cnt)


def _mlp_outs(hf, s):
    outs = []
    hooks = [blk.mlp.register_forward_hook(lambda mod, i, o: outs.append(o[0].detach())) for blk in hf.transformer.h]
    try:
        hf(s[None])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(outs)


def test_means_are_the_hand_computed_averages(peaked_gpt2):  # noqa: F811
    means = compute_means(peaked_gpt2, SEQS)
    pz, pm, az, am, cnt = _hand_means(peaked_gpt2.original_model, SEQS)
    assert means.pos_counts.tolist() == cnt.long().tolist() == [4, 4, 4, 3, 3, 2]
    assert means.n_tokens == sum(len(s) for s in SEQS) and means.n_sequences == 4
    assert means.covered_positions == 6
    # The library's means are fp32 activations summed in float64; the hand-computed ones come from
    # the HF module's own fp32 forward, whose kernels (and so roundings) depend on batch size and
    # thread count. The tolerance is therefore relative to each tensor's magnitude: 1e-5 of its
    # largest value is ~80 fp32 rounding steps — far below the difference a wrong count, position
    # or sequence would make (one sequence of four changes a mean by ~25 %).
    for got, want in ((means.pos_means["z"], pz), (means.pos_means["mlp_out"], pm),
                      (means.means["z"], az), (means.means["mlp_out"], am)):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5)
    # values(): agnostic broadcasts over any length, per-position covers the first positions only.
    assert means.values("z", 50).shape == (3, 1, 4, 8)
    assert means.values("mlp_out", 4, "per_position").shape == (3, 4, 32)
    with pytest.raises(InputError, match="cover positions 0..5"):
        means.values("z", 7, "per_position")
    assert _attached_hooks(peaked_gpt2) == []


def test_texts_and_token_batches_give_the_same_means(gpt2_model):
    texts = ["w5 w6 w7 w8", "w9 w10 w11 w12"]
    a = compute_means(gpt2_model, texts)
    b = compute_means(gpt2_model, gpt2_model.to_tokens(texts))  # a [2, pos] token batch
    c = compute_means(gpt2_model, [list(map(int, t)) for t in gpt2_model.to_tokens(texts)])
    assert a.fingerprint == b.fingerprint == c.fingerprint
    for r in ("z", "mlp_out"):
        torch.testing.assert_close(a.pos_means[r], b.pos_means[r])
        torch.testing.assert_close(a.means[r], c.means[r])


def test_cache_is_saved_loaded_and_reused(gpt2_model, tmp_path, monkeypatch):
    path = tmp_path / "means.safetensors"
    a = compute_means(gpt2_model, SEQS, path=path)
    assert path.exists()
    back = MeanCache.load(path)
    assert back.model == a.model and back.hooks == a.hooks and back.fingerprint == a.fingerprint
    for r in a.means:
        assert torch.equal(back.means[r], a.means[r]) and torch.equal(back.pos_means[r], a.pos_means[r])
    calls = []
    monkeypatch.setattr(mean_compute, "run_hooked", lambda *a, **k: calls.append(1))
    again = compute_means(gpt2_model, SEQS, path=path)  # same model and corpus: loaded, no forward
    assert calls == [] and torch.equal(again.means["z"], a.means["z"])
    monkeypatch.undo()
    other = compute_means(gpt2_model, SEQS[:2], path=path)  # another corpus: recomputed, overwritten
    assert other.fingerprint != a.fingerprint and MeanCache.load(path).fingerprint == other.fingerprint
    assert other.describe()["n_sequences"] == 2


@pytest.mark.parametrize("empty", [[], "", "   ", torch.zeros(0, 4, dtype=torch.long), [torch.tensor([], dtype=torch.long)]])
def test_empty_reference_corpus_is_refused(gpt2_model, empty):
    with pytest.raises(InputError, match="empty"):
        compute_means(gpt2_model, empty)


def test_bad_roles_and_long_references_are_refused(gpt2_model):
    with pytest.raises(InputError, match="hook roles"):
        compute_means(gpt2_model, SEQS, roles=("pattern",))
    with pytest.raises(InputError, match="Reference item 0.*context of 64"):
        compute_means(gpt2_model, [torch.arange(70) % 90])


def test_cache_from_another_model_is_refused(gpt2_model, llama_model, tiny_tokenizer_dir):
    from tests.tiny import tiny_bridge

    gpt = compute_means(gpt2_model, SEQS)
    with pytest.raises(InputError, match="computed on another model"):
        gpt.check_model(describe_model(llama_model))
    qwen = tiny_bridge("qwen2_bias", tiny_tokenizer_dir)  # 2 blocks instead of 3
    with pytest.raises(InputError, match="n_layers: cache 3 vs model 2"):
        gpt.check_model(describe_model(qwen))
    # Same model identity but a tampered shape (e.g. a hand-edited file): named with both shapes.
    bad = MeanCache(model=gpt.model, hooks=gpt.hooks, means={**gpt.means, "z": gpt.means["z"][:, :2]},
                    pos_means={**gpt.pos_means, "z": gpt.pos_means["z"][:, :, :2]}, pos_counts=gpt.pos_counts,
                    n_sequences=gpt.n_sequences, n_tokens=gpt.n_tokens, fingerprint=gpt.fingerprint)
    with pytest.raises(InputError, match=r"f32\[3,2,8\]"):
        bad.check_model(describe_model(gpt2_model))
    no_mlp = compute_means(gpt2_model, SEQS, roles=("z",))
    with pytest.raises(InputError, match="no means for 'mlp_out'"):
        no_mlp.check_model(describe_model(gpt2_model))


def test_corrupt_or_foreign_files_are_results_errors(tmp_path):
    with pytest.raises(ResultsError, match="No mean cache"):
        MeanCache.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ResultsError, match="not a tl_strace mean cache"):
        MeanCache.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"other": "{}"})
    with pytest.raises(ResultsError, match="not a tl_strace mean cache"):
        MeanCache.load(foreign)
    old = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(2)}, str(old), metadata={"tl_strace_means": json.dumps({"format_version": 0})})
    with pytest.raises(ResultsError, match="incompatible"):
        MeanCache.load(old)
