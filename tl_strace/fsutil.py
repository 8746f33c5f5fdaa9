"""Writing files safely: one atomic-write helper for every file tl_strace writes.

A write goes to a temporary file beside the target, is flushed to disk, then renamed over the
target, so a reader never sees half a file and a crash leaves the old file (or none). A failed write
removes its temporary file. The target must be a regular file or not exist yet: a directory, a
device node (``/dev/full``, ``/dev/null``), a FIFO or a socket is refused, never replaced, and a
missing or read-only parent directory is reported before any bytes are written.

:func:`check_output_path` runs the same checks without writing, so a command can refuse a bad
``--save`` / ``--html`` path *before* doing minutes of work.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tl_strace.errors import InputError

__all__ = ["OutputPathError", "atomic_write", "atomic_writer", "check_output_path", "write_with"]


class OutputPathError(InputError, OSError):
    """A path cannot be written: missing or read-only directory, or not a regular file.

    Derives from :class:`~tl_strace.errors.InputError` (the caller passed it) and :class:`OSError`
    (generic file-handling code keeps working).
    """


def check_output_path(path: str | os.PathLike[str], *, what: str = "output file") -> Path:
    """Check that ``path`` can be (over)written as a regular file; return it as a :class:`Path`.

    Raises :class:`OutputPathError` naming the problem: the path is a directory or a special file
    (device, FIFO, socket), its parent directory does not exist or is not a directory, or the
    parent is not writable by this process.
    """
    p = Path(os.fspath(path))
    if str(p) == "":
        raise OutputPathError(f"The {what} path is empty; give a file name.")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputPathError(f"Cannot write the {what} {str(p)!r}: {e.strerror or e}.") from e
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"The {what} {str(p)!r} is a directory; give a file name inside it.")
        if not stat.S_ISREG(st.st_mode):
            raise OutputPathError(
                f"The {what} {str(p)!r} is not a regular file (a device, FIFO or socket); tl_strace "
                "only replaces regular files. Give a normal file path."
            )
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputPathError(f"Cannot write the {what} {str(p)!r}: the directory {str(parent)!r} does not exist; create it first.")
    if not parent.is_dir():
        raise OutputPathError(f"Cannot write the {what} {str(p)!r}: {str(parent)!r} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"Cannot write the {what} {str(p)!r}: the directory {str(parent)!r} is not writable.")
    return p


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` must set it
    to read it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, what: str = "output file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and the target is left as it was. The target is
    checked with :func:`check_output_path` first.
    """
    target = check_output_path(path, what=what)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent if str(target.parent) else ".")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # again after the writer: some (safetensors' save_file) replace the file with a 0600 one
        os.chmod(tmp, 0o666 & ~_umask())
        # re-check just before replacing: the target may have become a special file meanwhile
        check_output_path(target, what=what)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, what: str = "output file") -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; return the path written.

    A full disk or any other failure raises :class:`OutputPathError` (text: what failed and where)
    and leaves no temporary file behind.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    target = Path(os.fspath(path))
    try:
        with atomic_writer(target, what=what) as tmp:
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
    except OutputPathError:
        raise
    except OSError as e:
        raise OutputPathError(f"Writing the {what} {str(target)!r} failed: {e.strerror or e}.") from e
    return target


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None], *, what: str = "output file") -> Path:
    """Atomically write ``path`` with ``writer(tmp_path)`` (for libraries that write files themselves,
    e.g. safetensors' ``save_file``). Failures raise :class:`OutputPathError`; no temporary is left."""
    target = Path(os.fspath(path))
    try:
        with atomic_writer(target, what=what) as tmp:
            writer(tmp)
    except OutputPathError:
        raise
    except OSError as e:
        raise OutputPathError(f"Writing the {what} {str(target)!r} failed: {e.strerror or e}.") from e
    return target
