"""How a run is stored and checked on load: the schemas of run.json, records, unigram and issue files,
shard reading with torn-line repair, merging shards, the lock and the appending of a record."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_strace.ablation import CONDITIONS
from tl_strace.corpus._base import ABLATIONS, GRANULARITIES, PROFILE_FIELDS, _METRICS, _digest, _sealed
from tl_strace.errors import InputError, ResultsError


# Every file of a run directory is checked when it is read (load_run, and a resume): its schema
# (types, lengths, ranges, consistency between fields) and, where the file carries one, its
# checksum. A record of a shard carries ``"sha256"``: the digest of its canonical JSON without that
# field (:func:`_digest`); run.json and unigram.json carry one over their whole content, each line
# of data_issues.jsonl over itself. Directories written before checksums existed have none and are
# checked by schema only; run.json says ``"checksums": "sha256"`` when every record must have one.
_METHODS = ("strace", "threshold", "nucleus")


_FIX_SHARD = "Delete that line to have its passage redone (or use another output directory)."


_FIX_RUN = "It is not a tl_strace run directory, or it was damaged; use another output directory."


_FIX_UNIGRAM = "Delete the file and rerun the run command to rebuild it."


_FIX_ISSUES = "Delete the file and rerun the run command to rewrite it."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_Check = tuple[Any, str]  # (predicate, what it expects)


_NAT: _Check = (lambda v: _is_int(v) and v >= 0, "a non-negative integer")


_INT: _Check = (_is_int, "an integer")


_NUM: _Check = (_is_num, "a number")


_STR: _Check = (lambda v: isinstance(v, str), "a string")


_BOOL: _Check = (lambda v: isinstance(v, bool), "true or false")


_OPT_INT: _Check = (lambda v: v is None or _is_int(v), "an integer or null")


_OPT_NUM: _Check = (lambda v: v is None or _is_num(v), "a number or null")


_OPT_STR: _Check = (lambda v: v is None or isinstance(v, str), "a string or null")


_OPT_BOOL: _Check = (lambda v: v is None or isinstance(v, bool), "true, false or null")


def _list_of(item: _Check) -> _Check:
    return (lambda v: isinstance(v, list) and all(item[0](x) for x in v), f"a list of {item[1].split(' or ')[0]}s")


def _show(v: Any) -> str:
    text = json.dumps(v, allow_nan=True, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class _Bad:
    """Builds the one-line ResultsError of one file (and line): where, which field, how to fix."""

    def __init__(self, where: str, fix: str) -> None:
        self.where, self.fix = where, fix

    def __call__(self, what: str) -> ResultsError:
        return ResultsError(f"{self.where}: {what}. {self.fix}")

    def check(self, obj: dict[str, Any], fields: dict[str, _Check], prefix: str = "") -> None:
        for name, (ok, expected) in fields.items():
            if name not in obj:
                raise self(f"field {prefix + name!r} is missing")
            if not ok(obj[name]):
                raise self(f"field {prefix + name!r} is {_show(obj[name])}, expected {expected}")

    def checksum(self, obj: dict[str, Any], required: bool) -> None:
        if "sha256" not in obj:
            if required:
                raise self("field 'sha256' (the checksum every record of this run carries) is missing")
            return
        if obj["sha256"] != _digest({k: v for k, v in obj.items() if k != "sha256"}):
            raise self("the content does not match its checksum (field 'sha256'): it was edited or damaged")


_RUN_CONFIG: dict[str, _Check] = {
    "data": (lambda v: isinstance(v, dict) and isinstance(v.get("source"), str)
             and isinstance(v.get("fingerprint"), str), "an object with a source and a fingerprint"),
    "granularity": (lambda v: v in GRANULARITIES, f"one of {list(GRANULARITIES)}"),
    "ablation": (lambda v: v in ABLATIONS, f"one of {list(ABLATIONS)}"),
    "ablate_attention": _BOOL,
    "method": (lambda v: v in _METHODS, f"one of {list(_METHODS)}"),
    "weights": (lambda v: v in ("l1", "ifr"), "one of ['l1', 'ifr']"),
    "sizes": (lambda v: v is None or (isinstance(v, list) and bool(v) and all(_is_num(s) and 0 < s <= 1 for s in v)),
              "null or a list of sizes in (0, 1]"),
    "taus": (lambda v: v is None or _list_of(_NUM)[0](v), "null or a list of numbers"),
    "conditions": (lambda v: isinstance(v, list) and "only" in v and all(c in CONDITIONS for c in v),
                   f"a list of conditions among {list(CONDITIONS)} with 'only'"),
    "seed": _INT,
    "top_k": _NAT,
    "prepend_bos": _OPT_BOOL,
    "record_sizes": _list_of(_NUM),
    "record_version": _INT,
    "model": (lambda v: isinstance(v, dict), "an object"),
}


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """Validate a parsed run.json; return it."""
    bad = _Bad(str(path), _FIX_RUN)
    if not isinstance(meta, dict):
        raise bad(f"the file is not a JSON object (it is {_show(meta)})")
    obj = (lambda v: isinstance(v, dict), "an object")
    bad.check(meta, {"config": obj, "versions": obj})
    bad.check(meta["config"], _RUN_CONFIG, "config.")
    for name, chk in (("n_passages", _NAT), ("checksums", (lambda v: v == "sha256", "'sha256'"))):
        if name in meta:
            bad.check(meta, {name: chk})
    if "positions" in meta["config"]:  # every-position runs only (absent: the last position of each passage)
        bad.check(meta["config"], {"positions": (lambda v: v == "every", "'every'")}, "config.")
        if meta["config"]["granularity"] != "token":
            raise bad("field 'config.positions' is 'every', but every-position runs are token granularity only")
    bad.checksum(meta, required=False)
    return meta


def _read_meta(path: Path) -> dict[str, Any]:
    """Read and validate run.json."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({e}); it is not a tl_strace run directory, "
                           "or it was damaged. Use another output directory.") from e
    return _check_meta(meta, path)


@dataclass(frozen=True)
class _Schema:
    """What every record of one run must look like (from its run.json)."""

    granularity: str = "token"
    conditions: tuple[str, ...] = ("only",)
    n_strata: int | None = None
    """The strata of every record (s-Trace with given sizes: those, plus the full graph)."""
    n_passages: int | None = None
    """Passages in the data (an index must be below it), when run.json says."""
    checksums: bool = False
    every_position: bool = False
    """Every record of an ok passage carries a ``profile`` (``positions: "every"`` in run.json)."""

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "_Schema":
        cfg = meta["config"]
        sizes, k = cfg.get("sizes"), None
        if cfg.get("method") == "strace" and cfg.get("granularity") == "token" and sizes:
            k = len(sizes) + (0 if float(sizes[-1]) == 1.0 else 1)
        return cls(granularity=cfg["granularity"], conditions=tuple(cfg["conditions"]), n_strata=k,
                   n_passages=meta.get("n_passages"), checksums=meta.get("checksums") == "sha256",
                   every_position=cfg.get("positions") == "every")


_OK_FIELDS: dict[str, _Check] = {
    "index": _NAT, "id": _STR, "text": _STR, "next_word": _OPT_STR, "context_words": _OPT_INT, "line": _OPT_INT,
    "target_id": _OPT_INT, "n_tokens": _NAT, "n_edges": _NAT, "density": _NUM, "density_linear": _NUM,
    "full_entropy": _NUM, "full_top_token": _STR, "full_top_id": _NAT, "full_top_prob": _NUM, "full_ce": _OPT_NUM,
    "full_target_rank": _OPT_NUM, "seconds": _NUM,
    "components": (lambda v: isinstance(v, dict) and all(
        isinstance(c, dict) and all(isinstance(n, str) and _is_int(e) for n, e in c.items()) for c in v.values()),
        "an object of {component: edge count} objects"),
}


_SKIPPED_FIELDS: dict[str, _Check] = {"index": _NAT, "id": _STR, "line": _OPT_INT, "text": _STR,
                                      "next_word": _OPT_STR, "reason": _STR}


_SHARE_FIELDS = ("share_attn", "share_mlp", "share_residual", *(f"share_layers_{g}" for g in range(4)))


def _check_record(rec: Any, schema: _Schema, bad: _Bad) -> dict[str, Any]:
    """Validate one parsed shard record (schema, then checksum); return it."""
    if not isinstance(rec, dict):
        raise bad(f"the line is not a JSON object (it is {_show(rec)})")
    bad.check(rec, {"status": (lambda v: v in ("ok", "skipped"), "'ok' or 'skipped'")})
    bad.check(rec, _OK_FIELDS if rec["status"] == "ok" else _SKIPPED_FIELDS)
    if rec["status"] == "skipped" and "memory_needed" in rec:  # a memory skip (retried once it fits)
        bad.check(rec, {"memory_needed": _NAT})
    if schema.n_passages is not None and rec["index"] >= schema.n_passages:
        raise bad(f"field 'index' is {rec['index']}, but the run's data has {schema.n_passages} passages")
    if rec["status"] == "ok":
        bad.check(rec, {k: _NUM for k in rec if k.startswith("recovery_")})
        bad.check(rec, {"sizes": _list_of(_NUM)})
        K = len(rec["sizes"])
        if schema.n_strata is not None and K != schema.n_strata:
            raise bad(f"field 'sizes' has {K} strata, but the run's sizes make {schema.n_strata}")
        curves: dict[str, _Check] = {"counts": _list_of(_NAT), "top_ids": _list_of(_NAT),
                                     "top_tokens": _list_of(_STR), "top_probs": _list_of(_NUM)}
        for cond in schema.conditions:
            suffix = "" if cond == "only" else f"_{cond}"
            curves.update({f"{m}{suffix}": _list_of(_BOOL if m == "reaches_input" else _NUM) for m in _METRICS})
        if schema.granularity == "token":
            curves.update({k: _list_of(_NUM) for k in _SHARE_FIELDS})
        bad.check(rec, curves)
        for name in curves:
            if len(rec[name]) != K:
                raise bad(f"field {name!r} has {len(rec[name])} values, but the record has {K} strata")
        if schema.every_position:
            _check_profile(rec, K, bad)
        elif "profile" in rec:
            raise bad("field 'profile' is present, but the run does not record every position (run.json has no "
                      "'positions': 'every')")
    bad.checksum(rec, required=schema.checksums)
    return rec


_PROFILE_CHECKS: dict[str, _Check] = {
    "position": _list_of(_NAT), "n_tokens": _list_of(_NAT), "token_id": _list_of(_NAT),
    "target_id": _list_of(_OPT_INT), "density": _list_of(_NUM), "density_linear": _list_of(_NUM),
    "full_entropy": _list_of(_NUM), "full_top_id": _list_of(_NAT), "full_top_prob": _list_of(_NUM),
    "full_ce": _list_of(_OPT_NUM), "full_target_rank": _list_of(_OPT_NUM), "seconds": _list_of(_NUM),
    "tv": _list_of((lambda v: isinstance(v, list) and all(_is_num(x) for x in v), "a list of numbers")),
}
assert set(_PROFILE_CHECKS) == set(PROFILE_FIELDS)


def _check_profile(rec: dict[str, Any], K: int, bad: _Bad) -> None:
    """An every-position record's ``profile``: every field of :data:`PROFILE_FIELDS` and the
    record's recovery sizes, one entry per position, positions increasing and within the passage's
    tokens, the last one the passage's own (the record's prediction), each TV curve ``K`` long."""
    if not isinstance(rec.get("profile"), dict):
        raise bad("field 'profile' is missing or not an object (every record of an every-position run has one)"
                  if "profile" not in rec else f"field 'profile' is {_show(rec['profile'])}, expected an object")
    prof = rec["profile"]
    checks = {**_PROFILE_CHECKS, **{k: _list_of(_NUM) for k in rec if k.startswith("recovery_")}}
    bad.check(prof, checks, "profile.")
    extra = sorted(set(prof) - set(checks))
    if extra:
        raise bad(f"field 'profile.{extra[0]}' is not a field of a profile")
    n = len(prof["position"])
    if n == 0:
        raise bad("field 'profile.position' is empty (at least the passage's last position is traced)")
    for name in checks:
        if len(prof[name]) != n:
            raise bad(f"field 'profile.{name}' has {len(prof[name])} values, but the profile has {n} positions")
    pos = prof["position"]
    if any(b <= a for a, b in zip(pos, pos[1:])):
        raise bad("field 'profile.position' is not increasing (each position once, in text order)")
    if pos[-1] != rec["n_tokens"] - 1:
        raise bad(f"field 'profile.position' ends at {pos[-1]}, but the passage's last position is "
                  f"{rec['n_tokens'] - 1} (n_tokens {rec['n_tokens']})")
    if prof["density"][-1] != rec["density"] or prof["full_top_id"][-1] != rec["full_top_id"]:
        raise bad("the profile's last position (the passage's own prediction) differs from the record's density "
                  "or top token")
    if any(m != t + 1 for t, m in zip(pos, prof["n_tokens"])):
        raise bad("field 'profile.n_tokens' does not match the positions (position t traces t + 1 tokens)")
    short = next((i for i, c in enumerate(prof["tv"]) if len(c) != K), None)
    if short is not None:
        raise bad(f"field 'profile.tv' at position {pos[short]} has {len(prof['tv'][short])} values, but the "
                  f"record has {K} strata")


def _check_unigram(obj: Any, path: Path) -> dict[int, int]:
    """Validate a parsed unigram.json; return its counts."""
    bad = _Bad(str(path), _FIX_UNIGRAM)
    if not isinstance(obj, dict):
        raise bad(f"the file is not a JSON object (it is {_show(obj)})")
    counts_ok = (lambda v: isinstance(v, dict) and all(isinstance(k, str) and k.isdigit() and _NAT[0](c)
                                                        for k, c in v.items()),
                 "an object of {token id: non-negative integer count}")
    bad.check(obj, {"total": _NAT, "counts": counts_ok})
    if obj["total"] != sum(obj["counts"].values()):
        raise bad(f"field 'total' is {obj['total']}, but the counts sum to {sum(obj['counts'].values())}")
    bad.checksum(obj, required=False)
    return {int(k): int(v) for k, v in obj["counts"].items()}


def _read_unigram(path: Path) -> dict[int, int]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({e}). {_FIX_UNIGRAM}") from e
    return _check_unigram(obj, path)


def _read_issues(path: Path) -> list[dict[str, Any]]:
    """The validated lines of data_issues.jsonl (line, id, reason)."""
    out = []
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        bad = _Bad(f"{path} line {n}", _FIX_ISSUES)
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the line is not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise bad(f"the line is not a JSON object (it is {_show(obj)})")
        bad.check(obj, {"line": _OPT_INT, "id": _OPT_STR, "reason": _STR})
        bad.checksum(obj, required=False)
        out.append({k: obj[k] for k in ("line", "id", "reason")})
    return out


def _merge(shards: list[tuple[Path, list[tuple[int, dict[str, Any]]]]]) -> dict[str, dict[str, Any]]:
    """The records of all shards by passage id; a passage (index or id) recorded twice is an error,
    except a memory skip (:func:`_is_memory_skip`) of the same passage (same index and id): any
    other record of it supersedes the skip (a resume retried the passage and it fit), whatever the
    order; of several memory skips the last one read counts."""
    by_index: dict[int, tuple[Path, int, str]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    where_id: dict[str, tuple[Path, int]] = {}
    for path, recs in shards:
        for n, rec in recs:
            i, pid = rec["index"], rec["id"]
            first = by_index.get(i) or ((*where_id[pid], pid) if pid in where_id else None)
            if first is not None and first[2] == pid and by_id[pid]["index"] == i \
                    and (_is_memory_skip(by_id[pid]) or _is_memory_skip(rec)):
                if _is_memory_skip(rec) and not _is_memory_skip(by_id[pid]):
                    continue  # the passage was retried and recorded; this skip is superseded
                first = None
            if first is not None:
                raise ResultsError(
                    f"{path} line {n}: passage index {i} ({pid}) is also recorded in {first[0]} line {first[1]} "
                    f"(passage {first[2]}); each passage is recorded once, so the directory was edited or two runs "
                    "wrote into it. Delete one of the two lines (or use another output directory).")
            by_index[i] = (path, n, pid)
            where_id[pid] = (path, n)
            by_id[pid] = rec
    return by_id


def _read_shard(path: Path, *, repair: bool,
                schema: _Schema | None = None) -> tuple[list[tuple[int, dict[str, Any]]], str | None]:
    """The complete records of a shard, as ``(line number, record)``, each validated against
    ``schema`` (:func:`_check_record`).

    A torn last line (no newline, or not JSON: what a kill during the write leaves) is ignored, and
    cut off the file when ``repair``: that passage is redone. A line before the last that is not
    JSON, and any line that is JSON but not a valid record, is corruption: a ResultsError naming
    the file, the line and the field."""
    schema = schema or _Schema()
    if path.exists() and not path.is_file():
        raise ResultsError(f"{path} is not a regular file (a directory or a special file has a shard's name); "
                           "remove it or move it out of the run directory.")
    data = path.read_bytes() if path.exists() else b""
    if not data:
        return [], None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    recs: list[tuple[int, dict[str, Any]]] = []
    keep = 0
    note = None
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(lines) - 1 and not tail:
                note = f"{path.name}: the last record (line {i + 1}) is corrupt; it is redone"
                break
            raise ResultsError(f"{path} line {i + 1} is corrupt (not a complete record) and is not the last line; "
                               "delete that line to have its passage redone.") from None
        recs.append((i + 1, _check_record(obj, schema, _Bad(f"{path} line {i + 1}", _FIX_SHARD))))
        keep += len(line) + 1
    if tail:
        note = f"{path.name}: the last record was torn ({len(tail)} bytes without a newline); it is redone"
    if note and repair:
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return recs, note


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the OS even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise ResultsError(f"Another process is writing {path.with_suffix('.jsonl').name} of this run "
                               f"(lock {path} is held); wait for it or stop it first.") from e
        yield
    finally:
        os.close(fd)


def _append(f: Any, rec: dict[str, Any]) -> None:
    """Append ``rec`` with its checksum as one line: one unbuffered write (repeated only if the OS
    writes part of it), then ``fsync``. A failure (full disk) leaves at most a torn last line,
    which the next start cuts off and redoes."""
    data = memoryview((json.dumps(_sealed(rec), ensure_ascii=False, allow_nan=True) + "\n").encode("utf-8"))
    while data:
        n = f.write(data)
        data = data[n:] if n is not None else data[len(data):]
    f.flush()
    os.fsync(f.fileno())


_RETRY = "rerun with a larger memory_budget (or on a machine with more memory) to retry it"


class _MemorySkip(InputError):
    """A passage that does not fit in memory now; ``needed`` is the bytes one call on it needs
    (stored in its skip record as ``memory_needed``, so a resume retries it once it fits)."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = int(needed)


def _is_memory_skip(rec: dict[str, Any]) -> bool:
    """A skip record of a passage that did not fit in memory (it may be superseded by a later record)."""
    return rec.get("status") == "skipped" and "memory_needed" in rec
