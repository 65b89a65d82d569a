"""tftpd.decision: what a worker does with a request, decided without I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tftpd import packet as P
from tftpd.decision import (
    Merge,
    Refuse,
    Room,
    Serve,
    Supersede,
    apply_rules,
    decide,
    is_full,
)
from tftpd.remap import Rules

ROOMY = Room(sessions=0, max_sessions=10, client_sessions=0)


def _rrq(name: bytes = b"pxelinux.0", mode: str = "octet", **options: str) -> P.Request:
    return P.Request(P.RRQ, name, mode, dict(options))


def _wrq(name: bytes = b"upload.bin", mode: str = "octet") -> P.Request:
    return P.Request(P.WRQ, name, mode, {})


def test_a_new_read_is_served() -> None:
    req = _rrq()
    d = decide(req, "pxelinux.0", P.encode_rrq(b"pxelinux.0", "octet", {}), None, ROOMY,
               create=False)
    assert d == Serve(req, "pxelinux.0")


def test_the_live_request_again_is_merged() -> None:
    data = P.encode_rrq(b"pxelinux.0", "octet", {})
    assert decide(_rrq(), "pxelinux.0", data, data, ROOMY, create=False) == \
        Merge("pxelinux.0")


def test_a_different_request_supersedes_and_the_live_transfer_is_not_counted() -> None:
    full = Room(sessions=1, max_sessions=1, client_sessions=1, max_per_client=1)
    old = P.encode_rrq(b"a", "octet", {})
    new = P.encode_rrq(b"b", "octet", {})
    d = decide(_rrq(b"b"), "b", new, old, full, create=False)
    assert isinstance(d, Supersede) and isinstance(d.then, Serve)
    # Without a live transfer to end, the same room is full.
    d = decide(_rrq(b"b"), "b", new, None, full, create=False)
    assert isinstance(d, Refuse) and d.outcome == "busy"


def test_refusals_in_order() -> None:
    data = b"x"
    d = decide(_wrq(), "upload.bin", data, None, ROOMY, create=False)
    assert isinstance(d, Refuse) and d.message == "Uploads are disabled"
    d = decide(_rrq(mode="mail"), "f", data, None, ROOMY, create=False)
    assert isinstance(d, Refuse) and d.code == P.E_ILLEGAL_OP and "mail" in d.message
    d = decide(_rrq(mode="morse"), "f", data, None, ROOMY, create=False)
    assert isinstance(d, Refuse) and d.message == "Unknown mode"
    d = decide(_wrq(mode="netascii"), "f", data, None, ROOMY, create=True)
    assert isinstance(d, Refuse) and d.message == "Uploads are octet only"
    # Full beats a wrong upload mode: the busy answer is the one a client retries on.
    busy = Room(sessions=10, max_sessions=10, client_sessions=0)
    d = decide(_wrq(mode="netascii"), "f", data, None, busy, create=True)
    assert isinstance(d, Refuse) and d.outcome == "busy"


def test_the_refusal_carries_what_the_client_asked() -> None:
    d = decide(_rrq(mode="morse", blksize="1428"), "f", b"x", None, ROOMY, create=False)
    assert isinstance(d, Refuse) and d.options == {"blksize": "1428"}


def test_a_map_rule_rewrites_or_refuses() -> None:
    rules = Rules.parse("a ^secret\nr ^old/ new/\n")
    req, name = apply_rules(_rrq(b"old/x"), "old/x", "10.0.0.1", rules)  # type: ignore[misc]
    assert req.filename == b"new/x" and name == "new/x"
    refused = apply_rules(_rrq(b"secret.txt"), "secret.txt", "10.0.0.1", rules)
    assert isinstance(refused, Refuse) and refused.by_map and refused.code == P.E_ACCESS


rooms = st.builds(Room, st.integers(0, 20), st.integers(1, 20), st.integers(0, 20),
                  st.integers(0, 5))
requests = st.builds(P.Request, st.sampled_from([P.RRQ, P.WRQ]),
                     st.binary(min_size=1, max_size=20),
                     st.sampled_from(["octet", "netascii", "mail", "OCTET", ""]),
                     st.dictionaries(st.sampled_from(["blksize", "tsize", "x"]),
                                     st.text(max_size=5), max_size=3))


@given(requests, st.binary(max_size=30), st.one_of(st.none(), st.binary(max_size=30)),
       rooms, st.booleans())
def test_every_request_gets_exactly_one_answer(req: P.Request, data: bytes,
                                               live: bytes | None, room: Room,
                                               create: bool) -> None:
    d = decide(req, "name", data, live, room, create=create)
    if live is None:
        assert isinstance(d, (Refuse, Serve))
    elif live == data:
        assert d == Merge("name")  # a repeat merges, however full the worker is
    else:
        assert isinstance(d, Supersede)
        d = d.then
    if isinstance(d, Serve):
        # Served only within the limits, in a mode served, and uploads only if allowed.
        assert req.mode in ("octet", "netascii")
        assert create or not req.is_write
        assert not req.is_write or req.mode == "octet"
        counted = room if live is None else Room(room.sessions - 1, room.max_sessions,
                                                 room.client_sessions - 1,
                                                 room.max_per_client)
        assert not is_full(counted)
    elif isinstance(d, Refuse):
        assert d.code in (P.E_ACCESS, P.E_ILLEGAL_OP, P.E_UNDEFINED)
        assert d.options == req.options and not d.by_map
