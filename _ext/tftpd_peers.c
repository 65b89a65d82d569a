/*
 * tftpd_peers.c - the peer table (which slot serves a peer) and the OACK
 * timers of the transfers C started.
 */

#define _GNU_SOURCE /* sendmmsg(), recvmmsg(), struct in6_pktinfo */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <errno.h>
#include <string.h>

#include "tftpd_internal.h"

static unsigned int tftpd_peer_home(const struct tftpd_starts *st, const char *addr,
                                    unsigned int addrlen)
{
    return (unsigned int)tftpd_hash(addr, addrlen) & (st->peers_len - 1);
}

static int tftpd_peers_ok(const struct tftpd_starts *st)
{
    return st != NULL && st->peers != NULL && st->peers_len >= 2
        && (st->peers_len & (st->peers_len - 1)) == 0 && st->table != NULL;
}

int tftpd_peer_find(const struct tftpd_starts *st, const char *addr, unsigned int addrlen)
{
    unsigned int i, n, mask;

    if (!tftpd_peers_ok(st) || addr == NULL || addrlen == 0 || addrlen > 28)
        return -1;
    mask = st->peers_len - 1;
    for (n = 0, i = tftpd_peer_home(st, addr, addrlen); n < st->peers_len;
         n++, i = (i + 1) & mask) {
        unsigned int cell = st->peers[i];
        const struct tftpd_xfer *x;

        if (cell == 0)
            return -1;
        if (cell - 1 < st->table_len && (x = st->table[cell - 1]) != NULL
            && x->addrlen == addrlen && memcmp(x->addr, addr, addrlen) == 0)
            return (int)(cell - 1);
    }
    return -1;
}

int tftpd_peer_put(struct tftpd_starts *st, unsigned int slot)
{
    const struct tftpd_xfer *x;
    unsigned int i, mask;

    if (!tftpd_peers_ok(st) || slot >= st->table_len || (x = st->table[slot]) == NULL
        || x->addrlen == 0 || x->addrlen > sizeof(x->addr))
        return -EINVAL;
    if (2 * (st->npeers + 1) > st->peers_len)
        return -ENOSPC;
    mask = st->peers_len - 1;
    for (i = tftpd_peer_home(st, x->addr, x->addrlen); st->peers[i] != 0; i = (i + 1) & mask)
        if (st->peers[i] == slot + 1)
            return 0; /* already there */
    st->peers[i] = slot + 1;
    st->npeers++;
    return 0;
}

void tftpd_peer_del(struct tftpd_starts *st, unsigned int slot)
{
    const struct tftpd_xfer *x;
    unsigned int i, j, mask;

    if (!tftpd_peers_ok(st) || slot >= st->table_len || (x = st->table[slot]) == NULL
        || x->addrlen == 0 || x->addrlen > sizeof(x->addr))
        return;
    mask = st->peers_len - 1;
    for (i = tftpd_peer_home(st, x->addr, x->addrlen); st->peers[i] != slot + 1;
         i = (i + 1) & mask)
        if (st->peers[i] == 0)
            return; /* not there */
    st->peers[i] = 0;
    st->npeers--;
    /* The rest of the cluster is entered again, so that no probe for one of them
     * stops at the hole (Knuth's deletion for linear probing; no tombstones).  A
     * cell whose transfer is gone cannot be placed and is dropped: that cannot
     * happen while Python keeps the rules, and leaves no hole if it does. */
    for (j = (i + 1) & mask; st->peers[j] != 0; j = (j + 1) & mask) {
        unsigned int cell = st->peers[j], k;
        const struct tftpd_xfer *y;

        st->peers[j] = 0;
        st->npeers--;
        if (cell - 1 >= st->table_len || (y = st->table[cell - 1]) == NULL
            || y->addrlen == 0 || y->addrlen > sizeof(y->addr))
            continue;
        for (k = tftpd_peer_home(st, y->addr, y->addrlen); st->peers[k] != 0;
             k = (k + 1) & mask)
            ;
        st->peers[k] = cell;
        st->npeers++;
    }
}

int tftpd_overdue(const struct tftpd_starts *st, double now, unsigned int *out,
                  unsigned int max, double *next)
{
    unsigned int slot, n = 0;

    if (st == NULL || st->table == NULL || out == NULL)
        return -EINVAL;
    for (slot = 0; slot < st->table_len && n < max; slot++) {
        const struct tftpd_xfer *x = st->table[slot];
        double due;

        if (x == NULL || x->owner != TFTPD_OWNER_C)
            continue;
        due = x->armed_at + x->rto;
        if (due <= now)
            out[n++] = slot;
        else if (next != NULL && due < *next)
            *next = due;
    }
    if (n == max && slot < st->table_len && next != NULL)
        *next = now; /* cut short: scan again at once for the rest */
    return (int)n;
}
