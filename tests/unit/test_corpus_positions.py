"""The corpus runner's every-position option (issue 18): each passage's prediction after every token,
recorded resumably beside the passage's own record, equal to :func:`tl_strace.density_profile`."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_corpus import SIZES, model_dir, word_passages  # noqa: F401  (model_dir: the tiny Llama fixture)
from tl_strace import density_profile
from tl_strace.corpus import load_run, run_corpus
from tl_strace.corpus._base import _sealed
from tl_strace.errors import InputError, ResultsError
from tl_strace.io.datasets import write_passages
from tl_strace.io.models import load_model

N = 4


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data_pos") / "words.jsonl"
    write_passages(word_passages(N, seed=3, lo=3, hi=7), p)
    return p


@pytest.fixture(scope="module")
def runs(model_dir: str, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An every-position run and a plain run of the same passages and options."""
    base = tmp_path_factory.mktemp("runs_pos")
    every, plain = base / "every", base / "plain"
    run_corpus(model_dir, data_file, every, sizes=SIZES, record_sizes=[0.4], every_position=True, progress=False)
    run_corpus(model_dir, data_file, plain, sizes=SIZES, record_sizes=[0.4], progress=False)
    return every, plain


def test_every_position_equals_density_profile_and_the_plain_run(runs: tuple[Path, Path], model_dir: str) -> None:
    every, plain = load_run(runs[0]), load_run(runs[1])
    assert plain.profile is None and every.profile is not None
    assert "profile" not in every.table.columns
    # The passage's own record is the plain run's record (the last position is the whole text, the
    # same clean run): identical strata, and values equal to float rounding.
    a, b = every.table.drop(columns=["seconds"]), plain.table.drop(columns=["seconds"])
    assert a["id"].tolist() == b["id"].tolist() and a["counts"].tolist() == b["counts"].tolist()
    # TV and density are sums of ~100 probabilities or log-sizes of order 1: 1e-6 is far above float32
    # rounding of the same computation and far below any difference of strata (>= 1e-3 here).
    np.testing.assert_allclose(every.curves("tv"), plain.curves("tv"), atol=1e-6)
    np.testing.assert_allclose(a["density"], b["density"], rtol=1e-6)

    model = load_model(model_dir)
    prof = every.profile
    for _, row in every.table.iterrows():
        mine = prof[prof["id"] == row["id"]]
        ref = density_profile(model, row["text"], target=row["target_id"], sizes=SIZES, progress=False)
        assert mine["position"].tolist() == list(ref.positions) == list(range(1, row["n_tokens"]))
        np.testing.assert_allclose(mine["density"], [r.density for r in ref.results], rtol=1e-6)
        np.testing.assert_allclose(np.stack(mine["tv"].tolist()), np.stack([r.tv.numpy() for r in ref.results]),
                                   atol=1e-6)
        np.testing.assert_allclose(mine["full_entropy"], [r.full_entropy for r in ref.results], rtol=1e-6)
        assert mine["full_top_id"].tolist() == [int(r.full_top_ids[0]) for r in ref.results]
        # every position before the last has the text's next token as its target; the last, the passage's
        assert mine["target_id"].tolist()[:-1] == mine["token_id"].tolist()[1:]
        assert mine["target_id"].tolist()[-1] == row["target_id"]
        assert math.isclose(mine["density"].iloc[-1], row["density"], rel_tol=0, abs_tol=0)
        assert all(len(c) == len(SIZES) for c in mine["tv"])
        assert mine["tv"].iloc[-1] == row["tv"]


def test_resume_adds_passages_without_duplicating_positions(model_dir: str, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    s = run_corpus(model_dir, data_file, out, sizes=SIZES, limit=2, every_position=True, progress=False)
    assert s.n_new == 2
    shard = out / "shard-00000.jsonl"
    lines = shard.read_bytes().split(b"\n")
    shard.write_bytes(b"\n".join(lines[:1]) + b"\n" + lines[1][: len(lines[1]) // 2])  # a torn last record
    s = run_corpus(model_dir, data_file, out, sizes=SIZES, limit=N, every_position=True, progress=False)
    assert (s.n_done_before, s.n_new) == (1, N - 1) and s.repaired
    run = load_run(out)
    assert run.table["index"].tolist() == list(range(N))
    per = run.profile.groupby("index")["position"].apply(list)
    assert [p for p in per] == [list(range(1, n)) for n in run.table["n_tokens"]]


def test_mode_is_part_of_the_configuration(runs: tuple[Path, Path], model_dir: str, data_file: Path) -> None:
    every, plain = runs
    assert json.loads((every / "run.json").read_text())["config"]["positions"] == "every"
    assert "positions" not in json.loads((plain / "run.json").read_text())["config"]  # old directories unchanged
    with pytest.raises(ResultsError, match="another configuration.*positions"):
        run_corpus(model_dir, data_file, every, sizes=SIZES, record_sizes=[0.4], progress=False)
    with pytest.raises(ResultsError, match="another configuration.*positions"):
        run_corpus(model_dir, data_file, plain, sizes=SIZES, record_sizes=[0.4], every_position=True, progress=False)


def test_refused_before_any_work(model_dir: str, data_file: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="every_position.*token granularity"):
        run_corpus(model_dir, data_file, tmp_path / "c", granularity="component", every_position=True,
                   progress=False)
    with pytest.raises(InputError, match="every_position"):
        # unwrapped: the suite's beartype would refuse the str by its annotation before tl_strace's check
        inspect.unwrap(run_corpus)(model_dir, data_file, tmp_path / "c", every_position="yes", progress=False)
    assert not (tmp_path / "c").exists()


def _damage(src: Path, dst: Path, edit) -> None:
    """Copy run directory ``src`` to ``dst`` with ``edit`` applied to its first record, resealed (so
    the schema check, not the checksum, must catch it)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    shard = dst / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    rec = json.loads(lines[0])
    edit(rec)
    lines[0] = json.dumps(_sealed({k: v for k, v in rec.items() if k != "sha256"}))
    shard.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("profile"), "'profile' is missing"),
    (lambda r: r["profile"]["density"].pop(), "'profile.density' has"),
    (lambda r: r["profile"]["tv"][0].pop(), "'profile.tv' at position 1"),
    (lambda r: r["profile"]["position"].reverse(), "not increasing"),
    (lambda r: r["profile"]["token_id"].__setitem__(0, "x"), "'profile.token_id'"),
    (lambda r: r["profile"].__setitem__("secret", [0] * len(r["profile"]["position"])), "'profile.secret'"),
    (lambda r: r["profile"]["density"].__setitem__(-1, r["profile"]["density"][-1] + 1.0), "last position"),
])
def test_damaged_profiles_are_refused_on_load(runs: tuple[Path, Path], tmp_path: Path, edit, message: str) -> None:
    _damage(runs[0], tmp_path / "d", edit)
    with pytest.raises(ResultsError, match=message):
        load_run(tmp_path / "d")


def test_a_profile_in_a_plain_run_is_refused(runs: tuple[Path, Path], tmp_path: Path) -> None:
    prof = json.loads((runs[0] / "shard-00000.jsonl").read_text().splitlines()[0])["profile"]
    _damage(runs[1], tmp_path / "d", lambda r: r.__setitem__("profile", prof))
    with pytest.raises(ResultsError, match="does not record every position"):
        load_run(tmp_path / "d")


def test_cli_every_position(model_dir: str, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tl_strace.cli import main

    out = tmp_path / "cli"
    assert main(["run", "--model", model_dir, "--data", str(data_file), "--out", str(out), "--limit", "1",
                 "--quiet", "--every-position", "--sizes", *map(str, SIZES)]) == 0
    assert "1 passage(s) recorded now" in capsys.readouterr().out
    run = load_run(out)
    assert run.profile is not None and len(run.profile) == int(run.table["n_tokens"][0]) - 1
    torch.testing.assert_close(torch.tensor(run.profile["tv"].iloc[-1]), torch.tensor(run.table["tv"][0]))


def test_for_each_position_refuses_bad_arguments_before_work(model_dir: str) -> None:
    from tl_strace.profile import for_each_position

    model = load_model(model_dir)
    unwrapped = inspect.unwrap(for_each_position)  # past beartype, to reach tl_strace's own checks
    seen: list[int] = []
    with pytest.raises(InputError, match="each must be a function"):
        unwrapped(model, "w3 w4 w5", "print")
    with pytest.raises(InputError, match="unknown option 'size'"):
        for_each_position(model, "w3 w4 w5", lambda t, r: seen.append(t), size=[0.5])
    with pytest.raises(InputError, match="outside the text"):
        for_each_position(model, "w3 w4 w5", lambda t, r: seen.append(t), positions=[99])
    assert seen == []
    timings = for_each_position(model, "w3 w4 w5", lambda t, r: seen.append(t), sizes=SIZES, progress=False)
    assert seen == list(range(1, len(model.to_tokens("w3 w4 w5")[0]))) and timings["total"] > 0


def test_density_along_the_text_in_tables_and_the_report(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from tl_strace.analysis import density_along_text, plot_density_along_text, write_report

    every, plain = load_run(runs[0]), load_run(runs[1])
    da = density_along_text(every)
    prof = every.profile
    assert int(da["n"].sum()) == len(prof) and da.attrs["n"] == len(prof) and da.attrs["passages"] == N
    assert np.isfinite(da.attrs["step"]) and -1 <= da.attrs["rho"] <= 1
    # the mean of the bins, weighted by n, is the mean over every position
    assert np.isclose((da["mean_density"] * da["n"]).sum() / da["n"].sum(), prof["density"].mean())
    # the step is taken within passages only: recompute it by hand
    steps = [abs(b - a) for _, g in prof.groupby("index") for a, b in zip(g["density"], g["density"].iloc[1:])]
    assert np.isclose(da.attrs["step"], np.mean(steps))
    with pytest.raises(InputError, match="every_position=True"):
        density_along_text(plain)
    assert plot_density_along_text(every).axes
    pages = write_report([every, plain], tmp_path / "report", formats=["md"])
    text = Path(pages[0]).read_text()
    assert text.count("Density along the text (every position)") == 1
