"""Names -> files under the root: confinement by components, on the descriptor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tftpd import packet as P
from tftpd.files import FileCache, FileError, Root, normalize, sanitize


@pytest.mark.parametrize("name,expected", [
    (b"pxelinux.0", "pxelinux.0"),
    (b"/pxelinux.0", "pxelinux.0"),
    (b"boot\\grub\\grub.cfg", "boot/grub/grub.cfg"),
    (b"\\boot\\x", "boot/x"),
    (b"a//b/./c", "a/b/c"),
    (b"nbp.efi\xff", "nbp.efi"),  # legacy PXE ROM quirk
    (b"/tftpboot/frisbee/boot/loader.rc", "frisbee/boot/loader.rc"),  # root spelled out
])
def test_normalize(name: bytes, expected: str) -> None:
    assert normalize(name, "/tftpboot") == expected


@pytest.mark.parametrize("name", [
    b"../etc/passwd", b"a/../../x", b"..\\..\\x", b"/..", b"a/..", b"x\x01", b"\x1b[31m",
    b"a" * 1025, b"a/" + b"b" * 256, b"/", b".", b"\x7f",
    b"pxelinux.0/", b"boot/.", b"boot\\", b"/tftpboot/",  # a directory's name, never a file
])
def test_normalize_refuses(name: bytes) -> None:
    with pytest.raises(FileError) as exc:
        normalize(name, "/tftpboot")
    assert exc.value.code == P.E_ACCESS


def test_sanitize_escapes_control_bytes() -> None:
    assert sanitize(b"a\x1b[31mb\\") == "a\\x1b[31mb\\x5c"
    assert sanitize(b"x" * 500).endswith("...")
    assert len(sanitize(b"x" * 500)) == 123


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.txt").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"outside")
    (root / "out").symlink_to(tmp_path / "secret")
    (root / "in").symlink_to(root / "sub" / "f.txt")
    (root / "rel").symlink_to("sub/f.txt")
    os.mkfifo(root / "fifo")
    return root


def read_all(f_fd: int, size: int) -> bytes:
    return os.pread(f_fd, size, 0)


def test_open_inside(tree: Path) -> None:
    r = Root(str(tree))
    for name in (b"sub/f.txt", b"in", b"rel", b"/sub/f.txt", b"sub\\f.txt"):
        f = r.open_read(name)
        try:
            assert read_all(f.fd, f.size) == b"inside"
        finally:
            f.close()


@pytest.mark.parametrize("name,code", [
    (b"out", P.E_ACCESS), (b"sub", P.E_ACCESS), (b"fifo", P.E_ACCESS),
    (b"missing", P.E_NOT_FOUND), (b"sub/f.txt/x", P.E_NOT_FOUND),
])
def test_open_refuses(tree: Path, name: bytes, code: int) -> None:
    with pytest.raises(FileError) as exc:
        Root(str(tree)).open_read(name)
    assert exc.value.code == code


def test_netascii_conversion_and_size(tree: Path) -> None:
    (tree / "t.txt").write_bytes(b"a\nb\r\nc\rd")
    f = Root(str(tree)).open_read(b"t.txt", "netascii")
    try:
        data = read_all(f.fd, f.size)
    finally:
        f.close()
    assert data == b"a\r\nb\r\0\r\nc\r\0d"
    assert f.size == len(data)  # tsize is the size on the wire


# -- the shared open-file cache ----------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_shares_one_descriptor(tree: Path) -> None:
    cache = FileCache(Root(str(tree)))
    a = cache.open(b"sub/f.txt")
    b = cache.open(b"/sub/f.txt")
    assert a.fd == b.fd and cache.stats.opens == 1 and cache.stats.hits == 1
    a.close()
    b.close()
    c = cache.open(b"sub/f.txt")
    assert read_all(c.fd, c.size) == b"inside"  # still open after its users left
    c.close()


def test_replaced_file_is_served_whole_old_or_new(tree: Path) -> None:
    cache = FileCache(Root(str(tree)))
    old = cache.open(b"sub/f.txt")
    new_path = tree / "sub" / "f.new"
    new_path.write_bytes(b"brand new content")
    os.replace(new_path, tree / "sub" / "f.txt")  # how a careful admin updates a file
    new = cache.open(b"sub/f.txt")
    assert new.fd != old.fd
    assert read_all(old.fd, old.size) == b"inside"  # the running transfer keeps its file
    assert read_all(new.fd, new.size) == b"brand new content"
    old_fd = old.fd
    old.close()
    with pytest.raises(OSError):
        os.fstat(old_fd)  # the retired descriptor closed with its last user
    new.close()


def test_small_files_are_served_from_an_image_taken_once(tree: Path) -> None:
    (tree / "big.bin").write_bytes(b"b" * 5000)
    (tree / "mid.bin").write_bytes(b"m" * 3000)
    cache = FileCache(Root(str(tree)), image_max=4096, image_budget=3000)
    small = cache.open(b"sub/f.txt")
    assert small.image == b"inside"
    assert cache.open(b"big.bin").image is None  # larger than image_max
    assert cache.open(b"mid.bin").image is None  # 6 + 3000 bytes: past the budget
    assert cache._image_bytes == 6
    # Rewritten in place (same inode): a transfer that has the image keeps sending
    # the whole old file; the next open takes a new image.
    with open(tree / "sub" / "f.txt", "r+b") as f:
        f.write(b"INSIDE")
    os.utime(tree / "sub" / "f.txt", ns=(1, 1))
    assert small.image == b"inside"
    again = cache.open(b"sub/f.txt")
    assert again.image == b"INSIDE" and cache._image_bytes == 6
    for f in (small, again):
        f.close()


def test_negative_cache_and_its_invalidation(tree: Path) -> None:
    clock = Clock()
    cache = FileCache(Root(str(tree)), miss_ttl=2.0, clock=clock)
    for _ in range(3):
        with pytest.raises(FileError) as exc:
            cache.open(b"sub/late.txt")
        assert exc.value.code == P.E_NOT_FOUND
    assert cache.stats.miss_hits == 2
    (tree / "sub" / "late.txt").write_bytes(b"here now")  # the directory changes
    f = cache.open(b"sub/late.txt")
    assert read_all(f.fd, f.size) == b"here now"
    f.close()
    with pytest.raises(FileError):
        cache.open(b"gone")
    clock.now += 2.5  # and misses expire
    with pytest.raises(FileError):
        cache.open(b"gone")
    assert cache.stats.miss_hits == 2


def test_cache_still_confines(tree: Path) -> None:
    cache = FileCache(Root(str(tree)))
    f = cache.open(b"in")
    f.close()
    (tree / "in").unlink()
    (tree / "in").symlink_to(tree.parent / "secret")
    with pytest.raises(FileError) as exc:
        cache.open(b"in")
    assert exc.value.code == P.E_ACCESS


def test_cache_bounds_open_descriptors(tree: Path) -> None:
    for i in range(10):
        (tree / f"n{i}").write_bytes(b"x")
    cache = FileCache(Root(str(tree)), max_open=4)
    held = cache.open(b"n0")
    for i in range(1, 10):
        cache.open(f"n{i}".encode()).close()
    assert len(cache._open) <= 4 + 1
    assert read_all(held.fd, 1) == b"x"  # a descriptor in use is never evicted
    held.close()


def test_batched_log_lines_are_written_whole_in_small_writes() -> None:
    """Workers write their records once per loop turn, in whole-line writes below
    PIPE_BUF, so lines of different workers never interleave on a pipe."""
    import io
    import logging

    from tftpd.logs import ATOMIC_WRITE, BatchingHandler

    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return len(s)

    out = Recorder()
    h = BatchingHandler(out)
    h.setFormatter(logging.Formatter("%(message)s"))
    h.batching = True
    lines = [f"record {i} " + "x" * (i % 300) for i in range(200)]
    for text in lines:
        h.emit(logging.LogRecord("tftpd", logging.INFO, "", 0, text, None, None))
    assert out.writes == []  # nothing until the loop turn ends
    h.flush()
    assert all(w.endswith("\n") and len(w) <= ATOMIC_WRITE for w in out.writes)
    assert "".join(out.writes) == "".join(t + "\n" for t in lines)


@pytest.mark.parametrize("fmt, direct", [("tftpd[%(process)d]: %(message)s", True),
                                         ("%(asctime)s %(message)s", False)])
def test_direct_log_lines_are_the_records_lines(fmt: str, direct: bool) -> None:
    """logs.info_line skips the LogRecord only where the text comes out the same."""
    import io
    import logging

    from tftpd import logs

    out = io.StringIO()
    h = logs.BatchingHandler(out)
    h.setFormatter(logging.Formatter(fmt))
    saved = logs.log.handlers[:], logs.log.level, logs.log.propagate
    logs.log.handlers[:] = [h]
    logs.log.setLevel(logging.INFO)
    logs.log.propagate = False
    try:
        logs.start_batching()
        assert bool(logs._fast) is direct
        logs.info_line("10.0.0.1:1234 file=a outcome=ok")
        logs.log.info("%s", "10.0.0.1:1234 file=a outcome=ok")
        logs.flush_logs()
        first, second = out.getvalue().splitlines()
        if direct:
            assert first == second == f"tftpd[{os.getpid()}]: 10.0.0.1:1234 file=a outcome=ok"
        else:
            assert first.endswith(" 10.0.0.1:1234 file=a outcome=ok") and first[:4].isdigit()
        logs.log.setLevel(logging.WARNING)  # INFO off: no line either way
        logs.start_batching()
        logs.info_line("hidden")
        logs.flush_logs()
        assert "hidden" not in out.getvalue()
    finally:
        h.batching = False
        logs.log.handlers[:], level, logs.log.propagate = saved[0], saved[1], saved[2]
        logs.log.setLevel(level)
        logs._fast.clear()
