"""HTTP/1.1 on the TFTP root: GET and HEAD, served by every worker from a thread of its own.

Firmware that speaks HTTP (UEFI HTTP boot, iPXE) fetches kernels and images a hundred
times faster over TCP than over lock-step TFTP. The workers serve both from one root
under one set of rules: a name goes through the map file, then the confined root
(normalize(), symlinks, `--gz`), exactly as a TFTP filename does.

Each worker runs http_threads HttpServers (HttpThreads), each a thread with its own
selector and connections: the TFTP loop is not touched by a slow TCP client, and
neither waits for the other. What the threads count together (connections against
http_max_connections, the stats row's HTTP cells) is an HttpTally, under a lock. The
master binds the listening sockets (before privileges are dropped); every worker accepts from them,
non-blocking (a worker that loses the race gets EAGAIN). h11 parses; bodies go out
with sendfile(2) from the descriptors FileCache shares, without a copy.

Every connection is hostile until it has been served: the head must arrive within
http_head_timeout and fit in MAX_HEAD bytes, an idle keep-alive connection is closed
after http_idle_timeout, a response that makes no progress for http_send_timeout is
cut, and past http_max_connections a new connection gets 503 and is closed. The log
lines a client can cause go through logs.Throttle.
"""

from tftpd.http.message import BadRequest, decode_target, parse_range
from tftpd.http.server import HttpServer, HttpThreads, listen_socket

__all__ = ["BadRequest", "HttpServer", "HttpThreads", "decode_target", "listen_socket",
           "parse_range"]
