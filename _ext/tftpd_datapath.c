/*
 * tftpd_datapath.c - send a window of TFTP DATA blocks from a file to a
 * client: pread() into a caller-provided buffer, then sendmmsg() one datagram
 * per block, header and payload gathered from two iovecs.
 *
 * Why neither sendfile() nor mmap(): transfer sockets are unconnected (so the
 * server can answer a stray TID with ERROR 5), and sendfile() needs a
 * connected socket; a file truncated under a mapping raises SIGBUS, which
 * would kill a worker and every transfer it serves.  pread() merely comes up
 * short, which we report as TFTPD_ESHRANK.
 */
#define _GNU_SOURCE /* sendmmsg() */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tftpd_datapath.h"

#define TFTPD_OPCODE_DATA 3
#define TFTPD_MIN_BLKSIZE 8     /* RFC 2348 */
#define TFTPD_MAX_BLKSIZE 65464 /* RFC 2348 */

unsigned int tftpd_wire_block(unsigned long long k, unsigned int rollover)
{
    if (k < 65536)
        return (unsigned int)k;
    /* After 65535 the counter restarts at `rollover`, and so on every lap. */
    return rollover + (unsigned int)((k - 65536) % (65536 - rollover));
}

/* Read exactly len bytes at off.  A regular file only comes up short at its
 * end, so a zero-byte read before len means the file shrank. */
static int tftpd_read_full(int fd, char *buf, size_t len, unsigned long long off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -TFTPD_ESHRANK;
        done += (size_t)n;
    }
    return 0;
}

int tftpd_send_window(int sock, const char *addr, unsigned int addrlen,
                      int fd, unsigned long long filesize, unsigned int blksize,
                      unsigned long long first, unsigned int count,
                      unsigned int rollover,
                      char *scratch, size_t scratch_len)
{
    struct mmsghdr msgs[TFTPD_MAX_BATCH];
    struct iovec iov[TFTPD_MAX_BATCH][2];
    unsigned char hdr[TFTPD_MAX_BATCH][4];
    unsigned long long nblocks;
    size_t batch;
    unsigned int sent = 0;

    if (sock < 0 || fd < 0 || addr == NULL || addrlen == 0
        || addrlen > sizeof(struct sockaddr_storage) || scratch == NULL
        || blksize < TFTPD_MIN_BLKSIZE || blksize > TFTPD_MAX_BLKSIZE
        || rollover > 1 || first < 1 || count < 1 || count > INT_MAX
        || filesize > (unsigned long long)INT64_MAX - TFTPD_MAX_BLKSIZE)
        return -EINVAL;
    /* Blocks 1 .. filesize / blksize + 1 exist (the last may be empty). */
    nblocks = filesize / blksize + 1;
    if (first > nblocks || count - 1 > nblocks - first)
        return -EINVAL;

    batch = scratch_len / blksize;
    if (batch < 1)
        return -EINVAL;
    if (batch > TFTPD_MAX_BATCH)
        batch = TFTPD_MAX_BATCH;

    while (sent < count) {
        unsigned long long k0 = first + sent;
        unsigned long long off = (k0 - 1) * blksize;
        unsigned long long end;
        unsigned int n = count - sent, done = 0, i;
        int rc;

        if (n > batch)
            n = (unsigned int)batch;
        end = off + (unsigned long long)n * blksize;
        if (end > filesize)
            end = filesize;
        /* off <= filesize because every block asked for exists. */
        rc = tftpd_read_full(fd, scratch, (size_t)(end - off), off);
        if (rc < 0)
            return rc;

        for (i = 0; i < n; i++) {
            unsigned long long boff = off + (unsigned long long)i * blksize;
            unsigned long long left = filesize - boff;
            unsigned int wire = tftpd_wire_block(k0 + i, rollover);

            hdr[i][0] = 0;
            hdr[i][1] = TFTPD_OPCODE_DATA;
            hdr[i][2] = (unsigned char)(wire >> 8);
            hdr[i][3] = (unsigned char)(wire & 0xff);
            iov[i][0].iov_base = hdr[i];
            iov[i][0].iov_len = 4;
            iov[i][1].iov_base = scratch + (size_t)i * blksize;
            iov[i][1].iov_len = left < blksize ? (size_t)left : blksize;
            memset(&msgs[i], 0, sizeof(msgs[i]));
            /* sendmsg() never writes through msg_name; the cast drops const. */
            msgs[i].msg_hdr.msg_name = (void *)(uintptr_t)addr;
            msgs[i].msg_hdr.msg_namelen = addrlen;
            msgs[i].msg_hdr.msg_iov = iov[i];
            msgs[i].msg_hdr.msg_iovlen = 2;
        }

        /* sendmmsg() may stop early: it returns how many went out and
         * reports the error that stopped it on the next call. */
        while (done < n) {
            int r = sendmmsg(sock, msgs + done, n - done, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
                    return (int)(sent + done);
                return -errno;
            }
            if (r == 0) /* not documented to happen; never spin on it */
                return (int)(sent + done);
            done += (unsigned int)r;
        }
        sent += n;
    }
    return (int)sent;
}
