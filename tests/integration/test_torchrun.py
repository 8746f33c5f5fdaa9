"""Two ``torchrun`` processes on CPU (gloo) give the same table as one process (issue 5, acceptance 2).

Rank ``r`` of 2 traces the passages with ``index % 2 == r`` into its own shard; the reader merges the
shards into one table in data order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_corpus import canon, save_tiny_model, word_passages
from tl_strace.corpus import load_run, run_corpus
from tl_strace.io.datasets import write_passages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: corpus runs use one thread

SIZES = ["0.01", "0.05", "0.1", "0.2", "0.4", "0.7", "1.0"]


def test_two_torchrun_processes_equal_one_process(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    data = tmp_path / "words.jsonl"
    write_passages(word_passages(9, seed=2), data)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "tl_strace.cli", "run", "--model", model_dir, "--data", str(data), "--out", str(out),
           "--sizes", *SIZES, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # rank 0's summary line reaches the terminal (ranks end with os._exit, after flushing)
    assert "rank 0/2: 5 passage(s) recorded now" in done.stdout + done.stderr, done.stdout + done.stderr
    shards = sorted(p.name for p in out.glob("shard-*.jsonl"))
    assert shards == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert (out / "shard-00000.jsonl").read_bytes().count(b"\n") == 5  # indices 0, 2, 4, 6, 8
    assert (out / "shard-00001.jsonl").read_bytes().count(b"\n") == 4

    two = load_run(out)
    assert two.table["index"].tolist() == list(range(9))
    run_corpus(model_dir, data, tmp_path / "one", sizes=[float(s) for s in SIZES], progress=False)
    assert canon(two) == canon(load_run(tmp_path / "one"))

    # and a one-process restart of the two-process run finds nothing left to do
    s = run_corpus(model_dir, data, out, sizes=[float(s) for s in SIZES], progress=False)
    assert (s.n_new, s.n_done_before) == (0, 9)
