""":class:`DensityProfile`: the density of every chosen position of one text
(:func:`tl_strace.density_profile`), each position's full :class:`StraceResult`, a table, safe storage
and the display methods the views plug into (:func:`tl_strace.results.register_view`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from jaxtyping import Float, Int
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from tl_strace.errors import InputError, ResultsError
from tl_strace.results._schema import _INT_DTYPES, _Bad, _str_list
from tl_strace.results.result import _view
from tl_strace.results.token import StraceResult
from tl_strace.store import as_path, read_tensors, schema_checked, write_tensors

__all__ = ["PROFILE_FORMAT", "PROFILE_TV_SIZES", "DensityProfile"]

#: On-disk format of a profile file (its JSON ``format_version``); each position's result inside
#: it is stored in :data:`tl_strace.results.FORMAT_VERSION`.
PROFILE_FORMAT = 1

#: The sizes whose TV :meth:`DensityProfile.to_dataframe` reports (where the size grid has them):
#: one per phase of paper B (minimal core, construction, refinement).
PROFILE_TV_SIZES: tuple[float, ...] = (1e-3, 1e-2, 1e-1)

_KEY = "tl_strace_profile"
_WHAT = "tl_strace profile file"


@dataclass(frozen=True, kw_only=True)
class DensityProfile:
    """The s-Trace result of the next-token prediction after each chosen position of one text.

    ``results[i]`` is the trace of the prediction after token ``positions[i]``: exactly what
    ``strace(model, tokens[:positions[i] + 1], target=...)`` returns, with the options in ``config``
    (``config["next_token_targets"]``: whether each position's target is the text's next token).
    ``tokens``/``str_tokens`` are the whole text; ``positions`` increase strictly.
    """

    model: dict[str, Any]
    config: dict[str, Any]
    tokens: Int[Tensor, "pos"]
    str_tokens: list[str]
    positions: tuple[int, ...]
    results: tuple[StraceResult, ...]
    timings: dict[str, float] = field(default_factory=dict)

    KIND: ClassVar[str] = "density_profile"

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.positions)

    def at(self, position: int) -> StraceResult:
        """The trace of the prediction after token ``position`` (one of :attr:`positions`)."""
        if isinstance(position, bool) or not isinstance(position, int) or position not in self.positions:
            raise InputError(f"Position {position!r} was not traced; this profile has positions {list(self.positions)}.")
        return self.results[self.positions.index(position)]

    @property
    def density(self) -> Float[Tensor, "position"]:
        """Paper B's density (area under TV over log10 s) per position, float64."""
        return torch.tensor([r.density for r in self.results], dtype=torch.float64)

    @property
    def density_linear(self) -> Float[Tensor, "position"]:
        """Paper A's density (area under TV over linear s) per position, float64."""
        return torch.tensor([r.density_linear for r in self.results], dtype=torch.float64)

    @property
    def full_entropy(self) -> Float[Tensor, "position"]:
        """Entropy (nats) of the full model's next-token distribution per position."""
        return torch.tensor([r.full_entropy for r in self.results], dtype=torch.float64)

    # ---------------------------------------------------------------- tables
    def to_dataframe(self) -> pd.DataFrame:
        """One row per position: the token there, the text's next token, the model's top prediction,
        density (both papers'), TV at :data:`PROFILE_TV_SIZES` (where the size grid has them),
        entropy, and cross-entropy / rank of the next token when it was the target."""
        rows = []
        for t, r in zip(self.positions, self.results):
            row: dict[str, Any] = {
                "position": t,
                "token": self.str_tokens[t],
                "next_token": self.str_tokens[t + 1] if t + 1 < len(self.str_tokens) else None,
                "predicted": r.full_top_strs[0],
                "predicted_prob": float(r.full_top_probs[0]),
                "density": r.density,
                "density_linear": r.density_linear,
            }
            for s in PROFILE_TV_SIZES:
                k = r._stratum(s)
                if k is not None:
                    row[f"tv@{s:g}"] = float(r.tv[k])
            row.update({"entropy": r.full_entropy, "ce": r.full_ce, "target_rank": r.full_target_rank,
                        "n_edges": r.n_edges})
            rows.append(row)
        return pd.DataFrame(rows)

    # ---------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> None:
        """Write to one ``.safetensors`` file: each position's result stored as
        :meth:`StraceResult.save` stores it (its tensors under ``"{i}/name"``, its metadata in the JSON
        list ``results``), the text and positions beside them. Atomic and checksummed like a result
        file (:func:`tl_strace.store.write_tensors`); :meth:`load` verifies both."""
        self.validate()
        tensors: dict[str, Tensor] = {"tokens": self.tokens.cpu().clone()}
        metas = []
        for i, r in enumerate(self.results):
            ts, meta = r._stored()
            # cloned: the results' tensors may share memory (each position's tokens are a view of the text's),
            # which safetensors refuses to write
            tensors.update({f"{i}/{n}": v.clone() for n, v in ts.items()})
            metas.append(meta)
        meta = {"kind": self.KIND, "format_version": PROFILE_FORMAT, "model": self.model, "config": self.config,
                "str_tokens": list(self.str_tokens), "positions": list(self.positions), "timings": self.timings,
                "results": metas}
        write_tensors(path, tensors, _KEY, meta, what=_WHAT)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DensityProfile":
        """Read a profile written by :meth:`save` (safetensors + JSON: no code runs), checked: its
        SHA-256 checksum, then every position's result as :meth:`StraceResult.load` checks it, then
        :meth:`validate`. Every problem is one :class:`ResultsError` naming the file."""
        path = as_path(path, _WHAT)
        meta, tensors = read_tensors(path, _KEY, what=_WHAT, missing=f"No profile file at {path!r}.")
        fix = "recompute it or restore an intact copy"
        with schema_checked(path, "tl_strace density profile", fix):
            if not isinstance(meta, dict) or meta.get("kind") != cls.KIND:
                raise _Bad("kind", f"is {meta.get('kind') if isinstance(meta, dict) else meta!r}, not {cls.KIND!r}")
            version = meta.pop("format_version", None)
            if isinstance(version, bool) or version != PROFILE_FORMAT:
                raise ResultsError(f"{path!r} was written by an incompatible tl_strace version (profile format "
                                   f"{version!r}; this version reads {PROFILE_FORMAT}).")
            want = {"kind", "model", "config", "str_tokens", "positions", "timings", "results"}
            if set(meta) != want:
                bad = sorted(want ^ set(meta))
                raise _Bad(", ".join(bad), "is missing from the metadata" if bad[0] in want
                           else "is not a field of a profile")
            metas = meta["results"]
            if not isinstance(metas, list) or not metas:
                raise _Bad("results", "must be a non-empty list of results")
            if not isinstance(meta["positions"], list):
                raise _Bad("positions", f"must be a list of positions, got {meta['positions']!r}")
            parts: list[dict[str, Tensor]] = [{} for _ in metas]
            for name, t in tensors.items():
                i, sep, rest = name.partition("/")
                if name != "tokens" and not (sep and i.isdigit() and str(int(i)) == i and int(i) < len(metas)):
                    raise _Bad(name, "is not a tensor of a profile")
                if sep:
                    parts[int(i)][rest] = t
            if "tokens" not in tensors:
                raise _Bad("tokens", "is missing from the tensors")
            results = []
            for i, (m, ts) in enumerate(zip(metas, parts)):
                if not isinstance(m, dict):
                    raise _Bad(f"results[{i}]", "must be a result's metadata")
                results.append(StraceResult._from_stored(path, m, ts))  # checked as StraceResult.load does
            prof = cls(model=meta["model"], config=meta["config"], tokens=tensors["tokens"],
                       str_tokens=meta["str_tokens"], positions=tuple(meta["positions"]), results=tuple(results),
                       timings=meta["timings"])
            prof._check()
        return prof

    def validate(self) -> None:
        """Check every field and the consistency between the profile and its results (each result
        traced the prefix ending at its position, with the profile's model). Raises
        :class:`ResultsError` naming the first field that is wrong."""
        try:
            self._check()
        except _Bad as e:
            raise ResultsError(f"This DensityProfile is inconsistent: {e}.") from e

    def _check(self) -> None:
        if not isinstance(self.model, dict):
            raise _Bad("model", f"must be a dict, got {type(self.model).__name__}")
        if not isinstance(self.config, dict):
            raise _Bad("config", f"must be a dict, got {type(self.config).__name__}")
        if not isinstance(self.timings, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in self.timings.items()):
            raise _Bad("timings", "must map names to numbers of seconds")
        toks = _str_list(self.str_tokens, "str_tokens")
        T = len(toks)
        if not isinstance(self.tokens, Tensor) or self.tokens.dtype not in _INT_DTYPES or self.tokens.ndim != 1:
            raise _Bad("tokens", "must be a 1-D integer tensor")
        if int(self.tokens.numel()) != T:
            raise _Bad("str_tokens", f"has {T} entries but tokens has {self.tokens.numel()}")
        pos = self.positions
        if (not isinstance(pos, tuple) or not pos
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < T for t in pos)
                or any(b <= a for a, b in zip(pos, pos[1:]))):
            raise _Bad("positions", f"must be strictly increasing positions in [0, {T}), got {pos!r}")
        if not isinstance(self.results, tuple) or len(self.results) != len(pos):
            raise _Bad("results", f"must hold one result per position ({len(pos)})")
        for t, r in zip(pos, self.results):
            if not isinstance(r, StraceResult):
                raise _Bad(f"results[{t}]", f"must be a StraceResult, got {type(r).__name__}")
            if r.model != self.model:
                raise _Bad(f"results[{t}].model", "is not the profile's model")
            if not torch.equal(r.tokens.long().cpu(), self.tokens[: t + 1].long().cpu()) or r.str_tokens != toks[: t + 1]:
                raise _Bad(f"results[{t}].tokens", f"are not the text's first {t + 1} tokens")
            if self.config.get("next_token_targets") is True:
                want = int(self.tokens[t + 1]) if t + 1 < T else None
                if r.target != want:
                    raise _Bad(f"results[{t}].target", f"is {r.target!r}, but the text's next token is {want!r}")

    # ---------------------------------------------------------------- display
    def __repr__(self) -> str:
        d = self.density
        lo, hi = int(torch.argmin(d)), int(torch.argmax(d))
        return (f"DensityProfile(model={self.model.get('name')!r}, tokens={len(self.str_tokens)}, "
                f"positions={len(self.positions)}, density mean={float(d.mean()):.4f}, "
                f"min={float(d[lo]):.4f} at {self.positions[lo]} {self.str_tokens[self.positions[lo]]!r}, "
                f"max={float(d[hi]):.4f} at {self.positions[hi]} {self.str_tokens[self.positions[hi]]!r})")

    def _repr_html_(self) -> str:
        """Jupyter display: the text coloured by density (circuitsvis, offline), and the same text
        where hovering a token shows its TV curve and top tokens and clicking it opens its trace
        (:func:`tl_strace.views.profile_view`)."""
        return _view("profile_html")(self)

    def save_html(self, path: str | os.PathLike, *, circuits: bool = True) -> str:
        """Write a standalone HTML page of the view, where clicking a token also opens its position's
        circuit view (``circuits``: about 0.1 MB a position on SmolLM2); returns the path."""
        return _view("profile_save")(self, path, circuits=circuits)

    def plot(self, *, ax: Any = None) -> Any:
        """A matplotlib figure of density against position, the tokens on the x-axis."""
        return _view("profile_plot")(self, ax=ax)
