"""What to do with a request, decided without I/O.

A parsed RRQ or WRQ plus what the worker knows (the transfer live for that client,
the room left, the configuration) gives one answer: merge it into the live transfer,
supersede that transfer, refuse it, or serve it. Nothing here touches a socket, a file
or a clock; the worker carries the answer out (tftpd/worker/core.py). The checks run in
the order below, and that order is the rule: a map rule judges the name first
(apply_rules, before the worker looks for the client's live transfer), a repeat
of the live request merges before any limit applies, and a new request from a client
with a live transfer ends that transfer before the limits count it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from tftpd import packet as P
from tftpd.files import sanitize

MODES = ("octet", "netascii")


@dataclass(frozen=True, slots=True)
class Merge:
    """The same datagram as the live transfer's request: that transfer answers it."""

    name: str  # sanitised, for the log


@dataclass(frozen=True, slots=True)
class Refuse:
    """An ERROR to the client, and a record of why."""

    code: int
    message: str
    outcome: str  # denied, busy, ... (stats.OUTCOME)
    name: str  # sanitised, for the log
    mode: str  # sanitised, for the log
    options: dict[str, str]  # what the client asked, for the JSON log
    reason: str = ""
    by_map: bool = False  # refused before the request was looked at further


@dataclass(frozen=True, slots=True)
class Serve:
    """Go on: find the content, negotiate, start the transfer."""

    request: P.Request  # after remapping
    name: str  # sanitised, for the log


@dataclass(frozen=True, slots=True)
class Supersede:
    """The client moved on (same address and port, a different request): its live
    transfer ends, then `then` applies."""

    then: Refuse | Serve


Decision = Merge | Refuse | Serve | Supersede


@dataclass(frozen=True, slots=True)
class Room:
    """How full the worker is when the request arrives (the live transfer included)."""

    sessions: int  # live transfers in this worker
    max_sessions: int
    client_sessions: int  # live transfers of this client's address
    max_per_client: int = 0  # 0: no limit


def apply_rules(req: P.Request, name: str, client: str, rules: Any
                ) -> tuple[P.Request, str] | Refuse:
    """The request as the map rules (a tftpd.remap.Rules) rewrite it for `client`, and
    its sanitised name; or its refusal. Remapping comes first; confinement to the root
    judges its result. `name` is the sanitised name the client asked for."""
    mapped = rules.apply(os.fsdecode(req.filename), client, req.is_write)
    if mapped is None:
        return Refuse(P.E_ACCESS, "Access violation", "denied", name, req.mode,
                      req.options, "refused by a map rule", by_map=True)
    req = dataclasses.replace(req, filename=os.fsencode(mapped))
    return req, sanitize(req.filename)


def decide(req: P.Request, name: str, data: bytes, live_request: bytes | None,
           room: Room, *, create: bool) -> Decision:
    """The answer to `req` (the datagram `data`; `name`: its sanitised file name).

    `live_request` is the request datagram of the transfer live for the client's
    address and port, or None. The map rules have been applied (apply_rules).
    """
    if live_request is None:
        return _judge(req, name, room, create)
    if live_request == data:
        # A repeated RRQ (legacy ROMs send it twice, 10 us apart; a Raspberry Pi three
        # times): the transfer already answers it.
        return Merge(name)
    # The live transfer ends first: the limits count the worker without it.
    left = Room(room.sessions - 1, room.max_sessions, room.client_sessions - 1,
                room.max_per_client)
    return Supersede(_judge(req, name, left, create))


def _judge(req: P.Request, name: str, room: Room, create: bool) -> Refuse | Serve:
    if req.is_write and not create:
        return Refuse(P.E_ACCESS, "Uploads are disabled", "denied", name, req.mode,
                      req.options)
    if req.mode not in MODES:
        message = f"Mode not supported: {req.mode}" if req.mode == "mail" else "Unknown mode"
        return Refuse(P.E_ILLEGAL_OP, message, "denied", name, sanitize(req.mode),
                      req.options)
    if is_full(room):
        return Refuse(P.E_UNDEFINED, "Server busy, try again later", "busy", name, req.mode,
                      req.options)
    if req.is_write and req.mode != "octet":
        # netascii uploads would need converting back; no boot tool sends them.
        return Refuse(P.E_ILLEGAL_OP, "Uploads are octet only", "denied", name, req.mode,
                      req.options)
    return Serve(req, name)


def is_full(room: Room) -> bool:
    if room.sessions >= room.max_sessions:
        return True
    return bool(room.max_per_client) and room.client_sessions >= room.max_per_client
