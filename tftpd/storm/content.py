"""The deterministic content of every workload file, defined once.

The same function builds a server root and checks what a client received: file PATH of
SIZE bytes holds the first SIZE bytes of a PRNG seeded from PATH alone, so a file's bytes
never depend on which workload or which run made them. Another tool reproduces them with

    seed = int.from_bytes(sha256(b"tftpbench:" + path.encode()).digest()[:8], "big")
    data = random.Random(seed).randbytes(size)
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from tftpd.storm.workload import Workload

_cache: dict[tuple[str, int], bytes] = {}


def seed_for(path: str) -> int:
    return int.from_bytes(hashlib.sha256(b"tftpbench:" + path.encode()).digest()[:8], "big")


def content(path: str, size: int) -> bytes:
    """The bytes of workload file `path` (a path relative to the root) of `size` bytes."""
    key = (path, size)
    data = _cache.get(key)
    if data is None:
        data = random.Random(seed_for(path)).randbytes(size)
        _cache[key] = data
    return data


def expected(workload: Workload) -> dict[str, bytes]:
    """Every file of the workload, as the client must receive it."""
    return {path: content(path, size) for path, size in workload.files.items()}


def build_root(workload: Workload, root: str | os.PathLike[str]) -> Path:
    """Write the workload's files under `root` (made if missing); leave other files alone.

    A file already there with the right size and bytes is not rewritten. The names the
    workload expects to be missing must be missing: one that exists is an error.
    """
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    for path, size in workload.files.items():
        target = base / path
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(base).parents:
            os.chmod(base / parent, 0o755)
        data = content(path, size)
        try:
            if target.stat().st_size == size and target.read_bytes() == data:
                os.chmod(target, 0o644)
                continue
        except FileNotFoundError:
            pass
        tmp = target.with_name(target.name + ".tmp-storm")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    for step in workload.sequence:
        if step.expect == "notfound" and (base / step.file).exists():
            raise FileExistsError(f"{base / step.file} exists but the workload expects a miss")
    return base
