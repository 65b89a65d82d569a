"""Compile bench/'s C helpers at first use into bench/.build/ (never committed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / ".build"


class BuildError(RuntimeError):
    pass


def _stale(target: Path, sources: list[Path]) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(s.stat().st_mtime > t for s in sources)


def limit_binary() -> Path:
    """Path of the `limit` reference server, compiled from bench/limit.c if needed."""
    src = HERE / "limit.c"
    out = BUILD_DIR / "tftpbench-limit"
    if _stale(out, [src]):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise BuildError("no C compiler (install gcc) for bench/limit.c")
        BUILD_DIR.mkdir(exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(src)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"compiling {src} failed:\n{proc.stderr}")
        os.replace(tmp, out)
    return out
