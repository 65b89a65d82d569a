"""tftpd.options.negotiate: what each RRQ of a storm costs before the first byte."""

from __future__ import annotations

from typing import Any

from bench.micro.conftest import need_module

options = need_module("tftpd.options")

POLICY = options.Policy()
SIZE = 1 << 20


def test_negotiate_pxe_probe(benchmark: Any) -> None:
    got = benchmark(options.negotiate, {"tsize": "0"}, POLICY, size=SIZE)
    assert got.oack == {"tsize": str(SIZE)}


def test_negotiate_pxe_read(benchmark: Any) -> None:
    got = benchmark(options.negotiate, {"tsize": "0", "blksize": "1456"}, POLICY, size=SIZE)
    assert got.blksize == 1456


def test_negotiate_uefi_window(benchmark: Any) -> None:
    req = {"tsize": "0", "blksize": "1468", "windowsize": "4"}
    got = benchmark(options.negotiate, req, POLICY, size=SIZE, mtu_blksize=1472)
    assert got.windowsize == 4 and got.blksize == 1468


def test_negotiate_uboot_timeout(benchmark: Any) -> None:
    req = {"timeout": "5", "tsize": "0", "blksize": "1468", "windowsize": "8"}
    got = benchmark(options.negotiate, req, POLICY, size=SIZE)
    assert got.oack["timeout"] == "5"


def test_negotiate_no_options(benchmark: Any) -> None:
    assert benchmark(options.negotiate, {}, POLICY, size=SIZE).oack == {}


def test_negotiate_junk(benchmark: Any) -> None:
    req = {"blksize": "0x10", "tsize": "-1", "multicast": "", "foo": "bar", "timeout": "999"}
    got = benchmark(options.negotiate, req, POLICY, size=SIZE)
    assert "blksize" not in got.oack and "timeout" not in got.oack
