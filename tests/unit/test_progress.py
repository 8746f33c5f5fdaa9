"""A long call shows its stage and masked rows where a user watches, and nothing elsewhere (issue 17)."""

from __future__ import annotations

import pytest

import tl_strace as ts
from tl_strace import progress as progress_mod
from tl_strace.errors import InputError


def test_a_call_asked_for_progress_shows_its_stages_and_rows(llama_model, tokens, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)  # tiny calls are fast: show the bar at once
    monkeypatch.setattr(progress_mod, "MIN_INTERVAL_S", 0.0)  # and redraw it on every row
    res = ts.strace(llama_model, tokens, sizes=[0.1, 0.5], conditions=["only", "random"], progress=True)
    err = capsys.readouterr().err
    n_rows = 2 * res.sizes.numel()
    assert "s-Trace" in err and "evaluate" in err, err
    assert f"{n_rows}/{n_rows}" in err, err  # every masked row counted


def test_no_bar_by_default_under_pytest_or_when_turned_off(llama_model, tokens, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    ts.strace(llama_model, tokens, sizes=[0.1], conditions=["only"])  # default: nobody watches a test
    monkeypatch.setenv("TL_STRACE_PROGRESS", "0")
    ts.strace(llama_model, tokens, sizes=[0.1], conditions=["only"], progress=None)
    assert capsys.readouterr().err == ""


def test_watching_follows_the_environment(monkeypatch):
    monkeypatch.setenv("TL_STRACE_PROGRESS", "1")
    assert progress_mod.watching()
    monkeypatch.setenv("TL_STRACE_PROGRESS", "off")
    assert not progress_mod.watching()
    monkeypatch.delenv("TL_STRACE_PROGRESS")
    assert not progress_mod.watching()  # PYTEST_CURRENT_TEST is set here


def test_a_bad_progress_value_is_refused_before_any_work():
    # strace's own call is refused by the tests' runtime type check first (progress: bool | None);
    # without it (a user's session) check_progress, called before any work, says this:
    with pytest.raises(InputError, match="progress must be True, False or None"):
        progress_mod.check_progress("yes")
    assert progress_mod.check_progress(True) and not progress_mod.check_progress(False)


def test_a_profile_asked_for_progress_counts_its_positions(llama_model, tokens, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    monkeypatch.setattr(progress_mod, "MIN_INTERVAL_S", 0.0)
    prof = ts.density_profile(llama_model, tokens, [3, 5], sizes=[0.1], conditions=["only"], progress=True)
    err = capsys.readouterr().err
    assert "density profile (2 positions)" in err and "position 5" in err and "2/2" in err, err
    ts.density_profile(llama_model, tokens, [3], sizes=[0.1], conditions=["only"])  # default: silent in tests
    assert capsys.readouterr().err == ""
    assert prof.positions == (3, 5)


def test_a_component_call_asked_for_progress_counts_its_rows(llama_model, tokens, capsys, monkeypatch):
    from tl_strace.components import component_strace

    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    monkeypatch.setattr(progress_mod, "MIN_INTERVAL_S", 0.0)
    res = component_strace(llama_model, tokens, sizes=[0.5], progress=True)
    err = capsys.readouterr().err
    n = res.sizes.numel()
    assert "component s-Trace" in err and "evaluate" in err and f"{n}/{n}" in err, err
    component_strace(llama_model, tokens, sizes=[0.5])
    assert capsys.readouterr().err == ""
