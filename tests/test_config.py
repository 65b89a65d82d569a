"""The command line: in.tftpd's flags, clear refusals."""

from __future__ import annotations

import socket

import pytest

from tftpd.config import SETTINGS, ConfigError, build_parser, from_argv, parse_address


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


def test_content_hook_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = from_argv(["--content-hook", "pernode_hook:content", "--content-hook-timeout", "0.5",
                     "--root-per-client", "mac"])
    assert cfg.content_hook == "pernode_hook:content" and cfg.content_hook_timeout == 0.5
    assert cfg.root_per_client == "mac"
    assert from_argv([]).content_hook_timeout == 2.0
    conf = tmp_path / "tftpd.conf"
    conf.write_text('content-hook = "hooks.pxe:answer"\ncontent-hook-timeout = 3\n'
                    'root-per-client = "ip"\n')
    cfg = from_argv(["-C", str(conf)])
    assert (cfg.content_hook, cfg.content_hook_timeout, cfg.root_per_client) == \
        ("hooks.pxe:answer", 3.0, "ip")
    for argv in (["--content-hook", "pernode_hook"], ["--content-hook", "a:b:c"],
                 ["--content-hook-timeout", "0"], ["--content-hook-timeout", "soon"],
                 ["--root-per-client", "uuid"]):
        with pytest.raises(ConfigError):
            from_argv(argv)


# -- tftpd.conf and the man pages ----------------------------------------------------------

def test_config_file_then_command_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "tftpd.conf"
    conf.write_text('root = "/srv/boot"\naddress = ["127.0.0.1:6969", "[::1]:6969"]\n'
                    'create = true\numask = 0o27\nworkers = 3\nverbose = 2\nblocksize = 1468\n'
                    'refuse = "tsize"\nlog-format = "json"\n')
    cfg = from_argv(["-C", str(conf)])
    assert cfg.root == "/srv/boot" and cfg.create and cfg.umask == 0o27
    assert [str(a) for a in cfg.addresses] == ["127.0.0.1:6969", "[::1]:6969"]
    assert cfg.workers == 3 and cfg.verbose == 2 and cfg.max_blksize == 1468
    assert cfg.refuse == ("tsize",) and cfg.log_format == "json"
    cfg = from_argv(["-C", str(conf), "--workers", "1", "-B", "512", "/other"])
    assert cfg.workers == 1 and cfg.max_blksize == 512 and cfg.root == "/other"


@pytest.mark.parametrize("text,why", [
    ("bogus = 1", "unknown setting 'bogus'"),
    ("workers = 0", "workers"),
    ("create = 'yes'", "true or false"),
    ("address = 'nowhere:69'", "address"),
    ("root = 5", "root must be a string"),
    ("workers = [", "tftpd.conf"),
])
def test_config_file_errors_name_file_and_key(tmp_path, text: str, why: str) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "tftpd.conf"
    conf.write_text(text + "\n")
    with pytest.raises(ConfigError, match="tftpd.conf") as exc:
        from_argv(["-C", str(conf)])
    assert why in str(exc.value)


def test_man_pages_match_the_settings() -> None:
    from tftpd import manpage

    for path, text in manpage.pages().items():
        assert path.read_text() == text, f"{path.name} drifted: run python3 -m tftpd.manpage"


def test_every_setting_reaches_flag_file_and_man_page() -> None:
    from tftpd import manpage

    parser_flags = {f for a in build_parser()._actions for f in a.option_strings}
    page8, page5 = manpage.options_section(), manpage.settings_section()
    for s in SETTINGS:
        assert set(s.flags) <= parser_flags
        assert s.flags[-1].replace("-", "\\-") in page8
        assert f"\\fB{s.key.replace('-', chr(92) + '-')}\\fR" in page5


def test_every_environment_variable_read_is_in_the_man_page() -> None:
    import re
    from pathlib import Path

    from tftpd import manpage
    from tftpd.config import ENVIRONMENT

    top = Path(__file__).resolve().parent.parent
    sources = [*(top / "tftpd").rglob("*.py"), *(top / "_ext").glob("*.[ch]"),
               *(top / "_ext").glob("*.py"), *(top / "examples").glob("*.py"),
               *(top / "bench").rglob("*.py"), top / "setup.py"]
    # A read: env.get("TFTPD_X"), environ["TFTPD_X"], getenv("TFTPD_X"), or a name
    # kept in _ENV for such a read (C's TFTPD_ constants are not switches).
    read_at = re.compile(r"(?:\.get\(|\.pop\(|environ\[|getenv\(|_ENV\s*=\s*)"
                         r"[\"'](TFTPD_[A-Z0-9_]+)[\"']")
    read = {name for path in sources for name in read_at.findall(path.read_text())}
    # the scan finds each shape of read
    assert {"TFTPD_DATAPATH", "TFTPD_PUMP", "TFTPD_GSO", "TFTPD_SANITIZE"} <= read
    declared = {var.name for var in ENVIRONMENT}
    assert read <= declared, f"undeclared in config.ENVIRONMENT: {sorted(read - declared)}"
    page = manpage.pages()[manpage.MAN / "tftpd.8"]
    section = page[page.index(".SH ENVIRONMENT"):page.index(".SH FILES")]
    for name in declared:
        assert f".B {name}\n" in section, name
    for var in ENVIRONMENT:  # the page shows "VALUE: what it does"
        value, _, what = var.help.partition(": ")
        assert value.strip() and what.strip(), var


def test_man_pages_render_without_warnings() -> None:
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    man = Path(__file__).resolve().parent.parent / "man"
    for page in ("tftpd.8", "tftpd.conf.5"):
        out = subprocess.run(["groff", "-man", "-ww", "-z", str(man / page)],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0 and out.stderr == "", out.stderr
