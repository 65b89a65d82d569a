"""The data path: sending DATA, the pump, request intake, known answers.

Two implementations with one behaviour: the C one (``tftpd._datapath``, built by
cffi from ``_ext/``) and a pure-Python twin used when the extension is missing
(or forced: ``TFTPD_DATAPATH=python``).  This package is the only importer of
the compiled module.  Its modules, by concept:

- ``sending``: DataPath, send_window (the C call and the Python twin), FileShrank;
- ``intake``: reading requests from a listen socket, answering the known ones;
- ``known``: KnownAnswer(s), the table of requests whose answer is known;
- ``pump``: Pump, C's epoll loop, the transfers C starts, spare sockets;
- ``peers``: PeerTable, which slot serves a peer;
- ``net``: raw sockaddrs, ancillary data in, the pktinfo of a reply, drained;
- ``events``: the typed reports (PumpEvent, Request) and the Owner of a transfer;
- ``ext``: the numbers the compiled module must agree with.

The sans-IO rules (wire_block, the ACK rules) live in tftpd.transfer; the data
path uses them, and transfer.py imports nothing of the data path.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from tftpd.datapath import ext as _ext_mod
from tftpd.datapath.events import (
    EV_DONE,
    EV_ERROR,
    EV_PACKET,
    EV_PROBE,
    EV_READY,
    EV_REARM,
    EV_SHRANK,
    REQ_ANSWERED,
    REQ_MERGED,
    REQ_PASS,
    REQ_STARTED,
    Owner,
    PumpEvent,
    Request,
)
from tftpd.datapath.ext import BATCH, EXT_VERSION, REQ_BATCH, REQ_MAX
from tftpd.datapath.known import KnownAnswer, KnownAnswers
from tftpd.datapath.net import (
    IP_PKTINFO,
    IPV6_PKTINFO,
    IPV6_RECVPKTINFO,
    SO_TIMESTAMPNS,
    decode_sockaddr,
    drained,
    encode_sockaddr,
    from_ancillary,
    pktinfo_cmsg,
)
from tftpd.datapath.peers import PeerTable
from tftpd.datapath.pump import Pump
from tftpd.datapath.sending import (
    MAX_BLKSIZE,
    MIN_BLKSIZE,
    CDataPath,
    DataPath,
    FileShrank,
    PythonDataPath,
)
from tftpd.files import dir_identity
from tftpd.transfer import wire_block

__all__ = [
    "BATCH",
    "EV_DONE",
    "EV_ERROR",
    "EV_PACKET",
    "EV_PROBE",
    "EV_READY",
    "EV_REARM",
    "EV_SHRANK",
    "EXT_VERSION",
    "IPV6_PKTINFO",
    "IPV6_RECVPKTINFO",
    "IP_PKTINFO",
    "MAX_BLKSIZE",
    "MIN_BLKSIZE",
    "REQ_ANSWERED",
    "REQ_BATCH",
    "REQ_MAX",
    "REQ_MERGED",
    "REQ_PASS",
    "REQ_STARTED",
    "SO_TIMESTAMPNS",
    "CDataPath",
    "DataPath",
    "FileShrank",
    "KnownAnswer",
    "KnownAnswers",
    "Owner",
    "PeerTable",
    "Pump",
    "PumpEvent",
    "PythonDataPath",
    "Request",
    "decode_sockaddr",
    "dir_identity",
    "drained",
    "encode_sockaddr",
    "ext_error",
    "from_ancillary",
    "get_datapath",
    "pktinfo_cmsg",
    "wire_block",
]

_ENV = "TFTPD_DATAPATH"


def _load_ext() -> tuple[Any, str | None]:
    return _ext_mod.load()


_ext, _ext_error = _load_ext()
_warned = False


def ext_error() -> str | None:
    """Why the C data path is unavailable, or None when it loaded."""
    return _ext_error


def get_datapath(force: str | None = None) -> DataPath:
    """A new DataPath: C when the extension loaded, else Python (with a warning, once).

    ``force`` (or else the environment variable ``TFTPD_DATAPATH``) set to
    ``"c"`` or ``"python"`` picks one; forcing ``"c"`` without the extension
    raises ImportError.
    """
    global _warned
    choice = force if force is not None else os.environ.get(_ENV, "").strip().lower() or None
    if choice not in (None, "c", "python"):
        raise ValueError(f"data path must be 'c' or 'python', not {choice!r}")
    if choice == "python":
        return PythonDataPath()
    if choice == "c":
        if _ext is None:
            raise ImportError(f"{_ext_error}; it was required (force='c' or {_ENV}=c)")
        return CDataPath(_ext)
    if _ext is not None:
        return CDataPath(_ext)
    if not _warned:
        _warned = True
        warnings.warn(f"{_ext_error}; using the slower pure-Python data path",
                      RuntimeWarning, stacklevel=2)
    return PythonDataPath()
