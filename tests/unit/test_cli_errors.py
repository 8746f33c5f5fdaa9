"""Issue 12: the CLI's file errors are one line on stderr and exit status 2, checked before the work
(no model is loaded when the output cannot be written), and writes never leave temporaries or
replace special files.

The checks that the model is not loaded first replace ``load_model`` with a function that fails
the test.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

import tl_strace
import tl_strace.corpus as corpus
import tl_strace.corpus.run as corpus_run
from tests.unit.test_corpus import save_tiny_model, word_passages
from tl_strace.cli import main
from tl_strace.io.datasets import write_passages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_cli"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "words.jsonl"
    write_passages(word_passages(2), p)
    return p


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded (the error must come before any work)."""
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(tl_strace, "load_model", boom)
    monkeypatch.setattr(corpus_run, "load_model", boom)  # where the runner looks it up


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and "Loading weights" not in x]  # transformers' bar
    assert len(lines) == 1 and lines[0].startswith("tl-strace: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_trace_save_into_a_missing_directory(tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["trace", "w2 w3", "--save", str(tmp_path / "nope" / "r.safetensors")]) == 2
    _one_line_error(capsys, "does not exist")


def test_trace_save_onto_a_directory(tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["trace", "w2 w3", "--save", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")


def test_trace_html_onto_a_device_is_refused_and_the_device_kept(no_model: None,
                                                                 capsys: pytest.CaptureFixture) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    assert main(["trace", "w2 w3", "--html", "/dev/full"]) == 2
    _one_line_error(capsys, "/dev/full", "not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_run_out_pointing_at_a_file(tmp_path: Path, data_file: Path, no_model: None,
                                    capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "--model", "m", "--data", str(data_file), "--out", str(f), "--quiet"]) == 2
    _one_line_error(capsys, "not a directory")
    assert main(["run", "--model", "m", "--data", str(data_file), "--out", str(f / "sub"), "--quiet"]) == 2
    _one_line_error(capsys, "not a directory")
    assert f.read_text() == "x"


def _make_read_only(d: Path) -> str:
    """Make ``d`` read-only for this process: chmod, or ``chattr +i`` as root (root ignores modes).
    Returns how, or skips when neither takes effect here."""
    d.chmod(0o555)
    probe = d / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return "chmod"
    probe.unlink()
    d.chmod(0o755)
    done = subprocess.run(["chattr", "+i", str(d)], capture_output=True)
    if done.returncode == 0:
        try:
            probe.write_text("x")
        except OSError:
            return "chattr"
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    pytest.skip("cannot make a directory read-only for this process (root without chattr +i support)")


def _undo_read_only(d: Path, how: str) -> None:
    if how == "chattr":
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    d.chmod(0o755)


def test_read_only_output_directories(tmp_path: Path, data_file: Path, no_model: None,
                                      capsys: pytest.CaptureFixture) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    how = _make_read_only(ro)
    try:
        assert main(["trace", "w2 w3", "--save", str(ro / "r.safetensors")]) == 2
        _one_line_error(capsys, "not writable")
        assert main(["run", "--model", "m", "--data", str(data_file), "--out", str(ro), "--quiet"]) == 2
        _one_line_error(capsys, str(ro))
        assert main(["run", "--model", "m", "--data", str(data_file), "--out", str(ro / "new"), "--quiet"]) == 2
        _one_line_error(capsys, str(ro))
    finally:
        _undo_read_only(ro, how)
    assert list(ro.iterdir()) == []


def test_report_out_into_a_file_path(tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["report", str(tmp_path / "no-run"), "--out", str(f / "rep")]) == 2
    _one_line_error(capsys)


def test_a_full_disk_is_one_line(model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    """A write that fails after the work (the disk filled meanwhile): one line, exit 2, no temporary."""
    import builtins

    real_open = builtins.open

    def open_full(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if "w" in mode and ".tmp" in os.fspath(file):
            return real_open("/dev/full", mode, *a, **k)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", open_full)
    out = tmp_path / "res.html"
    assert main(["trace", "--model", model_dir, "w2 w3 w4", "--conditions", "only", "--sizes", "0.1", "1.0",
                 "--html", str(out)]) == 2
    _one_line_error(capsys, "No space left")
    assert list(tmp_path.iterdir()) == []


# ============================================================================ writers: no temporary left
def _failing_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rename(*a: Any, **k: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", no_rename)


def test_failed_writes_leave_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpt2_model: Any) -> None:
    from tl_strace.views._html import HTMLView as HTML
    from tl_strace.views.report import save_report

    _failing_replace(monkeypatch)
    with pytest.raises(OSError):
        write_passages(word_passages(2), tmp_path / "p.jsonl")
    with pytest.raises(OSError):
        HTML("<p>x</p>").save(tmp_path / "x.html")

    monkeypatch.undo()
    res = tl_strace.strace(gpt2_model, "w2 w3 w4", sizes=[0.1, 1.0], conditions=["only"])
    _failing_replace(monkeypatch)
    monkeypatch.setattr("tl_strace.views.report.report_html", lambda res, **k: "<html></html>")
    with pytest.raises(OSError):
        save_report(res, tmp_path / "rep.html")
    assert list(tmp_path.iterdir()) == []


def test_html_save_refuses_a_special_file(tmp_path: Path) -> None:
    """A FIFO of our own stands for a device node (the code before the fix replaced /dev/full)."""
    from tl_strace.errors import InputError
    from tl_strace.views._html import HTMLView as HTML

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        HTML("<p>x</p>").save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_attention_mode_flags(model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--reproduce-reference-pipeline`` is ``--attention never-ablated`` and says so in its output;
    two attention flags at once are refused by argparse in one line."""
    base = ["trace", "--model", model_dir, "w2 w3 w4", "--conditions", "only", "--sizes", "0.1", "1.0"]
    assert main(base + ["--reproduce-reference-pipeline"]) == 0
    out = capsys.readouterr().out
    assert "attention: never-ablated" in out and "not a faithful measurement" in out
    assert main(base) == 0
    assert "never-ablated" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(base + ["--attention", "faithful", "--no-attention-ablation"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not allowed with argument" in err
