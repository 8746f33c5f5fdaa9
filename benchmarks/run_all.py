"""Run every performance benchmark in turn (each in its own process) and report the wall time.

    python benchmarks/run_all.py [--quick]

The scripts: ``bench_strace.py`` (the ratios against forward passes), ``bench_memory.py`` (peak
memory against the documented bound), ``bench_vs_transformerlens.py`` (27 circuits against
TransformerLens's ``faithfulness``) and ``bench_corpus.py`` (corpus-runner throughput). Each writes
``benchmarks/results/<name>-<device>.json``; ``BENCHMARKS.md`` records the latest figures. The
study in ``components_smollm2.py`` (issue 3: scorer quality) is not a performance benchmark and is
not run here. Exits non-zero if any script fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

SCRIPTS: list[tuple[str, list[str], list[str]]] = [
    # (script, arguments, arguments with --quick)
    ("bench_strace.py", [], ["--repeat", "3"]),
    ("bench_memory.py", [], ["--quick", "--lengths", "59,150", "--gpt2-lengths", "59"]),
    ("bench_vs_transformerlens.py", [], ["--tokens", "8"]),
    ("bench_corpus.py", [], ["--passages", "6"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, lengths and circuits")
    args = ap.parse_args()
    t0 = time.perf_counter()
    times, failed = {}, []
    for script, full, quick in SCRIPTS:
        print(f"\n=== {script} ===", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *(quick if args.quick else full)])
        times[script] = time.perf_counter() - t
        if rc:
            failed.append(script)
    print("\n=== wall time ===")
    for k, v in times.items():
        print(f"  {k:<32} {v:6.0f} s")
    print(f"  {'total':<32} {time.perf_counter() - t0:6.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
