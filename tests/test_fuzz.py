"""tftpd-fuzz: finds nothing in tftpd, finds each fault of a deliberately broken server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, start_daemon
from faulty_tftp import FAULTS, FaultyServer

from tftpd.fuzz import checks
from tftpd.fuzz.cli import main

FILE = "boot.bin"
# 2600 bytes: six blocks of 512, a last short one, and bytes that netascii changes.
CONTENT = bytes(range(256)) * 10 + b"\r\n\n\r" * 10


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fuzz_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tftpd.fuzz.cli", *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_tftpd_passes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / FILE).write_bytes(CONTENT)
    d = start_daemon(root, "--workers", "2")
    try:
        proc = fuzz_cli("--seconds", "8", "--examples", "150", "--seed", "1",
                        f"127.0.0.1:{d.port}", FILE, cwd=tmp_path)
    finally:
        d.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no violation" in proc.stdout
    n = int(proc.stdout.split("no violation")[0].split("\n")[-1].split()[1])
    assert n >= 10, proc.stdout  # it did run examples, not just the oracle read
    assert not (tmp_path / ".hypothesis").exists()


def test_clean_faulty_server_passes(capsys: pytest.CaptureFixture[str]) -> None:
    with FaultyServer({FILE: CONTENT}) as srv:
        rc = main(["--seconds", "4", "--seed", "1", f"127.0.0.1:{srv.port}", FILE])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no violation" in out


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_found(fault: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    repro = tmp_path / "repro.json"
    with FaultyServer({FILE: CONTENT}, {fault}) as srv:
        rc = main(["--seconds", "10", "--shrink-seconds", "2", "--seed", "1", "--save",
                   str(repro), f"127.0.0.1:{srv.port}", FILE])
        out = capsys.readouterr().out
        assert rc == 1, out
        clause = FAULTS[fault]
        assert f"[{clause}]" in out, out
        assert checks.CLAUSES[clause] in out
        saved = json.loads(repro.read_text())
        assert clause in [v["clause"] for v in saved["violations"]]
        assert f"tftpd-fuzz --replay {repro}" in out
        if fault in ("wrong-byte", "sorcerer", "oack-extra"):
            # The reproduction replays: the same clause again, from the file alone.
            rc = main(["--replay", str(repro), f"127.0.0.1:{srv.port}"])
            out = capsys.readouterr().out
            assert rc == 1, out
            assert f"[{clause}]" in out, out


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in ([], ["127.0.0.1:69"], ["--seconds", "0", "127.0.0.1:69", FILE],
                 ["--bogus", "127.0.0.1:69", FILE], ["[::1:69", FILE],
                 ["--replay", str(tmp_path / "missing.json"), "127.0.0.1:69"]):
        assert main(args) == 2, args


def test_unreachable_server_exits_2(tmp_path: Path) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: the oracle read fails
    proc = fuzz_cli("--seconds", "5", f"127.0.0.1:{port}", FILE, cwd=tmp_path, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot read" in proc.stderr


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with FaultyServer({FILE: CONTENT}) as srv:
        assert main(["--seconds", "2", f"127.0.0.1:{srv.port}", "nope.bin"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_without_hypothesis_the_command_says_so(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "from tftpd.fuzz.cli import main\n"
            "raise SystemExit(main(['127.0.0.1:9', 'x']))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "needs hypothesis" in proc.stderr
    assert "pip install 'tftpd[fuzz]'" in proc.stderr


def test_server_never_imports_hypothesis() -> None:
    code = ("import sys, tftpd, tftpd.cli, tftpd.worker, tftpd.master, tftpd.client\n"
            "assert 'hypothesis' not in sys.modules, 'hypothesis imported'\n")
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=30)


@pytest.mark.parametrize("fault", ["blksize-above", "data-before-ack0"])
def test_random_search_alone_finds_faults(fault: str, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    with FaultyServer({FILE: CONTENT}, {fault}) as srv:
        rc = main(["--seconds", "10", "--shrink-seconds", "2", "--seed", "1", "--no-corpus",
                   f"127.0.0.1:{srv.port}", FILE])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"[{FAULTS[fault]}]" in out, out


def test_man_page_covers_every_flag_and_renders() -> None:
    import shutil

    from tftpd.fuzz.cli import _parser

    page = (REPO / "man" / "tftpd-fuzz.1").read_text()
    for action in _parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag.replace("-", "\\-") in page, flag
    for clause in checks.CLAUSES:
        assert f".B {clause.replace('-', chr(92) + '-')}\n" in page, clause
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    out = subprocess.run(["groff", "-man", "-ww", "-z", str(REPO / "man" / "tftpd-fuzz.1")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_ipv6_address_form(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / FILE).write_bytes(CONTENT)
    d = start_daemon(root, "--workers", "1", host="::1")
    try:
        proc = fuzz_cli("--seconds", "3", "--seed", "2", f"[::1]:{d.port}", FILE, cwd=tmp_path)
    finally:
        d.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[::1]:" in proc.stdout and "no violation" in proc.stdout
