/*
 * tftpd_send.c - send a window of TFTP DATA blocks from a file to a client:
 * pread() into a caller-provided buffer (or point into the file's image), then
 * sendmmsg() one datagram per block, header and payload gathered from two
 * iovecs, or one segmented sendmsg() (UDP_SEGMENT) per batch.
 *
 * Why neither sendfile() nor mmap(): transfer sockets are unconnected (so the
 * server can answer a stray TID with ERROR 5), and sendfile() needs a
 * connected socket; a file truncated under a mapping raises SIGBUS, which
 * would kill a worker and every transfer it serves.  pread() merely comes up
 * short, which is reported as the file having shrunk.
 */

#define _GNU_SOURCE /* sendmmsg(), recvmmsg(), struct in6_pktinfo */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tftpd_internal.h"

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h, Linux >= 4.18 */
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
/* A segmented send is one UDP datagram to the stack: at most 64 KiB in all. */
#define TFTPD_GSO_MAX_BYTES 65000

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

/* Send n >= 2 consecutive blocks starting at k0 (file offset off) as ONE
 * sendmsg() with UDP_SEGMENT: the kernel cuts the buffer into datagrams of
 * 4 + blksize bytes (the last may be shorter), so one syscall and one trip
 * through the stack carry the whole batch.  The scratch buffer holds
 * header + payload for each block, back to back.  Returns n, 0 on
 * back-pressure, -errno, -ESHRANK, or -TFTPD_ENOGSO when the kernel or the
 * route refuses segmentation (the caller then stops asking). */
static int tftpd_send_gso(int sock, const char *addr, unsigned int addrlen, int fd,
                          const char *mem, unsigned long long filesize, unsigned int blksize,
                          unsigned long long k0, unsigned int n, unsigned int rollover,
                          char *scratch)
{
    struct iovec rd[TFTPD_MAX_BATCH];
    struct iovec iov;
    struct msghdr msg;
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } ctl;
    struct cmsghdr *cm;
    unsigned long long off = (k0 - 1) * blksize, end, want;
    size_t seg = (size_t)blksize + 4, total = 0, got = 0;
    uint16_t gso_size = (uint16_t)seg;
    unsigned int i, cur = 0;

    end = off + (unsigned long long)n * blksize;
    if (end > filesize)
        end = filesize;
    want = end - off;
    for (i = 0; i < n; i++) {
        unsigned long long boff = off + (unsigned long long)i * blksize;
        unsigned long long left = filesize - boff;
        size_t len = left < blksize ? (size_t)left : blksize;
        unsigned int wire = tftpd_wire_block(k0 + i, rollover);
        unsigned char *h = (unsigned char *)scratch + i * seg;

        h[0] = 0;
        h[1] = TFTPD_OPCODE_DATA;
        h[2] = (unsigned char)(wire >> 8);
        h[3] = (unsigned char)(wire & 0xff);
        rd[i].iov_base = h + 4;
        rd[i].iov_len = len;
        total = i * seg + 4 + len;
    }
    if (mem != NULL) { /* the file's image: copied, not read */
        for (i = 0; i < n; i++)
            memcpy(rd[i].iov_base, mem + off + (size_t)i * blksize, rd[i].iov_len);
        got = want;
    }
    /* One preadv() for the batch.  A read may come up short (a network file
     * system, a signal): the next one resumes in the iovec where it stopped,
     * so `cur` and the trimmed iovec always describe bytes got .. want.  A
     * read of nothing before `want` means the file shrank. */
    while (got < want && cur < n) {
        ssize_t r = preadv(fd, rd + cur, (int)(n - cur), (off_t)(off + got));
        size_t left;

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -TFTPD_ESHRANK;
        got += (size_t)r;
        for (left = (size_t)r; cur < n && left >= rd[cur].iov_len; cur++)
            left -= rd[cur].iov_len;
        if (cur < n) {
            rd[cur].iov_base = (char *)rd[cur].iov_base + left;
            rd[cur].iov_len -= left;
        }
    }
    if (got < want)
        return -EIO; /* the kernel said it read more than was asked */

    iov.iov_base = scratch;
    iov.iov_len = total;
    memset(&msg, 0, sizeof(msg));
    msg.msg_name = (void *)(uintptr_t)addr;
    msg.msg_namelen = addrlen;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof(ctl.buf);
    cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(cm), &gso_size, sizeof(gso_size));
    for (;;) {
        ssize_t r = sendmsg(sock, &msg, 0);
        if (r >= 0)
            return (int)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
            return 0;
        if (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT || errno == EOPNOTSUPP
            || errno == EMSGSIZE)
            return -TFTPD_ENOGSO;
        return -errno;
    }
}

/* tftpd_send_window's work; the file shrinking is -TFTPD_ESHRANK here.  The
 * Python twin is tftpd.datapath.sending.PythonDataPath._send. */
int tftpd_send_blocks(int sock, const char *addr, unsigned int addrlen,
                      int fd, const char *mem, unsigned long long filesize,
                      unsigned int blksize, unsigned long long first, unsigned int count,
                      unsigned int rollover,
                      char *scratch, size_t scratch_len, unsigned int *gso)
{
    struct mmsghdr msgs[TFTPD_MAX_BATCH];
    struct iovec iov[TFTPD_MAX_BATCH][2];
    unsigned char hdr[TFTPD_MAX_BATCH][4];
    unsigned long long nblocks;
    size_t batch;
    unsigned int sent = 0;

    if (sock < 0 || (fd < 0 && mem == NULL) || addr == NULL || addrlen == 0
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

        if (gso != NULL && *gso) {
            /* As many blocks as one segmented send may carry. */
            unsigned int g = count - sent;
            size_t fit = scratch_len / ((size_t)blksize + 4);
            size_t room = TFTPD_GSO_MAX_BYTES / ((size_t)blksize + 4);

            if (g > TFTPD_MAX_BATCH)
                g = TFTPD_MAX_BATCH;
            if (g > fit)
                g = (unsigned int)fit;
            if (g > room)
                g = (unsigned int)room;
            if (g >= 2) {
                rc = tftpd_send_gso(sock, addr, addrlen, fd, mem, filesize, blksize, k0, g,
                                    rollover, scratch);
                if (rc > 0) {
                    sent += (unsigned int)rc;
                    continue;
                }
                if (rc == 0)
                    return (int)sent; /* back-pressure */
                if (rc != -TFTPD_ENOGSO)
                    return rc;
                *gso = 0; /* not on this path: plain datagrams from now on */
            }
        }
        if (n > batch)
            n = (unsigned int)batch;
        end = off + (unsigned long long)n * blksize;
        if (end > filesize)
            end = filesize;
        /* off <= filesize because every block asked for exists.  From an
         * image the payloads are sent where they lie: no read, no copy. */
        if (mem == NULL) {
            rc = tftpd_read_full(fd, scratch, (size_t)(end - off), off);
            if (rc < 0)
                return rc;
        }

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
            iov[i][1].iov_base = mem != NULL ? (void *)(uintptr_t)(mem + boff)
                                             : scratch + (size_t)i * blksize;
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

int tftpd_send_window(int sock, const char *addr, unsigned int addrlen,
                      int fd, const char *mem, unsigned long long filesize,
                      unsigned int blksize, unsigned long long first, unsigned int count,
                      unsigned int rollover,
                      char *scratch, size_t scratch_len, unsigned int *gso, int *shrank)
{
    int rc = tftpd_send_blocks(sock, addr, addrlen, fd, mem, filesize, blksize, first,
                               count, rollover, scratch, scratch_len, gso);

    if (shrank != NULL)
        *shrank = rc == -TFTPD_ESHRANK;
    return rc == -TFTPD_ESHRANK ? 0 : rc;
}
