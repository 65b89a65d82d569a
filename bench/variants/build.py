"""Compile the bench-only send variants (variants.c) through cffi at first use.

The module lands in bench/.build/variants/ (gitignored), rebuilt when missing or older
than variants.c / variants.h; never in tftpd/.  ``load()`` returns the module (its
``ffi`` and ``lib``).
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from bench.build import BUILD_DIR, BuildError

HERE = Path(__file__).resolve().parent
HEADER = HERE / "variants.h"
SOURCE = HERE / "variants.c"
MODNAME = "_tftpbench_variants"
OUT_DIR = BUILD_DIR / "variants"

# "#define VB_NAME 123": integer constants whose values cffi takes from the compiler.
_CONSTANT = re.compile(r"#\s*define\s+(VB_\w+)\s+(?:\d+|0x[0-9a-fA-F]+)\s*$")

_mod: ModuleType | None = None


def cdef_from_header(text: str) -> str:
    """The header minus preprocessor lines; integer #defines become ``#define NAME ...``."""
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            match = _CONSTANT.match(stripped)
            if match:
                out.append(f"#define {match.group(1)} ...")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def _find_built() -> Path | None:
    hits = sorted(glob.glob(str(OUT_DIR / f"{MODNAME}*.so")))
    return Path(hits[0]) if hits else None


def build(force: bool = False) -> Path:
    """Compile the module if needed; return the path of the .so."""
    try:
        import cffi
    except ImportError as exc:  # pragma: no cover - cffi is a project dependency
        raise BuildError("cffi is not installed") from exc
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        so = _find_built()
        newest = max(p.stat().st_mtime for p in (HEADER, SOURCE, Path(__file__)))
        if so is not None and not force and so.stat().st_mtime >= newest:
            return so
        ffi = cffi.FFI()
        ffi.cdef(cdef_from_header(HEADER.read_text(encoding="utf-8")))
        ffi.set_source(MODNAME, '#include "variants.h"\n', sources=[str(SOURCE)],
                       include_dirs=[str(HERE)],
                       extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"])
        try:
            path = ffi.compile(tmpdir=str(OUT_DIR), verbose=False)
        except Exception as exc:  # noqa: BLE001 - distutils/setuptools raise many kinds
            raise BuildError(f"building bench/variants/variants.c failed: {exc}") from exc
        return Path(path)


def load() -> ModuleType:
    """The compiled module, built first if needed."""
    global _mod
    if _mod is None:
        so = build()
        spec = importlib.util.spec_from_file_location(MODNAME, so)
        if spec is None or spec.loader is None:
            raise BuildError(f"cannot load {so}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[MODNAME] = mod
        spec.loader.exec_module(mod)
        _mod = mod
    return _mod


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
