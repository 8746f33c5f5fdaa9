"""Every tutorial runs top to bottom offline, and the committed notebooks match their sources.

Executing the notebooks is slow (about a minute each on CPU), so these tests are marked
``tutorial``; CI runs them. ``python tutorials/build.py`` rebuilds the notebooks with outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tutorials"))

import build  # noqa: E402

SOURCES = build.sources()


def test_there_are_tutorials_and_the_readme_links_them_in_order():
    assert len(SOURCES) >= 1
    readme = (ROOT / "README.md").read_text()
    positions = [readme.find(f"tutorials/{src.stem}.ipynb") for src in SOURCES]
    assert all(p >= 0 for p in positions), "README must link every tutorial"
    assert positions == sorted(positions), "README must link the tutorials in reading order"


@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_matches_its_source_and_explains_every_cell(src):
    nb_path = src.with_name(src.stem + ".ipynb").parent.parent / f"{src.stem}.ipynb"
    assert nb_path.exists(), f"run `python tutorials/build.py {src.stem}` to create {nb_path.name}"
    committed = nbformat.read(nb_path, as_version=4)
    fresh = build.parse(src)
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], \
        f"{nb_path.name} is out of date with {src.name}; rebuild it"
    assert committed.cells[0].cell_type == "markdown" and "What you will learn" in committed.cells[0].source
    kinds = [c.cell_type for c in committed.cells]
    for i, k in enumerate(kinds):
        if k == "code":
            near = kinds[max(0, i - 1):i] + kinds[i + 1:i + 2]
            assert "markdown" in near, f"code cell {i} of {nb_path.name} has no prose before or after it"
    errors = [o for c in committed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{nb_path.name} was saved with an error output"


@pytest.mark.tutorial
@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_tutorial_executes_offline(src):
    """Every cell runs without error in a fresh kernel, offline. No wall time is asserted (how long a
    tutorial takes is recorded in BENCHMARKS.md); the per-cell timeout only guards against a hang,
    and is generous because a busy 2-core machine runs tutorial 04 in ~10 minutes."""
    build.execute(build.parse(src), timeout=1800)
