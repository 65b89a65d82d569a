/*
 * variants.h - bench-only ways of sending TFTP DATA blocks, to measure against
 * the product's data path (_ext/tftpd_datapath.c: pread + sendmmsg to an
 * unconnected socket).  None of this ships: bench/variants/build.py compiles
 * it at first use into bench/.build/variants/.
 *
 * build.py hands these declarations to cffi's cdef(): it drops preprocessor
 * lines and turns "#define VB_<NAME> <number>" into "#define VB_<NAME> ...".
 * Keep the rest plain declarations.
 *
 * Every sender sends blocks first .. first+count-1 (block k = file bytes
 * [(k-1)*blksize, min(k*blksize, filesize))), one datagram per block, the
 * 4-byte DATA header (opcode 3, block number k & 0xffff, big-endian) then the
 * payload.  Each returns the number of datagrams sent (count, or fewer on
 * EAGAIN/ENOBUFS back-pressure) or -errno; every syscall's return is checked,
 * and a short pread/sendfile (the file shrank) returns -VB_ESHORT.
 */
#ifndef VB_VARIANTS_H
#define VB_VARIANTS_H

#include <stddef.h>

#define VB_MAX_WINDOW 64
#define VB_ESHORT 4096

/* (c) Connected socket: send(header, MSG_MORE), then sendfile(2) of the
 * payload; the pending MSG_MORE corks both into one datagram. */
int vb_sendfile_window(int sock, int fd, unsigned long long filesize, unsigned int blksize,
                       unsigned long long first, unsigned int count);

/* (d) Unconnected socket: one sendmsg() per block, iovecs {header, map + off}
 * pointing straight into a read-only mapping of the whole file. */
int vb_mmap_sendmsg_window(int sock, const char *addr, unsigned int addrlen,
                           const char *map, unsigned long long filesize,
                           unsigned int blksize, unsigned long long first, unsigned int count);

/* (e) As (d), but the whole window in sendmmsg() calls of up to VB_MAX_WINDOW. */
int vb_mmap_sendmmsg_window(int sock, const char *addr, unsigned int addrlen,
                            const char *map, unsigned long long filesize,
                            unsigned int blksize, unsigned long long first, unsigned int count);

/* (f) UDP GSO: the window is preadv()'d into `scratch` laid out as
 * [hdr|payload][hdr|payload]..., each slot 4 + blksize bytes (one preadv, its
 * iovecs pointing at the payload slots), then sent by sendmsg() calls that
 * carry a UDP_SEGMENT cmsg of gso_size = 4 + blksize, at most max_segs
 * segments each (the kernel caps one GSO send at 64 KiB of UDP payload).
 * Only the last block of the file may be short, and only as the last segment.
 * scratch_len must hold min(count, VB_MAX_WINDOW) slots. */
int vb_gso_window(int sock, const char *addr, unsigned int addrlen, int fd,
                  unsigned long long filesize, unsigned int blksize,
                  unsigned long long first, unsigned int count, unsigned int max_segs,
                  char *scratch, size_t scratch_len);

/* (g) The product's strategy on a connected socket (no msg_name): pread of the
 * window into `scratch`, then sendmmsg().  Separates what sendfile (c) saves
 * from what merely being connected saves (no route lookup per datagram). */
int vb_pread_sendmmsg_connected(int sock, int fd, unsigned long long filesize,
                                unsigned int blksize, unsigned long long first,
                                unsigned int count, char *scratch, size_t scratch_len);

/* 0 when this kernel knows UDP_SEGMENT (getsockopt on `sock`), else -errno. */
int vb_gso_probe(int sock);

/*
 * The receiver, run in a second process: drain `rxfd` with non-blocking
 * recvmmsg(MSG_TRUNC) (spinning, so the sender never pays for waking it) until
 * *stop becomes non-zero and the socket then stays empty for grace_ms.
 *
 * Every datagram is checked for length 4 + blksize (its real length, through
 * MSG_TRUNC), opcode 3, a block number in 1..nfull (the full blocks of the
 * file, all the bench sends), following the previous one (the sender walks the
 * file in order, wrapping to 1), and its first 60 payload bytes against the
 * file; the first 64 datagrams and the first of every recvmmsg batch are
 * copied out whole and compared byte for byte.
 */
struct vb_rx_stats {
    unsigned long long received;
    unsigned long long bytes;
    unsigned long long checked;        /* payloads compared in full */
    unsigned long long prefix_checked; /* payloads compared as far as 60 bytes */
    unsigned long long bad_len;
    unsigned long long bad_header;     /* opcode or block number out of range */
    unsigned long long bad_payload;
    unsigned long long out_of_seq;     /* block != previous + 1 and != 1 */
    unsigned long long first_bad_block;
    int err;                           /* errno of a failed recvmmsg, else 0 */
};

int vb_rx_run(int rxfd, int *stop, const char *file, unsigned long long filesize,
              unsigned int blksize, unsigned int grace_ms, struct vb_rx_stats *st);

#endif /* VB_VARIANTS_H */
