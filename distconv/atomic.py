"""Files written atomically: a temporary file beside the target, then ``os.replace``.

Readers (another rank, a resumed job, a crash halfway) see the old file or the new one,
never half of one; a failure while writing leaves the old file and no temporary behind.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path, tmp=None, make_folder=True):
    """``with atomic_path(path) as tmp:`` write ``tmp``; on a clean exit it replaces
    ``path``, on an exception it is removed and the exception goes on. ``tmp``: the
    temporary file's name (default: a new file of a unique name beside ``path``, made by
    ``tempfile.mkstemp``); ``make_folder``: create the folder if missing."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=folder)
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path, text: str, fsync: bool = False) -> None:
    """``text`` (UTF-8) to ``path`` atomically; ``fsync``: flushed to the disk first."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_json(path, doc, indent: int = 1) -> None:
    """``doc`` as JSON (``indent``, a final newline) to ``path`` atomically."""
    import json
    write_text(path, json.dumps(doc, indent=indent) + "\n")
