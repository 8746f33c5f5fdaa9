"""The token-level computational graph of one input (METHOD.md §1), as tensors.

Nodes are residual-stream states ``(g, t)``: ``g = 0`` the embedding, ``g = 2l+1`` the stream after
block ``l``'s attention, ``g = 2l+2`` after its MLP. Node ``(g, t)`` has id ``g * T + t``.

Edges live in one flat index space laid out by edge type (:class:`EdgeLayout`)::

    attn      [layer, head, target_pos, source_pos]   pattern[h,t,s] · v[s, kv(h)] @ W_O[h]
    res_attn  [layer, pos]                             skip into resid_mid:  resid_pre[t]
    mlp       [layer, pos]                             mlp_out[t]
    res_mlp   [layer, pos]                             skip into resid_post: resid_mid[t]

No per-edge Python object is ever built: weights, labels and masks are flat tensors over this space
and are viewed back into the four blocks with :meth:`EdgeLayout.split`. Only edges that are
ancestors of the output node ``(2L, T-1)`` belong to the graph (``Graph.valid``); in the last block
that is position ``T-1`` alone.

Parallel attention/MLP blocks (``EdgeLayout(..., parallel=True)``; GPT-NeoX/Pythia, GPT-J, Phi) have
one node per block and position, the block output ``(2l+2, t)``; no node ``(2l+1, t)`` is in the
graph. The same flat space is used with other meanings: ``res_attn[l, t]`` is the block's one skip
edge ``(2l, t) → (2l+2, t)`` (vector resid_pre[t]), ``mlp[l, t]`` the MLP edge from ``(2l, t)``
(mlp_out[t]), attention edges go from ``(2l, s)`` to ``(2l+2, t)``, and the ``res_mlp`` slots are no
edges (never ``valid``). Keeping the graph layers lets every consumer read node ids the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from enum import IntEnum

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_strace.errors import DecompositionError
from tl_strace.model import CleanRun

__all__ = ["EdgeLayout", "EdgeType", "Graph", "NodeVectors", "check_decomposition", "node_vectors"]


class EdgeType(IntEnum):
    """The four kinds of edge, in the order their blocks appear in the flat edge space."""

    ATTN = 0
    """Attention edge (layer, head, target t, source s): what head h moves from position s to t."""
    RES_ATTN = 1
    """Residual edge into resid_mid[t]: the skip connection around the attention sublayer (parallel
    blocks: the block's one skip edge, into resid_post[t])."""
    MLP = 2
    """MLP edge into resid_post[t]: the MLP's whole output at t."""
    RES_MLP = 3
    """Residual edge into resid_post[t]: the skip connection around the MLP (no edge in parallel blocks)."""


EDGE_TYPE_NAMES = ("attn", "res_attn", "mlp", "res_mlp")


@dataclass(frozen=True)
class EdgeLayout:
    """Where each edge lives in the flat edge space of a model with ``n_layers`` blocks, ``n_heads``
    query heads, over ``n_pos`` tokens.

    >>> lay = EdgeLayout(2, 3, 4)
    >>> lay.size  # 2*3*4*4 attention slots + 3 * 2*4 residual/MLP slots
    120
    >>> [t.shape for t in lay.split(torch.arange(lay.size))]
    [torch.Size([2, 3, 4, 4]), torch.Size([2, 4]), torch.Size([2, 4]), torch.Size([2, 4])]
    """

    n_layers: int
    n_heads: int
    n_pos: int
    parallel: bool = False
    """Parallel attention/MLP blocks: one node per block and position (module docstring)."""

    @property
    def n_attn(self) -> int:
        return self.n_layers * self.n_heads * self.n_pos * self.n_pos

    @property
    def n_local(self) -> int:
        """Slots per token-local edge type (res_attn, mlp, res_mlp)."""
        return self.n_layers * self.n_pos

    @property
    def size(self) -> int:
        return self.n_attn + 3 * self.n_local

    def offset(self, kind: EdgeType) -> int:
        return 0 if kind == EdgeType.ATTN else self.n_attn + (int(kind) - 1) * self.n_local

    @property
    def n_nodes(self) -> int:
        return (2 * self.n_layers + 1) * self.n_pos

    @property
    def output_node(self) -> int:
        return 2 * self.n_layers * self.n_pos + self.n_pos - 1

    def split(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """View a flat ``[..., edge]`` tensor as its four blocks (attn, res_attn, mlp, res_mlp)."""
        L, H, T = self.n_layers, self.n_heads, self.n_pos
        lead = flat.shape[:-1]
        a, r1, m, r2 = torch.split(flat, [self.n_attn, self.n_local, self.n_local, self.n_local], dim=-1)
        return (a.reshape(*lead, L, H, T, T), r1.reshape(*lead, L, T), m.reshape(*lead, L, T), r2.reshape(*lead, L, T))

    def join(self, attn: Tensor, res_attn: Tensor, mlp: Tensor, res_mlp: Tensor) -> Tensor:
        """Inverse of :meth:`split`."""
        lead = attn.shape[:-4]
        return torch.cat([attn.reshape(*lead, -1), res_attn.reshape(*lead, -1),
                          mlp.reshape(*lead, -1), res_mlp.reshape(*lead, -1)], dim=-1)

    def decode(self, ids: Int[Tensor, "n"]) -> dict[str, Tensor]:
        """Type, layer, head (-1 unless attention), target and source position of flat edge ids."""
        H, T = self.n_heads, self.n_pos
        ids = ids.long()
        is_attn = ids < self.n_attn
        rel = ids - self.n_attn
        kind = torch.where(is_attn, torch.zeros_like(ids), 1 + torch.div(rel, self.n_local, rounding_mode="floor"))
        local = torch.remainder(rel, self.n_local)
        layer = torch.where(is_attn, torch.div(ids, H * T * T, rounding_mode="floor"), torch.div(local, T, rounding_mode="floor"))
        head = torch.where(is_attn, torch.div(ids, T * T, rounding_mode="floor") % H, torch.full_like(ids, -1))
        target = torch.where(is_attn, torch.div(ids, T, rounding_mode="floor") % T, local % T)
        source = torch.where(is_attn, ids % T, target)
        return {"type": kind, "layer": layer, "head": head, "target": target, "source": source}

    def node_ids(self, ids: Int[Tensor, "n"]) -> tuple[Int[Tensor, "n"], Int[Tensor, "n"]]:
        """(source node, target node) of flat edge ids; node (g, t) has id g * n_pos + t."""
        d = self.decode(ids)
        T = self.n_pos
        kind, layer = d["type"], d["layer"]
        if self.parallel:  # every in-edge of block node (2l+2, t) leaves a node of graph layer 2l
            src_g, tgt_g = 2 * layer, 2 * layer + 2
        else:
            src_g = torch.where((kind == EdgeType.ATTN) | (kind == EdgeType.RES_ATTN), 2 * layer, 2 * layer + 1)
            tgt_g = src_g + 1
        return src_g * T + d["source"], tgt_g * T + d["target"]

    def ancestors(self) -> Bool[Tensor, "edge"]:
        """Edges that can reach the output node: causal attention edges, and in the last block only
        the edges into position T-1 (in parallel blocks, no ``res_mlp`` slot is an edge)."""
        L, H, T = self.n_layers, self.n_heads, self.n_pos
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn = causal.expand(L, H, T, T).clone()
        local = torch.ones(L, T, dtype=torch.bool)
        attn[L - 1, :, : T - 1] = False
        local[L - 1, : T - 1] = False
        res_mlp = torch.zeros_like(local) if self.parallel else local.clone()
        return self.join(attn, local, local.clone(), res_mlp)

    def n_edges_formula(self) -> int:
        """|E| in closed form: (L-1)·(H·T(T+1)/2 + 3T) + (H·T + 3); parallel blocks have one
        token-local edge fewer per node: (L-1)·(H·T(T+1)/2 + 2T) + (H·T + 2)."""
        L, H, T = self.n_layers, self.n_heads, self.n_pos
        n_local = 2 if self.parallel else 3
        return (L - 1) * (H * T * (T + 1) // 2 + n_local * T) + H * T + n_local


@dataclass(frozen=True)
class Graph:
    """A weighted token-level graph: layout, local edge weights and the ancestor mask.

    ``weights`` sum to 1 over each node's in-edges (they are *local*, METHOD.md §2); entries outside
    ``valid`` are 0.
    """

    layout: EdgeLayout
    weights: Float[Tensor, "edge"]
    valid: Bool[Tensor, "edge"]

    @cached_property
    def n_edges(self) -> int:
        """|E|: edges that are ancestors of the output node."""
        return int(self.valid.sum())

    def with_weights(self, weights: Float[Tensor, "edge"]) -> "Graph":
        return Graph(self.layout, weights.masked_fill(~self.valid, 0.0), self.valid)


@dataclass(frozen=True)
class NodeVectors:
    """The vectors edge weights are computed from, for every block.

    ``vo[l, s, h]`` is v[s, kv(h)] @ W_O[h]: an attention edge (l, h, t, s) has vector
    ``pattern[l, h, t, s] · vo[l, s, h]``. In the last block every vector has been passed through the
    linearised final norm (METHOD.md §1), so the output node is the normalised final state.

    Under a post-attention norm (sandwich / post-norm blocks, METHOD.md §1) the norm linearised at
    the clean run, ``u[l, t] ↦ u[l, t] · w[l] · gain[l, t]``, is split between the two factors: its
    weight is in ``vo`` and its per-target gain in ``pattern`` (which is then *not* the model's
    attention pattern: that is ``CleanRun.pattern``), so the edge vector is still the product.
    ``b_O`` is each attention node's constant term, per position (the output bias through that norm
    plus the norm's bias).
    """

    resid_pre: Float[Tensor, "layer pos d_model"]
    vo: Float[Tensor, "layer pos head d_model"]
    pattern: Float[Tensor, "layer head pos pos_src"]
    b_O: Float[Tensor, "layer pos d_model"]
    resid_mid: Float[Tensor, "layer pos d_model"]
    mlp_out: Float[Tensor, "layer pos d_model"]
    resid_post: Float[Tensor, "layer pos d_model"]
    parallel: bool = False
    """Parallel attention/MLP blocks: the node (2l+2, t) is ``resid_post`` and its in-edges are the skip
    (``resid_pre``), the attention edges and the MLP edge (``mlp_out``); ``resid_mid`` is then only
    ``resid_pre + attn_out``, no node."""


def node_vectors(run: CleanRun) -> NodeVectors:
    """Per-edge source vectors and node vectors from a clean run (last block normalised)."""
    spec = run.spec
    rep = spec.n_heads // spec.n_kv_heads
    v = run.v.repeat_interleave(rep, dim=2)  # [L, T, H, dh]: query head h reads kv head h // rep
    vo = torch.einsum("lshd,lhdm->lshm", v, run.W_O)
    resid_pre, resid_mid, mlp_out, resid_post = run.resid_pre, run.resid_mid, run.mlp_out, run.resid_post
    b_O = run.attn_const
    pattern = run.pattern
    if run.attn_post is not None:  # the linearised post-attention norm: weight into vo, gain into pattern
        vo = vo * run.attn_post.w[:, None, None, :]
        pattern = pattern * run.attn_post.gain[:, None, :, None]
    norm_last = run.normalise_last_block
    return NodeVectors(
        resid_pre=norm_last(resid_pre),
        vo=norm_last(vo),
        pattern=pattern,
        b_O=norm_last(b_O),
        resid_mid=norm_last(resid_mid),
        mlp_out=norm_last(mlp_out),
        resid_post=norm_last(resid_post),
        parallel=spec.parallel,
    )


def _tol(y: Tensor, rel: float) -> float:
    return rel * max(1.0, float(y.abs().max()))


def check_decomposition(run: CleanRun, vec: NodeVectors, *, rel_tol: float = 1e-4) -> dict[str, float]:
    """Check that the edges into every node sum to that node's vector, and return the worst errors.

    Checked on every call (it costs one einsum per block):

    * attention node (2l+1, t): ``resid_pre[t] + Σ_{h,s} pattern[h,t,s]·vo[s,h] + b_O == resid_mid[t]``,
      where resid_mid is what the block's MLP reads (``hook_attn_out`` added to the stream);
    * the heads' sum ``Σ_h z_h @ W_O[h] + b_O`` is the attention output, and under a post-attention
      norm that norm, linearised at the clean run, maps it to ``hook_attn_out`` at every position;
    * MLP node (2l+2, t): ``resid_mid[t] + mlp_out[t] == resid_post[t]`` (the block's real output);
    * parallel blocks instead: block node (2l+2, t):
      ``resid_pre[t] + Σ_{h,s} pattern[h,t,s]·vo[s,h] + b_O + mlp_out[t] == resid_post[t]``;
    * consecutive blocks: ``resid_post[l] == resid_pre[l+1]``;
    * output node: the linearised final norm plus its bias equals the model's own final norm output.

    Raises :class:`DecompositionError` naming the first identity that fails, with its error.
    """
    spec = run.spec
    errs: dict[str, float] = {}
    attn_sum = torch.einsum("lhts,lshm->ltm", vec.pattern, vec.vo) + vec.b_O
    heads = torch.einsum("lthd,lhdm->ltm", run.z, run.W_O) + run.b_O[:, None, :]
    checks: dict[str, tuple[Tensor, Tensor]] = {}
    if run.attn_post is None:
        checks["attention output (sum over heads of z @ W_O + b_O vs hook_attn_out)"] = (heads, run.attn_out)
    else:  # sandwich / post-norm: the heads feed the post-attention norm, whose output is added
        pn = run.attn_post
        checks["attention output (sum over heads of z @ W_O + b_O vs ln1_post.hook_in)"] = (heads, pn.inp)
        checks["post-attention norm (linearised at the clean run, vs hook_attn_out)"] = (
            pn.linear(pn.inp) + pn.b[:, None, :], run.attn_out)
    if vec.parallel:  # one node per block and position: skip + attention edges + b_O + MLP edge
        checks["block node (skip, attention and MLP edges into resid_post)"] = (
            vec.resid_pre + attn_sum + vec.mlp_out, vec.resid_post)
        checks["block output (resid_pre + attn_out + mlp_out == resid_post)"] = (
            run.resid_pre + run.attn_out + run.mlp_out, run.resid_post)
    else:
        checks |= {
            "attention node (edges into resid_mid)": (vec.resid_pre + attn_sum, vec.resid_mid),
            "MLP node (edges into resid_post)": (run.resid_pre + run.attn_out + run.mlp_out, run.resid_post),
        }
    checks |= {
        "block boundary (resid_post[l] == resid_pre[l+1])": (run.resid_post[:-1], run.resid_pre[1:]),
        "output node (linearised final norm)": (run.final_norm(run.resid_post[-1, -1]) + run.norm_b, run.final_out),
    }
    # z == pattern @ v: the attention edges really are what the head computes.
    rep = spec.n_heads // spec.n_kv_heads
    checks["head outputs (z == pattern @ v)"] = (
        torch.einsum("lhts,lshd->lthd", run.pattern, run.v.repeat_interleave(rep, dim=2)), run.z)
    for name, (got, want) in checks.items():
        if got.numel() == 0:
            errs[name] = 0.0
            continue
        err = float((got - want).abs().max())
        errs[name] = err
        if not err <= _tol(want, rel_tol):
            raise DecompositionError(
                f"{spec.name}: the sum-of-edges identity fails for the {name}: max abs error {err:.3g} "
                f"(tolerance {_tol(want, rel_tol):.3g}). This architecture does not decompose into the "
                "s-Trace graph exactly (edges summing to each residual-stream node), so tl_strace "
                "refuses to trace it rather than approximate. "
                "If the model runs in reduced precision, load it in float32 and retry."
            )
    return errs
