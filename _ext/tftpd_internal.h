/*
 * tftpd_internal.h - what the C data path's files share and Python does not
 * see: wire constants and the functions one file calls in another.  The API
 * Python calls (through cffi) is tftpd_datapath.h.
 */
#ifndef TFTPD_INTERNAL_H
#define TFTPD_INTERNAL_H

#include <stddef.h>

#include "tftpd_datapath.h"

#define TFTPD_OPCODE_DATA 3
#define TFTPD_OPCODE_ACK 4
#define TFTPD_OPCODE_ERROR 5
#define TFTPD_MIN_BLKSIZE 8     /* RFC 2348 */
#define TFTPD_MAX_BLKSIZE 65464 /* RFC 2348 */

/* Returned negated by the send functions when the file ended before a block
 * it had to supply (it shrank after its size was taken).  Outside the errno
 * range (Linux errno values stay below 4096); never crosses to Python, which
 * hears of it as TFTPD_SENT_SHRANK or TFTPD_EV_SHRANK. */
#define TFTPD_ESHRANK 4096
/* Returned negated (in tftpd_send.c) when the kernel refuses UDP segmentation. */
#define TFTPD_ENOGSO 4097

/* Seconds a timer may fire late rather than cost a Python turn (EV_REARM). */
#define TFTPD_REARM_SLACK 0.05

/* tftpd_send.c: tftpd_send_window's work, returning -TFTPD_ESHRANK when the
 * file shrank. */
int tftpd_send_blocks(int sock, const char *addr, unsigned int addrlen,
                      int fd, const char *mem, unsigned long long filesize,
                      unsigned int blksize, unsigned long long first, unsigned int count,
                      unsigned int rollover, char *scratch, size_t scratch_len,
                      unsigned int *gso);

/* tftpd_ack.c: the lock-step rules (their Python twins are named there). */
unsigned long long tftpd_absolute(const struct tftpd_xfer *x, unsigned int n);
void tftpd_sample_rtt(struct tftpd_xfer *x, double now);
int tftpd_next_window(struct tftpd_xfer *x, unsigned long long first, double now,
                      char *scratch, size_t scratch_len, unsigned int *gso);
int tftpd_on_ack(struct tftpd_xfer *x, unsigned int n, double now,
                 char *scratch, size_t scratch_len, unsigned int *gso);

/* tftpd_known.c: the entry that answers this request now, or NULL. */
const struct tftpd_known_answer *tftpd_lookup(const struct tftpd_known_answer *table,
                                              unsigned int table_len, const char *req,
                                              unsigned int len, double now);

#endif /* TFTPD_INTERNAL_H */
