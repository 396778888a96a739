"""Writing files so that a failure never leaves a half-written file where a good one was."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], fsync: bool = True) -> Path:
    """Run ``write`` on a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    The folder is created if needed. On any error the temp file is removed and an existing
    ``path`` is left as it was. ``fsync=False`` skips the flush to disk (many small files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 honours the umask (tempfile.mkstemp would leave the result private, 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_marked_section(path: str | Path, tag: str, body: str) -> Path:
    """Replace the text between ``<!-- TAG:begin -->`` and ``<!-- TAG:end -->`` in a markdown file.

    Benchmark scripts write their tables into the docs this way; the markers are appended at the
    end when the file (or the section) does not exist yet. The file is rewritten atomically.
    """
    import re

    path = Path(path)
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    return atomic_write(path, lambda f: f.write(text.encode()))
