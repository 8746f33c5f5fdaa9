"""Build the tutorial notebooks from their sources, executing them so they read well with outputs.

Each tutorial is written as ``tutorials/src/NN_name.py``: cells separated by ``# %%`` lines, prose
cells by ``# %% [markdown]`` with every line commented out (the "percent" format that Jupyter,
VS Code and jupytext read). ``python tutorials/build.py`` writes ``tutorials/NN_name.ipynb`` with
outputs; ``--check`` only executes them (what CI does through tests/tutorials). Tutorials run
offline (HF_HUB_OFFLINE=1) on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from jupyter_client.manager import KernelManager

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"


def parse(path: Path) -> nbformat.NotebookNode:
    """A notebook from a percent-format source file."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush() -> None:
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in text.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text.strip():
            cells.append(nbformat.v4.new_code_cell(text))

    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, *, timeout: int = 600) -> float:
    """Run every cell in a fresh kernel on this interpreter, in tutorials/; returns seconds taken."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore", "MPLBACKEND": "Agg"}
    km = KernelManager(kernel_cmd=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(HERE)}})
    t = time.perf_counter()
    with _env(env):
        client.execute()
    return time.perf_counter() - t


class _env:
    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.saved = env, dict(os.environ)

    def __enter__(self) -> None:
        os.environ.update(self.env)

    def __exit__(self, *exc: object) -> None:
        os.environ.clear()
        os.environ.update(self.saved)


def sources() -> list[Path]:
    return sorted(SRC.glob("[0-9][0-9]_*.py"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="tutorial stems to build (default: all)")
    ap.add_argument("--check", action="store_true", help="execute only; do not write notebooks")
    args = ap.parse_args(argv)
    for src in sources():
        if args.names and src.stem not in args.names:
            continue
        nb = parse(src)
        secs = execute(nb)
        print(f"{src.stem}: executed in {secs:.0f} s")
        if not args.check:
            for cell in nb.cells:  # keep the committed files stable: no execution timestamps
                cell.get("metadata", {}).pop("execution", None)
            nbformat.write(nb, HERE / f"{src.stem}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
