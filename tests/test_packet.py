"""The wire codec: examples from the RFCs and client quirks, then properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tftpd import packet as P


def test_rrq_with_options() -> None:
    raw = b"\x00\x01nbp.efi\x00octet\x00tsize\x000\x00blksize\x001456\x00"
    pkt = P.parse(raw)
    assert pkt == P.Request(P.RRQ, b"nbp.efi", "octet", {"tsize": "0", "blksize": "1456"})
    assert P.encode(pkt) == raw


def test_mode_and_option_names_are_case_insensitive() -> None:
    pkt = P.parse(b"\x00\x01f\x00OCTET\x00BlkSize\x001024\x00")
    assert isinstance(pkt, P.Request)
    assert pkt.mode == "octet" and pkt.options == {"blksize": "1024"}


def test_padding_after_options_is_ignored() -> None:
    # PA-RISC firmware pads its RRQ to 516 bytes with NULs.
    raw = b"\x00\x01f\x00octet\x00blksize\x00512\x00"
    pkt = P.parse(raw + b"\x00" * (516 - len(raw)))
    assert isinstance(pkt, P.Request) and pkt.options == {"blksize": "512"}


def test_unterminated_trailing_junk_is_ignored() -> None:
    pkt = P.parse(b"\x00\x01f\x00octet\x00tsize\x000\x00\xff\xfejunk")
    assert isinstance(pkt, P.Request) and pkt.options == {"tsize": "0"}


def test_repeated_option_first_wins() -> None:
    pkt = P.parse(b"\x00\x01f\x00octet\x00blksize\x00512\x00blksize\x009000\x00")
    assert isinstance(pkt, P.Request) and pkt.options == {"blksize": "512"}


@pytest.mark.parametrize("raw", [
    b"", b"\x00", b"\x00\x01", b"\x00\x01f", b"\x00\x01f\x00", b"\x00\x01\x00octet\x00",
    b"\x00\x01f\x00\x00", b"\x00\x03\x00", b"\x00\x04\x01", b"\x00\x05\x00", b"\x00\x63abc",
    b"\xff\xff",
])
def test_malformed_raise_packet_error(raw: bytes) -> None:
    with pytest.raises(P.PacketError):
        P.parse(raw)


def test_data_ack_error_oack() -> None:
    assert P.parse(b"\x00\x03\x00\x07hello") == P.Data(7, b"hello")
    assert P.parse(b"\x00\x04\xff\xff") == P.Ack(65535)
    assert P.parse(b"\x00\x05\x00\x08bye\x00") == P.Error(8, "bye")
    assert P.parse(b"\x00\x05\x00\x00no nul") == P.Error(0, "no nul")
    assert P.parse(b"\x00\x06tsize\x00123\x00") == P.OAck({"tsize": "123"})


def test_option_pairs_are_bounded() -> None:
    body = b"".join(b"o%d\x00v\x00" % i for i in range(1000))
    pkt = P.parse(b"\x00\x01f\x00octet\x00" + body)
    assert isinstance(pkt, P.Request) and len(pkt.options) == P.MAX_OPTIONS


# -- properties ------------------------------------------------------------------------

@given(st.binary(max_size=600))
def test_any_bytes_decode_or_raise_packet_error(raw: bytes) -> None:
    try:
        P.parse(raw)
    except P.PacketError:
        pass  # the one error the codec may raise


@given(st.sampled_from([b"\x00\x01", b"\x00\x02"]), st.binary(max_size=300))
def test_any_request_body_decodes_or_raises(op: bytes, body: bytes) -> None:
    try:
        pkt = P.parse(op + body)
    except P.PacketError:
        return
    assert isinstance(pkt, P.Request) and pkt.filename and b"\0" not in pkt.filename


_field = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)
_text = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), min_size=1,
                max_size=20)
_lower = _text.map(str.lower)
_opts = st.dictionaries(_lower, st.text(alphabet=st.characters(min_codepoint=1,
                                                                max_codepoint=255),
                                         max_size=10), max_size=8)


@given(st.sampled_from([P.RRQ, P.WRQ]), _field, _lower, _opts)
def test_request_round_trip(op: int, name: bytes, mode: str, opts: dict[str, str]) -> None:
    pkt = P.Request(op, name, mode, opts)
    assert P.parse(P.encode(pkt)) == pkt


@given(st.integers(0, 65535), st.binary(max_size=1500))
def test_data_round_trip(block: int, payload: bytes) -> None:
    assert P.parse(P.encode_data(block, payload)) == P.Data(block, payload)


@given(st.integers(0, 65535))
def test_ack_round_trip(block: int) -> None:
    assert P.parse(P.encode_ack(block)) == P.Ack(block)


@given(st.integers(0, 65535), st.text(alphabet=st.characters(min_codepoint=1,
                                                             max_codepoint=255), max_size=100))
def test_error_round_trip(code: int, message: str) -> None:
    assert P.parse(P.encode_error(code, message)) == P.Error(code, message)


@given(_opts.filter(lambda d: all(d.values())))
def test_oack_round_trip(opts: dict[str, str]) -> None:
    assert P.parse(P.encode_oack(opts)) == P.OAck(opts)
