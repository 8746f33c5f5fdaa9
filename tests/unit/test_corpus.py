"""Unit tests of corpus runs: passage files, the resumable runner, the analyses and the report.

A tiny random Llama (GQA) with the word-level tiny tokenizer is saved to a directory once, so the
runner loads it by path exactly as a user (or a torchrun worker) would. Torch runs on one thread
here: these models are so small that thread hand-offs dominate otherwise.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tl_strace.analysis import (
    attention_ablation_comparison,
    component_frequency,
    cross_model_density,
    density_distribution,
    density_vs_context,
    density_vs_frequency,
    edge_shares,
    entropy_density,
    lorenz_curves,
    sign_test,
    spearman,
    t_pvalue,
    unigram_frequency,
    write_report,
)
from tl_strace.corpus import CorpusRun, load_run, run_corpus
from tl_strace.errors import InputError, ResultsError
from tl_strace.io.datasets import (
    SHIPPED_SETS,
    Passage,
    load_passages,
    passages_from_words,
    read_passages,
    wikitext_passages,
    write_passages,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: corpus runs use one thread

SIZES = [0.005, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0]
RECORD = [0.1, 0.4]


def save_tiny_model(path: Path) -> str:
    """A tiny random Llama (3 blocks, 4 heads, 2 KV heads) and its tokenizer, save_pretrained'ed."""
    import transformers

    from tests.tiny import TINY_CONFIGS, VOCAB, save_tiny_tokenizer

    save_tiny_tokenizer(str(path))
    cls_name, _, kwargs = TINY_CONFIGS["llama_gqa"]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs))
    hf.eval().save_pretrained(str(path))
    return str(path)


def word_passages(n: int, seed: int = 0, *, lo: int = 3, hi: int = 9) -> list[Passage]:
    rng = random.Random(seed)
    return [Passage(id=f"p{i:03d}", text=" ".join(f"w{rng.randint(2, 96)}" for _ in range(rng.randint(lo, hi))),
                    next_word=f"w{rng.randint(2, 96)}") for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "words.jsonl"
    write_passages(word_passages(12), p)
    return p


@pytest.fixture(scope="module")
def run_dir(model_dir: str, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    torch.set_num_threads(1)
    run_corpus(model_dir, data_file, out, sizes=SIZES, record_sizes=RECORD, progress=False)
    return out


def canon(run: CorpusRun) -> str:
    """A run's table as canonical JSON (timings dropped; NaN compares equal to NaN)."""
    return json.dumps(run.table.drop(columns=["seconds"]).to_dict(orient="records"), sort_keys=True)


# ============================================================================ passages
def test_shipped_sets_are_small_well_formed_and_aligned() -> None:
    sets = {n: load_passages(n) for n in SHIPPED_SETS}
    total = sum((Path(__file__).parents[2] / "tl_strace" / "data" / f"{n}.jsonl").stat().st_size for n in SHIPPED_SETS)
    assert total < 2_000_000
    p40, p20, p10 = sets["austen-40"], sets["austen-20"], sets["austen-10"]
    assert len(p40) >= 2000 and p40.n_skipped == 0
    assert p40.ids == p20.ids == p10.ids
    for a, b, c in zip(p40[:50], p20[:50], p10[:50]):
        assert len(a.text.split()) == 40 and len(b.text.split()) == 20 and len(c.text.split()) == 10
        assert a.next_word == b.next_word == c.next_word and a.next_word[0].isalpha()
        assert a.text.endswith(b.text) and b.text.endswith(c.text)
    assert {p.id.split("-")[0] for p in p40[:200]} == {"sense", "pride", "mansfield", "emma", "northanger",
                                                       "persuasion"}


def test_malformed_lines_are_reported_per_line(tmp_path: Path) -> None:
    good = json.dumps({"id": "a", "text": "w3 w4", "next_word": "w5"}).encode()
    lines = [
        good,                                                       # 1 ok
        b"",                                                        # 2 empty line
        b'{"id": "b", "text": "caf\xe9 w4", "next_word": "w5"}',    # 3 latin-1 byte: not UTF-8
        b'{"id": "c", "text": "w3"',                                # 4 torn JSON
        b'{"id": "d", "next_word": "w5"}',                          # 5 no text
        b'{"id": "a", "text": "w7", "next_word": "w5"}',            # 6 duplicate id
        b'{"id": "e", "text": "   ", "next_word": "w5"}',           # 7 empty text
        b'{"id": "f", "text": "w9 w10", "next_word": 3}',           # 8 next_word not a string
        json.dumps({"id": "g", "text": "w8 w9", "next_word": "w2"}).encode(),  # 9 ok
        b"", b"",                                                   # trailing blank lines: not data
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))
    ps = read_passages(path)
    assert ps.ids == ["a", "g"]
    assert ps.n_skipped == 7
    by_line = {i.line: i.reason for i in ps.issues}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8]
    assert by_line[2] == "empty line"
    assert "UTF-8" in by_line[3] and "0xe9" in by_line[3]
    assert "JSON" in by_line[4] and "text" in by_line[5] and "duplicate" in by_line[6]
    assert "empty text" in by_line[7] and "next_word" in by_line[8]
    assert "skipped 7 line(s)" in ps.report() and "line 3" in ps.report()


def test_tsv_and_plain_text_formats(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("w3 w4\tw5\nonly one column\nw6 w7\tw8\n", encoding="utf-8")
    ps = read_passages(tmp_path / "a.tsv")
    assert [(p.text, p.next_word, p.line) for p in ps] == [("w3 w4", "w5", 1), ("w6 w7", "w8", 3)]
    assert ps.issues[0].line == 2 and "columns" in ps.issues[0].reason
    (tmp_path / "b.tsv").write_text("next_word\ttext\tid\nw5\tw3 w4\tx1\n", encoding="utf-8")
    assert [(p.id, p.text, p.next_word) for p in read_passages(tmp_path / "b.tsv")] == [("x1", "w3 w4", "w5")]
    (tmp_path / "c.txt").write_text("w3 w4 w5\n\nw6\n", encoding="utf-8")
    ps = read_passages(tmp_path / "c.txt")
    assert [(p.id, p.next_word) for p in ps] == [("c:1", None), ("c:3", None)] and ps.n_skipped == 1
    with pytest.raises(InputError, match="Unknown passage format"):
        read_passages(tmp_path / "a.tsv", format="csv")
    (tmp_path / "d.csv").write_text("x\n", encoding="utf-8")
    with pytest.raises(InputError, match="suffix"):
        read_passages(tmp_path / "d.csv")
    with pytest.raises(InputError, match="No passage file"):
        read_passages(tmp_path / "missing.jsonl")


def test_passages_from_words_windows_targets_and_stable_ids() -> None:
    words = "The cat sat on the mat . and then it slept soundly all night long".split()
    ps = passages_from_words(words, n_words=3)
    assert [(p.text, p.next_word) for p in ps] == [("The cat sat", "on"), ("the mat .", "and"),
                                                  ("then it slept", "soundly"), ("all night long", None)][:3]
    sub = passages_from_words(words, n_words=3, n=2, seed=1)
    assert {p.id for p in sub} <= {p.id for p in ps} and len(sub) == 2
    assert passages_from_words([["a", "b", "c"], ["d", "e", "f"]], n_words=2)[1].text == "d e"  # no crossing


def test_wikitext_loader_reads_a_local_file_offline(tmp_path: Path) -> None:
    words = " ".join(f"word{'abcdefghij'[i % 10]}{'abcdefghij'[i // 10]}" for i in range(100))
    raw = f" = Article One = \n\n {words} \n\n = = Section = = \n\n more text here \n = Article Two = \n\n {words} \n"
    (tmp_path / "wiki.test.raw.txt").write_text(raw, encoding="utf-8")
    ps = wikitext_passages(data_files=str(tmp_path / "wiki.test.raw.txt"), n_words=40, n=None)
    assert len(ps) == 4 and all(len(p.text.split()) == 40 for p in ps)
    assert ps[0].next_word == "wordae" and ps.fingerprint  # word 40


# ============================================================================ statistics
def test_spearman_matches_scipy_reference_values() -> None:
    rho, p, n = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert n == 5 and rho == pytest.approx(0.8207826816681233) and p == pytest.approx(0.0885870053135438, abs=1e-6)
    rho, p, n = spearman([1.0, 2.0, np.nan, 4.0], [4.0, 3.0, 1.0, 1.0])
    assert n == 3 and rho == pytest.approx(-1.0) and p == 0.0
    assert math.isnan(spearman([1, 2], [2, 1])[0])
    assert t_pvalue(2.228139, 10.0) == pytest.approx(0.05, abs=1e-6)
    assert t_pvalue(1.0, 1.0) == pytest.approx(0.5)
    assert sign_test([1, 1, 1, 1, 1, 1, 1, 1, 1, -1, 0, np.nan]) == (9, 1, pytest.approx(22 / 1024))


# ============================================================================ the runner
def test_run_records_every_passage_with_what_the_analyses_need(run_dir: Path, data_file: Path) -> None:
    run = load_run(run_dir)
    assert list(run.table["id"]) == read_passages(data_file).ids
    t = run.table
    assert t["index"].tolist() == list(range(12))
    assert np.all(np.isfinite(t["density"])) and np.all(t["n_edges"] > 0)
    for col in ("tv", "nucleus", "entropy", "share_attn", "share_layers_3", "top_ids"):
        assert all(len(v) == len(SIZES) for v in t[col])
    shares = run.curves("share_attn") + run.curves("share_mlp") + run.curves("share_residual")
    assert np.allclose(shares[np.isfinite(shares)], 1.0)
    layers = sum(run.curves(f"share_layers_{g}") for g in range(4))
    assert np.allclose(layers[np.isfinite(layers)], 1.0)
    assert np.allclose(run.curves("tv")[:, -1], 0.0, atol=1e-5)  # the full graph is the model
    assert set(t["components"][0]) == {"0.1", "0.4"}
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["config"]["sizes"] == SIZES and meta["versions"]["tl_strace"]
    assert run.unigram and sum(run.unigram.values()) > 0


def test_rerun_is_a_no_op_and_a_larger_limit_extends(model_dir: str, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    s = run_corpus(model_dir, data_file, out, sizes=SIZES, limit=3, progress=False)
    assert (s.n_new, s.n_done_before, s.n_passages) == (3, 0, 3)
    s = run_corpus(model_dir, data_file, out, sizes=SIZES, limit=3, progress=False)
    assert (s.n_new, s.n_done_before) == (0, 3)
    s = run_corpus(model_dir, data_file, out, sizes=SIZES, limit=5, progress=False)
    assert (s.n_new, s.n_done_before) == (2, 3)
    assert load_run(out).table["id"].tolist() == read_passages(data_file).ids[:5]


def test_a_different_configuration_is_refused(run_dir: Path, model_dir: str, data_file: Path,
                                              tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="another configuration.*sizes"):
        run_corpus(model_dir, data_file, run_dir, progress=False)
    with pytest.raises(ResultsError, match="conditions"):
        run_corpus(model_dir, data_file, run_dir, sizes=SIZES, record_sizes=RECORD, conditions=("only", "random"),
                   progress=False)
    other = tmp_path / "other.jsonl"
    write_passages(word_passages(3, seed=5), other)
    with pytest.raises(ResultsError, match="data"):
        run_corpus(model_dir, other, run_dir, sizes=SIZES, record_sizes=RECORD, progress=False)
    other_model = save_tiny_model(tmp_path / "m2")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(other_model)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(2.0)
    hf.save_pretrained(other_model)
    with pytest.raises(ResultsError, match="another model"):
        run_corpus(other_model, data_file, run_dir, sizes=SIZES, record_sizes=RECORD, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "shard-00000.jsonl").write_text("{}\n")
    with pytest.raises(ResultsError, match="no run.json"):
        run_corpus(model_dir, data_file, tmp_path / "junk", progress=False)


def test_malformed_data_is_reported_and_the_run_goes_on(model_dir: str, tmp_path: Path) -> None:
    """Empty lines, non-UTF-8 bytes and a passage longer than the model's context (64 tokens):
    each reported with its line, counted, and the good passages traced."""
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(p.to_json()).encode() for p in word_passages(3)]
    too_long = json.dumps({"id": "long", "text": " ".join(["w5"] * 80), "next_word": "w3"}).encode()
    path.write_bytes(b"\n".join([good[0], b"", b'{"id": "x", "text": "\xff\xfe w3"}', too_long, good[1], b"   ",
                                 good[2]]) + b"\n")
    out = tmp_path / "r"
    s = run_corpus(model_dir, path, out, sizes=SIZES, progress=False)
    assert s.n_skipped == 1 and len(s.issues) == 4
    by_line = {i.line: i.reason for i in s.issues}
    assert by_line[2] == "empty line" and "UTF-8" in by_line[3] and by_line[6] == "empty line"
    assert "81 tokens" in by_line[4] and "context of 64" in by_line[4]
    assert "skipped 4" in s.report() or "4 skipped" in s.report()
    run = load_run(out)
    assert run.table["id"].tolist() == ["p000", "p001", "p002"]
    assert sorted(run.skipped["line"].tolist()) == [2, 3, 4, 6]
    assert run.skipped.set_index("line").loc[4, "id"] == "long"
    s = run_corpus(model_dir, path, out, sizes=SIZES, progress=False)  # the skipped passage is not retried
    assert s.n_new == 0 and s.n_skipped == 1


def test_option_errors_come_before_any_work(model_dir: str, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(InputError, match="granularity"):
        run_corpus(model_dir, data_file, out, granularity="edge")
    with pytest.raises(InputError, match="token granularity"):
        run_corpus(model_dir, data_file, out, ablation="mean")
    with pytest.raises(InputError, match="taus"):
        run_corpus(model_dir, data_file, out, taus=[0.5])
    with pytest.raises(InputError, match="token granularity only"):
        run_corpus(model_dir, data_file, out, granularity="component", weights="ifr")
    with pytest.raises(InputError, match="applies to token granularity"):
        run_corpus(model_dir, data_file, out, granularity="component", ablate_attention=False)
    assert not out.exists()


def test_component_granularity(model_dir: str, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "comp"
    run_corpus(model_dir, data_file, out, granularity="component", limit=3, record_sizes=[0.1, 0.5],
               progress=False)
    run = load_run(out)
    assert len(run.table) == 3 and run.config["granularity"] == "component"
    assert "share_attn" not in run.table and np.all(np.isfinite(run.table["density"]))
    freq = component_frequency(run)
    assert set(freq["size"]) == {0.1, 0.5}
    mean = tmp_path / "mean"
    run_corpus(model_dir, data_file, mean, granularity="component", ablation="mean", limit=2, progress=False)
    assert (mean / "means.safetensors").is_file() and len(load_run(mean).table) == 2
    assert not np.allclose(load_run(mean).curves("tv")[:, 0], run.curves("tv")[:2, 0])


def test_attention_kept_run_and_comparison(model_dir: str, data_file: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kept"
    run_corpus(model_dir, data_file, out, sizes=SIZES, record_sizes=RECORD, attention="never-ablated", progress=False)
    kept, faithful = load_run(out), load_run(run_dir)
    assert kept.config["ablate_attention"] is False and kept.attention == "never-ablated"
    assert "attention never ablated (reference pipeline)" in kept.name and faithful.attention == "faithful"
    assert "reference pipeline" not in faithful.name
    assert not np.allclose(kept.curves("tv"), faithful.curves("tv"))
    cmp = attention_ablation_comparison(faithful, kept)
    assert list(cmp["n"]) == [12, 12] and {"mean_tv@0.1", "median_top_token_size"} <= set(cmp.columns)
    assert -1.0 <= cmp.attrs["rho"] <= 1.0


# ============================================================================ analyses and report
def test_analyses_return_tables(run_dir: Path, model_dir: str, tmp_path: Path) -> None:
    run = load_run(run_dir)
    dd = density_distribution(run)
    assert dd.loc[0, "n"] == 12 and dd.loc[0, "mean"] == pytest.approx(run.table["density"].mean())
    ed = entropy_density(run)
    rho, p, n = spearman(run.table["full_entropy"], run.table["density"])
    assert (ed.loc[0, "rho"], ed.loc[0, "p"], ed.loc[0, "n"]) == (rho, p, n)
    es = edge_shares(run)
    assert es["size"].tolist() == pytest.approx(SIZES) and set(es["phase"]) == {"construction", "refinement"}
    assert es.loc[es["size"] == 1.0, "share_residual"].item() > 0
    freq = component_frequency(run)
    assert len(freq) == 2 * 3 * (4 + 1) and freq["frequency"].between(0, 1).all()
    lz = lorenz_curves(run)
    assert lz.groupby("size")["y"].last().eq(1.0).all() and lz["gini"].between(0, 1).all()
    with pytest.raises(InputError, match="record_sizes"):
        component_frequency(run, [0.01])
    uf = unigram_frequency(run)
    assert len(uf) == len(SIZES) and uf["frac_same_token"].iloc[-1] == 1.0
    dv = density_vs_frequency(run, bins=3)
    assert dv["n"].sum() == 12 and "rho" in dv.attrs
    m = cross_model_density([run, run])
    assert m.shape == (2, 2) and np.allclose(m.to_numpy(), 1.0)


def test_density_vs_context_pairs_passages_by_id(model_dir: str, tmp_path: Path) -> None:
    long = word_passages(6, seed=3, lo=8, hi=8)
    runs = []
    for n in (2, 4, 8):
        path = tmp_path / f"c{n}.jsonl"
        write_passages([p.with_context(n) for p in long], path)
        run_corpus(model_dir, path, tmp_path / f"r{n}", sizes=SIZES, progress=False)
        runs.append(load_run(tmp_path / f"r{n}"))
    dc = density_vs_context(runs[::-1])
    assert list(dc["context_words"]) == [2, 4, 8] and list(dc["n_paired_with_longest"]) == [6, 6, 6]
    assert dc["mean_diff_longest_minus_this"].iloc[-1] == 0.0 and "rho" in dc.attrs
    with pytest.raises(InputError, match="two context lengths"):
        density_vs_context(runs[:1])


def test_report_is_self_contained_and_escaped(run_dir: Path, tmp_path: Path, data_file: Path,
                                              model_dir: str) -> None:
    evil = tmp_path / "evil.jsonl"
    write_passages([Passage("</script><b>x", "w3 w4 <script>alert(1)</script>", "w5")], evil)
    run_corpus(model_dir, evil, tmp_path / "evil", sizes=SIZES, record_sizes=RECORD, progress=False)
    paths = write_report([run_dir, tmp_path / "evil"], tmp_path / "rep" / "report")
    html_text = paths[0].read_text(encoding="utf-8")
    assert "<img" in html_text and "data:image/png;base64," in html_text
    assert "http://" not in html_text and "https://" not in html_text and "<script" not in html_text
    assert "Finding 2" in html_text and "Lorenz" in html_text
    md = paths[1].read_text(encoding="utf-8")
    assert "| run |" in md and "](report_assets/" in md
    assert any((tmp_path / "rep" / "report_assets").glob("*.png"))


def test_cli_run_and_report(model_dir: str, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tl_strace.cli import main

    out = tmp_path / "cli"
    args = ["run", "--model", model_dir, "--data", str(data_file), "--out", str(out), "--limit", "2", "--quiet",
            "--sizes", *map(str, SIZES)]
    assert main(args) == 0
    assert "2 passage(s) recorded now" in capsys.readouterr().out
    assert main([*args[:-len(SIZES) - 1], "--sizes", "0.5", "1.0"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main(["report", str(out), "--format", "html"]) == 0
    assert (out / "report.html").is_file()
    assert isinstance(load_run(out).table, pd.DataFrame)


def test_cli_memory_budget(model_dir: str, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--memory-budget takes sizes with units; too small a budget is one clear line (trace) or a
    skipped passage with its reason (run: nothing else is lost)."""
    from tl_strace.cli import main

    assert main(["trace", "--model", model_dir, "w2 w3 w4 w5", "--conditions", "only", "--memory-budget", "1MiB"]) == 2
    err = capsys.readouterr().err
    assert "tl-strace: error:" in err and "needs at least" in err
    with pytest.raises(SystemExit) as e:  # argparse: usage and the message, exit status 2
        main(["trace", "--model", model_dir, "w2 w3 w4 w5", "--memory-budget", "lots"])
    assert e.value.code == 2 and "not a size" in capsys.readouterr().err
    assert main(["trace", "--model", model_dir, "w2 w3 w4 w5", "--conditions", "only", "--memory-budget", "1GiB",
                 "--json"]) == 0
    out = tmp_path / "tight"
    assert main(["run", "--model", model_dir, "--data", str(data_file), "--out", str(out), "--limit", "2", "--quiet",
                 "--sizes", *map(str, SIZES), "--memory-budget", "1MiB"]) == 0
    run = load_run(out)
    assert len(run.skipped) == 2 and all("needs at least" in r for r in run.skipped["reason"])


@pytest.mark.real
def test_smollm2_on_shipped_passages(tmp_path: Path) -> None:
    """Two shipped Austen passages on the real SmolLM2 (paper B's default sizes)."""
    out = tmp_path / "smol"
    s = run_corpus("smollm2-135m", "austen-40", out, limit=2, progress=False)
    assert s.n_new == 2 and s.n_skipped == 0
    run = load_run(out)
    t = run.table
    assert t["id"].tolist() == load_passages("austen-40").ids[:2]
    assert np.all((t["density"] > 0) & (t["density"] <= 5.0)) and np.all(t["n_tokens"] > 40)
    assert np.allclose(run.curves("tv")[:, -1], 0.0, atol=1e-4)
    shares = run.curves("share_attn") + run.curves("share_mlp") + run.curves("share_residual")
    assert np.allclose(shares[np.isfinite(shares)], 1.0)
    assert run.config["model"]["n_layers"] == 30 and len(run.unigram) > 1000


def test_cross_model_heat_map_keeps_its_axes_with_long_run_names() -> None:
    """Six runs named as reports name them: before the fix the rotated labels left the axes no room
    ("constrained_layout not applied because axes sizes collapsed to zero") and the map was blank."""
    import warnings

    from tl_strace.analysis.plots import plot_cross_model

    names = [f"qwen2.5-coder-0.5b, {w} words, attention never ablated (reference pipeline) #{i}"
             for i, w in enumerate((10, 20, 40, 10, 20, 40))]
    rng = np.random.default_rng(0)
    m = pd.DataFrame(np.clip(rng.normal(0.3, 0.3, (6, 6)), -1, 1), index=names, columns=names)
    fig = plot_cross_model(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the collapse is reported as a UserWarning at draw time
        fig.canvas.draw()
    box = fig.axes[0].get_position()
    assert box.width > 0.2 and box.height > 0.2, box  # the heat map keeps a real share of the figure
