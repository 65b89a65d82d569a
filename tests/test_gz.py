"""The `.gz` lookup both ways, made once, shared, bounded."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
from conftest import need, start_daemon

from tftpd import client
from tftpd import packet as P
from tftpd.files import FileCache, FileError, Root
from tftpd.gz import GzCache


def read(f_fd: int, size: int) -> bytes:
    return os.pread(f_fd, size, 0)


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    cache = tmp_path / "cache"
    return root, cache


def test_both_ways_and_original_wins(rig: tuple[Path, Path]) -> None:
    root, cache = rig
    plain = os.urandom(1000) * 50
    (root / "boot" / "loader.conf").write_bytes(plain)
    (root / "boot" / "kernel.gz").write_bytes(gzip.compress(plain))
    (root / "both").write_bytes(b"original")
    (root / "both.gz").write_bytes(gzip.compress(b"from the gz"))
    fc = FileCache(Root(str(root)), gz=GzCache.open_dir(str(cache)))

    f = fc.open(b"boot/loader.conf.gz")  # only the plain file exists
    assert gzip.decompress(read(f.fd, f.size)) == plain
    assert f.size == os.fstat(f.fd).st_size  # tsize is the size on the wire
    f.close()
    f = fc.open(b"boot/kernel")  # only the .gz exists
    assert read(f.fd, f.size) == plain and f.size == len(plain)
    f.close()
    f = fc.open(b"both")
    assert read(f.fd, f.size) == b"original"
    f.close()
    with pytest.raises(FileError) as exc:
        fc.open(b"neither.gz")
    assert exc.value.code == P.E_NOT_FOUND


def test_off_by_default(rig: tuple[Path, Path]) -> None:
    root, _ = rig
    (root / "x").write_bytes(b"data")
    with pytest.raises(FileError):
        FileCache(Root(str(root))).open(b"x.gz")


def test_made_once_and_remade_when_the_source_changes(rig: tuple[Path, Path]) -> None:
    root, cache = rig
    (root / "f").write_bytes(b"one" * 100)
    gz = GzCache.open_dir(str(cache))
    a, b = FileCache(Root(str(root)), gz=gz), FileCache(Root(str(root)), gz=gz)
    for fc in (a, b, a):
        fc.open(b"f.gz").close()
    assert gz.made == 1
    (root / "f").write_bytes(b"two" * 200)
    f = b.open(b"f.gz")
    assert gzip.decompress(read(f.fd, f.size)) == b"two" * 200
    f.close()
    assert gz.made == 2


def test_corrupt_and_bomb_are_refused(rig: tuple[Path, Path]) -> None:
    root, cache = rig
    (root / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (root / "bomb.gz").write_bytes(gzip.compress(bytes(3 << 20)))
    fc = FileCache(Root(str(root)), gz=GzCache(os.open(str(root.parent), os.O_RDONLY),
                                               max_expand=1 << 20))
    for name in (b"bad", b"bomb"):
        with pytest.raises(FileError) as exc:
            fc.open(name)
        assert exc.value.code == P.E_UNDEFINED
    assert not [n for n in os.listdir(root.parent) if n.endswith((".raw", ".tmp"))]


def test_cache_is_bounded(rig: tuple[Path, Path]) -> None:
    root, cache = rig
    gz = GzCache.open_dir(str(cache), max_bytes=150_000)
    fc = FileCache(Root(str(root)), gz=gz)
    for i in range(5):
        (root / f"r{i}").write_bytes(os.urandom(60_000))  # incompressible
        fc.open(f"r{i}.gz".encode()).close()
    sizes = [os.path.getsize(cache / n) for n in os.listdir(cache)]
    assert sum(sizes) <= 150_000 and len(sizes) >= 1


def test_racing_workers_make_it_once(rig: tuple[Path, Path]) -> None:
    """Two processes ask for the same derived file at once: one makes it, both read it
    whole."""
    root, cache = rig
    big = os.urandom(6 << 20)  # incompressible: a few hundred ms to compress
    (root / "mfsroot").write_bytes(big)
    os.close(GzCache.open_dir(str(cache)).dir_fd)  # create the directory first
    script = (
        "import gzip, os, sys\n"
        "from tftpd.files import FileCache, Root\n"
        "from tftpd.gz import GzCache\n"
        "gz = GzCache.open_dir(sys.argv[2])\n"
        "f = FileCache(Root(sys.argv[1]), gz=gz).open(b'mfsroot.gz')\n"
        "data = gzip.decompress(os.pread(f.fd, f.size, 0))\n"
        "print(gz.made, len(data), flush=True)\n"
    )
    procs = [subprocess.Popen(["python3", "-c", script, str(root), str(cache)],
                              stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == [0, 1]
    assert all(int(o[1]) == len(big) for o in outs)
    assert [n for n in os.listdir(cache) if not n.endswith(".lock")] == \
        [n for n in os.listdir(cache) if n.endswith(".gz")]  # no temporary left


def test_daemon_serves_both_ways_to_curl(tmp_path: Path) -> None:
    curl = need("curl")
    root = tmp_path / "root"
    root.mkdir()
    plain = b"loader settings\n" * 500
    (root / "loader.conf").write_bytes(plain)
    (root / "kernel.ko.gz").write_bytes(gzip.compress(plain * 3))
    d = start_daemon(root, "--workers", "2", "--gz", "--gz-cache", str(tmp_path / "c"))
    try:
        out = tmp_path / "out"
        subprocess.run([curl, "-s", "-o", str(out), f"tftp://127.0.0.1:{d.port}/loader.conf.gz"],
                       check=True, timeout=60)
        assert gzip.decompress(out.read_bytes()) == plain
        r = client.get("127.0.0.1", d.port, "kernel.ko", options={"tsize": "0"})
        assert r.data == plain * 3 and r.oack["tsize"] == str(len(plain) * 3)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("gz_present", [True, False])
def test_the_loaders_eleven_requests(tmp_path: Path, datapath: str, gz_present: bool) -> None:
    """The FreeBSD loader of the disk-imaging MFS, as tftpd/storm/workloads/mfs.json has it:
    with the `.gz` files on disk they are served as they are; with only the plain
    files, `--gz` makes each `.gz` asked for, its tsize true before the download."""
    import json

    from conftest import REPO

    seq = json.loads((REPO / "tftpd" / "storm" / "workloads" / "mfs.json").read_text())["sequence"]
    assert len(seq) == 11
    root = tmp_path / "root"
    (root / "boot" / "defaults").mkdir(parents=True)
    plain: dict[str, bytes] = {}
    for i, step in enumerate(seq):
        name = step["file"]
        if step["expect"] == "notfound" or name in plain:
            continue
        body = (f"{name} {i}\n".encode() + os.urandom(3000)) * (40 if "kernel" in name else 3)
        plain[name] = body
        if name.endswith(".gz"):
            path = root / (name if gz_present else name[:-3])
            path.write_bytes(gzip.compress(body) if gz_present else body)
        else:
            (root / name).write_bytes(body)
    d = start_daemon(root, "--workers", "2", "--gz", "--gz-cache", str(tmp_path / "c"),
                     env={"TFTPD_DATAPATH": datapath})
    try:
        size: dict[str, int] = {}
        for step in seq:
            name, opts = step["file"], {k: str(v) for k, v in step["options"].items()}
            if step["expect"] == "notfound":
                with pytest.raises(client.TftpError) as exc:
                    client.get("127.0.0.1", d.port, name, options=opts)
                assert exc.value.code == P.E_NOT_FOUND
            elif step["expect"] == "probe":
                size[name] = int(client.probe("127.0.0.1", d.port, name).oack["tsize"])
            else:
                got = client.get("127.0.0.1", d.port, name, options=opts).data
                want = plain[name]
                assert (gzip.decompress(got) if name.endswith(".gz") else got) == want
                if name in size:
                    assert size[name] == len(got)  # the probe's tsize was the truth
                if gz_present and name.endswith(".gz"):
                    assert got == (root / name).read_bytes()  # served as it is on disk
    finally:
        assert d.stop() == 0
