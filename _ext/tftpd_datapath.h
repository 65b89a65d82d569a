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
#define TFTPD_DATAPATH_VERSION 1

/* Most datagrams handed to one sendmmsg() call, and the most blocks read in
 * one go: a window is read and sent in batches of at most this many blocks
 * (the message array lives on the stack).  The pure-Python twin batches the
 * same way, so both stop at the same place when the file shrinks. */
#define TFTPD_MAX_BATCH 64

/* Returned negated when the file ended before a block it had to supply: the
 * file shrank after its size was taken.  Outside the errno range
 * (Linux errno values stay below 4096). */
#define TFTPD_ESHRANK 4096

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
                      char *scratch, size_t scratch_len);

/* The 16-bit block number block k carries on the wire. */
unsigned int tftpd_wire_block(unsigned long long k, unsigned int rollover);

#endif /* TFTPD_DATAPATH_H */
