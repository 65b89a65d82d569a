"""tftpd.packet: parse and build the packets of a boot storm."""

from __future__ import annotations

from typing import Any

from bench.micro.conftest import need_module

packet = need_module("tftpd.packet")

RRQ = b"\x00\x01nbp.efi\x00octet\x00tsize\x000\x00blksize\x001456\x00"
RRQ_UEFI = (b"\x00\x01\\EFI\\BOOT\\grubx64.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00"
            b"windowsize\x004\x00")
DATA = b"\x00\x03\x01\x02" + bytes(1456)
ACK = b"\x00\x04\x01\x02"
PAYLOAD = bytes(1456)


def test_codec_parse_rrq(benchmark: Any) -> None:
    req = benchmark(packet.parse, RRQ)
    assert req.options["blksize"] == "1456"


def test_codec_parse_rrq_uefi(benchmark: Any) -> None:
    req = benchmark(packet.parse, RRQ_UEFI)
    assert req.options["windowsize"] == "4"


def test_codec_parse_ack(benchmark: Any) -> None:
    assert benchmark(packet.parse, ACK).block == 0x0102


def test_codec_parse_data(benchmark: Any) -> None:
    assert benchmark(packet.parse, DATA).block == 0x0102


def test_codec_encode_data(benchmark: Any) -> None:
    assert len(benchmark(packet.encode_data, 258, PAYLOAD)) == 1460


def test_codec_encode_ack(benchmark: Any) -> None:
    assert benchmark(packet.encode_ack, 258) == ACK


def test_codec_encode_oack(benchmark: Any) -> None:
    out = benchmark(packet.encode_oack, {"tsize": "1048576", "blksize": "1456"})
    assert out.startswith(b"\x00\x06")


def test_codec_encode_rrq(benchmark: Any) -> None:
    out = benchmark(packet.encode_rrq, "nbp.efi", "octet", {"tsize": "0", "blksize": "1456"})
    assert out == RRQ


def test_codec_encode_error(benchmark: Any) -> None:
    assert benchmark(packet.encode_error, 1, "File not found").endswith(b"\x00")
