"""The C sender over reads that come up short, as a network file system's may.

tests/c/short_reads.c links the data path with its own preadv()/pread(), which hand
out at most CHUNK bytes a call, and checks every datagram it gets back against the
file. It is built with AddressSanitizer and UBSan, so a write past the batch's
iovec array on the stack fails the run even where the bytes sent look right.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("short-reads") / "short_reads"
    sources = sorted(str(p) for p in (REPO / "_ext").glob("tftpd_*.c"))
    subprocess.run(["gcc", "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                    "-I", str(REPO / "_ext"), str(REPO / "tests/c/short_reads.c"),
                    *sources, "-o", str(out)], check=True)
    return out


@pytest.mark.parametrize(("blksize", "count", "chunk"), [
    (512, 64, 1000),    # a read ends inside the second block, then every two
    (512, 64, 100),     # many reads per block
    (1456, 44, 3000),   # the PXE blksize; GSO fits 44 of these in one send
    (8, 64, 3),         # the smallest blksize, a read never covers a whole block
    (512, 10, 1),       # a byte a read
])
def test_short_reads_fill_every_block(harness: Path, tmp_path: Path, blksize: int,
                                      count: int, chunk: int) -> None:
    data = os.urandom(blksize * count * 2 + 77)
    f = tmp_path / "file"
    f.write_bytes(data)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1")
    for first in (1, count + 1):  # the last batch ends in the file's short block
        run = subprocess.run([str(harness), str(f), str(blksize), str(first), str(count),
                              str(chunk)], capture_output=True, text=True, env=env,
                             timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "short reads" in run.stdout
