"""Option negotiation: the rules from DESIGN.md, then properties over any request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tftpd.options import (
    BLKSIZE_MAX,
    BLKSIZE_MIN,
    OptionRefused,
    Policy,
    negotiate,
)

POLICY = Policy()


def test_no_options_no_oack() -> None:
    n = negotiate({}, POLICY, size=100)
    assert n.oack == {} and n.blksize == 512 and n.windowsize == 1 and n.timeout is None


def test_pxe_probe_and_read() -> None:
    assert negotiate({"tsize": "0"}, POLICY, size=1048576).oack == {"tsize": "1048576"}
    n = negotiate({"tsize": "0", "blksize": "1456"}, POLICY, size=1048576)
    assert n.oack == {"tsize": "1048576", "blksize": "1456"} and n.blksize == 1456


def test_blksize_never_above_request_and_clamped() -> None:
    assert negotiate({"blksize": "70000"}, POLICY).blksize == BLKSIZE_MAX
    assert negotiate({"blksize": "9000"}, Policy(max_blksize=1468)).oack == {"blksize": "1468"}
    assert negotiate({"blksize": "1468"}, POLICY, mtu_blksize=1472).blksize == 1468
    assert negotiate({"blksize": "8192"}, POLICY, mtu_blksize=1472).blksize == 1472


@pytest.mark.parametrize("value", ["7", "0", "", "abc", "-1", "0x200", " 512", "1e3"])
def test_invalid_blksize_ignored(value: str) -> None:
    n = negotiate({"blksize": value}, POLICY)
    assert "blksize" not in n.oack and n.blksize == 512


def test_timeout_echoed_exactly_or_left_out() -> None:
    assert negotiate({"timeout": "5"}, POLICY).oack == {"timeout": "5"}
    assert negotiate({"timeout": "5"}, POLICY).timeout == 5
    assert negotiate({"timeout": "0"}, POLICY).oack == {}
    assert negotiate({"timeout": "256"}, POLICY).oack == {}


def test_windowsize_clamped_by_policy() -> None:
    assert negotiate({"windowsize": "64"}, Policy(max_windowsize=16)).windowsize == 16
    assert negotiate({"windowsize": "0"}, POLICY).oack == {}


def test_window_fits_a_receive_buffer() -> None:
    # WinPE asks for 65464-byte blocks in windows: two of them make one 128 KiB burst.
    n = negotiate({"blksize": "65464", "windowsize": "16"}, POLICY)
    assert n.oack == {"blksize": "65464", "windowsize": "2"}
    assert negotiate({"blksize": "8192", "windowsize": "16"}, POLICY).windowsize == 16
    assert negotiate({"blksize": "1456", "windowsize": "64"}, POLICY).windowsize == 64


def test_unknown_and_refused_options() -> None:
    n = negotiate({"multicast": "", "utimeout": "1000", "blksize": "1024"},
                  Policy(refused=frozenset({"blksize"})))
    assert n.oack == {} and n.blksize == 512


def test_wrq_tsize_checked_against_upload_limit() -> None:
    assert negotiate({"tsize": "100"}, Policy(max_upload=1000), is_write=True).tsize == 100
    with pytest.raises(OptionRefused):
        negotiate({"tsize": "1001"}, Policy(max_upload=1000), is_write=True)


# -- properties ------------------------------------------------------------------------

_names = st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "utimeout", "x"])
_values = st.one_of(st.integers(-5, 70000).map(str), st.text(max_size=6))
_requests = st.dictionaries(_names, _values, max_size=6)
_policies = st.builds(Policy, max_blksize=st.integers(BLKSIZE_MIN, BLKSIZE_MAX),
                      max_windowsize=st.integers(1, 65535),
                      max_window_bytes=st.integers(512, 1 << 24),
                      refused=st.frozensets(_names, max_size=2))


@given(_requests, _policies, st.integers(0, 2**40), st.none() | st.integers(8, 65464))
def test_accepted_is_a_subset_within_bounds(req: dict[str, str], policy: Policy, size: int,
                                            mtu: int | None) -> None:
    n = negotiate(req, policy, size=size, mtu_blksize=mtu)
    assert set(n.oack) <= set(req)
    assert not set(n.oack) & policy.refused
    if "blksize" not in n.oack:
        assert n.blksize == 512  # RFC 1350's size: nothing else without an OACK
    else:
        assert BLKSIZE_MIN <= n.blksize <= min(policy.max_blksize, BLKSIZE_MAX)
        assert int(n.oack["blksize"]) <= int(req["blksize"])
        assert mtu is None or n.blksize <= max(mtu, BLKSIZE_MIN)
    if "timeout" in n.oack:
        assert n.oack["timeout"] == req["timeout"] and 1 <= int(req["timeout"]) <= 255
    if "tsize" in n.oack:
        assert n.oack["tsize"] == str(size)
    assert 1 <= n.windowsize <= policy.max_windowsize
    assert n.windowsize == 1 or n.windowsize * n.blksize <= policy.max_window_bytes
    # Deterministic: the same question always gets the same answer.
    assert negotiate(req, policy, size=size, mtu_blksize=mtu) == n
