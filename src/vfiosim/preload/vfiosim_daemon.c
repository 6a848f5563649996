/*
 * vfiosim_daemon.c -- the daemon's side of the shared-memory channel, in C.
 *
 * Loaded by src/vfiosim/transport/native.py with ctypes (which releases the
 * GIL around every call, so a thread waiting here for its program's next
 * request does not hold up the others).  What is here is what Python cannot
 * do cheaply or at all:
 *
 *  - waiting on a channel: spin briefly, then sleep with futex(2); publishing
 *    a reply and waking the program (vfiosim_protocol.h describes the channel);
 *    copying a request out of shared memory before anything looks at it, so a
 *    program cannot change it under the daemon's feet;
 *  - a program's credentials in three system calls (PIDFD_GET_INFO, capget,
 *    prlimit), cheap enough to check before every call;
 *  - copy_from_user/copy_to_user through a /proc/<pid>/mem fd bound to the
 *    program's address space, honouring the protection PROCMAP_QUERY reports
 *    for each mapping, as the kernel's uaccess does;
 *  - acting with a program's credentials: raw setresuid/setresgid/setgroups
 *    change this thread's credentials only (glibc's would change every
 *    thread's), so the host kernel itself checks what the daemon opens for
 *    the program.
 *
 * Written for x86-64 Linux.  Depends only on libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vfiosim_protocol.h"

#define EXPORT __attribute__((visibility("default")))

/* ---------------------------------------------------------------- credentials */

struct pidfd_info {                  /* <linux/pidfd.h>, Linux 6.13 (PIDFD_INFO_SIZE_VER0) */
    uint64_t mask, cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid, spare0;
};
#define PIDFD_INFO_CREDS (1ull << 1)
#define PIDFD_GET_INFO _IOWR(0xFF, 11, struct pidfd_info)

struct vd_creds {
    uint32_t ruid, euid, suid, fsuid, rgid, egid, sgid, fsgid;
    uint64_t cap_eff, cap_prm, memlock_cur, memlock_max;
};

struct cap_header {
    uint32_t version;
    int pid;
};
struct cap_data {
    uint32_t effective, permitted, inheritable;
};

/*
 * The credentials of process `pid` (whose pidfd is `pidfd`), in three system
 * calls.  0, or -errno: -ESRCH if it is gone, -ENOTTY if the kernel has no
 * PIDFD_GET_INFO (before 6.13: read /proc/<pid>/status instead).  The pidfd
 * is asked last: if it still answers, the pid was not reused in between.
 */
EXPORT int vd_creds(int pidfd, int pid, struct vd_creds *out)
{
    struct cap_header h = {0x20080522, pid}; /* _LINUX_CAPABILITY_VERSION_3 */
    struct cap_data d[2];
    if (syscall(SYS_capget, &h, d) < 0)
        return -errno;
    out->cap_eff = d[0].effective | (uint64_t)d[1].effective << 32;
    out->cap_prm = d[0].permitted | (uint64_t)d[1].permitted << 32;
    struct rlimit rl;
    if (syscall(SYS_prlimit64, pid, RLIMIT_MEMLOCK, NULL, &rl) < 0)
        return -errno;
    out->memlock_cur = rl.rlim_cur;
    out->memlock_max = rl.rlim_max;
    struct pidfd_info info;
    memset(&info, 0, sizeof info);
    info.mask = PIDFD_INFO_CREDS;
    if (ioctl(pidfd, PIDFD_GET_INFO, &info) < 0)
        return errno == EINVAL || errno == ENOTTY ? -ENOTTY : -errno;
    out->ruid = info.ruid;
    out->euid = info.euid;
    out->suid = info.suid;
    out->fsuid = info.fsuid;
    out->rgid = info.rgid;
    out->egid = info.egid;
    out->sgid = info.sgid;
    out->fsgid = info.fsgid;
    return 0;
}

/* ---------------------------------------------------------------- the channel */

static inline uint32_t load_acq(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* A new request.  Posted stores alone wake nobody: they are performed, in a
 * batch, before the next request or when the wait times out, instead of
 * costing the daemon a Python call while the program goes on posting. */
static inline int pending(struct vchan *ch, uint32_t last)
{
    return load_acq(&ch->prog.req_seq) != last;
}

/* How long to spin before sleeping: twice what the program took to come back
 * lately when spinning caught it, halved whenever it did not (on a busy
 * machine, where the program is seldom back in time, the thread sleeps at
 * once instead of taking a CPU the program needs). */
#define SPIN_MIN_NS 2000u
#define SPIN_MAX_NS 100000u

static void spin_caught(uint32_t *budget, uint64_t took_ns)
{
    uint64_t want = 2 * took_ns + SPIN_MIN_NS, b = *budget;
    b = (7 * b + (want > SPIN_MAX_NS ? SPIN_MAX_NS : want)) / 8;
    *budget = (uint32_t)(b < SPIN_MIN_NS ? SPIN_MIN_NS : b);
}

static void spin_missed(uint32_t *budget)
{
    *budget = *budget / 2 < SPIN_MIN_NS ? SPIN_MIN_NS : *budget / 2;
}

/*
 * Wait until the program has posted a request after `last`, `*stop` is set,
 * or `timeout_ms` passed.  Spins for up to
 * `*budget` ns first (and adapts it).  Returns 1 (something to do), 0
 * (timeout) or -1 (stop).  The request itself is copied out by
 * vd_take_request().
 */
EXPORT int vd_wait(struct vchan *ch, uint32_t last, const volatile uint32_t *stop, uint32_t *budget,
                   int timeout_ms)
{
    uint64_t start = now_ns(), spin = *budget;
    for (unsigned i = 0;; i++) {
        if (*stop)
            return -1;
        if (pending(ch, last)) {
            spin_caught(budget, now_ns() - start);
            return 1;
        }
        if ((i & 15) == 15 && now_ns() - start >= spin)
            break;
        __builtin_ia32_pause();
    }
    spin_missed(budget);
    uint64_t end = start + (uint64_t)timeout_ms * 1000000u;
    for (;;) {
        __atomic_store_n(&ch->daemon.daemon_waiting, 1, __ATOMIC_SEQ_CST);
        if (*stop || pending(ch, last)) {
            __atomic_store_n(&ch->daemon.daemon_waiting, 0, __ATOMIC_RELAXED);
            return *stop ? -1 : 1;
        }
        uint64_t t = now_ns();
        if (t >= end) {
            __atomic_store_n(&ch->daemon.daemon_waiting, 0, __ATOMIC_RELAXED);
            return 0;
        }
        uint64_t left = end - t;
        struct timespec ts = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
        futex(&ch->prog.req_seq, FUTEX_WAIT, last, &ts);
        __atomic_store_n(&ch->daemon.daemon_waiting, 0, __ATOMIC_RELAXED);
        if (*stop)
            return -1;
        if (pending(ch, last))
            return 1;
    }
}

/* Copy the request (header, then `len` bytes of payload, clamped) out of the
 * channel into `out` (sizeof(struct vreq) + VMAX_PAYLOAD bytes); returns the
 * request's sequence number. */
EXPORT uint32_t vd_take_request(struct vchan *ch, uint8_t *out)
{
    uint32_t seq = load_acq(&ch->prog.req_seq);
    struct vreq rq;
    memcpy(&rq, (const void *)&ch->req, sizeof rq);
    uint32_t len = rq.len;
    memcpy(out, &rq, sizeof rq);
    memcpy(out + sizeof rq, (const void *)ch->req_payload, len > VMAX_PAYLOAD ? VMAX_PAYLOAD : len);
    return seq;
}

/* Publish a reply (header and payload, `len` bytes in all) for request `seq`, and wake the program. */
EXPORT void vd_reply(struct vchan *ch, uint32_t seq, const uint8_t *rep, uint32_t len)
{
    if (len > sizeof(struct vrep) + sizeof ch->rep_payload)
        len = sizeof(struct vrep) + sizeof ch->rep_payload;
    memcpy((void *)&ch->rep, rep, len < sizeof(struct vrep) ? len : sizeof(struct vrep));
    if (len > sizeof(struct vrep))
        memcpy((void *)ch->rep_payload, rep + sizeof(struct vrep), len - sizeof(struct vrep));
    __atomic_store_n(&ch->daemon.rep_seq, seq, __ATOMIC_SEQ_CST);
    if (load_acq(&ch->prog.prog_waiting))
        futex(&ch->daemon.rep_seq, FUTEX_WAKE, 1, NULL);
}

/* Wake the daemon thread that waits on this channel (its stop flag is set). */
EXPORT void vd_wake(struct vchan *ch)
{
    futex(&ch->prog.req_seq, FUTEX_WAKE, 1, NULL);
}

/* Copy out up to `max` posted stores, oldest first, and consume them.
 * Returns how many, or -1 if the program's ring head is impossible. */
EXPORT int vd_take_posts(struct vchan *ch, struct vpost *out, int max)
{
    uint32_t head = load_acq(&ch->prog.ring_head);
    uint32_t tail = ch->daemon.ring_tail;
    uint32_t n = head - tail;
    if (n > VRING)
        return -1;
    if (n > (uint32_t)max)
        n = (uint32_t)max;
    for (uint32_t i = 0; i < n; i++)
        memcpy(&out[i], (const void *)&ch->ring[(tail + i) % VRING], sizeof *out);
    __atomic_store_n(&ch->daemon.ring_tail, tail + n, __ATOMIC_RELEASE);
    return (int)n;
}

/* One connection's serving state, owned by its thread (transport/native.py). */
struct vd_session {
    struct vchan *ch;
    uint32_t stop;                   /* set by another thread to end the wait */
    uint32_t budget;                 /* ns to spin before sleeping (learnt) */
    uint32_t seq;                    /* the last request taken */
    int32_t pidfd, pid;              /* whose credentials to check before each request (pidfd < 0: none) */
    uint32_t flags;                  /* out: VD_* */
    int32_t creds_errno;             /* out, with VD_CREDS_ERROR */
    uint32_t pad;
    struct vd_creds creds;           /* the last credentials seen */
    uint8_t req[sizeof(struct vreq) + VMAX_PAYLOAD];   /* out: the request, copied out of the channel */
};
#define VD_CREDS_CHANGED 1u
#define VD_CREDS_ERROR 2u
#define VD_POSTS 4u

/*
 * Publish the reply to the last request (if `replen`), then wait for the next
 * one: 1 when a request was copied into s->req (with s->flags saying whether
 * the program's credentials changed and whether stores were posted before it),
 * 2 when only posted stores wait, 0 on timeout, -1 when stopped.  One foreign
 * call per request: the hot path of the daemon.
 */
EXPORT int vd_next(struct vd_session *s, const uint8_t *rep, uint32_t replen, int timeout_ms)
{
    struct vchan *ch = s->ch;
    if (replen)
        vd_reply(ch, s->seq, rep, replen);
    int r = vd_wait(ch, s->seq, &s->stop, &s->budget, timeout_ms);
    if (r != 1)
        return r;
    uint32_t flags = 0;
    if (load_acq(&ch->prog.ring_head) != ch->daemon.ring_tail)
        flags |= VD_POSTS;
    if (load_acq(&ch->prog.req_seq) == s->seq) {
        s->flags = flags;
        return 2;
    }
    s->seq = vd_take_request(ch, s->req);
    if (s->pidfd >= 0) {
        struct vd_creds c;
        int e = vd_creds(s->pidfd, s->pid, &c);
        if (e < 0) {
            flags |= VD_CREDS_ERROR;
            s->creds_errno = -e;
        } else if (memcmp(&c, &s->creds, sizeof c)) {
            s->creds = c;
            flags |= VD_CREDS_CHANGED;
        }
    }
    s->flags = flags;
    return 1;
}

/* ---------------------------------------------------------------- acting as the program */

/* This thread takes uid/gid (real, effective, saved-for-gid, filesystem) and
 * supplementary groups; the saved uid stays 0 so that vd_as_root() can come
 * back.  Leaving euid 0 clears the effective capabilities, so the kernel checks
 * what the thread does as it would for the program.  Needs CAP_SETUID/SETGID. */
EXPORT int vd_as_user(uint32_t uid, uint32_t gid, int ngroups, const uint32_t *groups)
{
    if (syscall(SYS_setgroups, (size_t)ngroups, groups) < 0)
        return -errno;
    if (syscall(SYS_setresgid, gid, gid, gid) < 0)
        return -errno;
    if (syscall(SYS_setresuid, uid, uid, 0) < 0)
        return -errno;
    return 0;
}

/* Back to root, with these supplementary groups. */
EXPORT int vd_as_root(uint32_t gid, int ngroups, const uint32_t *groups)
{
    if (syscall(SYS_setresuid, 0, 0, 0) < 0)
        return -errno;
    if (syscall(SYS_setresgid, gid, gid, gid) < 0)
        return -errno;
    if (syscall(SYS_setgroups, (size_t)ngroups, groups) < 0)
        return -errno;
    return 0;
}

EXPORT int vd_kcmp_file(int pid1, int pid2, int fd1, int fd2)
{
    long r = syscall(SYS_kcmp, pid1, pid2, 0 /* KCMP_FILE */, fd1, fd2);
    return r < 0 ? -errno : (int)r;
}

EXPORT int vd_pidfd_getfd(int pidfd, int fd)
{
    long r = syscall(438 /* SYS_pidfd_getfd */, pidfd, fd, 0);
    return r < 0 ? -errno : (int)r;
}

/* ---------------------------------------------------------------- a program's memory */

struct procmap_query {               /* <linux/fs.h>, Linux 6.11 */
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PROCMAP_QUERY_VMA_READABLE 0x01
#define PROCMAP_QUERY_VMA_WRITABLE 0x02
#define PROCMAP_QUERY_VMA_EXECUTABLE 0x04
#define PROCMAP_QUERY_VMA_SHARED 0x08
#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10

/* The mapping holding `addr` (or, with `or_next`, the first one after it):
 * out = {start, end, flags (PROCMAP_QUERY_VMA_*)}.  0, -ENOENT (none), -ENOTTY
 * (no PROCMAP_QUERY: before Linux 6.11), -ESRCH (the address space is gone). */
EXPORT int vd_vma(int maps_fd, uint64_t addr, int or_next, uint64_t *out)
{
    struct procmap_query q;
    memset(&q, 0, sizeof q);
    q.size = sizeof q;
    q.query_addr = addr;
    q.query_flags = or_next ? PROCMAP_QUERY_COVERING_OR_NEXT_VMA : 0;
    if (ioctl(maps_fd, PROCMAP_QUERY, &q) < 0)
        return errno == ENOTTY || errno == EINVAL ? -ENOTTY : -errno;
    out[0] = q.vma_start;
    out[1] = q.vma_end;
    out[2] = q.vma_flags;
    return 0;
}

/* Every byte of [addr, addr + n) in mappings with one of the `need` accesses
 * (the kernel's uaccess reads any accessible x86 mapping: write implies read). */
static int check_access(int maps_fd, uint64_t addr, uint64_t n, uint64_t need)
{
    uint64_t end = addr + n, vma[3];
    if (end < addr)
        return -EFAULT;
    while (addr < end) {
        int r = vd_vma(maps_fd, addr, 0, vma);
        if (r == -ENOENT || r == -ESRCH)
            return -EFAULT;
        if (r < 0)
            return r;
        if (!(vma[2] & need))
            return -EFAULT;
        addr = vma[1];
    }
    return 0;
}

static int mem_rw(int mem_fd, uint64_t addr, uint64_t n, void *buf, int write)
{
    if (addr > INT64_MAX || n > INT64_MAX - addr)
        return -EFAULT;
    uint64_t done = 0;
    while (done < n) {
        ssize_t r = write ? pwrite(mem_fd, (const uint8_t *)buf + done, n - done, (off_t)(addr + done))
                          : pread(mem_fd, (uint8_t *)buf + done, n - done, (off_t)(addr + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -EFAULT;      /* unmapped, or the address space is gone (exec, exit) */
        done += (uint64_t)r;
    }
    return 0;
}

/* copy_from_user(): -EFAULT unless all of it is mapped readable. */
EXPORT int vd_uread(int maps_fd, int mem_fd, uint64_t addr, uint64_t n, void *buf)
{
    if (n == 0)
        return 0;
    int r = check_access(maps_fd, addr, n, PROCMAP_QUERY_VMA_READABLE | PROCMAP_QUERY_VMA_WRITABLE);
    return r < 0 ? r : mem_rw(mem_fd, addr, n, buf, 0);
}

/* copy_to_user(): -EFAULT unless all of it is mapped writable. */
EXPORT int vd_uwrite(int maps_fd, int mem_fd, uint64_t addr, uint64_t n, const void *buf)
{
    if (n == 0)
        return 0;
    int r = check_access(maps_fd, addr, n, PROCMAP_QUERY_VMA_WRITABLE);
    return r < 0 ? r : mem_rw(mem_fd, addr, n, (void *)buf, 1);
}

/* A device's DMA: reaches the pages whatever the CPU's protection is now. */
EXPORT int vd_dma(int mem_fd, uint64_t addr, uint64_t n, void *buf, int write)
{
    return mem_rw(mem_fd, addr, n, buf, write);
}

/* Several DMA transfers (a NIC's burst): `n` ranges, their data one after the
 * other in `buf`. */
EXPORT int vd_dma_many(int mem_fd, int n, const uint64_t *addrs, const uint64_t *lens, uint8_t *buf, int write)
{
    uint64_t at = 0;
    for (int i = 0; i < n; i++) {
        int r = mem_rw(mem_fd, addrs[i], lens[i], buf + at, write);
        if (r < 0)
            return r;
        at += lens[i];
    }
    return 0;
}
