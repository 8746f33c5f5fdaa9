"""Issue 12: corpus run directories are tied to the model's weights, validated on load and on
resume, and a passage that cannot fit in memory is skipped with its reason (the run goes on).

Every damaged field of ``run.json``, a shard, ``unigram.json`` or ``data_issues.jsonl`` must be a
:class:`ResultsError` naming the file, the line and the field; a run written before checksums
existed (no ``sha256`` fields) still loads.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tl_strace.corpus as corpus
import tl_strace.corpus.run as corpus_run
import tl_strace.memory as memory
from tests.unit.test_corpus import canon, save_tiny_model, word_passages
from tl_strace.corpus import load_run, run_corpus
from tl_strace.errors import ResultsError
from tl_strace.io.datasets import Passage, write_passages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: corpus runs use one thread

SIZES = [0.05, 0.2, 1.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_integrity"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "words.jsonl"
    # one line that is not a passage, so data_issues.jsonl has a record
    lines = [json.dumps(q.to_json()) for q in word_passages(4, seed=3)]
    p.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")
    return p


@pytest.fixture(scope="module")
def pristine(model_dir: str, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "r"
    torch.set_num_threads(1)
    run_corpus(model_dir, data_file, out, sizes=SIZES, limit=3, progress=False)
    return out


def _copy(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "r"
    shutil.copytree(pristine, out)
    return out


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write_lines(path: Path, recs: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _edit_record(out: Path, line: int, edit: Callable[[dict[str, Any]], None], *, reseal: bool = True) -> None:
    """Edit record ``line`` (1-based) of shard 0; ``reseal``: recompute its checksum, as a forger (or a
    run from before checksums) would have it, so that the schema check is what must catch it."""
    shard = out / "shard-00000.jsonl"
    recs = _lines(shard)
    edit(recs[line - 1])
    if reseal and "sha256" in recs[line - 1]:
        recs[line - 1]["sha256"] = corpus._digest({k: v for k, v in recs[line - 1].items() if k != "sha256"})
    _write_lines(shard, recs)


def _edit_json(path: Path, edit: Callable[[Any], Any], *, reseal: bool = True) -> None:
    obj = json.loads(path.read_text())
    obj = edit(obj) or obj
    if reseal and isinstance(obj, dict) and "sha256" in obj:
        obj["sha256"] = corpus._digest({k: v for k, v in obj.items() if k != "sha256"})
    path.write_text(json.dumps(obj))


# ============================================================================ (a) model identity
def test_checkpoints_that_differ_in_one_block_do_not_share_a_run(model_dir: str, data_file: Path,
                                                                  tmp_path: Path) -> None:
    """Same config, same embedding and unembedding; one MLP weight of block 1 differs. The old
    identity (first and last parameter only) let the second model resume into the first's run."""
    import transformers

    other = save_tiny_model(tmp_path / "other")
    hf = transformers.AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    hf.save_pretrained(other)
    out = tmp_path / "r"
    run_corpus(model_dir, data_file, out, sizes=SIZES, limit=1, progress=False)
    with pytest.raises(ResultsError, match="another model.*weights"):
        run_corpus(other, data_file, out, sizes=SIZES, limit=2, progress=False)
    assert len(load_run(out)) == 1  # nothing of the other model was recorded


# ============================================================================ (b) validation
def _density_str(r: dict[str, Any]) -> None:
    r["density"] = "0.5"


def _no_tv(r: dict[str, Any]) -> None:
    del r["tv"]


def _short_tv(r: dict[str, Any]) -> None:
    r["tv"] = r["tv"][:-1]


def _index_out_of_range(r: dict[str, Any]) -> None:
    r["index"] = 999


def _counts_float(r: dict[str, Any]) -> None:
    r["counts"][0] = 1.5


def _bad_status(r: dict[str, Any]) -> None:
    r["status"] = "maybe"


@pytest.mark.parametrize(("edit", "match"), [
    (_density_str, r"shard-00000\.jsonl line 2.*'density'.*number"),
    (_no_tv, r"shard-00000\.jsonl line 2.*'tv'.*missing"),
    (_short_tv, r"shard-00000\.jsonl line 2.*'tv'.*3 strata"),
    (_index_out_of_range, r"shard-00000\.jsonl line 2.*'index'.*999"),
    (_counts_float, r"shard-00000\.jsonl line 2.*'counts'"),
    (_bad_status, r"shard-00000\.jsonl line 2.*'status'"),
], ids=["density-str", "missing-key", "short-curve", "index-range", "counts-float", "status"])
def test_a_wrongly_typed_record_field_is_named(pristine: Path, tmp_path: Path, edit: Callable, match: str,
                                               model_dir: str, data_file: Path) -> None:
    out = _copy(pristine, tmp_path)
    _edit_record(out, 2, edit)
    with pytest.raises(ResultsError, match=match):
        load_run(out)
    with pytest.raises(ResultsError, match=match):  # and on resume, before anything is traced
        run_corpus(model_dir, data_file, out, sizes=SIZES, limit=3, progress=False)


def test_an_edited_number_fails_its_checksum(pristine: Path, tmp_path: Path) -> None:
    out = _copy(pristine, tmp_path)
    _edit_record(out, 1, lambda r: r.update(density=r["density"] + 0.1), reseal=False)
    with pytest.raises(ResultsError, match=r"shard-00000\.jsonl line 1.*sha256"):
        load_run(out)


def test_a_passage_recorded_in_two_shards_is_refused(pristine: Path, tmp_path: Path) -> None:
    out = _copy(pristine, tmp_path)
    first = (out / "shard-00000.jsonl").read_text().splitlines()[0]
    (out / "shard-00001.jsonl").write_text(first + "\n")
    with pytest.raises(ResultsError, match=r"shard-00001\.jsonl line 1.*index 0.*shard-00000\.jsonl line 1"):
        load_run(out)


def test_a_bad_line_before_the_last_is_corruption_but_a_torn_last_line_is_not(pristine: Path,
                                                                              tmp_path: Path) -> None:
    out = _copy(pristine, tmp_path)
    shard = out / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    with pytest.raises(ResultsError, match=r"shard-00000\.jsonl line 2"):
        load_run(out)
    shard.write_text("\n".join([lines[0], lines[1], lines[2][:40]]))  # torn last record: a run killed
    with pytest.warns(UserWarning, match="torn"):
        assert len(load_run(out)) == 2


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: [1, 2], r"run\.json.*not a JSON object"),
    (lambda m: m.pop("config") and None, r"run\.json.*'config'.*missing"),
    (lambda m: m["config"].pop("sizes") and None, r"run\.json.*'config\.sizes'.*missing"),
    (lambda m: m["config"].update(seed="0"), r"run\.json.*'config\.seed'"),
    (lambda m: m["config"].update(conditions="only"), r"run\.json.*'config\.conditions'"),
], ids=["not-object", "no-config", "no-sizes", "seed-str", "conditions-str"])
def test_a_damaged_run_json_is_named(pristine: Path, tmp_path: Path, edit: Callable, match: str,
                                     model_dir: str, data_file: Path) -> None:
    out = _copy(pristine, tmp_path)
    _edit_json(out / "run.json", edit)
    with pytest.raises(ResultsError, match=match):
        load_run(out)
    with pytest.raises(ResultsError, match=match):
        run_corpus(model_dir, data_file, out, sizes=SIZES, limit=3, progress=False)


def test_an_edited_run_json_fails_its_checksum(pristine: Path, tmp_path: Path) -> None:
    out = _copy(pristine, tmp_path)
    _edit_json(out / "run.json", lambda m: m["config"].update(method="threshold"), reseal=False)
    with pytest.raises(ResultsError, match=r"run\.json.*sha256"):
        load_run(out)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda u: u["counts"].update({"7": -1}), r"unigram\.json.*'counts'"),
    (lambda u: u["counts"].update({"7": 1.5}), r"unigram\.json.*'counts'"),
    (lambda u: u["counts"].update({"seven": 1}), r"unigram\.json.*'counts'"),
    (lambda u: u.update(counts=[1, 2]), r"unigram\.json.*'counts'"),
    (lambda u: u.update(total=u["total"] + 1), r"unigram\.json.*'total'"),
], ids=["negative", "float", "key", "list", "total"])
def test_damaged_unigram_counts_are_named(pristine: Path, tmp_path: Path, edit: Callable, match: str) -> None:
    out = _copy(pristine, tmp_path)
    _edit_json(out / "unigram.json", edit)
    with pytest.raises(ResultsError, match=match):
        load_run(out)


def test_a_damaged_data_issue_is_named(pristine: Path, tmp_path: Path) -> None:
    out = _copy(pristine, tmp_path)
    path = out / "data_issues.jsonl"
    recs = _lines(path)
    assert recs, "the fixture's data has an empty line"
    recs[0]["reason"] = 3
    _write_lines(path, recs)
    with pytest.raises(ResultsError, match=r"data_issues\.jsonl line 1.*'reason'"):
        load_run(out)


def test_a_run_from_before_checksums_still_loads(pristine: Path, tmp_path: Path) -> None:
    out = _copy(pristine, tmp_path)
    for shard in out.glob("shard-*.jsonl"):
        _write_lines(shard, [{k: v for k, v in r.items() if k != "sha256"} for r in _lines(shard)])
    for name in ("run.json", "unigram.json"):
        _edit_json(out / name, lambda m: {k: v for k, v in m.items() if k not in ("sha256", "checksums")},
                   reseal=False)
    _write_lines(out / "data_issues.jsonl",
                 [{k: v for k, v in r.items() if k != "sha256"} for r in _lines(out / "data_issues.jsonl")])
    assert canon(load_run(out)) == canon(load_run(pristine))
    _edit_record(out, 2, _density_str)  # ... and is still validated by schema
    with pytest.raises(ResultsError, match="'density'"):
        load_run(out)


# ============================================================================ (c) memory
def _passages_with_one_long(tmp_path: Path) -> Path:
    ps = word_passages(3, seed=4) + [Passage(id="long", text=" ".join(["w5"] * 60), next_word="w3")]
    ps = [ps[0], ps[3], ps[1], ps[2]]
    path = tmp_path / "mixed.jsonl"
    write_passages(ps, path)
    return path


def _needs(model_dir: str, n_tokens: int) -> int:
    """What the runner must compare with the memory there is: one call with a single masked row."""
    from tl_strace.io.models import load_model
    from tl_strace.model import describe_model

    return memory.estimate_memory(describe_model(load_model(model_dir)), n_tokens, 1).total


def test_a_passage_that_does_not_fit_the_machine_is_skipped(model_dir: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """memory_budget=None: the passage is checked against the memory available; the long one (61
    tokens with BOS) does not fit, the short ones (at most 10 tokens) do, and the run goes on."""
    data = _passages_with_one_long(tmp_path)
    avail = (_needs(model_dir, 10) + _needs(model_dir, 61)) // 2
    monkeypatch.setattr(memory, "available_memory", lambda: avail, raising=False)
    out = tmp_path / "r"
    s = run_corpus(model_dir, data, out, sizes=SIZES, progress=False)
    assert s.n_new == 4 and s.n_skipped == 1
    run = load_run(out)
    assert sorted(run.table["id"]) == ["p000", "p001", "p002"]
    reason = run.skipped.set_index("id").loc["long", "reason"]
    assert "available" in reason and "61 tokens" in reason
    s = run_corpus(model_dir, data, out, sizes=SIZES, progress=False)  # and a resume does not retry it
    assert s.n_new == 0 and s.n_skipped == 1


def test_a_passage_over_the_memory_budget_is_skipped(model_dir: str, tmp_path: Path) -> None:
    data = _passages_with_one_long(tmp_path)
    budget = (_needs(model_dir, 10) + _needs(model_dir, 61)) // 2
    out = tmp_path / "r"
    s = run_corpus(model_dir, data, out, sizes=SIZES, memory_budget=budget, progress=False)
    assert s.n_skipped == 1
    run = load_run(out)
    assert sorted(run.table["id"]) == ["p000", "p001", "p002"]
    assert "memory_budget" in run.skipped.set_index("id").loc["long", "reason"]


# ============================================================================ full disk mid-run
def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(model_dir: str, data_file: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    from tl_strace.cli import main

    real = corpus._append
    written: list[int] = []

    def append_then_fill(f: Any, rec: dict[str, Any]) -> None:
        if len(written) == 2:  # the third record: half of it reaches the disk, then ENOSPC
            f.write(json.dumps(rec).encode()[:50])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, rec)
        written.append(1)

    monkeypatch.setattr(corpus_run, "_append", append_then_fill)  # where the runner looks it up
    out = tmp_path / "full"
    args = ["run", "--model", model_dir, "--data", str(data_file), "--out", str(out), "--quiet",
            "--sizes", *map(str, SIZES)]
    assert main(args) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "Loading weights" not in x]
    assert len(lines) == 1 and lines[0].startswith("tl-strace: error:"), lines
    err = lines[0]
    assert "No space left" in err and "rerun" in err
    monkeypatch.setattr(corpus_run, "_append", real)
    assert main(args) == 0
    ref = tmp_path / "ref"
    run_corpus(model_dir, data_file, ref, sizes=SIZES, progress=False)
    assert canon(load_run(out)) == canon(load_run(ref))


# ============================================================================ (f) atomic writes
def test_a_failed_write_of_a_run_file_leaves_no_temporary(model_dir: str, data_file: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def no_rename(*a: Any, **k: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", no_rename)
    out = tmp_path / "r"
    with pytest.raises(OSError):
        run_corpus(model_dir, data_file, out, sizes=SIZES, limit=1, progress=False)
    assert [p.name for p in out.iterdir() if "tmp" in p.name] == []
