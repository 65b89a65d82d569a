"""Compile bench/'s C helpers at first use into bench/.build/ (never committed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / ".build"


class BuildError(RuntimeError):
    pass


def _stale(target: Path, sources: list[Path]) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(s.stat().st_mtime > t for s in sources)


def program(name: str) -> Path:
    """Path of bench/NAME.c compiled (as tftpbench-NAME) if it is missing or stale."""
    src = HERE / f"{name}.c"
    out = BUILD_DIR / f"tftpbench-{name}"
    if _stale(out, [src]):
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise BuildError(f"no C compiler (install gcc) for bench/{name}.c")
        BUILD_DIR.mkdir(exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(src)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BuildError(f"compiling {src} failed:\n{proc.stderr}")
        os.replace(tmp, out)
    return out


def limit_binary() -> Path:
    """Path of the `limit` reference server, compiled from bench/limit.c if needed."""
    return program("limit")


def build_cffi(modname: str, cdef: str, preamble: str, sources: list[Path],
               inputs: list[Path], out_dir: Path, what: str,
               extra_compile_args: list[str] | None = None, force: bool = False) -> Path:
    """Compile a cffi module into out_dir unless an up-to-date one is there.

    An flock keeps concurrent runs (parallel test processes) from building twice.
    `inputs` are the files whose change makes the module stale.
    """
    import fcntl
    import glob

    try:
        import cffi
    except ImportError as exc:  # pragma: no cover - cffi is a project dependency
        raise BuildError("cffi is not installed") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hits = sorted(glob.glob(str(out_dir / f"{modname}*.so")))
        so = Path(hits[0]) if hits else None
        newest = max(p.stat().st_mtime for p in inputs)
        if so is not None and not force and so.stat().st_mtime >= newest:
            return so
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(modname, preamble, sources=[str(s) for s in sources],
                       include_dirs=sorted({str(s.parent) for s in sources}),
                       extra_compile_args=extra_compile_args or ["-O2", "-Wall"])
        try:
            return Path(ffi.compile(tmpdir=str(out_dir), verbose=False))
        except Exception as exc:  # noqa: BLE001 - distutils/setuptools raise many kinds
            raise BuildError(f"building {what} failed: {exc}") from exc


def load_cffi(modname: str, so: Path) -> ModuleType:
    """Import a built cffi module from its path."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(modname, so)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot load {so}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod
