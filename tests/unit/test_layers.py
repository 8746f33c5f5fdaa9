"""The layer contract of pyproject.toml ([tool.importlinter]) holds, and it can fail.

Data flows one way (model → graph → search → masked evaluation → metrics → results → views →
corpus → analysis → cli); import-linter checks every import, including those inside functions.
The second test adds one upward import to a copy of the package and asserts the check catches it,
so the contract is not a check that cannot fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_is_kept() -> None:
    proc = _lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """graph.py importing a view (inside a function, where a reader would not look) is caught."""
    shutil.copytree(ROOT / "tl_strace", tmp_path / "tl_strace", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    graph = tmp_path / "tl_strace" / "graph.py"
    graph.write_text(graph.read_text() + "\n\ndef _upward():\n    from tl_strace.views import circuit_view\n\n"
                     "    return circuit_view\n")
    proc = _lint(tmp_path, tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "tl_strace.graph is not allowed to import tl_strace.views" in proc.stdout, proc.stdout[-3000:]
