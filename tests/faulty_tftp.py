"""A small TFTP server with switchable faults, one per clause tftpd-fuzz checks.

Pure Python, threads, loopback only; read-only (WRQ gets ERROR 2). With no fault on it
follows the RFCs: OACK only for options asked and valid, blksize and windowsize at most
what was asked, timeout echoed, tsize the true size, DATA only after ACK 0, resends on
its timer only.
"""

from __future__ import annotations

import socket
import threading
import time

FAULTS = {
    "oack-extra": "oack-names",  # OACK carries an option nobody asked for
    "blksize-above": "oack-bounds",  # OACK blksize one above the asked value
    "tsize-wrong": "tsize",  # tsize one more than the file's size
    "data-before-ack0": "data-before-ack0",  # DATA 1 right after the OACK
    "wrong-byte": "data-content",  # one byte of block 2 flipped (after an OACK)
    "short-block": "block-size",  # block 1 one byte short, then block 2 (after an OACK)
    "sorcerer": "sorcerer",  # a duplicate ACK resends the window at once
    "blksize-zero": "invalid-option",  # blksize=0 echoed in the OACK
    "crash": "liveness",  # an unknown opcode and it answers nothing ever again
}

RTO = 0.5
RETRIES = 4
MAX_BLKSIZE = 1468


def _u16(b: bytes, i: int) -> int:
    return int.from_bytes(b[i:i + 2], "big")


def _error(code: int, msg: str) -> bytes:
    return b"\0\5" + code.to_bytes(2, "big") + msg.encode() + b"\0"


def _digits(v: str) -> int | None:
    return int(v) if v.isascii() and v.isdigit() and len(v) < 10 else None


class FaultyServer:
    def __init__(self, files: dict[str, bytes], faults: set[str] = frozenset()) -> None:
        unknown = set(faults) - set(FAULTS)
        assert not unknown, unknown
        self.files = files
        self.faults = set(faults)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.dead = False
        self.threads: list[threading.Thread] = []
        self._listener = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> FaultyServer:
        self._listener.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._listener.join(5)
        for t in self.threads:
            t.join(5)
        self.sock.close()

    def _listen(self) -> None:
        while not self.stopping.is_set():
            try:
                data, src = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if self.dead:
                continue
            op = _u16(data, 0) if len(data) >= 2 else -1
            if op not in (1, 2):
                if "crash" in self.faults and op not in (3, 4, 5, 6):
                    self.dead = True  # a weird datagram: it never answers again
                continue
            t = threading.Thread(target=self._transfer, args=(data, src), daemon=True)
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
            t.start()

    def _transfer(self, req: bytes, peer: tuple) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        try:
            self._serve(s, req, peer)
        except OSError:
            pass
        finally:
            s.close()

    def _serve(self, s: socket.socket, req: bytes, peer: tuple) -> None:
        if not req.endswith(b"\0"):
            return
        f = req[2:-1].split(b"\0")
        if len(f) < 2 or not f[0]:
            return
        if _u16(req, 0) == 2:
            s.sendto(_error(2, "read only"), peer)
            return
        name, mode = f[0].decode("latin-1"), f[1].decode("latin-1").lower()
        if mode not in ("octet", "netascii"):
            s.sendto(_error(4, "bad mode"), peer)
            return
        if name not in self.files:
            s.sendto(_error(1, "not found"), peer)
            return
        data = self.files[name]
        if mode == "netascii":
            data = data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
        asked: dict[str, str] = {}
        for i in range(2, len(f) - 1, 2):
            asked.setdefault(f[i].decode("latin-1").lower(), f[i + 1].decode("latin-1"))
        oack: dict[str, str] = {}
        blksize, window = 512, 1
        n = _digits(asked.get("blksize", ""))
        if n is not None and n >= 8:
            blksize = min(n, MAX_BLKSIZE) + (1 if "blksize-above" in self.faults else 0)
            oack["blksize"] = str(blksize)
        elif n == 0 and "blksize-zero" in self.faults:
            oack["blksize"] = "0"  # echoed, while 512 is used: half applied
        if _digits(asked.get("tsize", "")) == 0:
            oack["tsize"] = str(len(data) + (1 if "tsize-wrong" in self.faults else 0))
        n = _digits(asked.get("timeout", ""))
        if n is not None and 1 <= n <= 255:
            oack["timeout"] = str(n)
        n = _digits(asked.get("windowsize", ""))
        if n is not None and n >= 1:
            window = min(n, 8)
            oack["windowsize"] = str(window)
        if oack and "oack-extra" in self.faults:
            oack["x-extra"] = "1"
        blocks = len(data) // blksize + 1

        def block(k: int) -> bytes:
            payload = data[(k - 1) * blksize:k * blksize]
            # Only with options: the fuzzer's oracle is a plain read, which stays right.
            if k == 2 and "wrong-byte" in self.faults and payload and oack:
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
            if k == 1 and "short-block" in self.faults and blocks > 1 and oack:
                payload = payload[:-1]
            return b"\0\3" + (k & 0xFFFF).to_bytes(2, "big") + payload

        acked = -1 if oack else 0
        sent = 0
        last: list[bytes] = []

        def send_window() -> None:
            nonlocal sent, last
            last = [block(k) for k in range(acked + 1, min(acked + window, blocks) + 1)]
            for pkt in last:
                s.sendto(pkt, peer)
            sent = acked + len(last)

        if oack:
            last = [b"\0\6" + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                       for k, v in oack.items())]
            s.sendto(last[0], peer)
            if "data-before-ack0" in self.faults:
                s.sendto(block(1), peer)
        else:
            send_window()
        retries = 0
        deadline = time.monotonic() + RTO
        while not self.stopping.is_set() and not self.dead:
            s.settimeout(max(0.001, min(0.1, deadline - time.monotonic())))
            try:
                pkt, src = s.recvfrom(65536)
            except TimeoutError:
                if time.monotonic() < deadline:
                    continue
                retries += 1
                if retries > RETRIES:
                    return
                for p in last:
                    s.sendto(p, peer)
                deadline = time.monotonic() + RTO
                continue
            if src != peer:
                s.sendto(_error(5, "unknown transfer ID"), src)
                continue
            if len(pkt) < 4:
                continue
            op, k = _u16(pkt, 0), _u16(pkt, 2)
            if op == 5:
                return
            if op != 4:
                continue
            if k == acked & 0xFFFF and acked >= 0:
                if "sorcerer" in self.faults:
                    for p in last:
                        s.sendto(p, peer)
                continue  # a duplicate: only the timer resends
            if acked < k <= max(sent, 0) or (acked == -1 and k == 0):
                acked = k
                if acked >= blocks:
                    return
                retries = 0
                send_window()
                deadline = time.monotonic() + RTO
