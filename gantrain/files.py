"""Writing files so that a failure never leaves a half-written file where a good one was."""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from gantrain.errors import GantrainError

# The errors that mean "this file system will not take more bytes here": no space, over quota,
# over the process's file-size limit (ulimit -f), or mounted read-only / not writable by us.
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # atomic_write's temp names


class WriteError(GantrainError):
    """A file could not be written for a reason outside gantrain: a full disk, no permission."""


def write_error(e: OSError, path: str | Path, size: int | None = None) -> WriteError:
    """One line for an ``OSError`` writing ``path``: what happened, the size needed and the space free."""
    path = Path(path)
    what = e.strerror or str(e)
    if e.errno in FULL:
        need = f"needs {_mb(size)}, " if size is not None else ""
        free = _free(path.parent)
        return WriteError(
            f"cannot write '{path}': {what} ({need}{free}); free some space (or raise the quota / ulimit -f), "
            "then resume with trainer.resume=auto"
        )
    if e.errno in NOT_WRITABLE:
        return WriteError(f"cannot write '{path}': {what}; the run directory must be writable (see hydra.run.dir)")
    return WriteError(f"cannot write '{path}': {what}")


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _free(folder: Path) -> str:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{_mb(shutil.disk_usage(folder).free)} free on its file system"
    except OSError:
        return "free space unknown"


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temp files an interrupted :func:`atomic_write` left in ``folder`` (call it only while
    holding the run directory's lock: another process's temp file is not stale)."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name)] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], fsync: bool = True) -> Path:
    """Run ``write`` on a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``. The folder is created if
    needed. On any error the temp file is removed and an existing ``path`` is left as it was; a full disk or a folder we
    may not write raises :class:`WriteError` (one line: the path, the reason, the space free). ``fsync=False`` skips the
    flush to disk (many small files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 honours the umask (tempfile.mkstemp would leave the result private, 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise (write_error(e, path) if e.errno in FULL | NOT_WRITABLE else e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None and cause.errno in FULL | NOT_WRITABLE:
            raise write_error(cause, path, size=_size_of(write)) from None
        raise
    return path


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind ``e``: torch.save's zip writer replaces a failed write's OSError by a RuntimeError
    raised while closing the archive, with the OSError as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class _Counter:
    """A write-only sink that only counts bytes (``torch.save`` and ``save_image`` accept it)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def _size_of(write: Callable[[BinaryIO], None]) -> int | None:
    """The bytes ``write`` produces, measured without a disk (for the full-disk message); None if unknown."""
    counter = _Counter()
    try:
        write(counter)  # type: ignore[arg-type]
    except Exception:
        return None
    return counter.n


def replace_marked_section(path: str | Path, tag: str, body: str) -> Path:
    """Replace the text between ``<!-- TAG:begin -->`` and ``<!-- TAG:end -->`` in a markdown file. Benchmark scripts
    write their tables into the docs this way; missing markers (or file) are appended. Atomic."""
    import re

    path = Path(path)
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    return atomic_write(path, lambda f: f.write(text.encode()))
