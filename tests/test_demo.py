"""The quick start's first command: `python3 -m tftpd --demo` serves a root and says how
to fetch from it, by TFTP and by HTTP, and its iPXE script chains from one to the other."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tftpd import client

REPO = Path(__file__).resolve().parent.parent


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def what_the_demo_says(proc: subprocess.Popen[str]) -> str:
    """The demo's standard output up to its last line ("Ctrl-C stops the server.")."""
    assert proc.stdout is not None
    said = ""
    deadline = time.monotonic() + 20
    while "Ctrl-C" not in said and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"the demo ended after {said!r}"
        said += line
    return said


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_demo_prints_curl_lines_that_work() -> None:
    tport, hport = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "tftpd", "--demo", "-a",
                             f"127.0.0.1:{tport}", "--http", f"127.0.0.1:{hport}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        said = what_the_demo_says(proc)
        commands = re.findall(r"^\s+(curl -s \S+)$", said, re.M)
        assert [c.split("://")[0] for c in commands] == ["curl -s tftp", "curl -s http"]
        for command in commands:
            out = subprocess.run(command.split(), capture_output=True, text=True,
                                 timeout=20, check=True).stdout
            assert out == "Hello from tftpd: served over TFTP from a preforked pool.\n"
        script = client.get("127.0.0.1", tport, "boot.ipxe", timeout=2.0).data.decode()
        assert script.startswith("#!ipxe\n")
        assert f"imgfetch http://127.0.0.1:{hport}/boot.img" in script
        image = subprocess.run(["curl", "-s", f"http://127.0.0.1:{hport}/boot.img"],
                               capture_output=True, timeout=20, check=True).stdout
        assert len(image) == 1 << 20
    finally:
        stop(proc)


# Python as a fresh machine has it: no h11 (the HTTP parser), whatever this one has.
WITHOUT_H11 = ("import runpy, sys; sys.modules['h11'] = None; "
               "sys.argv[0] = 'tftpd'; runpy.run_module('tftpd', run_name='__main__')")


def test_demo_without_h11_serves_tftp_and_says_what_http_needs(tmp_path: Path) -> None:
    tport = free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([sys.executable, "-c", WITHOUT_H11, "--demo", "-a",
                             f"127.0.0.1:{tport}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        said = what_the_demo_says(proc)
        commands = re.findall(r"^\s+(curl -s \S+)$", said, re.M)
        assert commands == [f"curl -s tftp://127.0.0.1:{tport}/hello.txt"]
        assert "pip install h11" in said
        root = re.search(r"Demo root (\S+) ", said)
        assert root is not None
        out = subprocess.run(commands[0].split(), capture_output=True, text=True,
                             timeout=20, check=True).stdout
        assert out == "Hello from tftpd: served over TFTP from a preforked pool.\n"
    finally:
        stop(proc)
    assert not Path(root.group(1)).exists()


def test_http_without_h11_is_a_clear_startup_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", WITHOUT_H11, "-L", "-a", "127.0.0.1:0",
                           "--http", "127.0.0.1:0", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert "--http needs the h11 package" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_inherited_http_socket_without_h11_is_a_clear_startup_error(tmp_path: Path) -> None:
    """systemd's ListenStream= hands a listening TCP socket over: without h11 that is the
    same one-line refusal as --http, not a worker's traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        fd = lst.fileno()
        # As systemd starts a service: the socket at descriptor 3, LISTEN_PID its pid.
        activate = (f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
                    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                    "os.execv(sys.executable, [sys.executable, '-c', *sys.argv[1:]])")
        proc = subprocess.run([sys.executable, "-c", activate, WITHOUT_H11, "-L", "-u", "root",
                               str(tmp_path)], cwd=REPO, pass_fds=(fd,), capture_output=True,
                              text=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert "--http needs the h11 package" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
