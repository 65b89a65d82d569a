"""The project's size limits, held: a part that outgrows them is split into named parts.

Modules under tftpd/ at most 800 lines; classes at most 500 and functions at most 100
(tftpd/, bench/, _ext/ and setup.py); tracked C files at most 700; README.md at most
12,000 bytes; no build output tracked.
"""

from __future__ import annotations

import ast
import fnmatch
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
MODULE_LINES = 800
CLASS_LINES = 500
FUNCTION_LINES = 100
C_LINES = 700
README_BYTES = 12_000
BUILD_OUTPUT = ("*.o", "*.so", "build/*", "*/build/*", "*.egg-info/*", "*.egg-info",
                "tftpd/_datapath.c")


def _tracked(*patterns: str) -> list[str]:
    done = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=TOP,
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in done.stdout.decode().split("\0") if p]


def _python_sources() -> list[Path]:
    files = [TOP / "setup.py"] if (TOP / "setup.py").exists() else []
    for top in ("tftpd", "bench", "_ext"):
        files += sorted(p for p in (TOP / top).rglob("*.py")
                        if "build" not in p.relative_to(TOP).parts)
    return files


def _lines(path: Path) -> int:
    return path.read_text(errors="replace").count("\n")


def oversized_parts(files: list[Path], top: Path = TOP) -> list[str]:
    """Each class over CLASS_LINES and function over FUNCTION_LINES in FILES."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
            if size > limit:
                found.append(f"{path.relative_to(top)}:{node.lineno} {node.name} "
                             f"is {size} lines (limit {limit})")
    return found


def test_modules_in_tftpd_are_at_most_800_lines() -> None:
    big = [f"{p.relative_to(TOP)} is {_lines(p)} lines" for p in (TOP / "tftpd").rglob("*.py")
           if _lines(p) > MODULE_LINES]
    assert not big, big


def test_classes_and_functions_within_limits() -> None:
    big = oversized_parts(_python_sources())
    assert not big, "\n".join(big)


def test_c_files_are_at_most_700_lines() -> None:
    big = [f"{p} is {_lines(TOP / p)} lines" for p in _tracked("*.c", "*.h")
           if (TOP / p).exists() and _lines(TOP / p) > C_LINES]
    assert not big, big


def test_no_build_output_is_tracked() -> None:
    tracked = [p for p in _tracked()
               if any(fnmatch.fnmatch(p, pat) for pat in BUILD_OUTPUT)]
    assert not tracked, tracked


def test_readme_is_at_most_12000_bytes() -> None:
    size = (TOP / "README.md").stat().st_size
    assert size <= README_BYTES, f"README.md is {size} bytes"


def test_the_size_check_finds_a_long_function_and_class(tmp_path: Path) -> None:
    """The limits check counts what it claims to: a 101-line function and a 501-line
    class are reported, a 100-line function is not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(99))
    src = (f"def fits():\n{body}\n\n\n"
           f"def too_long():\n{body}\n    x = 0\n\n\n"
           "class Big:\n" + "\n".join(f"    y{i} = {i}" for i in range(500)) + "\n")
    path = tmp_path / "sample.py"
    path.write_text(src)
    found = oversized_parts([path], tmp_path)
    assert [f.split()[1] for f in found] == ["too_long", "Big"]
