"""Edge weights (METHOD.md §2) are computed one block at a time, straight into the flat edge space
(issue 17: no second copy of the edge space, no whole-model transients); the numbers must be the
whole-tensor formula's bit for bit, or the search order (which ties break) could move.

The reference below is the L1 formula written over every block at once, as tl_strace computed it
before the per-block fill; equality is exact (``torch.equal``), not within a tolerance: the same
elementwise operations on the same float32 inputs give the same bits.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_parallel import tiny_parallel
from tl_strace.graph import EdgeLayout, NodeVectors, node_vectors
from tl_strace.model import clean_run, describe_model, prepare_tokens
from tl_strace.weights import compute_weights, l1_weights

TOKENS = [0, 5, 17, 3, 42, 8, 9, 23, 61, 4, 4, 4, 0]


def _whole_l1(vec: NodeVectors) -> torch.Tensor:
    """L1 weights of every block at once: ``|z|₁`` over each node's in-edges, normalised (uniform
    where a node's scores sum to 0); flat, in the layout's order."""
    L, H, T, _ = vec.pattern.shape
    causal = torch.ones(T, T).tril().expand(L, H, T, T)
    attn = vec.pattern * vec.vo.abs().sum(-1).permute(0, 2, 1)[:, :, None, :] * causal
    res = vec.resid_pre.abs().sum(-1)
    mlp = vec.mlp_out.abs().sum(-1)
    safe = lambda tot: torch.where(tot > 0, tot, torch.ones_like(tot))  # noqa: E731
    if vec.parallel:
        tot = res + attn.sum(dim=(1, 3)) + mlp
        n_in, zero = 2 + causal.sum(dim=(1, 3)), tot <= 0
        a = torch.where(zero[:, None, :, None], causal / n_in[:, None, :, None], attn / safe(tot)[:, None, :, None])
        blocks = (a, torch.where(zero, 1.0 / n_in, res / safe(tot)), torch.where(zero, 1.0 / n_in, mlp / safe(tot)),
                  torch.zeros_like(mlp))
    else:
        res_mlp = vec.resid_mid.abs().sum(-1)
        tot_a, tot_m = res + attn.sum(dim=(1, 3)), mlp + res_mlp
        n_in, za, zm = 1 + causal.sum(dim=(1, 3)), tot_a <= 0, tot_m <= 0
        a = torch.where(za[:, None, :, None], causal / n_in[:, None, :, None], attn / safe(tot_a)[:, None, :, None])
        blocks = (a, torch.where(za, 1.0 / n_in, res / safe(tot_a)),
                  torch.where(zm, torch.full_like(mlp, 0.5), mlp / safe(tot_m)),
                  torch.where(zm, torch.full_like(res_mlp, 0.5), res_mlp / safe(tot_m)))
    layout = EdgeLayout(L, H, T, parallel=vec.parallel)
    return layout.join(*blocks).masked_fill(~layout.ancestors(), 0.0)


def _check(model) -> None:
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, torch.tensor(TOKENS))
    vec = node_vectors(clean_run(model, spec, tokens))
    layout = EdgeLayout(spec.n_layers, spec.n_heads, int(tokens.numel()), parallel=spec.parallel)
    want = _whole_l1(vec)
    assert torch.equal(compute_weights(vec, layout, "l1").weights, want)
    assert torch.equal(layout.join(*l1_weights(vec)).masked_fill(~layout.ancestors(), 0.0), want)


def test_l1_weights_block_by_block_are_the_whole_formula(tiny_model):
    _check(tiny_model)


@pytest.mark.parametrize("name", ["neox", "phi"])
def test_l1_weights_of_parallel_blocks_are_the_whole_formula(name, tiny_tokenizer_dir):
    _check(tiny_parallel(name, tiny_tokenizer_dir)[0])
