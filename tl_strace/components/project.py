"""Token-level traces projected onto heads and MLPs: :func:`component_table`, :func:`project_trace`."""

from __future__ import annotations



import numpy as np
import pandas as pd
import torch

from tl_strace.components.space import _name, parse_component
from tl_strace.errors import InputError
from tl_strace.graph import EdgeLayout
from tl_strace.results import ComponentResult, StraceResult, TraceResult
from tl_strace.search import NOT_IN_ANY


# ---------------------------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------------------------
def component_table(result: TraceResult) -> pd.DataFrame:
    """One row per component of a component-level result, in rank order (unranked last):
    name, layer, head (-1 for MLPs), position (-1 unless per position), kind, rank, score, and
    ``first_size`` — the smallest stratum size that contains it. Filter ``first_size <= s`` for the
    components kept at size ``s``."""
    if not isinstance(result, ComponentResult):
        raise InputError("component_table reads component-level results (tl_strace.component_strace); for a "
                         "token-level trace use project_trace(result) or result.subgraph(s).components().")
    names = result.components
    parsed = [parse_component(n) for n in names]
    sizes = result.sizes.tolist()
    df = pd.DataFrame({
        "name": names,
        "layer": [p[0] for p in parsed],
        "head": [p[1] for p in parsed],
        "position": [p[2] for p in parsed],
        "kind": ["mlp" if p[1] < 0 else "head" for p in parsed],
        "rank": result.rank.numpy(),
        "score": result.scores.numpy(),
        "first_size": [sizes[int(k)] for k in result.labels.tolist()],
    })
    key = np.where(df["rank"] >= 0, df["rank"], len(df) + np.arange(len(df)))
    return df.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)


def project_trace(result: TraceResult) -> pd.DataFrame:
    """Way 1: which heads and MLPs a token-level trace uses at each of its sizes.

    One row per (stratum, component): ``size``, ``stratum``, ``component`` (``L3H7``/``MLP3``),
    ``layer``, ``head`` (-1 for MLPs), ``kind``, ``n_edges`` (the component's edges in the
    stratum: attention edges of the head, or MLP edges of the block), ``n_edges_total`` (its edges
    in the full graph), ``share`` = their ratio, ``weight`` (summed local weight of those edges)
    and ``used`` (``n_edges > 0``). Residual edges belong to no component.

    >>> df = project_trace(ts.strace(model, text))                          # doctest: +SKIP
    >>> df[(df["size"] == 1e-3) & df["used"]][["component", "share"]]       # doctest: +SKIP
    """
    if not isinstance(result, StraceResult):
        raise InputError("project_trace projects a token-level trace (tl_strace.strace) onto components; this "
                         "result is already component-level (see component_table).")
    layout: EdgeLayout = result.layout
    L, H = layout.n_layers, layout.n_heads
    K = len(result.sizes)
    # The sizes as configured (exact decimals, so df["size"] == 1e-3 works), else the stored ones.
    cfg_sizes = result.config.get("sizes")
    sizes = [float(x) for x in cfg_sizes] if isinstance(cfg_sizes, list) and len(cfg_sizes) == K \
        else [float(x) for x in result.sizes.tolist()]
    a_lab, _, m_lab, _ = layout.split(result.labels.long())
    a_w, _, m_w, _ = layout.split(result.weights.double())
    a_lab = a_lab.reshape(L, H, -1)
    a_w = a_w.reshape(L, H, -1)
    valid_a = a_lab < NOT_IN_ANY
    valid_m = m_lab < NOT_IN_ANY
    n_tot = torch.cat([valid_a.sum(-1), valid_m.sum(-1)[:, None]], dim=1)  # [L, H+1]
    names = [_name(l, h if h < H else -1, -1) for l in range(L) for h in range(H + 1)]
    frames = []
    for k in range(K):
        ina = valid_a & (a_lab <= k)
        inm = valid_m & (m_lab <= k)
        n = torch.cat([ina.sum(-1), inm.sum(-1)[:, None]], dim=1)
        w = torch.cat([(a_w * ina).sum(-1), (m_w * inm).sum(-1)[:, None]], dim=1)
        frames.append(pd.DataFrame({
            "size": sizes[k],
            "stratum": k,
            "component": names,
            "layer": np.repeat(np.arange(L), H + 1),
            "head": np.tile(np.r_[np.arange(H), -1], L),
            "kind": np.tile(["head"] * H + ["mlp"], L),
            "n_edges": n.reshape(-1).numpy(),
            "n_edges_total": n_tot.reshape(-1).numpy(),
            "weight": w.reshape(-1).numpy(),
        }))
    df = pd.concat(frames, ignore_index=True)
    df["share"] = df["n_edges"] / df["n_edges_total"].where(df["n_edges_total"] > 0, 1)
    df["used"] = df["n_edges"] > 0
    return df[["size", "stratum", "component", "layer", "head", "kind", "n_edges", "n_edges_total", "share",
               "weight", "used"]]
