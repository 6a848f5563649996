/* The virtio-net loopback's common case in C: one transmit notification,
 * taken, translated, copied and published in one call (virtio_native.py).
 *
 * loopback_burst(tx, rx, keys, rd, wr, limit, rx_header):
 *   tx, rx     (desc, avail, used, num, last_avail, used_idx, check_irq): the
 *              split queues as the device holds them (virtio.py SplitQueue);
 *              check_irq: an interrupt may be due, so the driver's
 *              VRING_AVAIL_F_NO_INTERRUPT must be set to go on.
 *   keys/rd/wr uint64 arrays, an open-addressed table of 4 KiB bus pages:
 *              keys[h] = page + 1 (0: empty slot), rd[h]/wr[h] the address of
 *              that page in this process for a device read/write (0: not known).
 *   limit      frames the backend can take now.
 *   rx_header  the 12-byte virtio_net_hdr every received frame gets.
 *
 * Returns
 *   (n, frames, lens)   n frames moved from the transmit queue to the receive
 *                       queue, both used rings published; frames: each frame
 *                       after rx_header (virtio_net.py's Frames layout), lens
 *                       their lengths (0 frames: nothing was available);
 *   [(iova, write)...]  pages the table lacks: nothing changed; fill and call again;
 *   int > 0             anything unusual (the reason, FALLBACK_*): nothing
 *                       changed; the exact Python path must run.
 *
 * Nothing is written before everything was read and checked, so a fall-back
 * leaves the rings and memory as they were.  The writes then follow the
 * Python path's order (transmit used ring, receive buffers, receive used
 * ring); where that order or the Python path's later reads could tell the
 * two apart (rings that share a page with what is written before them), it
 * falls back too. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PAGE_SHIFT 12
#define PAGE_SIZE (1ull << PAGE_SHIFT)
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define NET_HDR_LEN 12
#define MAX_BURST 256
#define MAX_FRAME 65536            /* longer buffers: the Python path */
#define MAX_MISSES 64
#define MAX_PAGES (2 * MAX_BURST + 8) /* pieces of what is written remembered for the overlap checks */

enum {
    FALLBACK_INDEX = 1,            /* the available index moved more than the queue size */
    FALLBACK_BURST,                /* more than the backend takes, or a whole ring at once */
    FALLBACK_HEAD,                 /* a head out of range */
    FALLBACK_CHAIN,                /* chained, indirect or wrongly directed descriptors */
    FALLBACK_LENGTH,               /* a buffer too short, too long, or not fitting its frame */
    FALLBACK_RX_ROOM,              /* fewer receive buffers than frames */
    FALLBACK_INTERRUPT,            /* an interrupt is due */
    FALLBACK_OVERLAP,              /* rings sharing a page with what is written before them */
    FALLBACK_RANGE,                /* a range past the end of the bus address space */
};

typedef struct {
    const uint64_t *keys, *rd, *wr;
    uint64_t mask;
    int bits;
    uint64_t last_page[2];                  /* the page last found, per direction (+1; 0: none) */
    uint8_t *last_addr[2];
} table_t;

typedef struct {
    unsigned long long desc, avail, used;
    unsigned int num, last_avail, used_idx;
    int check_irq;
} queue_t;

typedef struct {
    unsigned long long iova[MAX_MISSES];
    int write[MAX_MISSES];
    int n;
} misses_t;

static uint8_t *page_of(table_t *t, uint64_t page, int write)
{
    if (t->last_page[write] == page + 1)
        return t->last_addr[write];
    uint64_t h = (page * 0x9E3779B97F4A7C15ull) >> (64 - t->bits);
    for (;;) {
        uint64_t k = t->keys[h];
        if (!k)
            return NULL;
        if (k == page + 1) {
            uint8_t *a = (uint8_t *)(uintptr_t)(write ? t->wr[h] : t->rd[h]);
            if (a) {
                t->last_page[write] = page + 1;
                t->last_addr[write] = a;
            }
            return a;
        }
        h = (h + 1) & t->mask;
    }
}

static void miss(misses_t *m, uint64_t page, int write)
{
    uint64_t iova = page << PAGE_SHIFT;
    for (int i = 0; i < m->n; i++)
        if (m->iova[i] == iova && m->write[i] == write)
            return;
    if (m->n < MAX_MISSES) {
        m->iova[m->n] = iova;
        m->write[m->n++] = write;
    }
}

/* 0 if every page of [iova, iova+len) is in the table for that direction,
 * else the pages missing are noted and 1; -1 past the end of the address space. */
static int check(table_t *t, uint64_t iova, uint64_t len, int write, misses_t *m)
{
    if (!len)
        return 0;
    if (iova + len - 1 < iova)
        return -1;
    int missing = 0;
    for (uint64_t p = iova >> PAGE_SHIFT; p <= (iova + len - 1) >> PAGE_SHIFT; p++) {
        if (!page_of(t, p, write)) {
            miss(m, p, write);
            missing = 1;
        }
    }
    return missing;
}

/* Copies for ranges check() accepted. */
static void copy_from(table_t *t, uint64_t iova, uint64_t len, uint8_t *dst)
{
    while (len) {
        uint64_t off = iova & (PAGE_SIZE - 1), n = PAGE_SIZE - off;
        if (n > len)
            n = len;
        memcpy(dst, page_of(t, iova >> PAGE_SHIFT, 0) + off, n);
        dst += n;
        iova += n;
        len -= n;
    }
}

static void copy_to(table_t *t, uint64_t iova, const uint8_t *src, uint64_t len)
{
    while (len) {
        uint64_t off = iova & (PAGE_SIZE - 1), n = PAGE_SIZE - off;
        if (n > len)
            n = len;
        memcpy(page_of(t, iova >> PAGE_SHIFT, 1) + off, src, n);
        src += n;
        iova += n;
        len -= n;
    }
}

/* The bytes a write will reach (host addresses, page piece by page piece),
 * remembered to check later reads against. */
typedef struct {
    uintptr_t start[MAX_PAGES], end[MAX_PAGES];
    int n, full;
} pages_t;

static void note_pages(pages_t *w, table_t *t, uint64_t iova, uint64_t len)
{
    while (len) {
        uint64_t off = iova & (PAGE_SIZE - 1), n = PAGE_SIZE - off;
        if (n > len)
            n = len;
        if (w->n == MAX_PAGES) {
            w->full = 1;
            return;
        }
        w->start[w->n] = (uintptr_t)page_of(t, iova >> PAGE_SHIFT, 1) + off;
        w->end[w->n] = w->start[w->n] + n;
        w->n++;
        iova += n;
        len -= n;
    }
}

/* Whether a read of [iova, iova+len) reaches bytes of ``w``. */
static int hits(const pages_t *w, table_t *t, uint64_t iova, uint64_t len)
{
    if (w->full)
        return 1;
    while (len) {
        uint64_t off = iova & (PAGE_SIZE - 1), n = PAGE_SIZE - off;
        if (n > len)
            n = len;
        uintptr_t a = (uintptr_t)page_of(t, iova >> PAGE_SHIFT, 0) + off;
        for (int i = 0; i < w->n; i++)
            if (a < w->end[i] && w->start[i] < a + n)
                return 1;
        iova += n;
        len -= n;
    }
    return 0;
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }
static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v & 0xFFFF); put16(p + 2, v >> 16); }

typedef struct {
    uint16_t flags, idx, n;                 /* the available ring's flags and index; chains taken */
    uint16_t head[MAX_BURST];
    uint64_t addr[MAX_BURST];
    uint32_t len[MAX_BURST];
} side_t;

/* The available ring's ranges holding entries [start, start+n) of a ring of num. */
static int ring_ranges(uint64_t base, unsigned int start, unsigned int n, unsigned int num, unsigned int esize,
                       uint64_t off, uint64_t iova[2], uint64_t len[2])
{
    unsigned int first = n < num - start ? n : num - start;
    iova[0] = base + off + (uint64_t)esize * start;
    len[0] = (uint64_t)esize * first;
    iova[1] = base + off;
    len[1] = (uint64_t)esize * (n - first);
    return first < n ? 2 : 1;
}

/* Take up to ``want`` (0: all there are, at most ``limit``) chains of one
 * queue, every one a single descriptor with flags ``flags``.  0 done, 1 misses
 * (noted), else a FALLBACK_*. */
static int take(table_t *t, const queue_t *q, side_t *s, unsigned int want, unsigned int limit,
                uint16_t flags, misses_t *m)
{
    int r = check(t, q->avail, 4, 0, m);
    if (r)
        return r < 0 ? FALLBACK_RANGE : 1;
    uint8_t hdr[4];
    copy_from(t, q->avail, 4, hdr);
    s->flags = le16(hdr);
    s->idx = le16(hdr + 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);        /* the entries after the index */
    unsigned int avail = (uint16_t)(s->idx - q->last_avail);
    if (avail > q->num)
        return FALLBACK_INDEX;
    if (q->check_irq && !(s->flags & AVAIL_F_NO_INTERRUPT))
        return FALLBACK_INTERRUPT;
    if (want) {
        if (avail < want)
            return FALLBACK_RX_ROOM;
        avail = want;
    } else if (avail > limit || avail >= MAX_BURST) {
        return FALLBACK_BURST;
    }
    s->n = (uint16_t)avail;
    if (!avail)
        return 0;
    uint64_t iova[2], len[2];
    int k = ring_ranges(q->avail, q->last_avail % q->num, avail, q->num, 2, 4, iova, len);
    int missing = 0;
    for (int i = 0; i < k; i++) {
        r = check(t, iova[i], len[i], 0, m);
        if (r < 0)
            return FALLBACK_RANGE;
        missing |= r;
    }
    if (missing)
        return 1;
    uint8_t raw[2 * MAX_BURST];
    copy_from(t, iova[0], len[0], raw);
    if (k == 2)
        copy_from(t, iova[1], len[1], raw + len[0]);
    for (unsigned int i = 0; i < avail; i++) {
        s->head[i] = le16(raw + 2 * i);
        if (s->head[i] >= q->num)
            return FALLBACK_HEAD;
        r = check(t, q->desc + 16ull * s->head[i], 16, 0, m);
        if (r < 0)
            return FALLBACK_RANGE;
        missing |= r;
    }
    if (missing)
        return 1;
    for (unsigned int i = 0; i < avail; i++) {
        uint8_t d[16];
        copy_from(t, q->desc + 16ull * s->head[i], 16, d);
        if (le16(d + 12) != flags)
            return FALLBACK_CHAIN;
        s->addr[i] = le64(d);
        s->len[i] = le32(d + 8);
    }
    return 0;
}

static int parse_queue(PyObject *o, queue_t *q)
{
    if (!PyArg_ParseTuple(o, "KKKIIIp", &q->desc, &q->avail, &q->used, &q->num, &q->last_avail, &q->used_idx,
                          &q->check_irq))
        return -1;
    if (!q->num || q->num > 32768 || q->num & (q->num - 1) || q->last_avail > 0xFFFF || q->used_idx > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "queue size a power of 2 up to 32768, indices 16-bit");
        return -1;
    }
    return 0;
}

static PyObject *misses_list(const misses_t *m)
{
    PyObject *out = PyList_New(m->n);
    for (int i = 0; out && i < m->n; i++) {
        PyObject *e = Py_BuildValue("(KO)", m->iova[i], m->write[i] ? Py_True : Py_False);
        if (!e) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, e);
    }
    return out;
}

/* The used ring's entries [used_idx, used_idx+n) and its index, as ranges. */
static int used_ranges(const queue_t *q, unsigned int n, uint64_t iova[3], uint64_t len[3])
{
    int k = ring_ranges(q->used, q->used_idx % q->num, n, q->num, 8, 4, iova, len);
    iova[k] = q->used + 2;
    len[k] = 2;
    return k + 1;
}

static void publish(table_t *t, const queue_t *q, const side_t *s, const uint32_t *written)
{
    uint8_t elems[8 * MAX_BURST];
    for (unsigned int i = 0; i < s->n; i++) {
        put32(elems + 8 * i, s->head[i]);
        put32(elems + 8 * i + 4, written ? written[i] : 0);
    }
    uint64_t iova[3], len[3];
    int k = used_ranges(q, s->n, iova, len);
    copy_to(t, iova[0], elems, len[0]);
    if (k == 3)
        copy_to(t, iova[1], elems + len[0], len[1]);
    uint8_t idx[2];
    put16(idx, (q->used_idx + s->n) & 0xFFFF);
    __atomic_thread_fence(__ATOMIC_RELEASE);        /* the entries before the index */
    copy_to(t, iova[k - 1], idx, 2);
}

static PyObject *py_loopback_burst(PyObject *self, PyObject *args)
{
    PyObject *txo, *rxo, *result = NULL;
    Py_buffer kb = {0}, rb = {0}, wb = {0}, hb = {0};
    unsigned int limit;
    queue_t tx, rx;
    side_t ts, rs;
    if (!PyArg_ParseTuple(args, "OOy*y*y*Iy*", &txo, &rxo, &kb, &rb, &wb, &limit, &hb))
        return NULL;
    if (parse_queue(txo, &tx) < 0 || parse_queue(rxo, &rx) < 0)
        goto out;
    Py_ssize_t slots = kb.len / 8;
    if (slots < 2 || slots & (slots - 1) || rb.len != kb.len || wb.len != kb.len || hb.len != NET_HDR_LEN) {
        PyErr_SetString(PyExc_ValueError, "keys/rd/wr: equal uint64 arrays of a power of 2 > 1; a 12-byte header");
        goto out;
    }
    table_t t = {kb.buf, rb.buf, wb.buf, (uint64_t)slots - 1, 0, {0, 0}, {NULL, NULL}};
    while ((1ll << t.bits) < slots)
        t.bits++;
    misses_t m = {.n = 0};

    int r = take(&t, &tx, &ts, 0, limit, 0, &m);
    if (r == 0 && ts.n == 0) {
        result = Py_BuildValue("(iOO)", 0, Py_None, Py_None);
        goto out;
    }
    if (r == 0) {
        int missing = 0;
        for (unsigned int i = 0; i < ts.n; i++) {
            if (ts.len[i] < NET_HDR_LEN || ts.len[i] > MAX_FRAME) {
                r = FALLBACK_LENGTH;
                break;
            }
            int c = check(&t, ts.addr[i], ts.len[i], 0, &m);
            if (c < 0) {
                r = FALLBACK_RANGE;
                break;
            }
            missing |= c;
        }
        if (!r && missing)
            r = 1;
    }
    if (r == 0)
        r = take(&t, &rx, &rs, ts.n, 0, DESC_F_WRITE, &m);
    if (r == 0) {
        int missing = 0;
        for (unsigned int i = 0; i < rs.n; i++) {
            if (rs.len[i] < ts.len[i]) {             /* header + frame must fit one buffer */
                r = FALLBACK_LENGTH;
                break;
            }
            int c = check(&t, rs.addr[i], ts.len[i], 1, &m);
            if (c < 0) {
                r = FALLBACK_RANGE;
                break;
            }
            missing |= c;
        }
        uint64_t iova[3], len[3];
        for (int qi = 0; qi < 2 && !r; qi++) {
            int k = used_ranges(qi ? &rx : &tx, ts.n, iova, len);
            for (int i = 0; i < k; i++) {
                int c = check(&t, iova[i], len[i], 1, &m);
                if (c < 0) {
                    r = FALLBACK_RANGE;
                    break;
                }
                missing |= c;
            }
        }
        if (!r && missing)
            r = 1;
    }
    if (r == 1) {
        result = misses_list(&m);
        goto out;
    }
    if (r) {
        result = PyLong_FromLong(r);
        goto out;
    }

    /* Everything is readable and writable.  What the Python path writes
     * before it reads: the transmit used ring, before the receive queue's
     * rings (and the transmit queue's flags, when an interrupt may be due);
     * the receive buffers and used ring, before the receive queue's flags. */
    pages_t w = {.n = 0, .full = 0};
    uint64_t iova[3], len[3];
    int k = used_ranges(&tx, ts.n, iova, len);
    for (int i = 0; i < k; i++)
        note_pages(&w, &t, iova[i], len[i]);
    int hazard = hits(&w, &t, rx.avail, 4) || (tx.check_irq && hits(&w, &t, tx.avail, 4));
    k = ring_ranges(rx.avail, rx.last_avail % rx.num, rs.n, rx.num, 2, 4, iova, len);
    for (int i = 0; i < k && !hazard; i++)
        hazard = hits(&w, &t, iova[i], len[i]);
    for (unsigned int i = 0; i < rs.n && !hazard; i++)
        hazard = hits(&w, &t, rx.desc + 16ull * rs.head[i], 16);
    if (!hazard && rx.check_irq) {
        pages_t w2 = {.n = 0, .full = 0};
        k = used_ranges(&rx, rs.n, iova, len);
        for (int i = 0; i < k; i++)
            note_pages(&w2, &t, iova[i], len[i]);
        for (unsigned int i = 0; i < rs.n && !w2.full; i++)
            note_pages(&w2, &t, rs.addr[i], ts.len[i]);
        hazard = hits(&w2, &t, rx.avail, 4);
    }
    if (hazard) {
        result = PyLong_FromLong(FALLBACK_OVERLAP);
        goto out;
    }

    Py_ssize_t total = 0;
    for (unsigned int i = 0; i < ts.n; i++)
        total += ts.len[i];
    PyObject *frames = PyByteArray_FromStringAndSize(NULL, total);
    PyObject *lens = PyList_New(ts.n);
    if (!frames || !lens) {
        Py_XDECREF(frames);
        Py_XDECREF(lens);
        goto out;
    }
    uint8_t *at = (uint8_t *)PyByteArray_AS_STRING(frames);
    uint32_t written[MAX_BURST];
    for (unsigned int i = 0; i < ts.n; i++) {
        memcpy(at, hb.buf, NET_HDR_LEN);
        copy_from(&t, ts.addr[i] + NET_HDR_LEN, ts.len[i] - NET_HDR_LEN, at + NET_HDR_LEN);
        at += ts.len[i];
        written[i] = ts.len[i];
        PyList_SET_ITEM(lens, i, PyLong_FromUnsignedLong(ts.len[i] - NET_HDR_LEN));
    }
    publish(&t, &tx, &ts, NULL);
    at = (uint8_t *)PyByteArray_AS_STRING(frames);
    for (unsigned int i = 0; i < rs.n; i++) {
        copy_to(&t, rs.addr[i], at, ts.len[i]);
        at += ts.len[i];
    }
    publish(&t, &rx, &rs, written);
    result = Py_BuildValue("(INN)", (unsigned int)ts.n, frames, lens);
out:
    if (kb.obj) PyBuffer_Release(&kb);
    if (rb.obj) PyBuffer_Release(&rb);
    if (wb.obj) PyBuffer_Release(&wb);
    if (hb.obj) PyBuffer_Release(&hb);
    return result;
}

static PyMethodDef methods[] = {
    {"loopback_burst", py_loopback_burst, METH_VARARGS,
     "loopback_burst(tx, rx, keys, rd, wr, limit, rx_header): a transmit notification through the loopback"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_vring", "virtio-net's native burst path (_vring.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__vring(void)
{
    PyObject *mod = PyModule_Create(&moduledef);
    if (!mod)
        return NULL;
    PyModule_AddIntConstant(mod, "PAGE_SHIFT", PAGE_SHIFT);
    PyModule_AddIntConstant(mod, "MAX_BURST", MAX_BURST);
    return mod;
}
