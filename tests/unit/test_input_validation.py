"""Every bad input or option is a one-line InputError naming the argument, raised before any forward
pass, and the model is left clean (issue 12, "Errors to make clear"); the accepted variants work.

A counting wrapper on ``model.forward`` (every forward of tl_strace goes through ``model(...)``)
shows that no forward pass ran before the error.
"""

from __future__ import annotations

import argparse
import inspect

import numpy as np
import pytest
import torch

import tl_strace as ts
from tl_strace import options
from tl_strace.cli import _bytes, build_parser
from tl_strace.components import evaluate_components
from tl_strace.corpus import run_corpus
from tl_strace.errors import InputError
from tl_strace.model import _attached_hooks

TOKS = torch.tensor([0, 5, 17, 3, 42, 8])

# The suite runs tl_strace under beartype (pyproject: --jaxtyping-packages), which refuses some of
# these values by their annotations before tl_strace's own checks run. Users run without it, so the
# entry points are called unwrapped here; everything they call stays checked.
strace = inspect.unwrap(ts.strace)
component_strace = inspect.unwrap(ts.component_strace)
evaluate_components = inspect.unwrap(evaluate_components)
run_corpus = inspect.unwrap(run_corpus)


@pytest.fixture()
def counted(gpt2_model, monkeypatch):
    """The GPT-2 tiny model with its forward passes counted; the wrapper is removed afterwards.

    The counter wraps the *class's* forward (for this test only): tl_strace refuses a model whose
    forward is replaced on the instance, as a patch it cannot see into."""
    calls: list[int] = []
    cls = type(gpt2_model)
    orig = cls.forward

    def forward(self, *args, **kwargs):
        if self is gpt2_model:
            calls.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    try:
        yield gpt2_model, calls
    finally:
        monkeypatch.undo()
    assert _attached_hooks(gpt2_model) == []
    assert not any(m.training for m in gpt2_model.modules())


class _gen:
    """A one-shot generator of ``values``, made afresh for each test that receives it.

    A generator object placed in a ``parametrize`` table is created once at collection; under
    TransformerLens 3.9 the same case runs for the bridge and the HookedTransformer, and the second
    run would get an exhausted generator. Iterating a ``_gen`` yields each value once per ``iter``
    call made by a fresh :func:`_fresh` copy; the library sees a real generator.
    """

    def __init__(self, values):
        self.values = list(values)

    def __iter__(self):
        return (v for v in self.values)


def _fresh(kwargs):
    """``kwargs`` with every :class:`_gen` replaced by a real (single-use) generator."""
    return {k: (iter(v) if isinstance(v, _gen) else v) for k, v in kwargs.items()}


STRACE_CASES = [
    # (input, kwargs, words in the message)
    (b"w3 w4 w5", {}, "decode it first"),
    (bytearray(b"w3 w4"), {}, "decode it first"),
    (torch.tensor([1, 2, 3], device="meta"), {}, "meta device"),
    ([[1, 2], [3]], {}, "ragged"),
    (["a", "b"], {}, "one string"),
    ([1 + 2j, 3], {}, "integers"),
    (torch.tensor([1 + 2j, 3]), {}, "integers"),
    ([True, False, True], {}, "bool"),
    (None, {}, "text or token ids"),
    ({"a": 1}, {}, "token ids"),
    (TOKS, {"batch_size": float("nan")}, "batch_size must be an integer"),
    (TOKS, {"batch_size": 2.5}, "batch_size must be an integer"),
    (TOKS, {"batch_size": True}, "batch_size must be an integer"),
    (TOKS, {"memory_budget": float("nan")}, "memory_budget must be a number of bytes"),
    (TOKS, {"memory_budget": "lots"}, "is not a size"),
    (TOKS, {"memory_budget": "-1GiB"}, "is not a size"),
    (TOKS, {"memory_budget": -5}, "must be positive"),
    (TOKS, {"memory_budget": 2.5}, "memory_budget must be a number of bytes"),
    (TOKS, {"conditions": None}, "conditions must be a list"),
    (TOKS, {"conditions": "random"}, "conditions must be a list"),
    (TOKS, {"conditions": [["only"]]}, "Conditions must be distinct names"),
    (TOKS, {"target": torch.tensor([1, 2])}, "one token id"),
    (TOKS, {"target": 1.5}, "target must be a token id"),
    (TOKS, {"target": True}, "target must be a token id"),
    (TOKS, {"target": b"w3"}, "target must be a token id"),
    (TOKS, {"seed": 1.5}, "seed must be an integer"),
    (TOKS, {"seed": "0"}, "seed must be an integer"),
    (TOKS, {"seed": None}, "seed must be an integer"),
    (TOKS, {"top_k": "5"}, "top_k must be an integer"),
    (TOKS, {"top_k": 2.0}, "top_k must be an integer"),
    (TOKS, {"top_k": 0}, "top_k must be at least 1"),
    (TOKS, {"method": "threshold", "taus": []}, "taus must not be empty"),
    (TOKS, {"method": "nucleus", "taus": ["0.5"]}, "taus values must be"),
    (TOKS, {"method": "threshold", "taus": [float("nan")]}, "taus values must be"),
    (TOKS, {"ablate_attention": "no"}, "ablate_attention must be True or False"),
    (TOKS, {"ablate_attention": 1}, "ablate_attention must be True or False"),
    (TOKS, {"attention": "never"}, "Unknown attention 'never'; choose one of ['faithful', 'never-ablated']"),
    (TOKS, {"attention": False}, "Unknown attention"),
    (TOKS, {"attention": "never-ablated", "ablate_attention": True}, "disagree; pass only attention="),
    (TOKS, {"prepend_bos": "yes"}, "prepend_bos must be True, False or None"),
    (TOKS, {"sizes": "0.1"}, "sizes must be a list"),
    (TOKS, {"sizes": 0.1}, "sizes must be a list"),
    (TOKS, {"sizes": ["0.1"]}, "sizes must be numbers"),
    (TOKS, {"sizes": [float("nan")]}, "(0, 1]"),
    (TOKS, {"sizes": []}, "must not be empty"),
    (TOKS, {"sizes": _gen([0.5, 0.1])}, "strictly increasing"),
    (TOKS, {"method": None}, "Unknown method None (NoneType)"),
    (TOKS, {"weights": ["l1"]}, "Unknown weights"),
]


@pytest.mark.parametrize("inp, kwargs, words", STRACE_CASES,
                         ids=[f"{i}-{next(iter(k), 'input')}" for i, (_, k, _) in enumerate(STRACE_CASES)])
def test_strace_refuses_before_any_forward(counted, inp, kwargs, words):
    model, calls = counted
    with pytest.raises(InputError) as e:
        strace(model, inp, **_fresh(kwargs))
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    assert calls == [], f"{len(calls)} forward pass(es) ran before the error"


def test_strace_accepts_the_reasonable_variants(counted):
    """A generator of sizes (read once), "1GiB", NumPy/torch integer scalars, a one-element target tensor."""
    model, _ = counted
    ref = ts.strace(model, TOKS, sizes=[0.1, 0.5], conditions=["only"], seed=3, target=5, top_k=2)
    # within the annotations, so through the type-checked entry point too
    res = ts.strace(model, TOKS, sizes=iter(_gen([0.1, 0.5])), conditions=iter(_gen(["only"])), seed=3,
                    target=torch.tensor([5]), top_k=2, memory_budget="1GiB")
    # NumPy / torch scalars, which a user's code passes as often as ints
    res_np = strace(model, TOKS, sizes=np.array([0.1, 0.5]), conditions=("only",), seed=np.int64(3),
                    target=np.int64(5), top_k=torch.tensor(2), memory_budget=np.int64(1 << 30),
                    batch_size=np.int32(4), ablate_attention=np.bool_(True))
    for r in (res, res_np):
        assert r.sizes.tolist() == ref.sizes.tolist() == [0.1, 0.5, 1.0]
        assert r.target == 5 and r.config["seed"] == 3 and type(r.config["top_k"]) is int
        assert type(r.config["ablate_attention"]) is bool
        # the same computation on the same input and masks: equal up to batching of the masked rows
        torch.testing.assert_close(r.tv_all, ref.tv_all)
    thr = ts.strace(model, TOKS, method="threshold", taus=iter(_gen([0.5, 0.1])), conditions=["only"])
    assert {0.1, 0.5} <= set(thr.config["taus"])  # (plus tau = 0, the full graph)


COMPONENT_CASES = [
    ({"scorer": None}, "Unknown scorer None"),
    ({"ablation": 1}, "Unknown ablation 1 (int)"),
    ({"mean_positions": "everywhere"}, "Unknown mean_positions"),
    ({"per_position": "yes"}, "per_position must be True or False"),
    ({"scorer": "greedy", "greedy_steps": 2.5}, "greedy_steps must be an integer"),
    ({"scorer": "greedy", "greedy_steps": 0}, "greedy_steps must be at least 1"),
    ({"greedy_steps": 3}, "greedy_steps applies to scorer='greedy'"),
    ({"scorer": "attribution", "attribution_point": float("nan")}, "attribution_point must be a finite number"),
    ({"attribution_point": "0.5"}, "attribution_point must be a finite number"),
    ({"scorer": "attribution", "attribution_point": 1.0}, "strictly between 0 and 1"),
    ({"conditions": None}, "conditions must be a list"),
    ({"conditions": ["only", "only"]}, "Conditions must be distinct"),
    ({"sizes": _gen([])}, "must not be empty"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"target": 1.5}, "target must be a token id"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"memory_budget": float("nan")}, "memory_budget"),
    ({"prepend_bos": 0}, "prepend_bos must be True, False or None"),
]


@pytest.mark.parametrize("kwargs, words", COMPONENT_CASES,
                         ids=[f"{i}-{next(iter(k))}" for i, (k, _) in enumerate(COMPONENT_CASES)])
def test_component_strace_refuses_before_any_forward(counted, kwargs, words):
    model, calls = counted
    with pytest.raises(InputError) as e:
        component_strace(model, TOKS, **_fresh(kwargs))
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    assert calls == []


@pytest.mark.parametrize("kwargs, words", [
    ({"ablation": "none"}, "Unknown ablation"),
    ({"mean_positions": None}, "Unknown mean_positions"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"memory_budget": "a lot"}, "is not a size"),
    ({"prepend_bos": "no"}, "prepend_bos"),
])
def test_evaluate_components_refuses_before_any_forward(counted, kwargs, words):
    model, calls = counted
    with pytest.raises(InputError, match=words):
        evaluate_components(model, TOKS, [["L0H1"]], **_fresh(kwargs))
    assert calls == []


def test_component_strace_accepts_text_budgets_and_generators(counted):
    model, _ = counted
    res = component_strace(model, TOKS, sizes=iter(_gen([0.5])), memory_budget="1GiB", seed=np.int64(1),
                              greedy_steps=None)
    assert res.sizes.tolist()[-1] == 1.0


CORPUS_CASES = [
    ({"conditions": ["random", "random"]}, "Conditions must be distinct"),
    ({"conditions": None}, "conditions must be a list"),
    ({"sizes": [0.5, 0.1]}, "strictly increasing"),
    ({"sizes": [0.1, 0.1]}, "strictly increasing"),
    ({"sizes": _gen([])}, "must not be empty"),
    ({"limit": 2.5}, "limit must be an integer"),
    ({"limit": True}, "limit must be an integer"),
    ({"limit": -1}, "limit must be at least 0"),
    ({"record_sizes": []}, "record_sizes must not be empty"),
    ({"record_sizes": "0.1"}, "record_sizes must be a list"),
    ({"record_sizes": [0.4, 0.1]}, "record_sizes must be strictly increasing"),
    ({"granularity": None}, "Unknown granularity"),
    ({"ablation": ["zero"]}, "Unknown ablation"),
    ({"method": "magic"}, "Unknown method"),
    ({"weights": "l2"}, "Unknown weights"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"top_k": "3"}, "top_k must be an integer"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"memory_budget": float("nan")}, "memory_budget"),
    ({"ablate_attention": "no"}, "ablate_attention must be True or False"),
    ({"attention": "kept"}, "Unknown attention 'kept'"),
    ({"prepend_bos": 1}, "prepend_bos must be True, False or None"),
    ({"progress": "no"}, "progress must be True or False"),
    ({"method": "threshold", "taus": []}, "taus must not be empty"),
]


@pytest.mark.parametrize("kwargs, words", CORPUS_CASES,
                         ids=[f"{i}-{next(iter(k))}" for i, (k, _) in enumerate(CORPUS_CASES)])
def test_corpus_runner_refuses_options_before_any_work(tmp_path, kwargs, words):
    """Options are checked before the model is loaded, the data read or the directory created."""
    out = tmp_path / "never"
    with pytest.raises(InputError) as e:
        run_corpus("no-such-model", "no-such-data", out, **{"progress": False, **_fresh(kwargs)})
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("text, expected", [
    ("1GiB", 1 << 30), ("512MB", 512 * 10**6), ("2.5G", 2_500_000_000), ("512MiB", 512 << 20),
    ("4096", 4096), ("1e9", 10**9), (" 2 gib ", 2 << 30), ("3Ki", 3 << 10),
])
def test_cli_and_api_share_the_byte_units(text, expected):
    assert _bytes(text) == options.parse_bytes(text) == expected
    args = build_parser().parse_args(["trace", "--memory-budget", text, "w3 w4"])
    assert args.memory_budget == expected


@pytest.mark.parametrize("text", ["nan", "inf", "0", "-1GiB", "1 parsec", "", "GiB", "0.0000001"])
def test_cli_refuses_bad_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _bytes(text)
    with pytest.raises(InputError):
        options.parse_bytes(text)


@pytest.mark.parametrize("value, ok", [
    (3, 3), (np.int64(3), 3), (torch.tensor(3), 3), (torch.tensor([3]), 3),
    (True, None), (3.0, None), (float("nan"), None), ("3", None), (torch.tensor(3.0), None),
    (torch.tensor([3, 4]), None), (np.float32(3), None),
])
def test_check_int(value, ok):
    if ok is None:
        with pytest.raises(InputError, match="x must be an integer"):
            options.check_int("x", value)
    else:
        got = options.check_int("x", value)
        assert got == ok and type(got) is int


@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, [], torch.tensor(True)])
def test_check_bool_refuses_truthy_values(value):
    with pytest.raises(InputError, match="flag must be True or False"):
        options.check_bool("flag", value)
    assert options.check_bool("flag", np.bool_(False)) is False
