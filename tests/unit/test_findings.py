"""The findings table (issue 16): its fixed rules, its file block, and docs/findings.md against the committed runs.

The rules are tested on runs of a tiny model whose columns are then set by hand, so each verdict is
forced by the data it is given (a rule that ignored its numbers would fail one of the two sides).
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_corpus import save_tiny_model, word_passages
from tl_strace.analysis import findings_markdown, findings_table, phases_table, update_findings_file, write_report
from tl_strace.analysis.findings import BEGIN, END
from tl_strace.cli import main
from tl_strace.corpus import CorpusRun, load_run, run_corpus
from tl_strace.io.datasets import write_passages

ROOT = Path(__file__).resolve().parents[2]
SIZES = [1e-3, 0.005, 0.01, 0.05, 0.1, 0.4, 1.0]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CorpusRun, CorpusRun]:
    torch.set_num_threads(1)
    model = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    data = tmp_path_factory.mktemp("data") / "p.jsonl"
    write_passages(word_passages(16), data)
    out = tmp_path_factory.mktemp("runs")
    run_corpus(model, data, out / "f", sizes=SIZES, record_sizes=[1e-3, 0.4], progress=False)
    run_corpus(model, data, out / "n", sizes=SIZES, record_sizes=[1e-3, 0.4], attention="never-ablated",
               progress=False)
    return load_run(out / "f"), load_run(out / "n")


def _as(run: CorpusRun, name: str, **cols: np.ndarray) -> CorpusRun:
    """A copy of ``run`` named ``name`` (another model) with some table columns replaced."""
    t = run.table.copy()
    for k, v in cols.items():
        t[k] = v
    cfg = {**run.config, "model": {**run.config["model"], "model_name": name, "weights_fingerprint": name}}
    return dataclasses.replace(run, config=cfg, table=t)


def _row(df, finding: str, attention: str = "faithful", model: str | None = None):
    sel = df[df["finding"].str.startswith(finding) & (df["attention"] == attention)]
    if model is not None:
        sel = sel[sel["model"] == model]
    assert len(sel) == 1, df
    return sel.iloc[0]


def test_every_finding_for_each_mode_with_its_numbers(runs) -> None:
    f, n = runs
    df = findings_table([f, n])
    assert set(df["attention"]) == {"faithful", "never-ablated"}
    assert set(df["verdict"]) <= {"reproduced", "not reproduced", "contradicted", "mixed"}
    for mode in ("faithful", "never-ablated"):
        for finding in ("1.", "2.", "3.", "A. rarer"):
            row = _row(df, finding, mode)
            assert row["n"] == 16 and row["numbers"]
    ph = phases_table([f, n])
    assert list(ph["attention"]) == ["faithful", "never-ablated"] and (ph["n"] == 16).all()
    # the two modes measure different things on the same passages
    assert ph["TV@0.01"].iloc[0] != ph["TV@0.01"].iloc[1]


def test_entropy_rule_follows_its_data(runs) -> None:
    f, _ = runs
    ent = np.linspace(1.0, 5.0, len(f.table))
    up = findings_table([_as(f, "m", full_entropy=ent, density=ent)])
    down = findings_table([_as(f, "m", full_entropy=ent, density=-ent)])
    noise = findings_table([_as(f, "m", full_entropy=ent, density=np.array([1.0, -1.0] * 8))])
    assert _row(up, "2.")["verdict"] == "reproduced"
    assert _row(down, "2.")["verdict"] == "contradicted"
    assert _row(noise, "2.")["verdict"] == "not reproduced"


def test_cross_model_rule_pairs_the_same_passages(runs) -> None:
    f, n = runs
    d = f.table["density"].to_numpy()
    rank = np.argsort(np.argsort(d)).astype(float)
    a, b = _as(f, "a", density=rank), _as(f, "b", density=rank + 0.1)
    c = _as(f, "c", density=-rank)
    same = _row(findings_table([a, b]), "4.")
    assert same["verdict"] == "reproduced" and "mean Spearman rho 1 over 1 pairs" in same["numbers"]
    assert "outside paper B's range 0.263–0.711" in same["numbers"] and same["n"] == 16
    mixed = _row(findings_table([a, b, c]), "4.")
    assert mixed["verdict"] == "mixed" and "over 3 pairs" in mixed["numbers"]
    # one row per attention mode; never-ablated runs are never paired with faithful ones
    df = findings_table([a, b, _as(n, "a"), _as(n, "b")])
    assert len(df[df["finding"].str.startswith("4.")]) == 2


def test_findings_file_block_is_replaced_and_escaped(runs, tmp_path: Path) -> None:
    f, n = runs
    hostile = _as(f, "<img src=x onerror=alert(1)>|*m*")
    doc = tmp_path / "findings.md"
    doc.write_text("# Findings\n\nProse a reader wrote.\n\n" + BEGIN + "\nold\n" + END + "\n\nMore prose.\n")
    text = update_findings_file(doc, [hostile, n])
    assert text.startswith("# Findings\n\nProse a reader wrote.") and text.endswith("More prose.\n")
    assert "old" not in text and "<img" not in text and "&lt;img" in text and "\\*m\\*" in text
    assert update_findings_file(doc, [hostile, n]) == text  # idempotent
    # the CLI writes the same block beside the report
    out = tmp_path / "cli.md"
    assert main(["report", str(f.path), str(n.path), "--out", str(tmp_path / "rep"), "--format", "md",
                 "--findings", str(out)]) == 0
    assert findings_markdown([f, n]) in out.read_text()
    # the report carries both modes, labelled
    md = write_report([f, n], tmp_path / "r", formats=["md"])[0].read_text()
    assert "Finding 1: the two phases" in md and "attention never ablated (reference pipeline)" in md


def test_committed_findings_match_the_committed_runs() -> None:
    """docs/findings.md's generated block is what the report computes from findings/runs (issue 16,
    acceptance 1): regenerate with findings/regenerate.sh after the runs grow."""
    dirs = sorted(glob.glob(str(ROOT / "findings" / "runs" / "*" / "*")))
    if not dirs:
        pytest.skip("no committed runs under findings/runs")
    text = (ROOT / "docs" / "findings.md").read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "docs/findings.md lost its generated block"
    committed = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    assert committed == findings_markdown(dirs).strip("\n")


def test_runs_are_grouped_by_their_weights(runs) -> None:
    """Two models, two context lengths each: context groups never mix models, and the cross-model
    comparison pairs one run per model per attention mode. (The grouping once keyed runs by a field
    run.json no longer writes, so every run looked like one model: no cross-model section, and
    context groups across models.)"""
    from tl_strace.analysis._base import group_runs

    f, n = runs
    cut, full = {"context_words": np.full(len(f.table), 20)}, {"context_words": np.full(len(f.table), 40)}
    a40, b40 = _as(f, "a", **full), _as(f, "b", density=f.table["density"].to_numpy()[::-1].copy(), **full)
    a20, b20 = _as(f, "a", **cut), _as(f, "b", **cut)
    g = group_runs([a40, b40, a20, b20, _as(n, "a", **full), _as(n, "b", **full)])
    assert [[r.config["model"]["model_name"] for r in grp] for grp in g["context_groups"]] == [["a", "a"], ["b", "b"]]
    assert {m: [r.config["model"]["model_name"] for r in rs] for m, rs in g["cross_model"].items()} == \
        {"faithful": ["a", "b"], "never-ablated": ["a", "b"]}
    assert [(x.config["model"]["model_name"], y.config["model"]["model_name"]) for x, y in g["attention_pairs"]] == \
        [("a", "a"), ("b", "b")]


@pytest.mark.parametrize("text, words", [
    (f"a\n{END}\nb\n{BEGIN}\nc\n", "(end before begin)"),
    (f"keep me\n{BEGIN}\nuser text\n", "1 begin and 0 end"),
    (f"{BEGIN}\nx\n{END}\n{BEGIN}\ny\n{END}\n", "2 begin and 2 end"),
])
def test_findings_file_with_stray_markers_is_refused_untouched(runs, tmp_path: Path, text: str, words: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A stray, doubled or reversed marker would make the update drop the reader's text or keep a stale
    table: refused in one line, file unchanged — and by the CLI before the report is written."""
    from tl_strace.errors import InputError

    f, n = runs
    doc = tmp_path / "findings.md"
    doc.write_text(text)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        update_findings_file(doc, [f, n])
    assert doc.read_text() == text
    rep = tmp_path / "rep"
    assert main(["report", str(f.path), "--out", str(rep), "--findings", str(doc)]) == 2
    assert words in capsys.readouterr().err and not list(tmp_path.glob("rep*"))
    assert doc.read_text() == text


def test_two_checkpoints_under_one_name_are_two_models(runs) -> None:
    """Findings key runs by their weights, as the report's grouping does: two checkpoints that share
    a model name (a fine-tune saved under its base's config) are two rows and a pair, labelled apart.
    (Keyed by name, the second silently replaced the first.)"""
    f, _ = runs
    d = f.table["density"].to_numpy()
    a = _as(f, "same-name", density=d)
    b = dataclasses.replace(a, config={**a.config, "model": {**a.config["model"], "weights_fingerprint": "f" * 16}},
                            table=a.table.assign(density=-d))
    df = findings_table([a, b])
    two = df[df["finding"].str.startswith("2.")]
    assert sorted(two["model"]) == ["same-name (weights ffffffff)", "same-name (weights same-nam)"]
    four = _row(df, "4.")
    assert "over 1 pairs" in four["numbers"] and four["verdict"] == "not reproduced" or four["verdict"] == "mixed"
    assert "-1" in four["numbers"]  # the pair is there: opposite densities
    assert sorted(phases_table([a, b])["model"]) == sorted(two["model"])


def test_too_few_passages_give_no_verdict(runs) -> None:
    """A run that has just started (fewer than MIN_N passages) gets no verdict, and a pair of models
    sharing fewer passages is left out of finding 4 by name (it once made the mean "n/a")."""
    from tl_strace.analysis.findings import MIN_N

    f, _ = runs
    d = f.table["density"].to_numpy()
    a, b = _as(f, "a", density=d), _as(f, "b", density=d + 0.1)
    short = dataclasses.replace(_as(f, "c"), table=_as(f, "c").table.iloc[:3].reset_index(drop=True))
    df = findings_table([a, b, short])
    assert MIN_N > 3 and set(df[df["model"] == "c"]["verdict"]) == {"too few passages"}
    assert set(df[df["model"] == "a"]["verdict"]) != {"too few passages"}
    four = _row(df, "4.")
    assert "over 1 pairs" in four["numbers"] and four["verdict"] == "reproduced"
    assert "left out, fewer than 10 shared passages: a ~ c (n 3); b ~ c (n 3)" in four["numbers"]
    alone = _row(findings_table([short, dataclasses.replace(short, config=b.config)]), "4.")
    assert alone["verdict"] == "too few passages" and "no pair of models shares 10" in alone["numbers"]


def test_interpolated_curves_resample_every_passage_on_the_papers_grid(runs) -> None:
    """METHOD.md §6: each passage's curve on np.logspace(-5, 0, 150), linear in log10 s, then
    averaged; computed here independently from the recorded sizes and TVs."""
    from tl_strace.analysis import interpolated_curves

    f, _ = runs
    got = interpolated_curves(f)
    grid = np.logspace(-5, 0, 150)
    per = np.stack([np.interp(np.log10(grid), np.log10(np.asarray(s, float)), np.asarray(v, float))
                    for s, v in zip(f.table["sizes"], f.table["tv"])])
    assert np.array_equal(got["size"].to_numpy(), grid)
    # float64 means of at most 16 values in [0, 1]: rounding far below 1e-12
    np.testing.assert_allclose(got["mean"], per.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["std"], per.std(0, ddof=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["q25"], np.percentile(per, 25, 0), rtol=0, atol=1e-12)
    assert (got["n"] == len(f.table)).all()
    # below the smallest recorded size the curve holds its first value (np.interp), not an extrapolation
    first = min(float(np.min(s)) for s in f.table["sizes"])
    assert np.allclose(got["mean"][grid < first], per[:, 0].mean())


def test_report_overlays_one_line_per_model_in_each_attention_mode(runs, tmp_path: Path) -> None:
    """The report's overlay compares models (one line each, within one attention mode, labelled),
    and every model also gets its own figure of its runs."""
    from tl_strace.analysis import build_report, plot_interpolated_curves

    f, n = runs
    models = [f, n, _as(f, "other"), _as(n, "other")]
    names = {name for _, name, _ in (b for kind, b in build_report(models).blocks if kind == "fig")}
    assert {"tv-grid-faithful", "tv-grid-never-ablated"} <= names
    assert sum(name.startswith("tv-grid-") for name in names) == 4  # two overlays, two per-model figures
    fig = plot_interpolated_curves([f, _as(f, "other")])
    labels = [line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")]
    assert len(labels) == 2 and any("other" in lab for lab in labels)
    never = plot_interpolated_curves([n, _as(n, "other")])
    assert all("never ablated" in line.get_label() for line in never.axes[0].lines
               if not line.get_label().startswith("_"))
