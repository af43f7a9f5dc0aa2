"""Errors raised alike on every rank of a communicator (no rank left waiting)."""
from __future__ import annotations

from typing import Callable, Mapping, Optional


class DatasetKeyError(KeyError):
    """A missing dataset in an HDF5 file (a ``KeyError`` whose message prints unquoted)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


# exception types of the data files and loader that may cross ranks by name
_KINDS = {c.__name__: c for c in (FileNotFoundError, OSError, DatasetKeyError, ValueError,
                                  TypeError)}


def agreed_message(bad: list) -> str:
    """The text of an error agreed on by several ranks.

    ``bad``: ``(rank, message)`` of every failing rank, in rank order. One message shared
    by all of them is followed by the failing ranks, e.g. ``"bad file (on rank(s) [0,
    2])"``; different ones are listed per rank, ``"rank 0: x; rank 1: y"``.
    """
    msgs = sorted({m for _, m in bad})
    if len(msgs) == 1:
        return f"{msgs[0]} (on rank(s) {[r for r, _ in bad]})"
    return "; ".join(f"rank {r}: {m}" for r, m in bad)


def agree_error(comm, err: Optional[BaseException], kinds: Mapping[str, type],
                fallback: Callable[[BaseException], str],
                message: Callable[[BaseException], str] = str) -> None:
    """Raise the same exception on every rank of ``comm`` if any rank has ``err``.

    Collective: one small allgather (none on one rank), also when ``err`` is ``None``.
    ``kinds``: the exception classes, by name, that may cross ranks; an ``err`` of
    another type crosses as the kind named ``fallback(err)``. ``message(err)``: its text.
    The type raised is that of the lowest failing rank; the message is that rank's
    text on one rank, else :func:`agreed_message` of all failing ranks. On the ranks
    that failed, ``err`` is chained as the cause.
    """
    mine = None
    if err is not None:
        name = type(err).__name__
        mine = (name if name in kinds else fallback(err), message(err))
    flags = [mine] if comm.size == 1 else comm.allgather_obj(mine)
    bad = [(r, f) for r, f in enumerate(flags) if f is not None]
    if not bad:
        return
    exc = kinds[bad[0][1][0]]
    if comm.size == 1:
        raise exc(bad[0][1][1]) from err
    raise exc(agreed_message([(r, m) for r, (_, m) in bad])) from err


def _agree_error(comm, err: Optional[BaseException]) -> None:
    """:func:`agree_error` for the data files and loader: an error of a type not in
    :data:`_KINDS` crosses as ``OSError`` if it is one, else as ``ValueError``."""
    agree_error(comm, err, _KINDS,
                lambda e: "OSError" if isinstance(e, OSError) else "ValueError")
