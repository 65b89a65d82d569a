/*
 * tftpd_datapath.h - the C data path's whole API.
 *
 * _ext/build_datapath.py hands the declarations below to cffi's cdef(): it
 * drops the preprocessor lines and turns every "#define TFTPD_<NAME> <number>"
 * into "#define TFTPD_<NAME> ...", so the value Python sees is the one the
 * compiler saw.  Keep everything else here plain C declarations that cffi can
 * parse: no macros in declarations, no includes, no inline code.
 *
 * The C side is stateless: Python decides which blocks go where and when, C
 * does the syscalls.  Nothing here allocates, keeps state or calls back.
 */
#ifndef TFTPD_DATAPATH_H
#define TFTPD_DATAPATH_H

#include <stddef.h>

/* Bump on any change of a signature or of a meaning below; tftpd/datapath.py
 * refuses a compiled module whose version differs from the one it expects. */
#define TFTPD_DATAPATH_VERSION 2

/* Most datagrams handed to one sendmmsg() call, and the most blocks read in
 * one go: a window is read and sent in batches of at most this many blocks
 * (the message array lives on the stack).  The pure-Python twin batches the
 * same way, so both stop at the same place when the file shrinks. */
#define TFTPD_MAX_BATCH 64

/* Returned negated when the file ended before a block it had to supply: the
 * file shrank after its size was taken.  Outside the errno range
 * (Linux errno values stay below 4096). */
#define TFTPD_ESHRANK 4096

/* Returned negated (internally) when the kernel refuses UDP segmentation. */
#define TFTPD_ENOGSO 4097

/*
 * Send DATA blocks first .. first+count-1 of the file open on `fd` to the
 * sockaddr `addr` (addrlen bytes) through the (unconnected) UDP socket `sock`.
 *
 * Block k carries file bytes [(k-1)*blksize, min(k*blksize, filesize)); the
 * last block of a file may be empty.  Each datagram is the 4-byte header
 * (opcode 3, wire block number, both big-endian) and the payload, gathered
 * from two iovecs.  Wire numbers roll over past 65535 to `rollover` (0 or 1).
 *
 * The payload is pread() into `scratch` (scratch_len bytes, at least one
 * block); blocks go out in batches of min(scratch_len / blksize,
 * TFTPD_MAX_BATCH), each batch read completely before any of it is sent.
 *
 * With *gso set, a batch of two or more blocks goes out as one segmented
 * sendmsg() (UDP_SEGMENT, Linux >= 4.18): the same datagrams on the wire for
 * one syscall.  If the kernel refuses segmentation, *gso is cleared and the
 * batch goes out by sendmmsg(); gso may be NULL.
 *
 * Returns the number of datagrams sent, 0..count.  Fewer than count means
 * back-pressure: sendmmsg() failed with EAGAIN/EWOULDBLOCK/ENOBUFS (0 if it
 * did so on the first datagram).  Returns -errno on any other error,
 * -TFTPD_ESHRANK when the file is shorter than filesize, and -EINVAL on bad
 * arguments.  EINTR is retried.
 */
int tftpd_send_window(int sock, const char *addr, unsigned int addrlen,
                      int fd, unsigned long long filesize, unsigned int blksize,
                      unsigned long long first, unsigned int count,
                      unsigned int rollover,
                      char *scratch, size_t scratch_len, unsigned int *gso);

/* The 16-bit block number block k carries on the wire. */
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
};

/* What the pump hands back to Python. */
#define TFTPD_EV_PACKET 1   /* a datagram Python must judge (in pktbuf) */
#define TFTPD_EV_DONE 2     /* the last block was acknowledged */
#define TFTPD_EV_ERROR 3    /* recv or send failed: err is errno or ESHRANK */

struct tftpd_event {
    unsigned int slot;             /* the transfer's index in the table */
    int kind;
    int err;
    unsigned int off;              /* EV_PACKET: the datagram is pktbuf[off..off+len) */
    unsigned int len;
    unsigned int srclen;           /* EV_PACKET: who sent it */
    char src[28];
};

/* RTO bounds, as transfer.py's RTO_FLOOR and RTO_CEILING (checked by a test). */
#define TFTPD_RTO_FLOOR_MS 200
#define TFTPD_RTO_CEILING_MS 10000

/*
 * Serve the ready sockets of the epoll set `epfd` (whose event data.u32 is
 * the slot of a transfer in `table`; table_len entries, NULL for none) once,
 * without waiting: at most `max_ready` sockets, at most 16 datagrams each.
 *
 * For a transfer with fast set, an ACK from its peer is handled here with
 * ReadTransfer._on_ack's rules: a duplicate or stale ACK is ignored; an ACK
 * of the whole window takes an RTT sample (not after a resend) and sends the
 * next window; an ACK inside the window counts the rest as retransmitted and
 * sends the window that starts after it; both reset retries and the backoff;
 * the ACK of block nblocks clears fast and reports EV_DONE.  Any other
 * datagram, or any datagram of a transfer without fast, is copied to pktbuf
 * and reported as EV_PACKET, and that socket is left for the next call, so
 * Python sees its datagrams in arrival order before C reads on.  A failed recv (but EAGAIN)
 * or send (but back-pressure, which the timer covers) reports EV_ERROR and
 * clears fast.  The pump stops early rather than read a datagram it has no
 * room to report (max_events, or 1500 bytes left in pktbuf).
 *
 * Returns the number of events written, or -errno if epoll_wait failed.
 */
int tftpd_pump(int epfd, struct tftpd_xfer **table, unsigned int table_len,
               double now, unsigned int max_ready,
               struct tftpd_event *events, unsigned int max_events,
               char *pktbuf, size_t pktbuf_len,
               char *scratch, size_t scratch_len, unsigned int *gso);

/* Add (op 1, EPOLL_CTL_ADD) or remove (op 2, EPOLL_CTL_DEL) socket `fd` in
 * the pump's epoll set, its events carrying `slot`.  0 or -errno. */
#define TFTPD_EPOLL_ADD 1
#define TFTPD_EPOLL_DEL 2
int tftpd_epoll_set(int epfd, int op, int fd, unsigned int slot);

#endif /* TFTPD_DATAPATH_H */
