"""Issue 12, a hostile tester's findings on the command, the report writer and the corpus runner:
reports written atomically (a full disk leaves no truncated file), special files refused, empty
paths refused, ``python -m tl_strace``, memory-skipped passages retried on resume, one-line
argument errors before the model is loaded, and clear errors for wrongly typed arguments.

Full disks are simulated by monkeypatching ``os.fsync`` of :mod:`tl_strace.fsutil` to raise ENOSPC
(every atomic write fsyncs its temporary file before the rename); nothing is mounted.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import tl_strace
import tl_strace.corpus as corpus
import tl_strace.corpus.run as corpus_run
import tl_strace.fsutil as fsutil
import tl_strace.memory as memory
from tests.unit.test_corpus import save_tiny_model, word_passages
from tl_strace.analysis import write_report
from tl_strace.cli import main
from tl_strace.corpus import load_run, run_corpus
from tl_strace.errors import InputError, ResultsError
from tl_strace.fsutil import OutputPathError
from tl_strace.io.datasets import Passage, write_passages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

# The suite runs tl_strace under beartype (pyproject: --jaxtyping-packages), which refuses values of
# the wrong type before the function's own checks; the calls that pass one are made unwrapped here
# (as a user calls them), everything they call stays checked.
unchecked_load_run = inspect.unwrap(load_run)
unchecked_run_corpus = inspect.unwrap(run_corpus)

SIZES = [0.01, 0.1, 0.4, 1.0]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_hostile"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "words.jsonl"
    write_passages(word_passages(2), p)
    return p


@pytest.fixture(scope="module")
def run_dir(model_dir: str, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r"
    run_corpus(model_dir, data_file, out, sizes=SIZES, record_sizes=[0.1, 0.4], progress=False)
    return out


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded (the error must come before any work)."""
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tl_strace, "load_model", boom)
    monkeypatch.setattr(corpus_run, "load_model", boom)  # where the runner looks it up


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fsync", enospc)


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and "Loading weights" not in x]
    assert len(lines) == 1 and lines[0].startswith("tl-strace: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    for n in needles:
        assert n in err, err
    return err


# ============================================================================ 1. report onto a full disk
def test_report_onto_a_full_disk_leaves_no_truncated_file(run_dir: Path, tmp_path: Path, full_disk: None,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(run_dir), "--out", str(out)]) == 2
    _one_line_error(capsys, "rep.html", "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no truncated rep.html, no temporary


def test_report_markdown_figures_onto_a_full_disk(run_dir: Path, tmp_path: Path, full_disk: None) -> None:
    with pytest.raises(OutputPathError, match=r"\.png.*No space left"):
        write_report([run_dir], tmp_path / "rep", formats=["md"])
    assert not (tmp_path / "rep.md").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_save_figure_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tl_strace.views.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, tmp_path / "f.svg").endswith("f.svg")
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    assert save_figure(fig, tmp_path / "g") == str(tmp_path / "g.png")  # as matplotlib: the format's suffix
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OutputPathError, match="h.png"):
        save_figure(fig, tmp_path / "h.png")
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.svg", "g.png"]


# ============================================================================ 2. a FIFO as the report
def test_write_report_refuses_a_fifo(run_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "d.html"
    os.mkfifo(fifo)
    stop = threading.Event()

    def drain() -> None:  # a reader, so that a (wrong) write into the FIFO cannot block the test
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            while not stop.is_set():
                try:
                    if not os.read(fd, 1 << 16):
                        time.sleep(0.005)
                except BlockingIOError:
                    time.sleep(0.005)
        finally:
            os.close(fd)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        with pytest.raises(OutputPathError, match="not a regular file"):
            write_report([run_dir], tmp_path / "d", formats=["html"])
    finally:
        stop.set()
        t.join(5)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.html"]


# ============================================================================ 3./4. empty paths
def test_empty_out_is_refused_api(model_dir: str, data_file: Path, run_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="out is empty"):
        run_corpus(model_dir, data_file, "", sizes=SIZES, progress=False)
    with pytest.raises(InputError, match="out is empty"):
        write_report([run_dir], "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["run", "--model", "m", "--data", "austen-10", "--out", "", "--quiet"],
    ["report", "somewhere", "--out", ""],
    ["trace", "--save", "", "w2 w3"],
    ["trace", "--html", "", "w2 w3"],
    ["trace", "--model", "", "w2 w3"],
])
def test_empty_path_options_are_refused(argv: list[str], tmp_path: Path, no_model: None,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line_error(capsys, "the value is empty", f"(see tl-strace {argv[0]} --help)")
    assert list(tmp_path.iterdir()) == []


# ============================================================================ 5. python -m tl_strace
def test_python_dash_m() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tl_strace", "--help"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tl-strace") and "report" in done.stdout
    done = subprocess.run([sys.executable, "-m", "tl_strace", "trace", "--seed", "1.5", "w2"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "tl-strace: error: argument --seed: invalid int value: '1.5' (see tl-strace trace --help)"], done.stderr


# ============================================================================ 6. memory skips are retried
def _passages_with_one_long(tmp_path: Path) -> Path:
    ps = word_passages(3, seed=4) + [Passage(id="long", text=" ".join(["w5"] * 60), next_word="w3")]
    path = tmp_path / "mixed.jsonl"
    write_passages([ps[0], ps[3], ps[1], ps[2]], path)
    return path


def _needs(model_dir: str, n_tokens: int) -> int:
    from tl_strace.io.models import load_model
    from tl_strace.model import describe_model

    return memory.estimate_memory(describe_model(load_model(model_dir)), n_tokens, 1).total


def _shard_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "shard-00000.jsonl").read_text().splitlines()]


def test_a_memory_skip_is_retried_when_memory_is_available(model_dir: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = _passages_with_one_long(tmp_path)
    avail = [(_needs(model_dir, 10) + _needs(model_dir, 61)) // 2]
    monkeypatch.setattr(memory, "available_memory", lambda: avail[0], raising=False)
    out = tmp_path / "r"
    s = run_corpus(model_dir, data, out, sizes=SIZES, progress=False)
    assert s.n_new == 4 and s.n_skipped == 1
    reason = load_run(out).skipped.set_index("id").loc["long", "reason"]
    assert "rerun with a larger memory_budget (or on a machine with more memory) to retry it" in reason
    rec = [r for r in _shard_lines(out) if r["id"] == "long"]
    assert len(rec) == 1 and rec[0]["memory_needed"] == _needs(model_dir, 61)

    s = run_corpus(model_dir, data, out, sizes=SIZES, progress=False)  # still too little: nothing written
    assert s.n_new == 0 and s.n_skipped == 1 and len(_shard_lines(out)) == 4

    avail[0] = 1 << 40
    s = run_corpus(model_dir, data, out, sizes=SIZES, progress=False)  # now it fits: retried
    assert s.n_new == 1 and s.n_skipped == 0
    run = load_run(out)
    assert sorted(run.table["id"]) == ["long", "p000", "p001", "p002"] and len(run.skipped) == 0
    assert [r["id"] for r in _shard_lines(out)].count("long") == 2  # append-only: the ok record supersedes
    s = run_corpus(model_dir, data, out, sizes=SIZES, progress=False)  # and it is done
    assert s.n_new == 0 and s.n_skipped == 0 and len(_shard_lines(out)) == 5


def test_a_memory_budget_skip_is_retried_with_a_larger_budget(model_dir: str, tmp_path: Path) -> None:
    data = _passages_with_one_long(tmp_path)
    budget = (_needs(model_dir, 10) + _needs(model_dir, 61)) // 2
    out = tmp_path / "r"
    s = run_corpus(model_dir, data, out, sizes=SIZES, memory_budget=budget, progress=False)
    assert s.n_skipped == 1
    reason = load_run(out).skipped.set_index("id").loc["long", "reason"]
    assert "memory_budget" in reason and "needs at least" in reason and "to retry it" in reason
    s = run_corpus(model_dir, data, out, sizes=SIZES, memory_budget=budget, progress=False)
    assert s.n_new == 0 and s.n_skipped == 1
    s = run_corpus(model_dir, data, out, sizes=SIZES, memory_budget="4GiB", progress=False)
    assert s.n_new == 1 and s.n_skipped == 0
    assert sorted(load_run(out).table["id"]) == ["long", "p000", "p001", "p002"]


def test_only_a_memory_skip_may_be_superseded(run_dir: Path, tmp_path: Path) -> None:
    """Two ok records of one passage, or an ok record then a skip for another reason: still refused."""
    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    shard = out / "shard-00000.jsonl"
    first = shard.read_text().splitlines()[0]
    shard.write_text(shard.read_text() + first + "\n")
    with pytest.raises(ResultsError, match="also recorded"):
        load_run(out)


# ============================================================================ 7. CLI errors: one line, first
@pytest.mark.parametrize("argv,needle", [
    (["trace", "--seed", "1.5", "w2"], "argument --seed: invalid int value: '1.5'"),
    (["trace", "--memory-budget", "abc", "w2"], "'abc' is not a size"),
    (["trace", "--method", "nope", "w2"], "invalid choice"),
    (["run", "--model", "m", "--data", "d"], "the following arguments are required: --out"),
])
def test_argument_errors_are_one_line(argv: list[str], needle: str, no_model: None,
                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line_error(capsys, needle, f"(see tl-strace {argv[0]} --help)")


def test_a_missing_command_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    _one_line_error(capsys, "(see tl-strace --help)")


@pytest.mark.parametrize("argv,needle", [
    (["trace", "--batch-size", "0", "w2 w3"], "batch_size must be at least 1"),
    (["trace", "--sizes", "0.5", "0.1", "--", "w2 w3"], "strictly increasing"),
    (["trace", "--sizes", "2", "--", "w2 w3"], "(0, 1]"),
    (["trace", "--taus", "0.1", "--", "w2 w3"], "taus apply to method='threshold'"),
    (["trace", "--method", "threshold", "--sizes", "0.1", "--", "w2 w3"], "pass taus"),
    (["trace", "  "], "The input text is empty"),
    (["trace", "--target", "", "w2 w3"], "--target is empty"),
    (["run", "--model", "m", "--data", "austen-10", "--out", "OUT", "--batch-size", "0", "--quiet"],
     "batch_size must be at least 1"),
    (["run", "--model", "m", "--data", "austen-10", "--out", "OUT", "--sizes", "0.5", "0.1", "--quiet"],
     "strictly increasing"),
])
def test_bad_options_are_refused_before_the_model_is_loaded(argv: list[str], needle: str, tmp_path: Path,
                                                            no_model: None, capsys: pytest.CaptureFixture) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    _one_line_error(capsys, needle)


# ============================================================================ 8. wrong types, odd files
def test_a_directory_with_a_shard_name(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    (out / "shard-00099.jsonl").mkdir()
    with pytest.raises(ResultsError, match="shard-00099.jsonl is not a regular file"):
        load_run(out)


def test_load_run_of_a_number() -> None:
    with pytest.raises(InputError, match="path of a run directory.*42"):
        unchecked_load_run(42)


def test_run_corpus_wrong_types_before_any_work(model_dir: str, data_file: Path, tmp_path: Path,
                                                no_model: None) -> None:
    out = tmp_path / "r"
    with pytest.raises(InputError, match="data must be .*42 \\(int\\)"):
        unchecked_run_corpus(model_dir, 42, out, progress=False)
    with pytest.raises(InputError, match="model must be a TransformerLens model.*42 \\(int\\)"):
        unchecked_run_corpus(42, data_file, out, progress=False)
    with pytest.raises(InputError, match="out must be"):
        unchecked_run_corpus(model_dir, data_file, 42, progress=False)
    with pytest.raises(InputError, match="model is empty"):
        run_corpus("", data_file, out, progress=False)
    assert not out.exists()


def test_run_corpus_refuses_data_without_passages(model_dir: str, tmp_path: Path) -> None:
    """An empty data file is a mistake (a wrong path or an empty export), not a finished run."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="holds no passages"):
        unchecked_run_corpus(model_dir, empty, tmp_path / "r", sizes=SIZES, progress=False)
    assert not (tmp_path / "r").exists()
