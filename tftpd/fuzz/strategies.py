"""Hypothesis strategies for TFTP requests and client behaviour (public API).

    from tftpd.fuzz import scenarios
    @given(scenarios("pxelinux.0"))
    def test_server(sc): ...

Every strategy draws simple values first, so that hypothesis shrinks a failure towards
a plain request and as few client reactions as will still show it.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tftpd.fuzz.scenario import Reaction, Scenario

__all__ = ["corpus", "typical_options", "option_names", "option_values", "option_lists",
           "modes", "requests", "reactions", "junk_datagrams", "scenarios"]

KNOWN = [b"blksize", b"tsize", b"timeout", b"windowsize"]
CASED = [b"BLKSIZE", b"BlkSize", b"TSIZE", b"tSize", b"TimeOut", b"WINDOWSIZE", b"WindowSize"]
OTHER = [b"multicast", b"rollover", b"utimeout", b"x", b"", b"blksize2", b"\xe9t\xe9",
         b"blk\xffsize", b"tsize ", b"\x01"]


def _no_nul(b: bytes) -> bytes:
    return b.replace(b"\0", b"")


def option_names() -> st.SearchStrategy[bytes]:
    """Known names mostly; mixed case, unknown, empty and non-ASCII ones too."""
    known = st.sampled_from(KNOWN)
    return st.one_of(known, known, known, st.sampled_from(CASED), st.sampled_from(OTHER),
                     st.binary(min_size=1, max_size=12).map(_no_nul))


def _num(values: list[int], low: int, high: int) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(values), st.integers(low, high)).map(
        lambda n: str(n).encode())


def typical_options() -> st.SearchStrategy[tuple[bytes, bytes]]:
    """One option as boot ROMs and loaders send it: a known name, a valid value."""
    return st.one_of(
        st.tuples(st.sampled_from([b"blksize", b"BLKSIZE", b"BlkSize"]),
                  _num([1456, 512, 1024, 1428, 1468, 8, 65464], 8, 65464)),
        st.tuples(st.sampled_from([b"tsize", b"TSIZE"]), st.just(b"0")),
        st.tuples(st.just(b"timeout"), _num([1, 3, 5, 255], 1, 255)),
        st.tuples(st.sampled_from([b"windowsize", b"WindowSize"]), _num([4, 1, 8, 16, 64], 1, 64)),
    )


def option_values() -> st.SearchStrategy[bytes]:
    """Numbers in and around every option's range, huge and negative ones, empty and
    non-numeric strings, non-ASCII bytes."""
    num = st.one_of(
        st.sampled_from([0, 1, 7, 8, 9, 255, 256, 511, 512, 513, 1428, 1456, 1468, 8192,
                         65464, 65465, 65535, 65536]),
        st.integers(min_value=0, max_value=70000),
        st.integers(min_value=-(2 ** 64), max_value=-1),
        st.integers(min_value=2 ** 31, max_value=10 ** 30),
    ).map(lambda n: str(n).encode())
    odd = st.sampled_from([b"", b"0x10", b"+512", b" 512", b"512 ", b"1e3", b"5\xe9",
                           b"\xff\xfe", b"abc", b"00000000000000000000512", b"-0"])
    return st.one_of(num, odd, st.binary(max_size=10).map(_no_nul))



def option_lists() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """What a boot ROM sends; a few odd options (duplicates allowed); or hundreds."""
    pair = st.tuples(option_names(), option_values())
    typical = st.lists(typical_options(), min_size=1, max_size=4)
    many = st.integers(min_value=100, max_value=400).map(
        lambda n: [(b"opt%d" % i, b"%d" % i) for i in range(n)])
    return st.one_of(
        typical,
        st.lists(pair, max_size=8),
        typical,
        st.tuples(st.lists(pair, max_size=4), many).map(lambda t: t[0] + t[1]),
        st.tuples(many, st.lists(pair, max_size=4)).map(lambda t: t[0] + t[1]),
    )


def modes() -> st.SearchStrategy[bytes]:
    octet = st.just(b"octet")
    return st.one_of(octet, octet, st.sampled_from(
        [b"netascii", b"OCTET", b"NetAscii", b"mail", b"binary", b"", b"oct\xe9t"]))


def _encode(op: int, name: bytes, mode: bytes, opts: list[tuple[bytes, bytes]]) -> bytes:
    return (op.to_bytes(2, "big") + name + b"\0" + mode + b"\0"
            + b"".join(k + b"\0" + v + b"\0" for k, v in opts))


def _mutate(data: bytes, how: tuple[int, int]) -> bytes:
    kind, n = how
    if kind == 0:
        return data
    if kind == 1:  # truncated
        return data[:n % (len(data) + 1)]
    if kind == 2:  # zero padding (PA-RISC ROMs pad to 516 bytes)
        return data.ljust(len(data) + n % 600, b"\0")
    if kind == 3:  # junk after the last field
        return data + bytes((n + i) % 256 for i in range(1 + n % 40))
    return data.ljust(60000 + n % 5000, b"\xa5")  # oversized


def requests(filename: str) -> st.SearchStrategy[bytes]:
    """The first datagram: mostly an RRQ of `filename`; also a missing file, a WRQ, every
    other opcode and unknown ones, truncated, padded and oversized datagrams."""
    name = filename.encode()
    names = st.one_of(st.just(name), st.sampled_from(
        [b"tftpd-fuzz-no-such-file", name + b"\xff", b"./" + name, b"x" * 300]))
    mutation = st.one_of(st.just((0, 0)), st.tuples(st.integers(1, 4),
                                                    st.integers(0, 100000)))
    rrq = st.builds(lambda n, m, o, mut: _mutate(_encode(1, n, m, o), mut),
                    names, modes(), option_lists(), mutation)
    wrq = st.builds(lambda m, o: _encode(2, b"tftpd-fuzz-upload-refused", m, o),
                    modes(), option_lists())
    other = st.builds(lambda op, tail: op.to_bytes(2, "big") + tail,
                      st.sampled_from([3, 4, 5, 6, 0, 7, 8, 255, 256, 65535]),
                      st.binary(max_size=40))
    tiny = st.binary(max_size=3)
    # one_of picks a branch evenly: RRQs of the file are what most examples should be.
    plain = st.builds(lambda m, o: _encode(1, name, m, o), modes(), option_lists())
    return st.one_of(plain, plain, plain, rrq, rrq, wrq, other, tiny)


def junk_datagrams() -> st.SearchStrategy[bytes]:
    """Datagrams for a server's TID that are never a well-formed ACK."""
    return st.one_of(
        st.sampled_from([b"", b"\0", b"\0\4", b"\0\4\0", b"\0\3\0\1", b"\0\6", b"\0\1x\0"
                         b"octet\0", b"\0\x07\0\1", b"\xff\xff"]),
        st.builds(lambda op, tail: op.to_bytes(2, "big") + tail,
                  st.sampled_from([0, 1, 2, 3, 6, 7, 255, 65535]), st.binary(max_size=20)),
    )


def reactions() -> st.SearchStrategy[Reaction]:
    return st.one_of(
        st.just(Reaction("ack")),
        st.just(Reaction("dup")),
        st.just(Reaction("reorder")),
        st.builds(lambda ms: Reaction("delay", ms), st.sampled_from([1, 5, 30, 120, 300])),
        st.just(Reaction("foreign")),
        st.builds(lambda c: Reaction("error", c), st.sampled_from([0, 1, 4, 5, 8, 9, 65535])),
        st.builds(lambda d: Reaction("junk", 0, d), junk_datagrams()),
        st.builds(lambda n: Reaction("bigack", n), st.sampled_from([5, 516, 1500, 65000])),
    )


def scenarios(filename: str, max_reactions: int = 8) -> st.SearchStrategy[Scenario]:
    """A request and the client's behaviour, for a server that serves `filename`."""
    return st.builds(
        lambda req, rs, fin: Scenario(req, tuple(rs), fin),
        requests(filename),
        st.lists(reactions(), max_size=max_reactions),
        st.sampled_from(["complete", "abort"]),
    )


def corpus(filename: str) -> list[Scenario]:
    """Requests real clients send and the classic mistakes, tried before anything random."""
    def rrq(mode: bytes = b"octet", **opts: str) -> bytes:
        return _encode(1, filename.encode(), mode,
                       [(k.encode(), v.encode()) for k, v in opts.items()])
    return [
        Scenario(rrq()),
        Scenario(rrq(blksize="1456", tsize="0")),  # a PXE ROM's read
        Scenario(rrq(tsize="0"), (Reaction("error", 8),)),  # its probe
        Scenario(rrq(blksize="1024", tsize="0", windowsize="4", timeout="3")),
        Scenario(rrq(blksize="8")),
        Scenario(rrq(blksize="0", windowsize="0", timeout="0")),
        Scenario(rrq(b"netascii")),
        Scenario(rrq(), (Reaction("dup"), Reaction("reorder"), Reaction("dup"))),
        Scenario(rrq(blksize="512"), (Reaction("dup"), Reaction("dup"))),
        Scenario(rrq(), (Reaction("foreign"), Reaction("ack"), Reaction("foreign"))),
        Scenario(b"\0\7\0\1"),  # an unknown opcode
    ]
