/*
 * tftpd_known.c - the known-answer table: SipHash of a request, and the lookup
 * of an entry that still holds (byte-identical request, unexpired, its
 * directory or file unchanged).  Python fills the table (tftpd/datapath/known.py).
 */

#define _GNU_SOURCE /* sendmmsg(), recvmmsg(), struct in6_pktinfo */
#define _FILE_OFFSET_BITS 64 /* files past 4 GiB on 32-bit hosts too */

#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

#include "tftpd_internal.h"

/* SipHash-2-4 (Aumasson and Bernstein), keyed by tftpd_hash_key. */
static uint64_t tftpd_key[2];

void tftpd_hash_key(unsigned long long k0, unsigned long long k1)
{
    tftpd_key[0] = k0;
    tftpd_key[1] = k1;
}

#define TFTPD_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define TFTPD_SIPROUND                                                                   \
    do {                                                                                  \
        v0 += v1; v1 = TFTPD_ROTL(v1, 13); v1 ^= v0; v0 = TFTPD_ROTL(v0, 32);           \
        v2 += v3; v3 = TFTPD_ROTL(v3, 16); v3 ^= v2;                                    \
        v0 += v3; v3 = TFTPD_ROTL(v3, 21); v3 ^= v0;                                    \
        v2 += v1; v1 = TFTPD_ROTL(v1, 17); v1 ^= v2; v2 = TFTPD_ROTL(v2, 32);           \
    } while (0)

unsigned long long tftpd_hash(const char *buf, unsigned int len)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t v0 = 0x736f6d6570736575ULL ^ tftpd_key[0];
    uint64_t v1 = 0x646f72616e646f6dULL ^ tftpd_key[1];
    uint64_t v2 = 0x6c7967656e657261ULL ^ tftpd_key[0];
    uint64_t v3 = 0x7465646279746573ULL ^ tftpd_key[1];
    uint64_t b = (uint64_t)len << 56, m, h;
    unsigned int i, left = len & 7;

    for (i = 0; i + 8 <= len; i += 8) {
        int j;
        for (m = 0, j = 7; j >= 0; j--) /* little-endian, whatever the host */
            m = (m << 8) | p[i + (unsigned int)j];
        v3 ^= m;
        TFTPD_SIPROUND;
        TFTPD_SIPROUND;
        v0 ^= m;
    }
    while (left > 0) {
        left--;
        b |= (uint64_t)p[i + left] << (8 * left);
    }
    v3 ^= b;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    TFTPD_SIPROUND;
    h = v0 ^ v1 ^ v2 ^ v3;
    return h ? h : 1;
}
/* The directory (or file) still is as it was when the entry was made: the
 * fields of identity() in tftpd/files.py.  Python twin: tftpd.files.dir_identity
 * compared with the entry's identity, in KnownAnswers.lookup. */
static int tftpd_dir_holds(const struct tftpd_known_answer *r)
{
    struct stat st;

    if (r->dir == NULL)
        return 0;
    if (stat(r->dir, &st) < 0)
        return !r->dir_known;
    return r->dir_known && (unsigned long long)st.st_dev == r->dev
        && (unsigned long long)st.st_ino == r->ino
        && (unsigned long long)st.st_size == r->size
        && (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec == r->mtime_ns
        && (long long)st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec == r->ctime_ns
        && (unsigned int)st.st_mode == r->mode && (unsigned int)st.st_uid == r->uid
        && (unsigned int)st.st_gid == r->gid;
}

/* The entry that answers this request at `now`.  Python twin:
 * tftpd.datapath.known.KnownAnswers.lookup. */
const struct tftpd_known_answer *tftpd_lookup(const struct tftpd_known_answer *table,
                                                unsigned int table_len, const char *req,
                                                unsigned int len, double now)
{
    unsigned long long h;
    unsigned int i, n;

    if (table == NULL || table_len == 0 || (table_len & (table_len - 1)) != 0)
        return NULL;
    h = tftpd_hash(req, len);
    for (n = 0, i = (unsigned int)h & (table_len - 1); n < table_len;
         n++, i = (i + 1) & (table_len - 1)) {
        const struct tftpd_known_answer *r = &table[i];
        if (r->hash == 0)
            return NULL;
        if (r->hash == h && r->reqlen == len && memcmp(r->req, req, len) == 0)
            return r->expires > now && tftpd_dir_holds(r) ? r : NULL;
    }
    return NULL;
}
