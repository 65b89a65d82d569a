"""The peer table: which slot of the pump serves a peer (C's tftpd_peer_*).

Open addressing over cells that hold slot + 1 (0: free), indexed by the keyed
hash of the peer's raw sockaddr; the cells are memory Python owns, C moves them.
The worker enters every transfer it gives the pump and removes it when it ends;
C does the same for the transfers it starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PeerTable"]


class PeerTable:
    """The pump's peer table, `cells` (a cffi unsigned int[size]) in `starts`."""

    def __init__(self, lib: Any, starts: Any, cells: Any, size: int) -> None:
        if size < 2 or size & (size - 1):
            raise ValueError("the peer table's size must be a power of two")
        self._lib, self._starts, self._cells = lib, starts, cells  # keeps the cells alive
        starts.peers, starts.peers_len = cells, size

    def __len__(self) -> int:
        return int(self._starts.npeers)

    def put(self, slot: int) -> bool:
        """Enter the slot's peer (its struct's addr); False when the table is more
        than half full (C then starts no transfer: nothing is lost)."""
        return int(self._lib.tftpd_peer_put(self._starts, slot)) == 0

    def delete(self, slot: int) -> None:
        """Remove the slot's peer; nothing when it is not there."""
        self._lib.tftpd_peer_del(self._starts, slot)

    def find(self, sockaddr: bytes) -> int:
        """The slot serving this peer (encode_sockaddr), or -1."""
        return int(self._lib.tftpd_peer_find(self._starts, sockaddr, len(sockaddr)))
