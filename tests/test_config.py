"""The command line: in.tftpd's flags, clear refusals."""

from __future__ import annotations

import socket

import pytest

from tftpd.config import SETTINGS, ConfigError, from_argv, parse_address


def test_in_tftpd_style_command_line() -> None:
    cfg = from_argv(["-L", "-s", "-a", "127.0.0.1:6969", "-B", "1468", "-T", "500000",
                     "-r", "tsize", "-vv", "--workers", "3", "/srv/tftp"])
    assert cfg.foreground and cfg.secure and cfg.root == "/srv/tftp"
    assert [str(a) for a in cfg.addresses] == ["127.0.0.1:6969"]
    assert cfg.max_blksize == 1468 and cfg.retransmit_us == 500000
    assert cfg.refuse == ("tsize",) and cfg.verbose == 2 and cfg.workers == 3


@pytest.mark.parametrize("text,family,host,port", [
    ("127.0.0.1", socket.AF_INET, "127.0.0.1", 69),
    (":6969", socket.AF_INET, "0.0.0.0", 6969),
    ("[::1]:69", socket.AF_INET6, "::1", 69),
    ("[::]", socket.AF_INET6, "::", 69),
    ("::1", socket.AF_INET6, "::1", 69),
])
def test_addresses(text: str, family: int, host: str, port: int) -> None:
    a = parse_address(text)
    assert (a.family, a.host, a.port) == (family, host, port)


@pytest.mark.parametrize("argv", [
    ["-a", "localhost:69"], ["-a", "1.2.3.4:99999"], ["-B", "7"], ["-B", "70000"],
    ["--workers", "0"], ["-R", "10:5"], ["-r", "bogus"], ["--nope"],
])
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        from_argv(argv)


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.later], ids=lambda s: s.flags[-1])
def test_later_flags_say_not_supported_yet(s: object) -> None:
    flag = s.flags[-1]  # type: ignore[attr-defined]
    argv = [flag] if s.convert is None else [flag, "1"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="not supported yet"):
        from_argv(argv)
