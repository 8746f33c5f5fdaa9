"""A corpus run survives ``kill -9`` and torn records (issue 5, acceptance 1).

The run is started with the ``tl-strace run`` command in a subprocess, killed with SIGKILL once a
few passages are recorded, and restarted with the same command (in-process: ``cli.main``); its
table must equal that of an uninterrupted run: same passages, same numbers, no duplicates. A second
test truncates the last record by hand (what a kill during the write leaves) and checks it is
detected and redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_corpus import canon, save_tiny_model, word_passages
from tl_strace.corpus import load_run, run_corpus
from tl_strace.io.datasets import write_passages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: corpus runs use one thread

SIZES = ["0.01", "0.05", "0.1", "0.2", "0.4", "0.7", "1.0"]
N = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "words.jsonl"
    write_passages(word_passages(N, seed=1), p)
    return p


def _command(model_dir: str, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tl_strace.cli", "run", "--model", model_dir, "--data", str(data),
            "--out", str(out), "--sizes", *SIZES, "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _records(out: Path) -> int:
    shard = out / "shard-00000.jsonl"
    return shard.read_bytes().count(b"\n") if shard.exists() else 0


def _reference(model_dir: str, data: Path, out: Path) -> str:
    run_corpus(model_dir, data, out, sizes=[float(s) for s in SIZES], progress=False)
    return canon(load_run(out))


def test_sigkill_mid_run_then_restart_equals_an_uninterrupted_run(model_dir: str, data_file: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(model_dir, data_file, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _records(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = _records(out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    assert 3 <= n_killed < N, f"the run was not killed mid-way ({n_killed} of {N} recorded)"

    # the same command again (in this process, to save a second interpreter start-up)
    from tl_strace.cli import main

    assert main(_command(model_dir, data_file, out)[3:]) == 0
    assert f"{N - n_killed} passage(s) recorded now" in capsys.readouterr().out

    restarted = load_run(out)
    ids = restarted.table["id"].tolist()
    assert len(ids) == len(set(ids)) == N
    assert _records(out) == N  # nothing recorded twice in the shard either
    assert canon(restarted) == _reference(model_dir, data_file, tmp_path / "reference")


def test_a_torn_last_record_is_detected_and_redone(model_dir: str, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "torn"
    sizes = [float(s) for s in SIZES]
    run_corpus(model_dir, data_file, out, sizes=sizes, limit=6, progress=False)
    full = canon(load_run(out))
    shard = out / "shard-00000.jsonl"
    data = shard.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    last_id = json.loads(data[last_start:])["id"]
    shard.write_bytes(data[: last_start + (len(data) - last_start) // 2])  # half of the last record

    with pytest.warns(UserWarning, match="torn"):
        partial = load_run(out)  # a reader skips the torn line and says so
    assert last_id not in set(partial.table["id"]) and len(partial.table) == 5

    s = run_corpus(model_dir, data_file, out, sizes=sizes, limit=6, progress=False)
    assert s.n_new == 1 and s.repaired and "torn" in s.repaired[0]
    assert canon(load_run(out)) == full
    assert shard.read_bytes().count(b"\n") == 6

    # a complete-looking but corrupt last line (e.g. zeros after a crash) is redone too
    data = shard.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    shard.write_bytes(data[:last_start] + b"\0" * 40 + b"\n")
    s = run_corpus(model_dir, data_file, out, sizes=sizes, limit=6, progress=False)
    assert s.n_new == 1 and "corrupt" in s.repaired[0]
    assert canon(load_run(out)) == full
