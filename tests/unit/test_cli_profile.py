"""``tl-strace profile``: the density of every position of a text, its files, and its errors before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tl_strace
from tl_strace.cli import main
from tl_strace.results import DensityProfile

TEXT = "w5 w17 w3 w42 w8 w9"  # the tiny tokenizer's words; BOS is prepended: 7 tokens


@pytest.fixture()
def tiny_loaded(monkeypatch: pytest.MonkeyPatch, gpt2_model: Any) -> Any:
    """``tl-strace profile`` runs on the tiny GPT-2 (load_model answers it whatever the name)."""
    monkeypatch.setattr(tl_strace, "load_model", lambda name, **k: gpt2_model)
    return gpt2_model


def test_profile_prints_a_line_per_position_and_writes_its_files(tiny_loaded, tmp_path: Path, capsys) -> None:
    out, html = tmp_path / "run", tmp_path / "p.html"
    assert main(["profile", TEXT, "--sizes", "0.001", "0.01", "0.1", "--positions", "2", "5", "--out", str(out),
                 "--html", str(html)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("pos"))
    rows = [line for line in lines[header + 2:] if line.strip() and not line.startswith(("profile", "HTML"))]
    assert [int(r.split()[0]) for r in rows] == [2, 5] and "tv@0.01" in lines[header]
    prof = DensityProfile.load(out / "profile.safetensors")
    assert prof.positions == (2, 5) and f"{float(prof.density[0]):.4f}" in rows[0]
    csv = (out / "profile.csv").read_text().splitlines()
    assert csv[0].startswith("position,token,next_token,predicted") and len(csv) == 3
    assert "CircuitsVis.ColoredTokens" in html.read_text()


def test_profile_json_is_one_valid_document(tiny_loaded, capsys) -> None:
    assert main(["profile", TEXT, "--sizes", "0.01", "0.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # strict JSON: the last position's NaNs are null
    assert [r["position"] for r in doc["positions"]] == list(range(1, 7))
    assert doc["positions"][-1]["next_token"] is None and doc["positions"][-1]["ce"] is None
    assert doc["positions"][0]["ce"] > 0 and "evaluate" in doc["timings"]


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tl_strace, "load_model", boom)


@pytest.mark.parametrize("args, needle", [
    (["--positions", "2", "2"], "twice"),
    (["--positions", "-1"], "negative"),
    (["--sizes", "2.0"], "size"),
    (["--out", "{file}"], "not a directory"),
    (["--out", "{missing}/sub"], "is not a directory"),
    (["--html", "{dir}"], "is a directory"),
])
def test_profile_errors_come_before_the_model(no_model, tmp_path: Path, capsys, args, needle) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    args = [a.format(file=f, missing=tmp_path / "nope", dir=tmp_path) for a in args]
    assert main(["profile", TEXT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-strace: error:") and len(err.strip().splitlines()) == 1 and needle in err, err
    assert f.read_text() == "x"


def test_positions_outside_the_text_are_one_line(tiny_loaded, capsys) -> None:
    assert main(["profile", TEXT, "--positions", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tl-strace: error: Position 7 is outside the text's 7 tokens") and err.count("\n") == 1


def test_generate_traces_the_generated_tokens(tiny_loaded, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    assert main(["generate", "w5 w17 w3", "--max-new-tokens", "3", "--no-stop-at-eos", "--sizes", "0.01", "0.1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("generated: ")
    prof = DensityProfile.load(out / "profile.safetensors")
    assert prof.config["generation"]["prompt_tokens"] == 4 and prof.positions == (3, 4, 5)
    assert text.splitlines()[0] == f"generated: {''.join(prof.str_tokens[4:])!r}"


def test_generate_has_no_positions_and_checks_before_loading(no_model, capsys) -> None:
    assert main(["generate", "w5", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "w5", "--positions", "1"])
    assert "unrecognized arguments: --positions" in capsys.readouterr().err


def test_generate_samples_when_asked(tiny_loaded, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    assert main(["generate", "w5 w17 w3", "--max-new-tokens", "3", "--no-stop-at-eos", "--sizes", "0.01", "0.1",
                 "--temperature", "5", "--top-p", "0.95", "--sample-seed", "7", "--out", str(out)]) == 0
    prof = DensityProfile.load(out / "profile.safetensors")
    assert prof.config["generation"]["sampling"] == {"temperature": 5.0, "top_k": None, "top_p": 0.95, "seed": 7}
    capsys.readouterr()
    assert main(["generate", "w5", "--temperature", "-1"]) == 2
    assert "temperature must be a positive number" in capsys.readouterr().err
