"""Microbenchmarks of tftpd's hot paths (pytest-benchmark); not part of the test run.

    python3 -m pytest bench/micro            # all of them
    python3 -m pytest bench/micro -k codec   # one group

Each module skips with the reason when the tftpd module it measures does not import.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def need_module(name: str) -> ModuleType:
    """Import a tftpd module or skip the whole benchmark module, saying why."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not ready"
        pytest.skip(f"{name} does not import yet: {type(exc).__name__}: {exc}",
                    allow_module_level=True)
        raise  # unreachable


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.bench)
