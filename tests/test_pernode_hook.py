"""examples/pernode_hook.py, run as tftpd runs it: through ContentHook and the
resolver, over a real root."""

from __future__ import annotations

import os
import sys
from concurrent.futures import wait
from pathlib import Path

import pytest

from tftpd.content import ContentResolver, PendingContent, Resolution
from tftpd.files import FileCache, Root
from tftpd.hook import ContentHook
from tftpd.neighbours import NeighbourCache

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

INVENTORY = """
[defaults]
kernel = "vmlinuz"
initrd = "initrd.img"
append = "console=ttyS0"

[nodes."52:54:00:12:34:56"]
hostname = "node01"

[nodes."52:54:00:ab:cd:ef"]
hostname = "node02"
append = "console=tty0 rd.break"
"""


@pytest.fixture
def resolver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    (root / "pxelinux.cfg").mkdir(parents=True)
    (root / "pxelinux.cfg" / "default").write_text("DEFAULT local\n")
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(INVENTORY)
    monkeypatch.setenv("TFTPD_INVENTORY", str(inventory))
    hook = ContentHook("pernode_hook:content", 5.0, [str(EXAMPLES)])
    assert hook.error is None, hook.error
    macs = {"10.0.0.2": "52:54:00:ab:cd:ef"}
    res = ContentResolver(FileCache(Root(str(root))), hook=hook,
                          neighbours=NeighbourCache(lookup=macs.get))
    yield res, inventory
    hook.close()
    sys.modules.pop("pernode_hook", None)


def _get(res: ContentResolver, name: str, ip: str = "10.0.0.1") -> str | None:
    out = res.begin(name.encode(), "octet", (ip, 2000), "tftp", {"tsize": "0"})
    if isinstance(out, PendingContent):
        assert wait([out.future], timeout=10).done
        out = res.complete(out)
    assert isinstance(out, Resolution)
    if out.file is None:
        return None
    try:
        return os.pread(out.file.fd, out.file.size, 0).decode()
    finally:
        out.file.close()


def test_a_known_node_gets_its_own_config_by_the_mac_in_the_name(resolver) -> None:  # type: ignore[no-untyped-def]
    res, _ = resolver
    text = _get(res, "pxelinux.cfg/01-52-54-00-12-34-56")
    assert text is not None
    assert "KERNEL vmlinuz" in text and "INITRD initrd.img" in text
    assert "APPEND console=ttyS0 hostname=node01" in text


def test_a_known_node_is_answered_at_its_first_question_by_its_neighbour_mac(resolver) -> None:  # type: ignore[no-untyped-def]
    res, _ = resolver
    text = _get(res, "pxelinux.cfg/564d1234-0000-0000-0000-000000000000", ip="10.0.0.2")
    assert text is not None and "APPEND console=tty0 rd.break hostname=node02" in text


def test_everyone_else_gets_the_files_in_the_root(resolver) -> None:  # type: ignore[no-untyped-def]
    res, _ = resolver
    assert _get(res, "pxelinux.cfg/01-52-54-00-99-99-99") is None  # not in the root either
    assert _get(res, "pxelinux.cfg/default") == "DEFAULT local\n"
    node02 = _get(res, "pxelinux.cfg/default", ip="10.0.0.2")  # node02 gets its own
    assert node02 is not None and "hostname=node02" in node02


def test_the_inventory_is_read_again_when_it_changes(resolver) -> None:  # type: ignore[no-untyped-def]
    res, inventory = resolver
    assert _get(res, "pxelinux.cfg/01-52-54-00-77-77-77") is None
    inventory.write_text(INVENTORY + '\n[nodes."52:54:00:77:77:77"]\nhostname = "node03"\n')
    text = _get(res, "pxelinux.cfg/01-52-54-00-77-77-77")
    assert text is not None and "hostname=node03" in text
