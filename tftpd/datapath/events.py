"""What crosses the boundary between the data path and the worker, typed.

The C data path reports through arrays of structs (tftpd_event, tftpd_request in
_ext/tftpd_datapath.h); this module names their kinds and gives each report a
NamedTuple of fixed field types, which the Python twin produces too.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from tftpd.datapath.known import KnownAnswer

__all__ = [
    "EV_DONE",
    "EV_ERROR",
    "EV_PACKET",
    "EV_PROBE",
    "EV_READY",
    "EV_REARM",
    "EV_SHRANK",
    "REQ_ANSWERED",
    "REQ_MERGED",
    "REQ_PASS",
    "REQ_STARTED",
    "Owner",
    "PumpEvent",
    "Request",
]

# The pump's event kinds (TFTPD_EV_* in the header; checked when the module loads).
EV_PACKET = 1  # a datagram Python must judge
EV_DONE = 2  # the last block was acknowledged
EV_ERROR = 3  # recv or send failed: err is the errno
EV_READY = 4  # a descriptor of Python's is ready: slot is its token
EV_PROBE = 5  # a transfer C started ended on ERROR 0, 8 or 9 (err)
EV_REARM = 6  # an ACK C answered brought the transfer's timer forward
EV_SHRANK = 7  # the next window found the file shorter than its size

# Request kinds (TFTPD_REQ_* in the header).
REQ_ANSWERED = 1  # a known ERROR went out
REQ_PASS = 2  # the worker must serve it
REQ_STARTED = 3  # a known OACK went out and C owns the transfer in `slot`
REQ_MERGED = 4  # a repeat of the request of a transfer C owns


class Owner(enum.IntEnum):
    """Who serves a transfer (struct tftpd_xfer's owner, TFTPD_OWNER_*)."""

    PYTHON = 0  # the worker; the pump may answer its ACKs while `fast` is set
    C = 1  # C started it from a known OACK and serves it until Python adopts it
    ENDED = 2  # C ended it (an existence probe); Python has yet to see EV_PROBE


class PumpEvent(NamedTuple):
    """One thing the pump hands back for Python to decide."""

    slot: int  # the transfer's slot (EV_READY: the token)
    kind: int  # EV_*
    err: int = 0  # EV_ERROR: the errno; EV_PROBE: the ERROR code; else 0
    datagram: bytes = b""  # EV_PACKET: what arrived
    source: tuple[Any, ...] | None = None  # EV_PACKET, EV_PROBE: who sent it
    offered: bool = False  # EV_PROBE: C offered the slot again itself


class Request(NamedTuple):
    """One request read from a listen socket."""

    kind: int  # REQ_*
    answer: KnownAnswer | None  # ANSWERED, STARTED, MERGED: the known answer
    err: int  # the failed answer's errno, or 0
    datagram: bytes  # PASS: the request
    source: tuple[Any, ...] | None  # the client (None for STARTED, MERGED: in the slot)
    destination: str | None  # the address it was sent to, if the socket said
    ifindex: int  # the arrival interface, 0 if unknown
    arrival: float  # realtime of arrival, 0.0 if unknown
    answered: float  # realtime the answer went out, 0.0 for PASS
    slot: int = -1  # STARTED, MERGED: the transfer's slot in the pump
