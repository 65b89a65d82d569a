/*
 * tftpd_datapath.h - the C data path's whole API.
 *
 * _ext/build_datapath.py hands the declarations below to cffi's cdef(): it
 * drops the preprocessor lines and turns every "#define TFTPD_<NAME> <number>"
 * into "#define TFTPD_<NAME> ...", so the value Python sees is the one the
 * compiler saw.  Keep everything else here plain C declarations that cffi can
 * parse: no macros in declarations, no includes, no inline code.
 *
 * What C does: send windows of DATA blocks (tftpd_send.c); serve the ACKs of
 * many transfers in one epoll loop, the pump (tftpd_pump.c, with the lock-step
 * rules in tftpd_ack.c); read requests and answer the ones whose answer is
 * known (tftpd_requests.c, the table in tftpd_known.c), starting the transfer
 * itself when the known answer is an OACK; and keep the peer table of the
 * transfers it serves (tftpd_peers.c).  Every table, struct and buffer lives
 * in memory Python allocates and owns; C moves the numbers in it (a
 * transfer's counters, the peer table, the free slots and spare sockets it
 * takes) and allocates nothing, calls nothing back.  The one state of C's own
 * is the hash key.  Each rule that also exists in Python names its twin where
 * it is defined; docs/twins.md lists them.
 */
#ifndef TFTPD_DATAPATH_H
#define TFTPD_DATAPATH_H

#include <stddef.h>

/* Bump on any change of a signature or of a meaning below; tftpd/datapath/ext.py
 * refuses a compiled module whose version differs from the one it expects. */
#define TFTPD_DATAPATH_VERSION 12

/* Most datagrams handed to one sendmmsg() call, and the most blocks read in
 * one go: a window is read and sent in batches of at most this many blocks
 * (the message array lives on the stack).  The pure-Python twin batches the
 * same way, so both stop at the same place when the file shrinks. */
#define TFTPD_MAX_BATCH 64

/*
 * Send DATA blocks first .. first+count-1 of the file open on `fd` to the
 * sockaddr `addr` (addrlen bytes) through the (unconnected) UDP socket `sock`.
 *
 * Block k carries file bytes [(k-1)*blksize, min(k*blksize, filesize)); the
 * last block of a file may be empty.  Each datagram is the 4-byte header
 * (opcode 3, wire block number, both big-endian) and the payload, gathered
 * from two iovecs.  Wire numbers roll over past 65535 to `rollover` (0 or 1).
 *
 * With `mem` (the file's filesize bytes in memory, an image taken when it was
 * opened; fd is then not read and may be -1) the payloads are sent from there:
 * no read, and no copy but the kernel's (a segmented batch is copied into
 * scratch).  Otherwise the payload is pread() into `scratch` (scratch_len bytes, at least one
 * block); blocks go out in batches of min(scratch_len / blksize,
 * TFTPD_MAX_BATCH), each batch read completely before any of it is sent.
 *
 * With *gso set, a batch of two or more blocks goes out as one segmented
 * sendmsg() (UDP_SEGMENT, Linux >= 4.18): the same datagrams on the wire for
 * one syscall.  If the kernel (or the route to addr) refuses segmentation,
 * *gso is cleared and the batch goes out by sendmmsg(); gso may be NULL.
 *
 * Returns the number of datagrams sent, 0..count.  Fewer than count means
 * back-pressure: sendmmsg() failed with EAGAIN/EWOULDBLOCK/ENOBUFS (0 if it
 * did so on the first datagram).  Returns -errno on any other error and
 * -EINVAL on bad arguments.  EINTR is retried.  *shrank (may be NULL) is set
 * to 1 when the file turned out shorter than filesize (it shrank after its
 * size was taken; the batches before went out whole, the return is then 0),
 * else to 0.
 *
 * Python twin: tftpd.datapath.sending.PythonDataPath._send.
 */
int tftpd_send_window(int sock, const char *addr, unsigned int addrlen,
                      int fd, const char *mem, unsigned long long filesize,
                      unsigned int blksize,
                      unsigned long long first, unsigned int count,
                      unsigned int rollover,
                      char *scratch, size_t scratch_len, unsigned int *gso,
                      int *shrank);

/* The 16-bit block number block k carries on the wire.
 * Python twin: tftpd.transfer.wire_block. */
unsigned int tftpd_wire_block(unsigned long long k, unsigned int rollover);

/*
 * The lock-step in C.  In a storm most events are "ACK n arrived, send the
 * next block (or window)".  tftpd_pump() takes that step for every ready
 * transfer socket of one epoll set per call; Python keeps the rules for the
 * rest (OACK, errors, strays, timers, the end).
 *
 * struct tftpd_xfer is one read transfer's numbers, in memory Python owns
 * (tftpd/transfer.py's XferState is its pure-Python twin, field for field).
 * Blocks are absolute indices 1..nblocks; times are CLOCK_MONOTONIC seconds,
 * as Python's time.monotonic() gives them.
 */
struct tftpd_xfer {
    int sock;                      /* the transfer's socket, non-blocking */
    int fd;                        /* the file */
    const char *mem;               /* its image (filesize bytes), or NULL: read fd */
    unsigned int addrlen;          /* the peer: a struct sockaddr_in or _in6 */
    char addr[28];
    unsigned long long filesize;
    unsigned long long nblocks;
    unsigned long long last_acked; /* highest block the peer acknowledged */
    unsigned long long sent_upto;  /* highest block sent */
    unsigned long long retransmits;
    unsigned int blksize;
    unsigned int windowsize;
    unsigned int rollover;
    int fast;                      /* 1: the pump may answer this peer's ACKs */
    int resent;                    /* the window in flight was sent again */
    int fixed_rto;                 /* the peer set a timeout: no adaptation */
    int retries;                   /* timeouts in a row */
    double sent_at;                /* the window in flight first went out */
    double armed_at;               /* the retransmission timer started */
    double rto;                    /* base_rto backed off by the retries */
    double base_rto;               /* from RTT samples */
    double srtt;                   /* < 0: no sample yet */
    double rttvar;
    unsigned int gso;              /* 1: its route takes UDP segmentation (so far) */
    int owner;                     /* TFTPD_OWNER_*: who serves the transfer (below) */
    unsigned int answer;           /* started by C: the id of the known answer it sent */
    unsigned int locallen;         /* started by C: its socket's local address (4, 16) */
    unsigned char local[16];
};

/* struct tftpd_xfer's owner.  Python serves the transfer (the pump may answer
 * its ACKs while fast is set); C started it from a known OACK and serves it
 * until Python adopts it; C ended it (ERROR 0, 8 or 9 to its OACK) and Python
 * has yet to see the EV_PROBE event. */
#define TFTPD_OWNER_PYTHON 0
#define TFTPD_OWNER_C 1
#define TFTPD_OWNER_ENDED 2

/* What the pump hands back to Python. */
#define TFTPD_EV_PACKET 1   /* a datagram Python must judge (in pktbuf) */
#define TFTPD_EV_DONE 2     /* the last block was acknowledged */
#define TFTPD_EV_ERROR 3    /* recv or send failed: err is the errno */
#define TFTPD_EV_READY 4    /* a descriptor of Python's is ready: slot is its token */
#define TFTPD_EV_PROBE 5    /* a transfer C started ended with ERROR 0, 8 or 9 (err) */
#define TFTPD_EV_REARM 6    /* an ACK C answered brought the transfer's timer forward */
#define TFTPD_EV_SHRANK 7   /* the next window found the file shorter than its size */

/* Epoll data at or above this is not a transfer's slot but a token: one of
 * Python's own descriptors (listen sockets, the signal pipe) in the same set. */
#define TFTPD_TOKEN_BASE 4294901760

struct tftpd_event {
    unsigned int slot;             /* the transfer's index in the table */
    int kind;
    int err;                       /* EV_ERROR: the errno; EV_PROBE: the ERROR code */
    unsigned int off;              /* EV_PACKET: the datagram is pktbuf[off..off+len) */
    unsigned int len;
    unsigned int offered;          /* EV_PROBE: 1 when C offered its slot again itself */
    unsigned int srclen;           /* EV_PACKET, EV_PROBE: who sent it */
    char src[28];
};

/*
 * What C needs to start transfers itself (tftpd_requests) and to end the
 * probes among them (tftpd_pump): memory Python owns, numbers both sides move.
 */
struct tftpd_spare {
    int sock;                      /* a new non-blocking UDP socket, bound to a
                                      random port: each serves one transfer */
    unsigned int dstlen;           /* 4 or 16: its local address */
    unsigned char dst[16];
};

struct tftpd_starts {
    int epfd;                      /* the pump's epoll set */
    struct tftpd_xfer **table;     /* the pump's table */
    unsigned int table_len;
    unsigned int *peers;           /* open addressing: slot + 1 per cell, 0 free */
    unsigned int peers_len;        /* a power of two */
    unsigned int npeers;
    unsigned int *free_slots;      /* slots (with a struct) C may take, from the end */
    unsigned int nfree;
    unsigned int free_cap;         /* room in free_slots */
    struct tftpd_spare *spares;    /* sockets C may take, from the end */
    unsigned int nspares;
    unsigned int spares_cap;       /* room in spares */
    unsigned int live;             /* transfers C started and still owns */
};

/* RTO bounds, as transfer.py's RTO_FLOOR and RTO_CEILING (checked by a test). */
#define TFTPD_RTO_FLOOR_MS 200
#define TFTPD_RTO_CEILING_MS 10000
/* Tries a transfer nobody has answered gets, as transfer.py's UNANSWERED_RETRIES
 * (checked when the module loads). */
#define TFTPD_UNANSWERED_RETRIES 3

/*
 * Serve the ready sockets of the epoll set `epfd` (each added by
 * tftpd_epoll_set with the slot of its transfer in `table`; table_len
 * entries, NULL for none): at most `max_ready` sockets per epoll_wait(), at
 * most 16 datagrams each.  A ready socket that its slot no longer names
 * (empty, or another socket's now) is taken out of the set.
 *
 * The pump waits up to timeout_ms (0: not at all) for something to do, and
 * keeps serving ACKs until there is something for Python: it returns as soon
 * as a call has produced events, when a token (a slot >= TFTPD_TOKEN_BASE)
 * is ready (reported as EV_READY with slot = the token; a signal handler's
 * wake-up pipe among them ends the wait), or when timeout_ms has passed.  A
 * lock-step stream is thus served in C alone, ACK after ACK, with the clock
 * (CLOCK_MONOTONIC) read after each wait; `now` is the time of the call.
 *
 * For a transfer with fast set, an ACK from its peer is handled here with
 * ReadTransfer._on_ack's rules: a duplicate or stale ACK is ignored; an ACK
 * of the whole window takes an RTT sample (not after a resend) and sends the
 * next window; an ACK inside the window counts the rest as retransmitted and
 * sends the window that starts after it; both reset retries and the backoff;
 * the ACK of block nblocks clears fast and reports EV_DONE.  A duplicate
 * ACK while the timer backs off (retries > 0) is Python's (it ends the
 * backoff and re-arms the timer sooner: ReadTransfer._revive).  An ACK C
 * answers that leaves the timer due sooner than before (progress after a
 * backoff, a smaller RTT) reports EV_REARM, so that Python's timer heap,
 * which holds the later time, is brought forward.  Any other
 * datagram, or any datagram of a transfer without fast, is copied to pktbuf
 * and reported as EV_PACKET, and that socket is left for the next call, so
 * Python sees its datagrams in arrival order before C reads on.  A failed recv (but EAGAIN)
 * or send (but back-pressure, which the timer covers) reports EV_ERROR and
 * clears fast; a file found shorter than its size reports EV_SHRANK and clears
 * fast.  The pump stops early rather than read a datagram it has no
 * room to report (max_events, or 1500 bytes left in pktbuf).
 *
 * A transfer C started (owner TFTPD_OWNER_C, see tftpd_requests) is ended
 * here when its peer answers the OACK with ERROR 0, 8 or 9, an existence probe
 * (tftpd_is_probe_end): the socket leaves the epoll set, the peer leaves st's
 * peer table, st->live drops, owner becomes TFTPD_OWNER_ENDED and EV_PROBE
 * reports the slot (err: the error code, src: the peer).  Where there is room,
 * C puts the slot back among the free slots itself, and says so in the
 * event's `offered`; Python logs the probe, closes
 * the socket (a transfer port serves one client only) and takes back the
 * slot if C could not.  The
 * slot's struct keeps its numbers until Python has seen the event (the next
 * start that takes the slot sets them anew).  Anything else such a
 * transfer receives is an EV_PACKET like any other: Python adopts the transfer
 * (owner becomes TFTPD_OWNER_PYTHON, st->live drops) and goes on with it.
 * st may be NULL.
 *
 * Windows go out segmented while *gso and the transfer's gso are set; a
 * route that refuses it clears the transfer's gso, not *gso.
 *
 * Returns the number of events written, or -errno if epoll_wait failed.
 */
int tftpd_pump(int epfd, struct tftpd_xfer **table, unsigned int table_len,
               double now, int timeout_ms, unsigned int max_ready,
               struct tftpd_event *events, unsigned int max_events,
               char *pktbuf, size_t pktbuf_len,
               char *scratch, size_t scratch_len, unsigned int *gso,
               struct tftpd_starts *st);

/* Add (op 1, EPOLL_CTL_ADD) or remove (op 2, EPOLL_CTL_DEL) socket `fd` in
 * the pump's epoll set, its events carrying `slot` (and `fd`, in the upper 32
 * bits of the event's data).  0 or -errno. */
#define TFTPD_EPOLL_ADD 1
#define TFTPD_EPOLL_DEL 2
int tftpd_epoll_set(int epfd, int op, int fd, unsigned int slot);

/*
 * Requests whose answer is already known (tftpd/datapath/known.py fills the
 * table).  In a boot storm most requests are guesses at names that do not
 * exist (pxelinux.cfg/01-<mac>, loader.conf.local, the .gz the loader tries
 * first), or the same request for a file that exists from many clients.
 * Python answers the first one, and, while its negative cache holds the name
 * (or the file is unchanged), enters the request and its answer in a table:
 * an ERROR, or an OACK from which C starts the transfer itself (see
 * tftpd_requests).  C then answers every copy of that request it reads, with
 * no Python work but a log line.
 *
 * The table is open addressing with linear probing over table_len entries
 * (a power of two), indexed by tftpd_hash() of the request datagram; an
 * entry whose hash is 0 is free and ends a probe.  Python fills and rebuilds
 * it (entries are never removed one by one) and keeps the bytes it points to
 * alive.  An entry answers only a byte-identical request, only until
 * `expires`, and only while `dir` (the directory of a missing name, or the
 * file an OACK is for) still has the identity it had (stat() of it fails
 * again if dir_known is 0): a file rewritten, replaced or made unreadable
 * since goes back to Python, which judges it afresh.
 */
struct tftpd_known_answer {
    unsigned long long hash;       /* tftpd_hash(req, reqlen); 0: free */
    int oack;                      /* 1: the reply is an OACK that starts a transfer */
    int ifindex;                   /* oack: only for requests that came in here, */
    unsigned int dstlen;           /* oack: sent to an address of this length (4, 16):
                                      the family its blksize was capped for */
    const struct tftpd_xfer *xfer; /* oack: the transfer's numbers (sock, addr: unset) */
    const char *req;               /* the request datagram */
    unsigned int reqlen;
    const char *reply;             /* the answer sent back: an ERROR, or (oack) the OACK */
    unsigned int replylen;
    unsigned int id;               /* Python's handle, for the log line */
    double expires;                /* CLOCK_MONOTONIC seconds */
    const char *dir;               /* NUL-terminated path */
    int dir_known;                 /* 1: the identity below; 0: missing */
    /* The identity (tftpd/files.py's identity(), field for field): a replaced or
     * rewritten file changes the first four; a permission revoked the rest. */
    unsigned long long dev;
    unsigned long long ino;
    unsigned long long size;
    long long mtime_ns;
    long long ctime_ns;
    unsigned int mode;
    unsigned int uid;
    unsigned int gid;
};

/* SipHash-2-4 of buf under the key set by tftpd_hash_key, never 0 (0 marks a
 * free entry).  The tables C reads are indexed by it: with a key no client
 * knows, no client can choose requests or addresses that collide.  Python
 * sets a random key once, when it loads the module. */
unsigned long long tftpd_hash(const char *buf, unsigned int len);
void tftpd_hash_key(unsigned long long k0, unsigned long long k1);

#define TFTPD_REQ_ANSWERED 1 /* a known ERROR went out: id, err (send errno or 0) */
#define TFTPD_REQ_PASS 2     /* Python must serve it: the datagram is pktbuf[off..off+len) */
#define TFTPD_REQ_STARTED 3  /* an OACK went out and C owns the transfer in `slot` */
#define TFTPD_REQ_MERGED 4   /* a repeat of the request a transfer C owns already answers */

struct tftpd_request {
    int kind;
    unsigned int id;
    unsigned int slot;             /* STARTED, MERGED: the transfer's slot */
    int err;
    int truncated;                 /* PASS: longer than TFTPD_REQ_MAX bytes, cut */
    unsigned int off;
    unsigned int len;
    unsigned int srclen;           /* the client: a struct sockaddr_in or _in6 */
    char src[28];
    int ifindex;                   /* arrival interface (IP_PKTINFO); 0: unknown */
    unsigned int dstlen;           /* 4 or 16: the address it was sent to; 0: unknown */
    unsigned char dst[16];
    double arrival;                /* CLOCK_REALTIME seconds (SO_TIMESTAMPNS); 0: unknown */
    double answered;               /* ANSWERED: CLOCK_REALTIME when the reply went out */
};

/* The largest request read (one UDP payload), and requests per call. */
#define TFTPD_REQ_MAX 65536
#define TFTPD_REQ_BATCH 32

/*
 * Read up to `max` (at most TFTPD_REQ_BATCH) requests from the non-blocking
 * listen socket `lsock` with one recvmmsg(), each into its own
 * TFTPD_REQ_MAX bytes of pktbuf (pktbuf_len >= max * TFTPD_REQ_MAX).  A
 * request found in `table` (table_len 0: none is) is answered from `errsock`
 * with the entry's reply, from the address it was sent to when `pktinfo` is
 * set (IP_PKTINFO / IPV6_PKTINFO, as the listen socket reported it); all the
 * answers of a call go out in one sendmmsg().  Every other datagram is
 * reported as PASS, in arrival order.  The listen socket must have
 * IP_PKTINFO (or IPV6_RECVPKTINFO) and SO_TIMESTAMPNS on for ifindex, dst
 * and arrival to be known.
 *
 * With `st` (NULL: none of this) a request can also start a transfer.  A
 * request from a peer that has a live transfer in st's peer table is PASSed
 * (Python merges or supersedes), except the exact request of a transfer C
 * started, which is reported MERGED and dropped (and, when the OACK went out
 * TFTPD_RTO_FLOOR_MS or longer ago, answered with the OACK again at once, a
 * try counted in retries, up to TFTPD_UNANSWERED_RETRIES, as
 * ReadTransfer.on_repeat does).  A request matching an
 * entry with oack set (and ifindex equal to the request's) takes a free slot
 * and a spare socket bound to the address the request was sent to (drained
 * of late datagrams first): the slot's struct is set from the entry's xfer,
 * with the socket, the peer, owner = TFTPD_OWNER_C, answer = the entry's id and sent_at =
 * armed_at = now; the socket joins the epoll set st->epfd with the slot, the
 * peer joins the peer table, st->live grows, and the OACK goes out from that
 * socket.  Without a free slot or a matching spare the request is PASSed.
 * Python keeps the retransmission timer of such a transfer: tftpd_overdue.
 *
 * Returns the number of requests written to out (0 when none was waiting),
 * or -errno when recvmmsg() failed (but EAGAIN and EINTR).  A failed answer
 * is not an error of the call: that request's err says why.
 */
int tftpd_requests(int lsock, int errsock, int pktinfo,
                   const struct tftpd_known_answer *table, unsigned int table_len,
                   double now, unsigned int max,
                   struct tftpd_request *out, char *pktbuf, size_t pktbuf_len,
                   struct tftpd_starts *st);

/*
 * The peer table: which slot serves a peer (x->addr, x->addrlen).  Python
 * enters every transfer it gives the pump and removes it when it ends; C
 * does the same for the transfers it starts.  put returns 0, or -ENOSPC when
 * the table is more than half full; del and find take no action on a peer
 * or slot that is not there.  find returns the slot, or -1.
 */
int tftpd_peer_put(struct tftpd_starts *st, unsigned int slot);
void tftpd_peer_del(struct tftpd_starts *st, unsigned int slot);
int tftpd_peer_find(const struct tftpd_starts *st, const char *addr, unsigned int addrlen);

/*
 * The transfers C started whose OACK timer is due at `now` (armed_at + rto):
 * up to max slots into out.  *next gets the earliest deadline of the others
 * (unchanged when there is none; `now` when max cut the scan short).  Python
 * adopts the due ones and retransmits.
 */
int tftpd_overdue(const struct tftpd_starts *st, double now, unsigned int *out,
                  unsigned int max, double *next);

/* Empty a spare socket of what strangers sent to its port while it waited (and
 * of a pending ICMP error from its last client, which a recv returns and
 * clears): 0 when it is empty, -1 when it keeps receiving (TFTPD_DRAIN_MAX
 * datagrams and more: someone floods that port) or fails.  tftpd_requests does
 * this to a spare before it starts a transfer on it.
 * Python twin: tftpd.datapath.net.drained. */
#define TFTPD_DRAIN_MAX 64
int tftpd_drain(int sock);

/* 1 when the datagram (len bytes) is ERROR 0, 8 or 9: a client that read an
 * OACK's tsize and stops, an existence probe.  Python twin:
 * tftpd.transfer.is_probe_end. */
int tftpd_is_probe_end(const unsigned char *p, size_t len);

#endif /* TFTPD_DATAPATH_H */
