"""Inputs and identity: text or tokens to one checked token tensor, the target token, the weights'
fingerprint, dtype and string tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from jaxtyping import Int
from typing import Any

import torch
from torch import Tensor

from tl_strace.checks import check_optional_bool, check_target
from tl_strace.errors import InputError
from tl_strace.model.spec import ModelSpec


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------
def prepare_tokens(model: Any, spec: ModelSpec, inp: Any, *,
                   prepend_bos: bool | None = None) -> Int[Tensor, "pos"]:
    """Turn text or tokens into one checked 1-D token tensor on the model's device.

    Text is tokenized with the model's own ``to_tokens`` (so BOS handling follows the model's
    TransformerLens defaults unless ``prepend_bos`` says otherwise). Tokens may be ``[pos]`` or
    ``[1, pos]`` (a tensor, a NumPy array or a list of ints); they are used as given. Everything
    else (bytes, ragged or string lists, complex or float ids, tensors on the meta device) is an
    :class:`InputError` here, before any forward pass.
    """
    prepend_bos = check_optional_bool("prepend_bos", prepend_bos)
    if isinstance(inp, (bytes, bytearray, memoryview)):
        raise InputError(f"The input is {type(inp).__name__}, not text; decode it first, e.g. "
                         "input=data.decode('utf-8'), or pass token ids as a tensor.")
    if isinstance(inp, str):
        if not inp.strip():
            raise InputError("The input text is empty (or only whitespace); give at least one word to predict from.")
        if getattr(model, "tokenizer", None) is None:
            raise InputError(
                "This model has no tokenizer, so text cannot be tokenized; pass a token tensor instead "
                "(e.g. torch.tensor([[1, 2, 3]]))."
            )
        kwargs: dict[str, Any] = {"truncate": False}  # TL truncates to n_ctx silently by default
        if prepend_bos is not None:
            kwargs["prepend_bos"] = prepend_bos
        tokens = model.to_tokens(inp, **kwargs)
    else:
        tokens = _as_token_tensor(inp)
    if tokens.numel() == 0:  # before the dtype: torch.as_tensor([]) is float32
        raise InputError("The token sequence is empty; give at least one token.")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InputError(f"Tokens must be integers, got dtype {tokens.dtype}; pass integer token ids "
                         "(e.g. torch.tensor([1, 2, 3]) or model.to_tokens(text)).")
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise InputError(
            f"Expected one sequence of tokens, shaped [pos] or [1, pos]; got shape {tuple(tokens.shape)}. "
            "Trace one input per call (or use tl_strace's corpus runner for many)."
        )
    if tokens.numel() == 0:
        raise InputError("The token sequence is empty; give at least one token.")
    if tokens.numel() > spec.n_ctx:
        raise InputError(
            f"The input is {tokens.numel()} tokens long but {spec.name} has a context of {spec.n_ctx} tokens; "
            "shorten the text (the method predicts the token after the last one, so keep the end)."
        )
    if int(tokens.min()) < 0 or int(tokens.max()) >= spec.d_vocab:
        raise InputError(f"Token ids must lie in the vocabulary [0, {spec.d_vocab}) of {spec.name}; got {int(tokens.min())}..{int(tokens.max())}.")
    device = _model_device(model)
    return tokens.to(device=device, dtype=torch.long)


def _token_list_error(inp: Any) -> str | None:
    """Why a (nested) Python list of token ids is unusable, or None: ragged rows, strings, bools,
    floats or complex numbers, found before ``torch.as_tensor`` coerces or fails on them."""
    import numbers

    import numpy as np

    def walk(x: Any, depth: int) -> tuple[int, ...] | str:
        if isinstance(x, (str, bytes)):
            return (f"a token list holds {type(x).__name__} {x!r:.40}; pass text as one string, or token ids as "
                    "integers")
        if isinstance(x, (bool, np.bool_)):
            return f"a token list holds the bool {x!r}; token ids are integers"
        if isinstance(x, numbers.Integral) or (isinstance(x, (Tensor, np.ndarray)) and x.ndim == 0):
            return ()
        if isinstance(x, numbers.Number):
            return f"a token list holds {x!r} ({type(x).__name__}); token ids are integers"
        if isinstance(x, (Tensor, np.ndarray)):
            return tuple(x.shape)
        if not isinstance(x, Sequence) or depth > 2:
            return f"a token list holds {type(x).__name__}; token ids are integers"
        shapes = [walk(e, depth + 1) for e in x]
        for s in shapes:
            if isinstance(s, str):
                return s
        if len(set(shapes)) > 1:
            return ("the token lists are ragged (rows of different lengths); trace one sequence per call, shaped "
                    "[pos] or [1, pos]")
        return (len(x), *(shapes[0] if shapes else ()))

    found = walk(inp, 0)
    return found if isinstance(found, str) else None


def _as_token_tensor(inp: Any) -> Tensor:
    """Token ids given as a tensor, a NumPy array or a list, as a tensor (same device); refuses what
    is not readable as integer ids with a one-line :class:`InputError`."""
    if isinstance(inp, Tensor):
        if inp.device.type == "meta":
            raise InputError("The tokens are on the meta device (shapes only, no values); create them on the CPU "
                             "or the model's device, e.g. torch.tensor([1, 2, 3]).")
        return inp
    if isinstance(inp, (list, tuple)):
        why = _token_list_error(inp)
        if why is not None:
            raise InputError(f"Cannot read the tokens: {why}.")
    try:
        return torch.as_tensor(inp)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"The input must be text or token ids ([pos] or [1, pos] integers); got "
                         f"{type(inp).__name__} ({str(e).splitlines()[0][:120]}).") from e


def target_token(model: Any, spec: ModelSpec, target: Any) -> int | None:
    """The true next token as an id: given as an id, or as text whose first token is used
    (tokenized without BOS, so ``" Paris"`` keeps its leading space). A one-element integer tensor
    is an id; floats, bools and longer tensors are refused (:func:`tl_strace.checks.check_target`)."""
    target = check_target(target)
    if target is None:
        return None
    if isinstance(target, str):
        if getattr(model, "tokenizer", None) is None:
            raise InputError("The model has no tokenizer; give the target as a token id.")
        ids = model.to_tokens(target, prepend_bos=False)[0]
        if ids.numel() == 0:
            raise InputError(f"The target {target!r} tokenizes to nothing.")
        unk_id, unk = getattr(model.tokenizer, "unk_token_id", None), getattr(model.tokenizer, "unk_token", None)
        if unk_id is not None and int(ids[0]) == int(unk_id) and target.strip() != str(unk):
            raise InputError(f"The target {target!r} is not in {spec.name}'s vocabulary: its first token is the "
                             f"unknown token {unk!r} (id {unk_id}); give a word the tokenizer knows, or a token id.")
        return int(ids[0])
    t = int(target)
    if not 0 <= t < spec.d_vocab:
        raise InputError(f"Target token id {t} is outside the vocabulary [0, {spec.d_vocab}).")
    return t


def _model_device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


#: Values sampled per tensor by :func:`weights_fingerprint` (evenly strided, first and last included).
_FINGERPRINT_SAMPLES = 16384


def weights_fingerprint(model: Any) -> str:
    """SHA-256 (hex) identifying a model by its weights, not its name.

    Every parameter and floating buffer enters by name, shape and dtype and an evenly strided
    sample of :data:`_FINGERPRINT_SAMPLES` of its values (all of them for smaller tensors). Two
    checkpoints of one architecture (a fine-tune, another training step, one retrained block) differ
    in nearly every weight, so they get different fingerprints, while the cost stays a gather per
    tensor (tens of milliseconds for a 135M model on a CPU). No reduction enters the hash, so the
    fingerprint does not depend on the thread count. Used to tie mean caches and corpus run
    directories to the model that made them.
    """
    h = hashlib.sha256()
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.dtype.is_floating_point]
    for name, t in sorted(named, key=lambda nt: nt[0]):
        x = t.detach()
        h.update(f"{name}|{tuple(x.shape)}|{x.dtype}|".encode())
        flat = x.reshape(-1)
        if flat.numel():
            n = min(_FINGERPRINT_SAMPLES, flat.numel())
            idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
            h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of the model's parameters (masks are built in it)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def str_tokens(model: Any, tokens: Int[Tensor, "pos"]) -> list[str]:
    """Token strings for display; ``"<id>"`` placeholders when the model has no tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{int(t)}>" for t in tokens]
    return [tok.decode([int(t)]) for t in tokens]
