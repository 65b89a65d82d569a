"""Prometheus text exposition of the shared counters, served by the master.

prometheus_client's multiprocess mode keeps one file per process and sums them at
scrape time; our counters already live in one shared mapping that the master sums
(and that survives worker restarts and reloads), so the master renders the text
format itself: no dependency, no files, no thread in the master.
"""

from __future__ import annotations

import socket

from tftpd.stats import BUCKETS, HISTOGRAMS

_OUTCOMES = ("ok", "probe", "aborted", "failed", "notfound", "denied")
_HELP = {
    "duration": ("tftpd_transfer_duration_seconds", "Time from request to end of transfer."),
    "first_answer": ("tftpd_first_answer_seconds", "Time from a request's arrival in the "
                     "socket buffer to the server's first answer."),
}


def render(t: dict[str, int], restarts: int, workers: int) -> str:
    # A family both protocols count has a series per protocol: protocol="tftp"
    # always, protocol="http" once HTTP has served anything. Families of one
    # protocol alone (probes, merges, C's starts; HTTP's connections) say it by name.
    http = any(t[k] for k in ("http_requests", "http_connections", "http_refused_busy",
                              "http_malformed"))

    def h(*lines: str) -> list[str]:
        return list(lines) if http else []

    out = [
        "# HELP tftpd_requests_total Requests read from the listen sockets.",
        "# TYPE tftpd_requests_total counter",
        f'tftpd_requests_total{{protocol="tftp"}} {t["requests"]}',
        *h(f'tftpd_requests_total{{protocol="http"}} {t["http_requests"]}'),
        "# HELP tftpd_transfers_total Finished transfers and refusals, by outcome.",
        "# TYPE tftpd_transfers_total counter",
        *(f'tftpd_transfers_total{{protocol="tftp",outcome="{o}"}} {t[o]}'
          for o in _OUTCOMES),
        *h(*(f'tftpd_transfers_total{{protocol="http",outcome="{o}"}} {t["http_" + o]}'
             for o in _HTTP_OUTCOMES)),
        "# HELP tftpd_probes_total Existence probes (OACK answered with ERROR 0, 8 or 9).",
        "# TYPE tftpd_probes_total counter",
        f"tftpd_probes_total {t['probe']}",
        "# HELP tftpd_misses_total Requests for files that do not exist.",
        "# TYPE tftpd_misses_total counter",
        f'tftpd_misses_total{{protocol="tftp"}} {t["notfound"]}',
        *h(f'tftpd_misses_total{{protocol="http"}} {t["http_notfound"]}'),
        "# HELP tftpd_refused_total Requests refused because the server was full.",
        "# TYPE tftpd_refused_total counter",
        f'tftpd_refused_total{{protocol="tftp",reason="busy"}} {t["refused_busy"]}',
        *h(f'tftpd_refused_total{{protocol="http",reason="busy"}} {t["http_refused_busy"]}'),
        "# HELP tftpd_merged_requests_total Repeated requests merged into a live transfer.",
        "# TYPE tftpd_merged_requests_total counter",
        f"tftpd_merged_requests_total {t['merged']}",
        "# HELP tftpd_c_starts_total Requests whose OACK the C data path sent alone "
        "(a request negotiated before).",
        "# TYPE tftpd_c_starts_total counter",
        f"tftpd_c_starts_total {t['c_starts']}",
        "# HELP tftpd_content_hook_failures_total Requests the content hook failed: it "
        "raised or returned something else than None, bytes or a path (failed), or it "
        "did not answer in time (timed_out).",
        "# TYPE tftpd_content_hook_failures_total counter",
        f'tftpd_content_hook_failures_total{{protocol="tftp",reason="failed"}} '
        f'{t["hook_failed"]}',
        f'tftpd_content_hook_failures_total{{protocol="tftp",reason="timed_out"}} '
        f'{t["hook_timed_out"]}',
        *h(f'tftpd_content_hook_failures_total{{protocol="http",reason="failed"}} '
           f'{t["http_hook_failed"]}',
           f'tftpd_content_hook_failures_total{{protocol="http",reason="timed_out"}} '
           f'{t["http_hook_timed_out"]}'),
        "# HELP tftpd_malformed_packets_total Datagrams on the listen port that were dropped.",
        "# TYPE tftpd_malformed_packets_total counter",
        f"tftpd_malformed_packets_total {t['malformed']}",
        *h("# HELP tftpd_malformed_requests_total HTTP requests refused as malformed, "
           "too large or too slow.",
           "# TYPE tftpd_malformed_requests_total counter",
           f'tftpd_malformed_requests_total{{protocol="http"}} {t["http_malformed"]}'),
        "# HELP tftpd_bytes_total Payload bytes acknowledged by clients (or received).",
        "# TYPE tftpd_bytes_total counter",
        f'tftpd_bytes_total{{protocol="tftp"}} {t["bytes"]}',
        *h(f'tftpd_bytes_total{{protocol="http"}} {t["http_bytes"]}'),
        "# HELP tftpd_retransmits_total Blocks, OACKs and ACKs sent again.",
        "# TYPE tftpd_retransmits_total counter",
        f"tftpd_retransmits_total {t['retransmits']}",
        "# HELP tftpd_active_transfers Transfers running now.",
        "# TYPE tftpd_active_transfers gauge",
        f"tftpd_active_transfers {t['active']}",
        *h("# HELP tftpd_connections HTTP connections open now.",
           "# TYPE tftpd_connections gauge",
           f'tftpd_connections{{protocol="http"}} {t["http_connections"]}'),
        "# HELP tftpd_worker_restarts_total Workers replaced after dying or hanging.",
        "# TYPE tftpd_worker_restarts_total counter",
        f"tftpd_worker_restarts_total {restarts}",
        "# HELP tftpd_workers Worker processes configured.",
        "# TYPE tftpd_workers gauge",
        f"tftpd_workers {workers}",
    ]
    for hist in HISTOGRAMS:
        if hist in _LABELLED:
            continue
        name, text = _HELP[hist]
        out += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        out += _histogram(t, hist, name, _OWN_LABEL.get(hist, ""))
        for other, (family, label) in _LABELLED.items():
            if family == hist and http:
                out += _histogram(t, other, name, label)
    return "\n".join(out) + "\n"


_HTTP_OUTCOMES = ("ok", "aborted", "failed", "notfound", "denied")
# Histograms rendered as a labelled series in the family of another.
_LABELLED = {"http_duration": ("duration", 'protocol="http",')}
# The labels of a histogram whose family another protocol's series join.
_OWN_LABEL = {"duration": 'protocol="tftp",'}


def _histogram(t: dict[str, int], hist: str, name: str, label: str) -> list[str]:
    out = []
    acc = 0
    for i, le in enumerate(BUCKETS):
        acc += t[f"{hist}_b{i}"]
        out.append(f'{name}_bucket{{{label}le="{le}"}} {acc}')
    out.append(f'{name}_bucket{{{label}le="+Inf"}} {t[f"{hist}_count"]}')
    labels = f"{{{label[:-1]}}}" if label else ""
    out.append(f"{name}_sum{labels} {t[f'{hist}_sum_us'] / 1e6}")
    out.append(f"{name}_count{labels} {t[f'{hist}_count']}")
    return out


class MetricsServer:
    """A minimal HTTP/1.0 endpoint in the master's own loop (no thread: the master
    forks, and a process with threads that forks can deadlock)."""

    MAX_REQUEST = 8192

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.conns: dict[socket.socket, bytes] = {}

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(False)
        self.conns[conn] = b""
        return conn

    def on_readable(self, conn: socket.socket, body: str) -> bool:
        """Read what the client sent; answer once the request is complete. True: done."""
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        buf = self.conns.get(conn, b"") + data
        if data and b"\r\n\r\n" not in buf and b"\n\n" not in buf \
                and len(buf) < self.MAX_REQUEST:
            self.conns[conn] = buf
            return False
        if data:
            line = buf.split(b"\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] in (
                    b"/metrics", b"/"):
                self._reply(conn, "200 OK", body, "text/plain; version=0.0.4")
            else:
                self._reply(conn, "404 Not Found", "not found\n", "text/plain")
        self.close(conn)
        return True

    @staticmethod
    def _reply(conn: socket.socket, status: str, body: str, ctype: str) -> None:
        payload = body.encode()
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        conn.setblocking(True)
        conn.settimeout(2.0)  # a scrape is a few KiB; a stuck client does not hold us
        try:
            conn.sendall(head + payload)
        except OSError:
            pass

    def close(self, conn: socket.socket) -> None:
        self.conns.pop(conn, None)
        conn.close()
