"""Issue 12: when one ``torchrun`` rank refuses to start (another process holds its shard's lock),
every rank exits with the same one-line error, and none with a Python traceback of its own (nor
waits at a barrier for the rank that has gone)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_corpus import save_tiny_model, word_passages
from tl_strace.io.datasets import write_passages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: corpus runs use one thread


def test_a_second_rank_refusal_is_one_line_on_every_rank(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    data = tmp_path / "words.jsonl"
    write_passages(word_passages(4, seed=2), data)
    out = tmp_path / "run"
    out.mkdir()
    lock = os.open(out / "shard-00001.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another process is writing shard 1"
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               "--tee", "3", "-m", "tl_strace.cli", "run", "--model", model_dir, "--data", str(data), "--out", str(out),
               "--sizes", "0.1", "1.0", "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # guards against a hang
    finally:
        os.close(lock)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    errors = [x for x in text.splitlines() if "tl-strace: error:" in x]
    assert len(errors) == 2, text[-3000:]  # one line per rank (torchrun --tee prefixes each with its rank)
    assert all("Another process is writing shard-00001.jsonl" in x for x in errors), errors
    # the workers' own output has no traceback (torchrun's launcher reports the exit codes itself)
    worker = [x for x in text.splitlines() if x.startswith(("[default0]", "[default1]"))]
    assert worker and not any("Traceback" in x or "Error:" in x and "tl-strace: error:" not in x for x in worker), \
        "\n".join(worker)[-3000:]
