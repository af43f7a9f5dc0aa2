"""Errors raised alike on every rank of a communicator (no rank left waiting)."""
from __future__ import annotations

from typing import Optional


class DatasetKeyError(KeyError):
    """A missing dataset in an HDF5 file (a ``KeyError`` whose message prints unquoted)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


_KINDS = {"FileNotFoundError": FileNotFoundError, "OSError": OSError,
          "DatasetKeyError": DatasetKeyError, "ValueError": ValueError,
          "TypeError": TypeError}


def _agree_error(comm, err: Optional[BaseException]) -> None:
    """Raise the same exception on every rank of ``comm`` if any rank has ``err``.

    The exception type is that of the lowest failing rank; the message is the one of
    :meth:`Communicator.agree` (the failing ranks and their messages).
    """
    kind = None
    if err is not None:
        kind = type(err).__name__ if type(err).__name__ in _KINDS else (
            "OSError" if isinstance(err, OSError) else "ValueError")
    kinds = comm.allgather_obj(kind) if comm.size > 1 else [kind]
    first = next((k for k in kinds if k is not None), None)
    if first is None:
        return
    comm.agree(err is None, "" if err is None else str(err), exc=_KINDS[first])
