"""Build the shipped offline English passage sets (``tl_strace/data/austen-{10,20,40}.jsonl``).

Source: Jane Austen's six novels (public domain) from the Debian package ``r-cran-janeaustenr``,
which stores them as R-serialised character vectors in ``data/Rdata.rdb``. The package is fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no installation, no root needed beyond
what apt-get download needs); the R data are read here with zlib + a ~40-line XDR reader.

    python scripts/build_passages.py                # writes tl_strace/data/austen-*.jsonl
    python scripts/build_passages.py --deb path/to/r-cran-janeaustenr_1.0.0-1_all.deb
    python scripts/build_passages.py --words 400 --out /tmp/long   # one set of longer passages (not shipped)

Passages follow paper B's setup (40 words of running text, the next word as target) with
:func:`tl_strace.io.datasets.passages_from_words`: non-overlapping windows within a chapter, drawn
with a fixed seed, each target an alphabetic word; the six novels' passages are then shuffled
(seeded), so the first N passages are a sample of all six. The 10- and 20-word variants keep the
*same* id and next word and only the last 10 / 20 words of the context, for the context-length
analysis. The output is deterministic for a given package version.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

from tl_strace.io.datasets import passages_from_words, write_passages

PACKAGE = "r-cran-janeaustenr"
BOOKS = {  # R object name -> short id prefix
    "sensesensibility": "sense", "prideprejudice": "pride", "mansfieldpark": "mansfield",
    "emma": "emma", "northangerabbey": "northanger", "persuasion": "persuasion",
}
OUT = Path(__file__).resolve().parents[1] / "tl_strace" / "data"


class _XDR:
    """Minimal reader of R's XDR serialisation (format 2/3): vectors, strings, pairlists."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-serialised R object")
        self.d, self.i = data, 2
        version = self.int()
        self.int(), self.int()  # writer / minimal reader versions
        if version == 3:
            n = self.int()  # native encoding name: length, then bytes
            self.i += n
        self.refs: list[Any] = []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def item(self) -> Any:
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if typ == 254:  # NILVALUE
            return None
        if typ == 255:  # REFSXP
            idx = flags >> 8
            return self.refs[(idx or self.int()) - 1]
        if typ == 1:  # SYMSXP
            sym = self.item()
            self.refs.append(sym)
            return sym
        if typ == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if typ == 2:  # LISTSXP (pairlist): attr, tag, car, cdr
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = [(tag, self.item())]
            rest = self.item()
            del attr
            return head + (rest or [])
        if typ in (10, 13, 14, 16, 19):  # LGL, INT, REAL, STR, VEC
            n = self.int()
            if typ in (10, 13):
                out: Any = list(struct.unpack_from(f">{n}i", self.d, self.i))
                self.i += 4 * n
            elif typ == 14:
                out = list(struct.unpack_from(f">{n}d", self.d, self.i))
                self.i += 8 * n
            else:
                out = [self.item() for _ in range(n)]
            if has_attr:
                attrs = dict(self.item() or [])
                if "names" in attrs:
                    out = dict(zip(attrs["names"], out))
            return out
        raise ValueError(f"unsupported R SEXP type {typ}")


def read_rdata(rdb: Path, rdx: Path) -> dict[str, Any]:
    """Every object of an R lazy-load database (``.rdb`` + ``.rdx``), by name."""
    index = _XDR(gzip.decompress(rdx.read_bytes())).item()
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset:offset + length]
        out[name] = _XDR(zlib.decompress(chunk[4:])).item()  # 4-byte length, then zlib
    return out


_HEADING = re.compile(r"^\s*(chapter|volume)\b", re.IGNORECASE)


def chapters(lines: list[str]) -> list[list[str]]:
    """A novel's lines as one word list per chapter: front matter (before the first chapter
    heading), headings and all-capitals lines dropped, ``_italics_`` markers removed."""
    out: list[list[str]] = []
    cur: list[str] | None = None
    for line in lines:
        line = (line or "").replace("_", "")
        if _HEADING.match(line):
            if cur:
                out.append(cur)
            cur = []
        elif cur is not None and line.strip() and not line.strip().isupper():
            cur.extend(line.split())
    if cur:
        out.append(cur)
    return out


def fetch_deb(workdir: Path) -> Path:
    """``apt-get download`` the package into ``workdir`` and return the .deb path."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True, capture_output=True)
    return next(workdir.glob(f"{PACKAGE}_*.deb"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE} .deb (default: apt-get download it)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--per-book", type=int, default=350, help="passages drawn from each novel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--words", type=int, default=None,
                   help="write one set, austen-N.jsonl, of N-word passages (long inputs: 400 words are ~512 "
                        "SmolLM2 tokens) instead of the shipped 40/20/10 sets and SOURCE.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or fetch_deb(Path(tmp))
        root = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        data = next(root.rglob("janeaustenr/data/Rdata.rdb"))
        books = read_rdata(data, data.with_suffix(".rdx"))
        deb_sha = hashlib.sha256(Path(deb).read_bytes()).hexdigest()
        deb_name = Path(deb).name
    drawn = []
    n_words = args.words or 40
    for obj, prefix in BOOKS.items():
        drawn += passages_from_words(chapters(books[obj]), n_words=n_words, n=args.per_book, seed=args.seed,
                                     id_prefix=prefix)
    random.Random(args.seed).shuffle(drawn)  # any prefix (--limit N) is a sample of all six novels
    if args.words:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"austen-{args.words}.jsonl"
        write_passages(drawn, path)
        print(f"{path}: {len(drawn)} passages of {args.words} words from {deb_name}, {path.stat().st_size / 1e3:.0f} kB")
        return 0
    sets = {n: [p.with_context(n) for p in drawn] for n in (40, 20, 10)}
    args.out.mkdir(parents=True, exist_ok=True)
    for n, ps in sets.items():
        path = args.out / f"austen-{n}.jsonl"
        write_passages(ps, path)
        print(f"{path}: {len(ps)} passages, {path.stat().st_size / 1e3:.0f} kB")
    (args.out / "SOURCE.json").write_text(json.dumps({
        "source": f"Debian package {deb_name} (Jane Austen's novels, public domain)",
        "sha256": deb_sha, "books": list(BOOKS), "per_book": args.per_book, "seed": args.seed,
        "builder": "scripts/build_passages.py",
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
