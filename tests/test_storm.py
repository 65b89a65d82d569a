"""tftpd-storm, the operator's storm: run as an unprivileged user against the real daemon.

The tool runs as user nobody (runuser; the tests run as root), from a copy of the package
in a directory user nobody can read, with a HOME (and so a cache directory) of nobody's own.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, Daemon, start_daemon
from faulty_tftp import FaultyServer

from tftpd.storm import cgen
from tftpd.storm.cli import _parser
from tftpd.storm.content import content
from tftpd.storm.workload import load

RUN_TIMEOUT_S = 90  # every storm here is bounded far below this by its --timeout
CLIENTS = 24
NOBODY = "nobody"


@dataclass
class Nobody:
    python: str  # an interpreter user nobody can run
    base: Path  # 0755, holds src/ (the package) and home/ (nobody's, 0700)
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
                "PYTHONPATH": str(self.base / "src"), "LC_ALL": "C.UTF-8", **extra}

    def storm(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        cmd = ["runuser", "-u", NOBODY, "--", "env", "-i",
               *(f"{k}={v}" for k, v in self.env(**env).items()),
               self.python, "-m", "tftpd.storm", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                              check=False, cwd=self.base)


def _runs_as_nobody(python: str) -> bool:
    probe = "import sys; assert sys.version_info >= (3, 11)"
    try:
        return subprocess.run(["runuser", "-u", NOBODY, "--", python, "-c", probe],
                              capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def nobody() -> Iterator[Nobody]:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to run the tool as user nobody")
    candidates = [sys.executable, *filter(None, (shutil.which("python3", path=p)
                                                 for p in ("/usr/local/bin", "/usr/bin")))]
    python = next((p for p in candidates if _runs_as_nobody(p)), None)
    if python is None:
        pytest.skip(f"no Python 3.11+ that user nobody can run among {candidates}")
    base = Path(tempfile.mkdtemp(prefix="storm-nobody-"))
    try:
        os.chmod(base, 0o755)
        shutil.copytree(REPO / "tftpd", base / "src" / "tftpd",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        home = base / "home"
        home.mkdir(mode=0o700)
        shutil.chown(home, NOBODY)
        yield Nobody(python, base, home)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _storm_json(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def pxe_root(nobody: Nobody) -> Path:
    """A root for pxe and probe, written by `tftpd-storm --make-root`."""
    root = nobody.base / "served"
    for wl in ("pxe", "probe"):
        proc = subprocess.run([sys.executable, "-m", "tftpd.storm", "--make-root", str(root),
                               "--workload", wl], env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def daemon(pxe_root: Path) -> Iterator[Daemon]:
    d = start_daemon(pxe_root, "--workers", "2")
    try:
        yield d
    finally:
        d.stop()


def _addr(d: Daemon) -> str:
    return f"{d.host}:{d.port}"


@pytest.mark.parametrize("workload", ["pxe", "probe"])
def test_storm_as_nobody_succeeds(nobody: Nobody, daemon: Daemon, workload: str) -> None:
    proc = nobody.storm(_addr(daemon), "--workload", workload, "--clients", str(CLIENTS),
                        "--timeout", "30", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = _storm_json(proc)
    assert rec["ok"] == CLIENTS and rec["failed"] == 0, rec
    assert rec["workload"] == workload and rec["verified"] == "tsize-and-completion"
    assert rec["requests_ok"] >= CLIENTS * len(load(workload).sequence)
    if workload == "pxe":
        assert rec["bytes_ok"] == CLIENTS * 1048576  # nbp.efi, read in full by each client
    if rec["engine"] == "c":
        cache = nobody.home / ".cache" / "tftpd-storm"
        assert cache.stat().st_uid == pwd.getpwnam(NOBODY).pw_uid
        assert list(cache.glob("cgen-*.so"))
    else:
        assert "C engine is unavailable" in proc.stderr, proc.stderr


def test_root_copy_with_one_changed_file_fails(nobody: Nobody, daemon: Daemon,
                                                pxe_root: Path) -> None:
    copy = nobody.base / "copy"
    shutil.copytree(pxe_root, copy, dirs_exist_ok=True)
    target = copy / "nbp.efi"
    data = bytearray(target.read_bytes())
    data[70_000] ^= 0x01  # in the 49th block of 1456 bytes
    target.write_bytes(bytes(data))
    os.chmod(target, 0o644)
    same = nobody.storm(_addr(daemon), "--workload", "pxe", "--clients", "8", "--json",
                        "--timeout", "30", "--root", str(pxe_root))
    assert same.returncode == 0, same.stdout + same.stderr
    assert _storm_json(same)["verified"] == "bytes"
    proc = nobody.storm(_addr(daemon), "--workload", "pxe", "--clients", "8", "--json",
                        "--timeout", "30", "--root", str(copy))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rec = _storm_json(proc)
    assert rec["failed"] == 8 and rec["ok"] == 0, rec
    assert rec["failed_by"] == {"corrupt": 8}, rec


def test_python_engine_when_the_compiler_fails(nobody: Nobody, daemon: Daemon) -> None:
    proc = nobody.storm(_addr(daemon), "--workload", "pxe", "--clients", str(CLIENTS),
                        "--timeout", "30", "--json", CC="/bin/false",
                        TFTPD_STORM_CACHE=str(nobody.home / "cache-cc-false"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = _storm_json(proc)
    assert rec["engine"] == "python" and rec["ok"] == CLIENTS and rec["failed"] == 0, rec
    assert "C engine is unavailable" in proc.stderr, proc.stderr
    # The reason is the compiler's unless that interpreter lacks cffi (checked first).
    assert "/bin/false" in proc.stderr or "cffi is not installed" in proc.stderr


def test_failed_build_names_the_compiler(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFTPD_STORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(cgen.BuildError, match="/bin/false .* exited with 1"):
        cgen.build()
    assert not list((tmp_path / "cache").iterdir())  # no half-built object left


def test_table_output(nobody: Nobody, daemon: Daemon) -> None:
    proc = nobody.storm(_addr(daemon), "--workload", "pxe", "--clients", "4",
                        "--timeout", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head, _, row = proc.stdout.strip().splitlines()[1:4]
    assert head.split()[:6] == ["server", "work", "N", "ok", "fail", "wall"], head
    assert row.split()[:5] == [_addr(daemon), "pxe", "4", "4", "0"], row


def test_unreachable_server_exits_2(nobody: Nobody) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    proc = nobody.storm(f"127.0.0.1:{closed}", "--workload", "pxe", "--clients", "4",
                        "--timeout", "5")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused" in proc.stderr and proc.stdout == ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        proc = nobody.storm(f"127.0.0.1:{silent.getsockname()[1]}", "--workload", "pxe",
                            "--clients", "4", "--timeout", "2", "--json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no answer" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("args", [
    ["127.0.0.1:69", "--clients", "0"],
    ["127.0.0.1:69", "--clients", "100000"],
    ["127.0.0.1:69", "--timeout", "0"],
    ["127.0.0.1:69", "--workload", "no-such-workload"],
    ["[::1]:69"],
    ["127.0.0.1:notaport"],
    ["127.0.0.1:69", "--root", "/nonexistent-storm-root"],
    [],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tftpd.storm", *args], capture_output=True,
                          text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("tftpd-storm: ") or "usage:" in proc.stderr


@pytest.mark.parametrize(("args", "said"), [
    (["127.0.0.1:69", "--faults", "loss=abc"], "--faults loss=abc: loss is not a number"),
    (["127.0.0.1:69", "--workload", "nosuch"], "unknown workload 'nosuch'; known: lockstep, "),
    (["127.0.0.1:69:5"], "127.0.0.1:69:5: expected HOST:PORT"),
    (["127.0.0.1:69", "--workload", "LIST.json"], "a workload is a JSON object"),
    (["127.0.0.1:69", "--workload", "BADOPT.json"], "step 0: option blksize: expected an "
                                                    "integer, got 'abc'"),
    (["127.0.0.1:69", "--workload", "HUGE.json"], "OverflowError"),
])
def test_usage_errors_say_what_is_wrong(args: list[str], said: str, tmp_path: Path) -> None:
    (tmp_path / "LIST.json").write_text("[1, 2]")
    doc = json.loads((REPO / "tftpd/storm/workloads/pxe.json").read_text())
    doc["sequence"][0]["options"] = {"blksize": "abc"}
    (tmp_path / "BADOPT.json").write_text(json.dumps(doc))
    doc["sequence"][0]["options"] = {"blksize": 1024.0}  # a whole number is an integer
    doc["client"]["ack_retries"] = 1e400
    (tmp_path / "HUGE.json").write_text(json.dumps(doc).replace("Infinity", "1e400"))
    args = [str(tmp_path / a) if a.endswith(".json") else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "tftpd.storm", *args], capture_output=True,
                          text=True, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- the engines, in process: no bytes known, only the announced size -------------------

@pytest.mark.parametrize("engine", ["python", "c"])
def test_tsize_is_held_to_the_bytes_received(engine: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tftpd.storm.engine import run_storm

    monkeypatch.setenv("TFTPD_STORM_CACHE", str(tmp_path / "cache"))
    wl = load("pxe")
    files = {p: content(p, 20_000) for p in wl.files}  # not the sizes the workload lists
    unknown = dict.fromkeys(wl.files)
    with FaultyServer(files) as good:
        res = run_storm(("127.0.0.1", good.port), wl, 3, engine=engine, files=unknown,
                        deadline_s=20)
    assert (res.engine, res.ok, res.failed) == (engine, 3, {}), res.summary()
    assert res.bytes_ok == 3 * 20_000
    with FaultyServer(files, {"tsize-wrong"}) as liar:  # announces one byte more
        res = run_storm(("127.0.0.1", liar.port), wl, 3, engine=engine, files=unknown,
                        deadline_s=20)
    assert res.ok == 0 and res.failed == {"short-file": 3}, res.summary()


def test_size_sources_lead_to_the_step_that_keeps_the_size() -> None:
    from tftpd.storm.workload import Step, size_sources

    probe, sized, plain = (Step("f", {"tsize": 0}, "probe"), Step("f", {"tsize": 0}, "data"),
                           Step("f", {}, "data"))
    other, miss = Step("g", {}, "data"), Step("f", {"tsize": 0}, "notfound")
    assert size_sources((probe, sized, plain)) == [-1, 0, 0]
    assert size_sources((probe, probe, plain)) == [-1, 0, 0]
    assert size_sources((plain, probe, other, plain)) == [-1, -1, -1, 1]
    assert size_sources((miss, plain)) == [-1, -1]


@pytest.mark.parametrize("engine", ["python", "c"])
def test_a_read_without_tsize_is_held_to_the_size_probed_before(
        engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mfs probes a name with tsize, then reads it plainly: the read must bring the size
    the probe announced."""
    from tftpd.storm.engine import run_storm

    monkeypatch.setenv("TFTPD_STORM_CACHE", str(tmp_path / "cache"))
    wl = load("mfs")
    assert any(a.file == b.file and "tsize" in a.options and "tsize" not in b.options
               for i, a in enumerate(wl.sequence) for b in wl.sequence[i + 1:])
    files = {p: content(p, 3000) for p in wl.files}
    unknown = dict.fromkeys(wl.files)
    with FaultyServer(files) as good:
        res = run_storm(("127.0.0.1", good.port), wl, 2, engine=engine, files=unknown,
                        deadline_s=20)
    assert (res.ok, res.failed) == (2, {}), res.summary()
    with FaultyServer(files, {"tsize-wrong"}) as liar:  # announces one byte more
        res = run_storm(("127.0.0.1", liar.port), wl, 2, engine=engine, files=unknown,
                        deadline_s=20)
    assert res.ok == 0 and set(res.failed) <= {"short-file", "bad-tsize"}, res.summary()


def test_cache_dir_writable_by_others_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("TFTPD_STORM_CACHE", str(shared))
    with pytest.raises(cgen.BuildError, match="writable by others"):
        cgen.build()
    assert not list(shared.iterdir())
    os.chmod(shared, 0o700)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    so = cgen.build()
    assert so.parent == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700


def test_man_page_covers_every_flag_and_renders() -> None:
    page = (REPO / "man" / "tftpd-storm.1").read_text()
    for action in _parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag.replace("-", "\\-") in page, flag
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'tftpd-storm = "tftpd.storm.cli:main"' in pyproject
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    out = subprocess.run(["groff", "-man", "-ww", "-z", str(REPO / "man" / "tftpd-storm.1")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_no_home_builds_in_a_temporary_directory(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    (tmp_path / "file").write_text("")
    monkeypatch.delenv("TFTPD_STORM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # cannot hold a directory
    so = cgen.build()
    try:
        assert so.exists() and not so.is_relative_to(tmp_path)
        assert so.parent.name.startswith("tftpd-storm-")
        assert stat.S_IMODE(so.parent.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(so.parent)
