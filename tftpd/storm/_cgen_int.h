/*
 * What the storm's C core (_cgen.c) and its fault layer (_cgen_faults.c) share: the
 * state of a storm and of its clients. Not part of the interface (that is _cgen.h).
 */
#ifndef TB_CGEN_INT_H
#define TB_CGEN_INT_H

#include <netinet/in.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "_cgen.h"

#define TB_SIZE_UNKNOWN UINT64_MAX

enum { S_IDLE, S_WAIT_FIRST, S_WAIT_OACK_DONE, S_DATA, S_DONE, S_FAILED };

struct client {
    int state, step, fd;
    struct sockaddr_in tid;
    int has_tid;
    double started, t_req, deadline, loop_end;
    int rrq_try, retries;
    uint32_t blksize, window, inwin;
    uint64_t nblk;
    uint64_t size;         /* the file's size: known, announced by tsize, or TB_SIZE_UNKNOWN */
    int gap_acked, wrong_tid, iteration, acked;
    uint32_t gen;          /* bumped with every new socket: held copies know their own */
    uint64_t nout, nin;    /* datagrams sent / delivered on the current socket */
};

/* A datagram the fault layer holds back (a min-heap on `due`). */
struct held {
    double due;
    uint32_t client, gen;
    int dir;               /* 0: the client sends it, 1: the client receives it */
    uint64_t seq;          /* the socket's count in that direction when it was held */
    struct sockaddr_in addr;
    uint32_t len;
    unsigned char *buf;
};

struct storm {
    const struct tb_config *cfg;
    const struct tb_step *steps;
    struct tb_result *res;
    struct tb_client_out *out;
    double *fa;
    struct client *c;
    int ep;
    struct sockaddr_in server;
    unsigned next_port;
    int faults;
    uint64_t rng;
    struct held *heap;
    uint32_t nheld;
    uint64_t *announced;   /* [client * nsteps + step]: the tsize that step was told */
    int *running;          /* clients started and not yet done or failed */
    int nrunning;
};

/* Client ports in turn from this range: see PORT_LO in pyengine.py. */
#define PORT_LO 10000u
#define PORT_HI 65000u

static inline double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* _cgen.c: a datagram the client receives, past the fault layer. */
void tb_on_packet(struct storm *s, struct client *c, const unsigned char *b, size_t n,
                  const struct sockaddr_in *from, double now);

/* _cgen_faults.c: every datagram a client sends or receives goes through these. */
ssize_t tb_send(struct storm *s, struct client *c, const void *buf, size_t len,
                const struct sockaddr_in *to);
void tb_deliver(struct storm *s, struct client *c, const unsigned char *b, size_t n,
                const struct sockaddr_in *from, double now);
void tb_release_due(struct storm *s, double now);
void tb_drop_held(struct storm *s);

#endif
