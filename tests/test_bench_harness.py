"""The benchmark harness (bench/) notices what a broken server does.

Every test runs inside a network namespace it makes and removes (loopback only), against
tiny fake servers written here (a few lines of UDP each, in a thread) or bench's `limit`
reference server. Both load-generator engines run each case: the pure-Python one and the
C core. The C core and `limit` are compiled here; a failed build fails the test (CI
installs gcc), it is never a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import netns
from tftpd.storm.content import build_root, content, expected
from tftpd.storm.engine import c_engine_error, run_storm
from tftpd.storm.result import Faults, StormResult
from tftpd.storm.workload import Workload, WorkloadError, load, parse

REPO = Path(__file__).resolve().parent.parent
SHARED_WORKLOADS = REPO.parent / "shared" / "workloads"

# Short retry rules: a fault shows within about a second. Where the server is correct
# the rules are patient (PATIENT), so that a loaded machine cannot fail the test.
RULES = {"rrq_timeouts_s": [0.3, 0.3], "ack_timeout_s": 0.25, "ack_retries": 2}
PATIENT = {"rrq_timeouts_s": [2, 2, 2], "ack_timeout_s": 1, "ack_retries": 3}
FILES = {"a.bin": 3000, "big.bin": 70000}


def tiny(sequence: list[dict], rules: dict | None = None, **extra: object) -> Workload:
    doc = {"name": "tiny", "files": FILES, "client": rules or RULES, "sequence": sequence,
           "storm": {"clients": [1], "ramp_ms": 0}}
    doc.update(extra)
    return parse(doc)


READ_A = [{"file": "a.bin", "options": {}, "expect": "data"}]


# -- namespace and engines -------------------------------------------------------------

@pytest.fixture
def in_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the harness runs its traffic in a network namespace")
    why = netns.available()
    if why:
        pytest.skip(why)
    netns.cleanup_stale()
    name = netns.create(f"t{threading.get_ident() % 100000}")
    try:
        with netns.inside(name):
            yield name
    finally:
        netns.delete(name)


def need_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (apt-get install nftables)")


@pytest.fixture(params=["python", "c"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "c":
        err = c_engine_error()
        if err:
            pytest.fail(f"the C load generator does not build: {err}")
    return request.param


# -- fake servers ----------------------------------------------------------------------

def _data(block: int, payload: bytes) -> bytes:
    return struct.pack("!HH", 3, block & 0xFFFF) + payload


def _error(code: int, msg: str) -> bytes:
    return struct.pack("!HH", 5, code) + msg.encode() + b"\0"


class FakeServer:
    """A lock-step TFTP server in a thread, with one deliberate fault.

    fault: None (correct), "corrupt" (one byte of block 2 flipped), "silent" (never
    answers), "wrong-port" (block 2 onwards from a second port), "listen-port" (answers
    from the port the RRQ went to), "ignore-options" (plain RFC 1350, no OACK).
    Files it has: FILES with tftpd.storm.content bytes, except those in `missing`.
    """

    def __init__(self, fault: str | None = None, missing: tuple[str, ...] = ()) -> None:
        self.fault = fault
        self.files = {p: content(p, s) for p, s in FILES.items() if p not in missing}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()

    def _run(self) -> None:
        end = time.monotonic() + 30  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                pkt, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            if pkt[:2] != b"\x00\x01":
                continue
            self.requests += 1
            if self.fault == "silent":
                continue
            self._serve(pkt, peer)

    def _serve(self, pkt: bytes, peer: tuple[str, int]) -> None:
        fields = pkt[2:].split(b"\0")
        name = fields[0].decode()
        opts = {fields[i].decode().lower(): int(fields[i + 1])
                for i in range(2, len(fields) - 1, 2) if fields[i]}
        if self.fault == "listen-port":
            tx = self.sock
        else:
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind(("127.0.0.1", 0))
        tx.settimeout(0.1)
        other = None
        try:
            data = self.files.get(name)
            if data is None:
                tx.sendto(_error(1, "File not found"), peer)
                return
            blksize = 512
            if opts and self.fault != "ignore-options":
                oack = b"\x00\x06"
                if "blksize" in opts:
                    blksize = min(opts["blksize"], 1468)
                    oack += b"blksize\0%d\0" % blksize
                if "tsize" in opts:
                    oack += b"tsize\0%d\0" % len(data)
                if not self._exchange(tx, oack, peer, 0):
                    return
            nblocks = len(data) // blksize + 1
            for block in range(1, nblocks + 1):
                payload = data[(block - 1) * blksize:block * blksize]
                if self.fault == "corrupt" and block == 2:
                    payload = payload[:7] + bytes([payload[7] ^ 0x40]) + payload[8:]
                sender = tx
                if self.fault == "wrong-port" and block >= 2:
                    if other is None:
                        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        other.bind(("127.0.0.1", 0))
                        other.settimeout(0.1)
                    sender = other
                if not self._exchange(sender, _data(block, payload), peer, block):
                    return
        finally:
            if tx is not self.sock:
                tx.close()
            if other is not None:
                other.close()

    def _exchange(self, tx: socket.socket, pkt: bytes, peer: tuple[str, int],
                  block: int) -> bool:
        """Send `pkt` until ACK `block` arrives (4 tries); False when the client quits."""
        for _ in range(4):
            if self.stop.is_set():
                return False
            tx.sendto(pkt, peer)
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                try:
                    ans, src = tx.recvfrom(2048)
                except TimeoutError:
                    continue
                if src != peer:
                    continue
                if ans[:2] == b"\x00\x05":
                    return False
                if ans[:2] == b"\x00\x04" and struct.unpack("!H", ans[2:4])[0] == block:
                    return True
        return False


def storm(port: int, wl: Workload, engine: str, clients: int = 1) -> StormResult:
    return run_storm(("127.0.0.1", port), wl, clients, engine=engine, deadline_s=20)


# -- content and workloads -------------------------------------------------------------

def test_content_is_the_documented_prng(tmp_path: Path) -> None:
    import random

    seed = int.from_bytes(hashlib.sha256(b"tftpbench:nbp.efi").digest()[:8], "big")
    assert content("nbp.efi", 4096) == random.Random(seed).randbytes(4096)
    assert content("nbp.efi", 100) == content("nbp.efi", 4096)[:100]
    assert content("nbp.efi", 64) != content("pxelinux.0", 64)
    wl = load("mfs")
    root = build_root(wl, tmp_path / "root")
    for path, size in wl.files.items():
        assert (root / path).read_bytes() == content(path, size)
    assert not (root / "boot/loader.conf.local").exists()
    (root / "boot/loader.conf.local").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        build_root(wl, root)


def test_workloads_parse_and_match_shared_copies() -> None:
    for name in ("pxe", "mfs", "probe", "stream"):
        wl = load(name)
        assert wl.sequence and wl.clients
        assert all(s.file in wl.files for s in wl.sequence if s.expect != "notfound")
    assert load("probe").repeat is not None
    assert load("stream").sequence[0].options["windowsize"] > 1
    if SHARED_WORKLOADS.is_dir():
        for name in ("pxe", "mfs"):
            ours = json.loads((REPO / "tftpd" / "storm" / "workloads" / f"{name}.json")
                              .read_text())
            theirs = json.loads((SHARED_WORKLOADS / f"{name}.json").read_text())
            assert ours == theirs
    with pytest.raises(WorkloadError):
        tiny([{"file": "nope.bin", "options": {}, "expect": "data"}])
    with pytest.raises(WorkloadError):
        tiny([{"file": "a.bin", "options": {}, "expect": "probe"}])


# -- the generator against fakes -------------------------------------------------------

def test_correct_server_passes(in_netns: str, engine: str) -> None:
    wl = tiny([
        {"file": "a.bin", "options": {"tsize": 0}, "expect": "probe"},
        {"file": "a.bin", "options": {}, "expect": "data"},
        {"file": "big.bin", "options": {"blksize": 1456, "tsize": 0}, "expect": "data"},
        {"file": "missing.cfg", "options": {}, "expect": "notfound"},
    ], PATIENT)
    with FakeServer() as srv:
        res = storm(srv.port, wl, engine, clients=2)
    assert res.failed == {}
    assert res.ok == 2 and res.requests_ok == 8
    assert res.bytes_ok == 2 * (3000 + 70000)
    assert len(res.first_answer_s) == 8 and len(res.completion_s) == 2
    assert res.rrq_retransmits == 0 and res.wrong_tid_packets == 0


def test_corrupted_byte_is_noticed(in_netns: str, engine: str) -> None:
    with FakeServer("corrupt") as srv:
        res = storm(srv.port, tiny(READ_A), engine)
    assert res.failed == {"corrupt": 1}
    assert res.ok == 0
    assert res.bytes_ok == 512  # block 1 was right, block 2 was not


def test_missing_file_is_noticed(in_netns: str, engine: str) -> None:
    with FakeServer(missing=("a.bin",)) as srv:
        res = storm(srv.port, tiny(READ_A), engine)
    assert res.failed == {"error-1": 1}
    # and a miss the workload expects is a success
    wl = tiny([{"file": "nothere", "options": {"tsize": 0}, "expect": "notfound"}], PATIENT)
    with FakeServer() as srv:
        res = storm(srv.port, wl, engine)
    assert res.failed == {} and res.ok == 1


def test_file_present_where_a_miss_is_expected(in_netns: str, engine: str) -> None:
    # the workload's own check keeps such a file out of its list; the server has it anyway
    doc_files = {"a.bin": 3000}
    wl = parse({"name": "t", "files": doc_files, "client": RULES,
                "sequence": [{"file": "big.bin", "options": {}, "expect": "notfound"}]})
    with FakeServer() as srv:
        res = storm(srv.port, wl, engine)
    assert res.failed == {"found": 1}


def test_silent_server_runs_out_of_retries(in_netns: str, engine: str) -> None:
    with FakeServer("silent") as srv:
        res = storm(srv.port, tiny(READ_A), engine)
        requests = srv.requests
    assert res.failed == {"rrq-timeout": 1}
    assert res.rrq_sent == len(RULES["rrq_timeouts_s"])
    assert res.rrq_retransmits == len(RULES["rrq_timeouts_s"]) - 1
    assert requests == res.rrq_sent
    assert res.first_answer_s == []


def test_answer_from_a_second_port_is_rejected(in_netns: str, engine: str) -> None:
    with FakeServer("wrong-port") as srv:
        res = storm(srv.port, tiny(READ_A), engine)
    assert res.failed == {"wrong-tid": 1}
    assert res.wrong_tid_packets >= 1
    assert res.bytes_ok == 512


def test_answer_from_the_listen_port_is_rejected(in_netns: str, engine: str) -> None:
    with FakeServer("listen-port") as srv:
        res = storm(srv.port, tiny(READ_A), engine)
    assert res.failed == {"wrong-tid": 1}
    assert res.wrong_tid_packets >= 1
    assert res.bytes_ok == 0


def test_probe_without_oack_fails(in_netns: str, engine: str) -> None:
    wl = tiny([{"file": "a.bin", "options": {"tsize": 0}, "expect": "probe"}])
    with FakeServer("ignore-options") as srv:
        res = storm(srv.port, wl, engine)
    assert res.failed == {"no-oack": 1}
    # a read whose options were ignored falls back to 512-byte blocks and succeeds
    wl = tiny([{"file": "big.bin", "options": {"blksize": 1456}, "expect": "data"}], PATIENT)
    with FakeServer("ignore-options") as srv:
        res = storm(srv.port, wl, engine)
    assert res.failed == {} and res.bytes_ok == 70000


# -- the limit server: windows, probes, many clients ----------------------------------

@pytest.fixture
def limit_server(in_netns: str, tmp_path: Path) -> Iterator[Callable[[Workload], int]]:
    from bench.build import BuildError, limit_binary

    try:
        binary = limit_binary()
    except BuildError as exc:
        pytest.fail(f"the limit server does not build: {exc}")
    procs: list[subprocess.Popen[str]] = []

    def start(wl: Workload) -> int:
        root = build_root(wl, tmp_path / "root")
        proc = subprocess.Popen([str(binary), "-a", "127.0.0.1:0", "--workers", "2",
                                 str(root)], stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on 127.0.0.1:" in line, line
        return int(line.rsplit(":", 1)[1])

    try:
        yield start
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_limit_server_windowed_storm(limit_server: Callable[[Workload], int],
                                     engine: str) -> None:
    wl = tiny([
        {"file": "big.bin", "options": {"tsize": 0, "blksize": 1456}, "expect": "probe"},
        {"file": "big.bin", "options": {"blksize": 1456, "windowsize": 8}, "expect": "data"},
        {"file": "a.bin", "options": {"blksize": 512, "windowsize": 4}, "expect": "data"},
        {"file": "pxelinux.cfg/default", "options": {"tsize": 0}, "expect": "notfound"},
    ], PATIENT)
    port = limit_server(wl)
    res = storm(port, wl, engine, clients=50)
    assert res.failed == {}
    assert res.ok == 50 and res.requests_ok == 200
    assert res.bytes_ok == 50 * (70000 + 3000)
    assert res.gen_cpu_s > 0


def test_window_gap_is_recovered_under_loss(limit_server: Callable[[Workload], int],
                                            in_netns: str, engine: str) -> None:
    """With 10% of packets dropped (nftables numgen) the windowed transfer still
    completes, through gap ACKs and timeouts. The client is patient enough (10 RRQs over
    5 s: limit repeats a lost OACK only after 1 s; 20 ACK re-sends) that a failure here
    is a bug, not bad luck."""
    wl = parse({"name": "lossy", "files": FILES,
                "client": {"rrq_timeouts_s": [0.5] * 10,
                           "ack_timeout_s": 0.3, "ack_retries": 20},
                "sequence": [{"file": "big.bin", "options": {"blksize": 1024,
                                                             "windowsize": 4},
                              "expect": "data"}]})
    need_nft()
    port = limit_server(wl)
    netns.set_loss(in_netns, 10)
    try:
        res = storm(port, wl, engine, clients=3)
        dropped = netns.loss_dropped(in_netns)
    finally:
        netns.set_loss(in_netns, 0)
    assert dropped and dropped > 0
    assert res.failed == {}
    assert res.bytes_ok == 3 * 70000


def test_fault_layer_duplicates_and_reorders_and_a_correct_server_survives(
        limit_server: Callable[[Workload], int]) -> None:
    """The C generator's own faults (drop, double, hold back) really happen in both
    directions: held copies are overtaken by later datagrams of their socket, so windows
    arrive out of order and the client sees repeated blocks; limit still delivers every
    byte. Patient rules: a failure here is a bug, not bad luck."""
    if c_engine_error():
        pytest.skip("the fault layer is in the C engine")
    wl = parse({"name": "faulty", "files": FILES,
                "client": {"rrq_timeouts_s": [0.5] * 10,
                           "ack_timeout_s": 0.3, "ack_retries": 20},
                "sequence": [
                    {"file": "big.bin", "options": {"blksize": 1024, "windowsize": 8},
                     "expect": "data"},
                    {"file": "a.bin", "options": {}, "expect": "data"}]})
    port = limit_server(wl)
    faults = Faults.parse("loss=3,dup=15,reorder=15,hold=1-20,seed=7")
    res = run_storm(("127.0.0.1", port), wl, 10, engine="c", deadline_s=60, faults=faults)
    assert res.failed == {}
    assert res.ok == 10 and res.bytes_ok == 10 * (70000 + 3000)
    f = res.faults
    assert f["reorder_pct"] == 15 and f["seed"] == 7
    for way in ("sent", "received"):
        d = f[way]
        assert d["seen"] > 0 and d["dropped"] > 0 and d["duplicated"] > 0 and d["held"] > 0
        # each datagram is a draw: far outside chance either way
        assert 0.05 < d["duplicated"] / (d["seen"] - d["dropped"]) < 0.3
    # received windows are reordered (a held DATA overtaken by its successors) ...
    assert f["received"]["overtaken"] > 0
    # ... and the client saw blocks again: doubled ones and ones the server re-sent
    assert res.duplicate_data > 0
    assert 0 < f["held_peak"] <= faults.max_held


def test_faults_are_parsed_and_need_the_c_engine() -> None:
    f = Faults.parse("loss=5,dup=5,reorder=5")
    assert (f.loss, f.dup, f.reorder, f.hold_ms) == (5, 5, 5, (1.0, 30.0)) and f
    assert Faults.parse("hold=7").hold_ms == (7.0, 7.0)
    assert not Faults.parse("")
    for bad in ("loss=100", "dup=-1", "wobble=3", "loss", "hold=9-2"):
        with pytest.raises(ValueError):
            Faults.parse(bad)
    with pytest.raises(ValueError):
        run_storm(("127.0.0.1", 9), tiny(READ_A), 1, engine="python", faults=f)


def test_nftables_loss_rule_drops_about_the_share_asked(in_netns: str) -> None:
    need_nft()
    netns.set_loss(in_netns, 50)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        got = 0
        for _ in range(400):
            tx.sendto(b"x", rx.getsockname())
            try:
                while True:
                    rx.recv(16)
                    got += 1
            except BlockingIOError:
                pass
        rx.settimeout(0.2)  # bounded drain of anything still in flight
        try:
            while True:
                rx.recv(16)
                got += 1
        except TimeoutError:
            pass
        assert 100 < got < 300  # 50% of 400, far outside chance either way
        assert netns.loss_dropped(in_netns) == 400 - got
        netns.set_loss(in_netns, 0)
        assert netns.loss_dropped(in_netns) is None
    finally:
        rx.close()
        tx.close()


def test_expected_contents_cover_the_workload() -> None:
    wl = load("pxe")
    files = expected(wl)
    assert set(files) == set(wl.files)
    assert all(len(files[p]) == s for p, s in wl.files.items())
