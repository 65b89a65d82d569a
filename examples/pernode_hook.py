"""A content hook for tftpd: each node's pxelinux.cfg, written from an inventory.

    tftpd --content-hook pernode_hook:content -C /etc/tftpd/tftpd.conf /srv/tftp

with this file in /etc/tftpd (the config file's directory) and, beside it,
inventory.toml (or the file named by TFTPD_INVENTORY):

    [defaults]
    kernel = "vmlinuz"
    initrd = "initrd.img"
    append = "console=ttyS0"

    [nodes."52:54:00:12:34:56"]
    hostname = "node01"
    append = "console=ttyS0 rd.break"   # overrides the default

PXELINUX asks pxelinux.cfg/<UUID>, then pxelinux.cfg/01-<MAC>, then names made of its
IP address in hex, then pxelinux.cfg/default. The first of those asked by a node the
inventory knows (by the MAC in the name, or else by the MAC the kernel's neighbour
table gives for the client) is answered with that node's configuration; every other
name returns None and is served from the root as usual. The inventory is read again
when it changes.
"""

from __future__ import annotations

import os
import threading
import tomllib

PREFIX = "pxelinux.cfg/"
INVENTORY = os.environ.get("TFTPD_INVENTORY") or \
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "inventory.toml")

_lock = threading.Lock()  # the hook runs in several threads at once
_loaded: tuple[tuple[int, int, int], dict] | None = None  # (identity of the file, inventory)


def inventory() -> dict:
    """The inventory as it is on disk now (parsed again only when it changed)."""
    global _loaded
    st = os.stat(INVENTORY)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if _loaded is None or _loaded[0] != key:
            with open(INVENTORY, "rb") as f:
                _loaded = (key, tomllib.load(f))
        return _loaded[1]


def mac_in_name(name: str) -> str | None:
    """aa:bb:cc:dd:ee:ff from pxelinux.cfg/01-aa-bb-cc-dd-ee-ff, else None."""
    base = name[len(PREFIX):]
    parts = base.split("-")
    if len(parts) == 7 and parts[0] == "01" and all(len(p) == 2 for p in parts[1:]):
        return ":".join(parts[1:]).lower()
    return None


def render(mac: str, node: dict, defaults: dict) -> str:
    value = {**defaults, **node}
    lines = [f"# {value.get('hostname', mac)} ({mac}), written by pernode_hook",
             "DEFAULT linux", "LABEL linux", f"  KERNEL {value['kernel']}"]
    if "initrd" in value:
        lines.append(f"  INITRD {value['initrd']}")
    append = value.get("append", "")
    if "hostname" in value:
        append = f"{append} hostname={value['hostname']}".strip()
    if append:
        lines.append(f"  APPEND {append}")
    return "\n".join(lines) + "\n"


def content(request) -> bytes | None:  # type: ignore[no-untyped-def]
    """tftpd's content hook: a pxelinux.cfg for the nodes in the inventory."""
    if not request.filename.startswith(PREFIX):
        return None
    mac = mac_in_name(request.filename) or request.mac
    if mac is None:
        return None
    inv = inventory()
    node = inv.get("nodes", {}).get(mac)
    if node is None:
        return None
    return render(mac, node, inv.get("defaults", {})).encode()
