"""Corpus runs: density over thousands of passages, resumable, sharded over ``torchrun`` ranks.

:func:`run_corpus` traces every passage of a data set with :func:`tl_strace.strace` and appends one
JSON record per passage, as soon as it finishes, to a shard file of the output directory. The
record holds everything the analyses of :mod:`tl_strace.analysis` need (curves, shares of edge
types and layer groups per stratum, the components in the trace at chosen sizes, top tokens), so
no analysis reruns the model. :func:`load_run` reads the shards back as one table.

>>> summary = run_corpus("smollm2-135m", "austen-40", "runs/smol", limit=200)   # doctest: +SKIP
>>> run = load_run("runs/smol")                                                   # doctest: +SKIP
>>> run.table[["id", "density", "full_entropy"]].head()                           # doctest: +SKIP

The output directory::

    run.json              configuration (compared on restart), versions, data source
    data_issues.jsonl     lines of the data that could not be read (line, reason)
    unigram.json          token counts of the corpus under the model's tokenizer
    shard-00000.jsonl     one record per passage (``"status": "ok"`` or ``"skipped"`` with a reason)
    shard-00001.jsonl     ... one shard per torchrun rank

**Resuming.** Each record is one line written with a single ``write`` and ``fsync``. On start,
every rank cuts a torn last line off its own shard (a line without its newline, or that does not
parse) and redoes that passage; passages with a complete record in any shard are not redone. So a
run killed at any point (``kill -9`` included) and restarted with the same command loses and
duplicates nothing. A different configuration pointed at the same directory raises
:class:`~tl_strace.errors.ResultsError`; ``limit`` may change (a larger limit extends the run).

**Passages skipped for memory.** A passage that cannot fit in memory (over ``memory_budget``, or
over the memory available on the machine when there is no budget) is recorded as skipped with the
bytes one call on it needs (``"memory_needed"``) and a reason that says to rerun with a larger
``memory_budget`` (or on a machine with more memory) to retry it. A resume retries it when those
bytes now fit the budget (or the memory available); the shard is append-only, so its new record is
appended and *supersedes* the skip: the loader keeps, per passage, the record that is not a memory
skip, and allows a passage to be recorded twice only in that way (any other duplicate is a
:class:`~tl_strace.errors.ResultsError`). A retry that still does not fit writes nothing. Every
other skip (too long for the context, a data problem) is final.

**Scale-out.** Started by ``torchrun --nproc-per-node N``, rank ``r`` of ``N`` takes the passages
with ``index % N == r`` and writes ``shard-<r>.jsonl`` (a gloo process group is used for barriers
only, so the same code runs on CPU and GPU). When the model is given by name, rank ``r`` loads it
on ``cuda:<LOCAL_RANK>`` when CUDA is available. A model too big for one GPU: load it spread over
several GPUs (``device_map="auto"`` through Accelerate, then ``TransformerBridge.boot_transformers``)
in one process and pass the model object.
"""

from tl_strace.corpus._base import (
    ABLATIONS,
    CONFIG_FILE,
    DEFAULT_RECORD_SIZES,
    GRANULARITIES,
    ISSUES_FILE,
    RECORD_VERSION,
    SHARD_GLOB,
    UNIGRAM_FILE,
    _digest,
)
from tl_strace.corpus._store import _append
from tl_strace.corpus.load import CorpusRun, load_run
from tl_strace.corpus.run import RunSummary, run_corpus

# The package is split by job (its modules: _base, _dist, _store, _records, run, load); the names
# above are its interface. ``_digest`` and ``_append`` are re-exported for the tests that check the
# records' checksums and interrupt an append; to replace a function the runner calls, patch it in
# ``tl_strace.corpus.run``, where the runner looks it up.

__all__ = [
    "GRANULARITIES",
    "ABLATIONS",
    "CorpusRun",
    "RunSummary",
    "load_run",
    "run_corpus",
]
