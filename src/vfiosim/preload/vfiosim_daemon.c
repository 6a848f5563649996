/*
 * vfiosim_daemon.c -- the daemon's side of the shared-memory channel, in C:
 * the CPython extension module vfiosim.preload._vfiosim_daemon, used by
 * src/vfiosim/transport/native.py.  What is here is what Python cannot do
 * cheaply or at all:
 *
 *  - serving a channel (vfiosim_protocol.h describes it): publishing a reply,
 *    waking the program, waiting for the next request -- spinning while the
 *    program is calling back to back, sleeping with futex(2) otherwise -- and
 *    copying the request out of shared memory before anything looks at it, so
 *    a program cannot change it under the daemon's feet.  One call per
 *    request, the GIL released while waiting: the hot path of the daemon;
 *  - a program's credentials in three system calls (PIDFD_GET_INFO, capget,
 *    prlimit), cheap enough to take at every privileged decision;
 *  - copy_from_user/copy_to_user through a /proc/<pid>/mem fd bound to the
 *    program's address space, honouring the protection PROCMAP_QUERY reports
 *    for each mapping, as the kernel's uaccess does; a device's DMA through
 *    the same fd;
 *  - a program's shared memory file, mapped into the daemon where a pin was
 *    taken, and a device's DMA copied to and from it (file mappings below);
 *  - acting with a program's credentials: raw setresuid/setresgid/setgroups
 *    change this thread's credentials only (glibc's would change every
 *    thread's), so the host kernel itself checks what the daemon opens for
 *    the program.
 *
 * Written for x86-64 Linux.  Depends on libc and the Python C API only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vfiosim_protocol.h"
#include "vfiosim_procmap.h"

/* ---------------------------------------------------------------- credentials */

struct pidfd_info {                  /* <linux/pidfd.h>, Linux 6.13 (PIDFD_INFO_SIZE_VER0) */
    uint64_t mask, cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid, spare0;
};
#define PIDFD_INFO_CREDS (1ull << 1)
#define PIDFD_GET_INFO _IOWR(0xFF, 11, struct pidfd_info)

struct cap_header {
    uint32_t version;
    int pid;
};
struct cap_data {
    uint32_t effective, permitted, inheritable;
};

/* (ruid, euid, suid, fsuid, rgid, egid, sgid, fsgid, cap_eff, cap_prm, memlock_cur, memlock_max) */
#define NCREDS 12

/*
 * The credentials of process `pid` (whose pidfd is `pidfd`), in three system
 * calls.  0, or -errno: -ESRCH if it is gone, -ENOTTY if the kernel has no
 * PIDFD_GET_INFO (before 6.13: read /proc/<pid>/status instead).  The pidfd
 * is asked last: if it still answers, the pid was not reused in between.
 */
static int read_creds(int pidfd, int pid, uint64_t *out)
{
    struct cap_header h = {0x20080522, pid}; /* _LINUX_CAPABILITY_VERSION_3 */
    struct cap_data d[2];
    if (syscall(SYS_capget, &h, d) < 0)
        return -errno;
    out[8] = d[0].effective | (uint64_t)d[1].effective << 32;
    out[9] = d[0].permitted | (uint64_t)d[1].permitted << 32;
    struct rlimit rl;
    if (syscall(SYS_prlimit64, pid, RLIMIT_MEMLOCK, NULL, &rl) < 0)
        return -errno;
    out[10] = rl.rlim_cur;
    out[11] = rl.rlim_max;
    struct pidfd_info info;
    memset(&info, 0, sizeof info);
    info.mask = PIDFD_INFO_CREDS;
    if (ioctl(pidfd, PIDFD_GET_INFO, &info) < 0)
        return errno == EINVAL || errno == ENOTTY ? -ENOTTY : -errno;
    uint32_t ids[8] = {info.ruid, info.euid, info.suid, info.fsuid, info.rgid, info.egid, info.sgid, info.fsgid};
    for (int i = 0; i < 8; i++)
        out[i] = ids[i];
    return 0;
}

static PyObject *raise_errno(int err)
{
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *py_creds(PyObject *self, PyObject *args)
{
    int pidfd, pid, r;
    uint64_t c[NCREDS];
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &pid))
        return NULL;
    r = read_creds(pidfd, pid, c);              /* GIL held: see py_limits_same() */
    if (r < 0)
        return raise_errno(-r);
    PyObject *t = PyTuple_New(NCREDS);
    if (!t)
        return NULL;
    for (int i = 0; i < NCREDS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(c[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* ---------------------------------------------------------------- the limits of one process */

/* Whether pid's capabilities (what & 1: capget) and RLIMIT_MEMLOCK (what & 2:
 * prlimit) are still want[0..3] (cap_eff, cap_prm, memlock cur, max): 1, 0,
 * or -errno.  The GIL stays held through these short calls, as in creds()
 * and vma(): releasing and taking it again costs a fifth of a microsecond, as
 * much as half of one of them, and the caller holds the machine's lock, which
 * every other thread needs before it can do anything that needs the GIL for
 * long. */
static int limits_unchanged(int pid, const uint64_t want[4], int what)
{
    if (what & 1) {
        struct cap_header h = {0x20080522, pid};
        struct cap_data d[2];
        if (syscall(SYS_capget, &h, d) < 0)
            return -errno;
        if ((d[0].effective | (uint64_t)d[1].effective << 32) != want[0] ||
            (d[0].permitted | (uint64_t)d[1].permitted << 32) != want[1])
            return 0;                  /* (changed already: the caller takes everything) */
    }
    if (what & 2) {
        struct rlimit rl;
        if (syscall(SYS_prlimit64, pid, RLIMIT_MEMLOCK, NULL, &rl) < 0)
            return -errno;
        if ((uint64_t)rl.rlim_cur != want[2] || (uint64_t)rl.rlim_max != want[3])
            return 0;
    }
    return 1;
}

/* The capabilities and RLIMIT_MEMLOCK of a creds() tuple. */
static int limits_of(PyObject *creds, uint64_t want[4])
{
    if (!PyTuple_Check(creds) || PyTuple_GET_SIZE(creds) != NCREDS) {
        PyErr_SetString(PyExc_ValueError, "creds must be a creds() tuple");
        return -1;
    }
    for (int i = 0; i < 4; i++) {
        want[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(creds, 8 + i));
        if (want[i] == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/*
 * limits_same(pid, creds, what=3) -> bool: whether the process's capabilities
 * (what & 1: capget) and RLIMIT_MEMLOCK (what & 2: prlimit) are still those
 * of `creds` (a creds() tuple), one system call each -- what a decision that
 * consults nothing else needs to know: Type1's MAP_DMA asks for CAP_IPC_LOCK,
 * and for the limit only when the process lacks it, as the kernel reads it.
 * The ids are not read: a caller that finds something changed takes all of
 * creds() again, whose pidfd check also catches a pid reused meanwhile; one
 * that finds nothing changed keeps the process's own values.  OSError as
 * creds() raises it.
 */
static PyObject *py_limits_same(PyObject *self, PyObject *args)
{
    int pid, what = 3;
    PyObject *prev;
    uint64_t want[4];
    if (!PyArg_ParseTuple(args, "iO|i", &pid, &prev, &what) || limits_of(prev, want) < 0)
        return NULL;
    int r = limits_unchanged(pid, want, what);
    if (r < 0)
        return raise_errno(-r);
    return PyBool_FromLong(r);
}

/*
 * LimitsCheck(pid, creds, caps_part, memlock_part): limits_same() of one
 * process and the creds() tuple last taken of it, as the callable a kernel
 * Task calls (Task.limits_same) with the parts of its credentials that a
 * decision consults: check(part) looks at the capabilities if part &
 * caps_part, at RLIMIT_MEMLOCK if part & memlock_part.  True: unchanged.
 * False: changed, or unreadable (the process is gone): the caller takes
 * everything again, which says why.  One C call where a partial, a method
 * and the tuple's parsing were: every Type1 MAP_DMA makes it.
 */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int pid;
    long caps_part, memlock_part;
    uint64_t want[4];
} LimitsCheck;

static PyObject *limits_check_call(LimitsCheck *c, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames) {
        PyErr_SetString(PyExc_TypeError, "check(part)");
        return NULL;
    }
    long part = PyLong_AsLong(args[0]);
    if (part == -1 && PyErr_Occurred())
        return NULL;
    int what = (part & c->caps_part ? 1 : 0) | (part & c->memlock_part ? 2 : 0);
    return PyBool_FromLong(limits_unchanged(c->pid, c->want, what) == 1);
}

static PyObject *limits_check_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int pid;
    long caps_part, memlock_part;
    PyObject *creds;
    static char *kwlist[] = {"pid", "creds", "caps_part", "memlock_part", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOll", kwlist, &pid, &creds, &caps_part, &memlock_part))
        return NULL;
    LimitsCheck *c = (LimitsCheck *)type->tp_alloc(type, 0);
    if (!c)
        return NULL;
    if (limits_of(creds, c->want) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    c->vectorcall = (vectorcallfunc)limits_check_call;
    c->pid = pid;
    c->caps_part = caps_part;
    c->memlock_part = memlock_part;
    return (PyObject *)c;
}

static PyMemberDef limits_check_members[] = {
    {"pid", T_INT, offsetof(LimitsCheck, pid), READONLY, "the process"},
    {NULL},
};

static PyTypeObject LimitsCheckType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfiosim.preload._vfiosim_daemon.LimitsCheck",
    .tp_doc = "check(part): whether a process's capabilities and/or RLIMIT_MEMLOCK are still those last taken.",
    .tp_basicsize = sizeof(LimitsCheck),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = limits_check_new,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LimitsCheck, vectorcall),
    .tp_members = limits_check_members,
};

/* ---------------------------------------------------------------- acting as the program */

static int gid_list(PyObject *seq, gid_t *out, int max)
{
    PyObject *fast = PySequence_Fast(seq, "groups must be a sequence");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > max) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many groups");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        out[i] = (gid_t)v;
    }
    Py_DECREF(fast);
    return (int)n;
}

/* This thread takes uid/gid (real, effective, saved-for-gid, filesystem) and
 * supplementary groups; the saved uid stays 0 so that as_root() can come
 * back.  Leaving euid 0 clears the effective capabilities, so the kernel checks
 * what the thread does as it would for the program.  Needs CAP_SETUID/SETGID. */
static PyObject *py_as_user(PyObject *self, PyObject *args)
{
    unsigned int uid, gid;
    PyObject *groups;
    gid_t g[256];
    if (!PyArg_ParseTuple(args, "IIO", &uid, &gid, &groups))
        return NULL;
    int n = gid_list(groups, g, 256);
    if (n < 0)
        return NULL;
    if (syscall(SYS_setgroups, (size_t)n, g) < 0 || syscall(SYS_setresgid, gid, gid, gid) < 0 ||
        syscall(SYS_setresuid, uid, uid, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* Back to root, with this gid and these supplementary groups. */
static PyObject *py_as_root(PyObject *self, PyObject *args)
{
    unsigned int gid;
    PyObject *groups;
    gid_t g[65536 / sizeof(gid_t)];
    if (!PyArg_ParseTuple(args, "IO", &gid, &groups))
        return NULL;
    int n = gid_list(groups, g, (int)(sizeof g / sizeof g[0]));
    if (n < 0)
        return NULL;
    if (syscall(SYS_setresuid, 0, 0, 0) < 0 || syscall(SYS_setresgid, gid, gid, gid) < 0 ||
        syscall(SYS_setgroups, (size_t)n, g) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_kcmp_file(PyObject *self, PyObject *args)
{
    int pid1, pid2, fd1, fd2;
    if (!PyArg_ParseTuple(args, "iiii", &pid1, &pid2, &fd1, &fd2))
        return NULL;
    long r = syscall(SYS_kcmp, pid1, pid2, 0 /* KCMP_FILE */, fd1, fd2);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

static PyObject *py_pidfd_getfd(PyObject *self, PyObject *args)
{
    int pidfd, fd;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &fd))
        return NULL;
    long r = syscall(438 /* SYS_pidfd_getfd */, pidfd, fd, 0);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

/* ---------------------------------------------------------------- a program's memory */


/* The mapping holding `addr` (or, with `or_next`, the first one after it):
 * out = {start, end, flags (PROCMAP_QUERY_VMA_*), inode}.  0, -ENOENT (none),
 * -ENOTTY (no PROCMAP_QUERY: before Linux 6.11), -ESRCH (the address space is gone). */
static int vma_at(int maps_fd, uint64_t addr, int or_next, uint64_t *out)
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
    out[3] = q.inode;
    out[4] = q.vma_offset;
    out[5] = q.dev_major;
    out[6] = q.dev_minor;
    return 0;
}

/* Every byte of [addr, addr + n) in mappings with one of the `need` accesses
 * (the kernel's uaccess reads any accessible x86 mapping: write implies read). */
static int check_access(int maps_fd, uint64_t addr, uint64_t n, uint64_t need)
{
    uint64_t end = addr + n, vma[7];
    if (end < addr)
        return -EFAULT;
    while (addr < end) {
        int r = vma_at(maps_fd, addr, 0, vma);
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

static PyObject *py_vma(PyObject *self, PyObject *args)
{
    int maps_fd, or_next, r;
    unsigned long long addr;
    uint64_t v[7];
    if (!PyArg_ParseTuple(args, "iKp", &maps_fd, &addr, &or_next))
        return NULL;
    r = vma_at(maps_fd, addr, or_next, v);      /* GIL held: see py_limits_same() */
    if (r == -ENOENT)
        Py_RETURN_NONE;
    if (r < 0)
        return raise_errno(-r);
    return Py_BuildValue("KKKK", (unsigned long long)v[0], (unsigned long long)v[1], (unsigned long long)v[2],
                         (unsigned long long)v[3]);
}

/* vma_file(maps_fd, addr): (start, end, flags, inode, file offset in bytes,
 * dev major, dev minor) of the mapping holding addr, or None. */
static PyObject *py_vma_file(PyObject *self, PyObject *args)
{
    int maps_fd, r;
    unsigned long long addr;
    uint64_t v[7];
    if (!PyArg_ParseTuple(args, "iK", &maps_fd, &addr))
        return NULL;
    r = vma_at(maps_fd, addr, 0, v);
    if (r == -ENOENT)
        Py_RETURN_NONE;
    if (r < 0)
        return raise_errno(-r);
    return Py_BuildValue("KKKKKKK", (unsigned long long)v[0], (unsigned long long)v[1], (unsigned long long)v[2],
                         (unsigned long long)v[3], (unsigned long long)v[4], (unsigned long long)v[5],
                         (unsigned long long)v[6]);
}

/* copy_from_user(): bytes, or OSError(EFAULT) unless all of it is mapped
 * readable (OSError(ENOTTY) without PROCMAP_QUERY). */
static PyObject *py_uread(PyObject *self, PyObject *args)
{
    int maps_fd, mem_fd, r;
    unsigned long long addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iiKn", &maps_fd, &mem_fd, &addr, &n))
        return NULL;
    if (n < 0)
        return raise_errno(EFAULT);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out || n == 0)
        return out;
    char *buf = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    r = check_access(maps_fd, addr, (uint64_t)n, PROCMAP_QUERY_VMA_READABLE | PROCMAP_QUERY_VMA_WRITABLE);
    if (r == 0)
        r = mem_rw(mem_fd, addr, (uint64_t)n, buf, 0);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        Py_DECREF(out);
        return raise_errno(-r);
    }
    return out;
}

/* copy_to_user(): OSError(EFAULT) unless all of it is mapped writable. */
static PyObject *py_uwrite(PyObject *self, PyObject *args)
{
    int maps_fd, mem_fd, r;
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iiKy*", &maps_fd, &mem_fd, &addr, &b))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = b.len == 0 ? 0 : check_access(maps_fd, addr, (uint64_t)b.len, PROCMAP_QUERY_VMA_WRITABLE);
    if (r == 0 && b.len)
        r = mem_rw(mem_fd, addr, (uint64_t)b.len, b.buf, 1);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (r < 0)
        return raise_errno(-r);
    Py_RETURN_NONE;
}

/* A device's DMA: reaches the pages whatever the CPU's protection is now. */
static PyObject *py_dma_read(PyObject *self, PyObject *args)
{
    int mem_fd, r;
    unsigned long long addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iKn", &mem_fd, &addr, &n))
        return NULL;
    if (n < 0)
        return raise_errno(EFAULT);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out || n == 0)
        return out;
    char *buf = PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    r = mem_rw(mem_fd, addr, (uint64_t)n, buf, 0);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        Py_DECREF(out);
        return raise_errno(-r);
    }
    return out;
}

/* dma_read_into(mem_fd, addr, writable buffer) */
static PyObject *py_dma_read_into(PyObject *self, PyObject *args)
{
    int mem_fd, r;
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iKw*", &mem_fd, &addr, &b))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = mem_rw(mem_fd, addr, (uint64_t)b.len, b.buf, 0);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (r < 0)
        return raise_errno(-r);
    Py_RETURN_NONE;
}

static PyObject *py_dma_write(PyObject *self, PyObject *args)
{
    int mem_fd, r;
    unsigned long long addr;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "iKy*", &mem_fd, &addr, &b))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    r = mem_rw(mem_fd, addr, (uint64_t)b.len, b.buf, 1);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (r < 0)
        return raise_errno(-r);
    Py_RETURN_NONE;
}

/* Several DMA transfers (a NIC's burst), the ranges' bytes one after the other
 * in one buffer: dma_read_ranges(mem_fd, addrs, lens, writable buffer) and
 * dma_write_ranges(mem_fd, addrs, lens, buffer).  The GIL is released once for
 * the whole burst; OSError at the first range that fails (the ranges before it
 * were moved, as a device's burst stops at its first fault). */
/* The (start, length) pairs of two sequences, as 2k uint64s (PyMem_Free them),
 * their lengths adding up to at most buflen: the ranges whose bytes lie one
 * after the other in a buffer.  NULL with an exception set otherwise (k 0:
 * NULL without one). */
static uint64_t *ranges_from(PyObject *starts, PyObject *lens, Py_ssize_t buflen, Py_ssize_t *k)
{
    PyObject *fa = NULL, *fl = NULL;
    uint64_t *v = NULL;
    *k = 0;
    if (!(fa = PySequence_Fast(starts, "the starts must be a sequence")) ||
        !(fl = PySequence_Fast(lens, "the lengths must be a sequence")))
        goto fail;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fa);
    if (PySequence_Fast_GET_SIZE(fl) != n) {
        PyErr_SetString(PyExc_ValueError, "the starts and the lengths differ in number");
        goto fail;
    }
    if (n && !(v = PyMem_Malloc(2 * (size_t)n * sizeof *v))) {
        PyErr_NoMemory();
        goto fail;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        v[2 * i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fa, i));
        v[2 * i + 1] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fl, i));
        if (PyErr_Occurred())
            goto fail;
        total += v[2 * i + 1];
        if (v[2 * i + 1] > (uint64_t)buflen || total > (uint64_t)buflen) {
            PyErr_SetString(PyExc_ValueError, "the ranges are longer than the buffer");
            goto fail;
        }
    }
    Py_DECREF(fa);
    Py_DECREF(fl);
    *k = n;
    return v;
fail:
    PyMem_Free(v);
    Py_XDECREF(fa);
    Py_XDECREF(fl);
    return NULL;
}

static PyObject *dma_ranges(PyObject *args, int write)
{
    int mem_fd;
    PyObject *addrs, *lens, *result = NULL;
    Py_buffer b;
    if (!PyArg_ParseTuple(args, write ? "iOOy*" : "iOOw*", &mem_fd, &addrs, &lens, &b))
        return NULL;
    Py_ssize_t k;
    uint64_t *v = ranges_from(addrs, lens, b.len, &k);
    if (!v && PyErr_Occurred())
        goto out;
    int r = 0;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *at = b.buf;
    for (Py_ssize_t i = 0; i < k && r >= 0; i++) {
        if (v[2 * i + 1])
            r = mem_rw(mem_fd, v[2 * i], v[2 * i + 1], at, write);
        at += v[2 * i + 1];
    }
    Py_END_ALLOW_THREADS
    if (r < 0)
        raise_errno(-r);
    else
        result = Py_NewRef(Py_None);
out:
    PyMem_Free(v);
    PyBuffer_Release(&b);
    return result;
}

static PyObject *py_dma_read_ranges(PyObject *self, PyObject *args)
{
    return dma_ranges(args, 0);
}

static PyObject *py_dma_write_ranges(PyObject *self, PyObject *args)
{
    return dma_ranges(args, 1);
}

/* ---------------------------------------------------------------- file mappings
 *
 * A program's MAP_SHARED memory file (memfd, tmpfs, hugetlbfs), mapped into
 * the daemon where a pin was taken (transport/host.py), so a device's DMA is
 * a memcpy instead of a pread/pwrite of /proc/<pid>/mem.  The program may
 * truncate the file under the mapping: an access past its end would kill the
 * daemon with SIGBUS.  The handler below replaces the page of such a fault,
 * when it lies in one of these mappings, with a private zero page (what a
 * device reaches there is then what it reaches in a pinned page of an exited
 * program: zeros, seen by nobody) and lets the copy go on; any other SIGBUS
 * goes to the handler that was there before. */

#define MAX_FILE_MAPS 4096
static struct { volatile uintptr_t start, end; } file_maps[MAX_FILE_MAPS];
static struct sigaction bus_before;
static volatile sig_atomic_t bus_replaced;

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
    uintptr_t a = (uintptr_t)si->si_addr;
    long page = sysconf(_SC_PAGESIZE);
    for (int i = 0; si->si_code > 0 && i < MAX_FILE_MAPS; i++) {
        if (file_maps[i].start <= a && a < file_maps[i].end) {
            uintptr_t p = a & ~(uintptr_t)(page - 1);
            if (mmap((void *)p, (size_t)page, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0) != MAP_FAILED) {
                bus_replaced++;
                return;
            }
        }
    }
    if (bus_before.sa_flags & SA_SIGINFO) {
        bus_before.sa_sigaction(sig, si, ctx);
    } else if (bus_before.sa_handler != SIG_DFL && bus_before.sa_handler != SIG_IGN) {
        bus_before.sa_handler(sig);
    } else {
        signal(SIGBUS, SIG_DFL);     /* the fault repeats, and kills as it would have */
    }
}

/* file_map(fd, offset, length) -> address: a MAP_SHARED, read-write mapping
 * of the file, registered with the SIGBUS handler (OSError as mmap gives,
 * ENOSPC when the daemon holds MAX_FILE_MAPS of them). */
static PyObject *py_file_map(PyObject *self, PyObject *args)
{
    int fd, slot = -1;
    unsigned long long off, len;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &off, &len))
        return NULL;
    for (int i = 0; i < MAX_FILE_MAPS && slot < 0; i++)
        if (!file_maps[i].end)
            slot = i;
    if (slot < 0 || !len)
        return raise_errno(slot < 0 ? ENOSPC : EINVAL);
    /* Installed (again) unless it is the handler now: whoever replaced it
     * (faulthandler.disable() restores what it found) is chained to. */
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (!(cur.sa_flags & SA_SIGINFO) || cur.sa_sigaction != on_sigbus) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        bus_before = cur;
        if (sigaction(SIGBUS, &sa, NULL) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    void *p = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    file_maps[slot].start = (uintptr_t)p;
    file_maps[slot].end = (uintptr_t)p + len;
    return PyLong_FromUnsignedLongLong((uintptr_t)p);
}

/* file_unmap(address, length): the mapping goes (first out of the handler's list). */
static PyObject *py_file_unmap(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    if (!PyArg_ParseTuple(args, "KK", &addr, &len))
        return NULL;
    for (int i = 0; i < MAX_FILE_MAPS; i++)
        if (file_maps[i].start == addr && file_maps[i].end) {
            file_maps[i].end = 0;
            file_maps[i].start = 0;
            if (munmap((void *)(uintptr_t)addr, (size_t)len) < 0)
                return PyErr_SetFromErrno(PyExc_OSError);
            Py_RETURN_NONE;
        }
    return raise_errno(EINVAL);
}

/* fs_type(fd): statfs's f_type of the file (TMPFS_MAGIC, HUGETLBFS_MAGIC, ...). */
static PyObject *py_fs_type(PyObject *self, PyObject *args)
{
    int fd;
    struct statfs sf;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (fstatfs(fd, &sf) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong((unsigned long long)(unsigned long)sf.f_type);
}

/* Several DMA transfers within one window of a program's address space
 * whose pages are each reached either through a file mapping of the daemon or
 * through /proc/<pid>/mem: window_ranges(mem_fd, vaddr, page_shift, slots,
 * bases, offs, lens, buffer, write).  slots: int32 per page of the window (0:
 * /proc/<pid>/mem at vaddr + offset; s: the daemon's address bases[s] + vaddr
 * + offset, uint64 arithmetic); the ranges' bytes one after the other in the
 * buffer, as dma_read_ranges.  OSError(EFAULT) at the first range that fails. */
static PyObject *py_window_ranges(PyObject *self, PyObject *args)
{
    int mem_fd, shift, write;
    unsigned long long vaddr;
    PyObject *offs, *lens, *buf, *result = NULL;
    Py_buffer sb = {0}, bb = {0}, b = {0};
    uint64_t *v = NULL;
    if (!PyArg_ParseTuple(args, "iKiy*y*OOOp", &mem_fd, &vaddr, &shift, &sb, &bb, &offs, &lens, &buf, &write))
        return NULL;
    if (PyObject_GetBuffer(buf, &b, write ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0)
        goto out;
    const int32_t *slots = sb.buf;
    const uint64_t *bases = bb.buf;
    uint64_t npages = (uint64_t)sb.len / sizeof *slots, nbases = (uint64_t)bb.len / sizeof *bases;
    Py_ssize_t k;
    v = ranges_from(offs, lens, b.len, &k);
    if (!v && PyErr_Occurred())
        goto out;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (v[2 * i] > (npages << shift) || v[2 * i + 1] > (npages << shift) - v[2 * i]) {
            PyErr_SetString(PyExc_ValueError, "the ranges run past the window");
            goto out;
        }
    }
    int r = 0;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *at = b.buf;
    for (Py_ssize_t i = 0; i < k && r >= 0; i++) {
        uint64_t off = v[2 * i], left = v[2 * i + 1];
        while (left && r >= 0) {
            uint64_t page = off >> shift;
            int32_t s = slots[page];
            uint64_t n = ((page + 1) << shift) - off;
            while (!s && n < left && !slots[++page])        /* /proc/<pid>/mem: one call for the run */
                n += (uint64_t)1 << shift;
            if (n > left)
                n = left;
            if (!s) {
                r = mem_rw(mem_fd, vaddr + off, n, at, write);
            } else if (s < 0 || (uint64_t)s >= nbases) {
                r = -EFAULT;
            } else {
                uint8_t *p = (uint8_t *)(uintptr_t)(bases[s] + vaddr + off);
                memcpy(write ? p : at, write ? at : p, n);
            }
            at += n;
            off += n;
            left -= n;
        }
    }
    Py_END_ALLOW_THREADS
    if (r < 0)
        raise_errno(-r);
    else
        result = Py_NewRef(Py_None);
out:
    PyMem_Free(v);
    if (sb.obj) PyBuffer_Release(&sb);
    if (bb.obj) PyBuffer_Release(&bb);
    if (b.obj) PyBuffer_Release(&b);
    return result;
}

/* ---------------------------------------------------------------- waiting */

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

/*
 * Spinning.  Waking a thread that sleeps costs a futex wake-up and, on an idle
 * virtual CPU, an interrupt and a halt exit: tens of microseconds on this
 * kind of VM, ten times the call itself.  So while a program calls back to
 * back, its serving thread spins (the GIL released) for the next request,
 * and the program spins for the reply.  Bounded, so that idle clients cost
 * nothing and busy ones do not starve others:
 *
 *  - for at most `budget` ns after each reply, learnt from the program's pace:
 *    grown when a request came just after the thread gave up, halved when
 *    the program stayed away long;
 *  - while the program is up (it did not sleep, or it picked up the reply:
 *    ack_seq) and not on this CPU (it would need the CPU this spins on), or
 *    for a while if the reply woke it;
 *  - not after being preempted: a gap between two looks at the clock means
 *    another thread needed this CPU;
 *  - by at most max(1, CPUs - 1) serving threads at once, daemon-wide;
 *  - not at all while the CPUs are contended: spins ended by contention turn
 *    spinning off for the connection, on both sides, for a while (control()).
 *    A call then costs two wake-ups, which on busy CPUs are cheaper than on
 *    idle ones, and much cheaper than spinning against the thread one waits for.
 */
#define SPIN_MIN_NS 5000u
#define SPIN_MAX_NS 200000u
#define SPIN_WOKEN_NS 100000u           /* how long a program the reply woke may take to pick it up */
#define PREEMPTED_NS 30000u             /* a gap between two looks at the clock this long: preempted */

static int spinners, max_spinners = 1;

static int take_spinner(void)
{
    int n = __atomic_load_n(&spinners, __ATOMIC_RELAXED);
    while (n < max_spinners)
        if (__atomic_compare_exchange_n(&spinners, &n, n + 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return 1;
    return 0;
}

static void put_spinner(void)
{
    __atomic_fetch_sub(&spinners, 1, __ATOMIC_RELEASE);
}

static void learn(uint32_t *budget, uint64_t gap, int caught)
{
    uint64_t b = *budget;
    if (caught || gap < SPIN_MAX_NS) {
        uint64_t want = 2 * gap + SPIN_MIN_NS;        /* would have caught it, with room */
        b = want > b ? want : (7 * b + want) / 8;
    } else {
        b /= 2;                                       /* the program was away: spinning did not pay */
    }
    *budget = (uint32_t)(b < SPIN_MIN_NS ? SPIN_MIN_NS : b > SPIN_MAX_NS ? SPIN_MAX_NS : b);
}

/* ---------------------------------------------------------------- the channel */

/* Spinning is turned off for a connection when, of WINDOW requests, spins of
 * FAILS_TO_SLEEP ended by contention (preempted, the other side on the same
 * CPU or not running); it is tried again after `backoff` requests, a number
 * that doubles each time it fails again and halves with each clean window. */
#define WINDOW 32
#define FAILS_TO_SLEEP 4
#define BACKOFF_MIN 32
#define BACKOFF_MAX 4096

/* Out flags of Channel.next() (what came with or instead of a request). */
#define VD_POSTS 1u                     /* posted stores wait in the ring */
#define VD_STOPPED 2u                   /* wake() was called: the thread ends */
#define VD_MALFORMED 4u                 /* the request's header is impossible: drop the connection */

typedef struct {
    PyObject_HEAD
    struct vchan *ch;
    int fd;                             /* the memfd, until handed over (close_fd) */
    uint32_t stop;                      /* set by another thread to end the wait */
    uint32_t budget;                    /* ns to spin before sleeping (learnt) */
    uint32_t seq;                       /* the last request taken */
    uint32_t wake;                      /* prog.wake_seq when the thread last looked */
    /* Whether spinning works for this connection (see control()). */
    uint32_t spin;                      /* 1: both sides spin (published as ch->daemon.spin) */
    uint32_t fails;                     /* our spins that contention ended, since control() last looked */
    uint32_t prog_fails;                /* the program's count, when control() last looked */
    uint32_t window, window_fails;      /* requests and failed spins in this window (spin on) */
    uint32_t sleep_left, backoff;       /* requests before spinning is tried again (spin off) */
    uint64_t caught, slept;             /* waits a spin ended, and waits that went to sleep (for benchmarks) */
} Channel;

static PyObject *empty_bytes;

static void channel_unmap(Channel *c)
{
    if (c->ch) {
        munmap(c->ch, VCHAN_SIZE);
        c->ch = NULL;
    }
}

static void channel_dealloc(Channel *c)
{
    channel_unmap(c);
    if (c->fd >= 0)
        close(c->fd);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* Channel(): a new channel in a sealed memfd (a program cannot shrink it
 * under the daemon, whose accesses would then fault). */
static PyObject *channel_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    Channel *c = (Channel *)type->tp_alloc(type, 0);
    if (!c)
        return NULL;
    c->fd = -1;
    c->budget = 20000;
    c->spin = 1;
    c->backoff = BACKOFF_MIN;
    int fd = memfd_create("vfiosim:channel", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        goto fail;
    c->fd = fd;
    if (ftruncate(fd, VCHAN_SIZE) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        goto fail;
    void *p = mmap(NULL, VCHAN_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        goto fail;
    c->ch = p;
    c->ch->daemon.spin = 1;
    c->ch->magic = VFIOSIM_MAGIC_VERSION;
    c->ch->size = VCHAN_SIZE;
    return (PyObject *)c;
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    Py_DECREF(c);
    return NULL;
}

static int check_open(Channel *c)
{
    if (!c->ch) {
        PyErr_SetString(PyExc_ValueError, "the channel is closed");
        return -1;
    }
    return 0;
}

/* The memfd, to hand to the program; -1 once closed. */
static PyObject *channel_get_fd(Channel *c, void *closure)
{
    return PyLong_FromLong(c->fd);
}

static PyObject *channel_get_budget(Channel *c, void *closure)
{
    return PyLong_FromUnsignedLong(c->budget);
}

static PyObject *channel_get_waits(Channel *c, void *closure)
{
    return Py_BuildValue("(KK)", (unsigned long long)c->caught, (unsigned long long)c->slept);
}

static PyObject *channel_get_spinning(Channel *c, void *closure)
{
    return PyBool_FromLong(c->spin);
}

static PyObject *channel_close_fd(Channel *c, PyObject *unused)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *channel_close(Channel *c, PyObject *unused)
{
    channel_close_fd(c, NULL);
    channel_unmap(c);
    Py_RETURN_NONE;
}

static void control(Channel *c)
{
    struct vchan *ch = c->ch;
    uint32_t pf = __atomic_load_n(&ch->prog.spin_fails, __ATOMIC_RELAXED);
    uint32_t fails = c->fails + (pf - c->prog_fails);
    c->prog_fails = pf;
    c->fails = 0;
    if (c->spin) {
        c->window_fails += fails;
        if (c->window_fails >= FAILS_TO_SLEEP) {
            c->spin = 0;
            c->sleep_left = c->backoff;
            c->backoff = c->backoff * 2 > BACKOFF_MAX ? BACKOFF_MAX : c->backoff * 2;
            c->window = c->window_fails = 0;
        } else if (++c->window >= WINDOW) {
            c->window = c->window_fails = 0;
            if (c->backoff > BACKOFF_MIN)
                c->backoff /= 2;
        }
    } else if (--c->sleep_left == 0) {
        c->spin = 1;
    }
    __atomic_store_n(&ch->daemon.spin, c->spin, __ATOMIC_RELAXED);
}

/* Work arrived since the thread last looked: a request or a kicked post. */
static inline int kicked(Channel *c)
{
    return load_acq(&c->ch->prog.wake_seq) != c->wake;
}

/* Wait until the program has kicked (a request, or a store with side effects
 * posted), `stop` is set or `timeout_ms` passed (GIL released).  1 (work),
 * 0 (timeout), -1 (stop).  `woke`: the reply to the last request woke the
 * program. */
static int wait_work(Channel *c, uint32_t last, int woke, int timeout_ms)
{
    struct vchan *ch = c->ch;
    uint64_t start = now_ns();
    if (c->spin && take_spinner()) {
        uint64_t budget = c->budget, prev = start;
        uint32_t cpu = (uint32_t)sched_getcpu();
        __atomic_store_n(&ch->daemon.cpu, cpu, __ATOMIC_RELAXED);
        for (unsigned i = 0;; i++) {
            if (__atomic_load_n(&c->stop, __ATOMIC_RELAXED)) {
                put_spinner();
                return -1;
            }
            if (kicked(c)) {
                put_spinner();
                c->caught++;
                learn(&c->budget, now_ns() - start, 1);
                return 1;
            }
            if ((i & 31) == 31) {
                uint64_t t = now_ns();
                if (t - start >= budget)
                    break;
                int contended;
                if (!woke || load_acq(&ch->prog.ack_seq) == last)
                    /* the program is up (it was, or it took the reply): not on our CPU */
                    contended = __atomic_load_n(&ch->prog.cpu, __ATOMIC_RELAXED) == cpu;
                else                  /* woken, not there yet: asleep still, or without a CPU */
                    contended = t - start >= SPIN_WOKEN_NS;
                if (contended || t - prev >= PREEMPTED_NS) {
                    c->fails++;
                    break;
                }
                prev = t;
            }
            __builtin_ia32_pause();
        }
        put_spinner();
    }
    uint64_t end = start + (uint64_t)timeout_ms * 1000000u;
    c->slept++;
    for (;;) {
        uint32_t seen = c->wake;
        __atomic_store_n(&ch->daemon.daemon_waiting, 1, __ATOMIC_SEQ_CST);
        int stop = __atomic_load_n(&c->stop, __ATOMIC_RELAXED);
        if (stop || __atomic_load_n(&ch->prog.wake_seq, __ATOMIC_SEQ_CST) != seen) {
            __atomic_store_n(&ch->daemon.daemon_waiting, 0, __ATOMIC_RELAXED);
            if (stop)
                return -1;
            learn(&c->budget, now_ns() - start, 0);
            return 1;
        }
        uint64_t t = now_ns();
        if (t >= end) {
            __atomic_store_n(&ch->daemon.daemon_waiting, 0, __ATOMIC_RELAXED);
            return 0;
        }
        uint64_t left = end - t;
        struct timespec ts = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
        futex(&ch->prog.wake_seq, FUTEX_WAIT, seen, &ts);
    }
}

/* Publish the reply (ret, errno, payload) to request `seq`; 1 if the program
 * slept and was woken. */
static int reply(struct vchan *ch, uint32_t seq, int64_t ret, int32_t err, const void *payload, uint32_t len)
{
    if (len > sizeof ch->rep_payload)
        len = sizeof ch->rep_payload;
    ch->rep.ret = ret;
    ch->rep.err = err;
    ch->rep.len = len;
    if (len)
        memcpy((void *)ch->rep_payload, payload, len);
    __atomic_store_n(&ch->daemon.rep_seq, seq, __ATOMIC_SEQ_CST);
    if (!load_acq(&ch->prog.prog_waiting))
        return 0;
    futex(&ch->daemon.rep_seq, FUTEX_WAKE, 1, NULL);
    return 1;
}

/* Publish (ret, err, payload) as the reply to the request taken last;
 * *woke: the program slept and was woken.  -1 with an exception set. */
static int publish(Channel *c, PyObject *ret_obj, PyObject *err_obj, PyObject *payload, int *woke)
{
    int64_t ret = PyLong_AsLongLong(ret_obj);
    long err = PyLong_AsLong(err_obj);
    if (PyErr_Occurred())
        return -1;
    const char *data = "";
    Py_ssize_t len = 0;
    if (payload != Py_None && PyBytes_AsStringAndSize(payload, (char **)&data, &len) < 0)
        return -1;
    *woke = reply(c->ch, c->seq, ret, (int32_t)err, data, (uint32_t)len);
    return 0;
}

/* Wait (GIL released) for the next request or kick, and copy the request out
 * of the channel: 1 (a request in *rq and payload), 2 (a kick without one),
 * 0 (timeout), -1 (stop); *seen says what else was noticed (VD_*). */
static int take_next(Channel *c, int woke, long timeout_ms, struct vreq *rq, uint8_t *payload, uint32_t *seen)
{
    struct vchan *ch = c->ch;
    int r;
    *seen = 0;
    Py_BEGIN_ALLOW_THREADS
    r = wait_work(c, c->seq, woke, (int)timeout_ms);
    if (r == 1) {
        c->wake = load_acq(&ch->prog.wake_seq);
        __atomic_store_n(&ch->daemon.cpu, (uint32_t)sched_getcpu(), __ATOMIC_RELAXED);
        uint32_t seq = load_acq(&ch->prog.req_seq);
        if (seq == c->seq) {
            r = 2;                     /* a kick: posts with side effects wait */
            control(c);                /* a program that only posts doorbells is paced by its kicks */
        } else {
            c->seq = seq;
            __atomic_store_n(&ch->daemon.taken_seq, seq, __ATOMIC_RELEASE);
            memcpy(rq, (const void *)&ch->req, sizeof *rq);
            if (rq->len > VMAX_PAYLOAD || rq->reserved) {
                *seen |= VD_MALFORMED;
                rq->len = 0;
            }
            if (rq->len)
                memcpy(payload, (const void *)ch->req_payload, rq->len);
            control(c);
        }
    }
    if (load_acq(&ch->prog.ring_head) != ch->daemon.ring_tail)
        *seen |= VD_POSTS;
    Py_END_ALLOW_THREADS
    return r;
}

/* (a0, a1, a2, a3, a4) of a request. */
static PyObject *args_tuple(const struct vreq *rq)
{
    PyObject *t = PyTuple_New(5);
    if (!t)
        return NULL;
    for (int i = 0; i < 5; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(rq->a[i]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* What serve() returns for a wait that brought no request: its VD_* bits. */
static PyObject *no_request_seen(int r, uint32_t seen)
{
    return PyLong_FromUnsignedLong((seen & VD_POSTS) | (r < 0 ? VD_STOPPED : 0));
}

/*
 * serve(handler, sess, timeout_ms) -> seen
 *
 * Wait for the program's requests and copy each out of the channel (so that
 * the program cannot change it under the daemon's feet), hand it to
 * handler(sess, op, flags, fd, fd2, (a0, a1, a2, a3, a4), payload, seen),
 * and publish the (ret, err, payload) it returns as the reply, waking the
 * program; seen & VD_MALFORMED: the header is impossible (the handler
 * refuses it).  Returns when a wait brings no request: 0 (timeout_ms passed),
 * VD_POSTS (only posted stores), VD_STOPPED (wake()), the last reply
 * published.  An exception from the handler ends it, that request
 * unanswered.  The loop is in C because a loop in Python cost every request
 * its tuples and bytecodes.
 */
static PyObject *channel_serve(Channel *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "serve(handler, sess, timeout_ms)");
        return NULL;
    }
    PyObject *handler = args[0], *sess = args[1];
    long timeout_ms = PyLong_AsLong(args[2]);
    if (timeout_ms == -1 && PyErr_Occurred())
        return NULL;
    struct vreq rq;
    uint8_t payload[VMAX_PAYLOAD];
    int woke = 0;
    for (;;) {
        if (check_open(c) < 0)
            return NULL;
        uint32_t seen;
        int r = take_next(c, woke, timeout_ms, &rq, payload, &seen);
        if (r != 1)
            return no_request_seen(r, seen);
        PyObject *argv[9] = {           /* argv[0]: room for a bound method's self (ARGUMENTS_OFFSET) */
            NULL, sess, PyLong_FromUnsignedLong(rq.op), PyLong_FromUnsignedLong(rq.flags), PyLong_FromLong(rq.fd),
            PyLong_FromLong(rq.fd2),
            args_tuple(&rq),
            rq.len ? PyBytes_FromStringAndSize((const char *)payload, rq.len) : Py_NewRef(empty_bytes),
            PyLong_FromUnsignedLong(seen),
        };
        PyObject *out = NULL;
        int ok = 1;
        for (int i = 2; i < 9; i++)
            if (!argv[i])
                ok = 0;
        if (ok)
            out = PyObject_Vectorcall(handler, argv + 1, 8 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        for (int i = 2; i < 9; i++)
            Py_XDECREF(argv[i]);
        if (!out)
            return NULL;
        if (!PyTuple_Check(out) || PyTuple_GET_SIZE(out) != 3) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_TypeError, "a handler returns (ret, err, payload)");
            return NULL;
        }
        int r2 = check_open(c) < 0 ? -1 : publish(c, PyTuple_GET_ITEM(out, 0), PyTuple_GET_ITEM(out, 1),
                                                  PyTuple_GET_ITEM(out, 2), &woke);
        Py_DECREF(out);
        if (r2 < 0)
            return NULL;
    }
}

/* take_posts() -> [(handle, offset, size, value, kick), ...], oldest first, consumed;
 * None if the program's ring head is impossible. */
static PyObject *channel_take_posts(Channel *c, PyObject *unused)
{
    if (check_open(c) < 0)
        return NULL;
    struct vchan *ch = c->ch;
    uint32_t head = load_acq(&ch->prog.ring_head);
    uint32_t tail = ch->daemon.ring_tail;
    uint32_t n = head - tail;
    if (n > VRING)
        Py_RETURN_NONE;
    struct vpost posts[VRING];
    for (uint32_t i = 0; i < n; i++)
        memcpy(&posts[i], (const void *)&ch->ring[(tail + i) % VRING], sizeof posts[i]);
    __atomic_store_n(&ch->daemon.ring_tail, tail + n, __ATOMIC_RELEASE);
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(KKIKI)", (unsigned long long)posts[i].handle,
                                    (unsigned long long)posts[i].offset, posts[i].size,
                                    (unsigned long long)posts[i].value, posts[i].flags & VPOST_KICK);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyObject *channel_has_posts(Channel *c, PyObject *unused)
{
    if (check_open(c) < 0)
        return NULL;
    return PyBool_FromLong(load_acq(&c->ch->prog.ring_head) != c->ch->daemon.ring_tail);
}

/* set_live(slot, live): whether stores through that mapping may be posted now. */
static PyObject *channel_set_live(Channel *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_live(slot, live)");
        return NULL;
    }
    if (check_open(c) < 0)
        return NULL;
    long slot = PyLong_AsLong(args[0]);
    int live = PyObject_IsTrue(args[1]);
    if ((slot == -1 && PyErr_Occurred()) || live < 0)
        return NULL;
    if (slot < 0 || slot >= VLIVE) {
        PyErr_SetString(PyExc_IndexError, "mapping slot out of range");
        return NULL;
    }
    __atomic_store_n(&c->ch->live[slot], (uint32_t)live, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* wake(): stop the thread serving this channel (from another thread). */
static PyObject *channel_wake(Channel *c, PyObject *unused)
{
    __atomic_store_n(&c->stop, 1, __ATOMIC_SEQ_CST);
    if (c->ch)
        futex(&c->ch->prog.wake_seq, FUTEX_WAKE, 1, NULL);     /* the word it sleeps on */
    Py_RETURN_NONE;
}

static PyMethodDef channel_methods[] = {
    {"serve", (PyCFunction)(void (*)(void))channel_serve, METH_FASTCALL,
     "serve(handler, sess, timeout_ms): requests handed to the handler, its replies published, until none comes"},
    {"take_posts", (PyCFunction)channel_take_posts, METH_NOARGS, "the posted stores, oldest first, consumed"},
    {"has_posts", (PyCFunction)channel_has_posts, METH_NOARGS, "whether posted stores wait"},
    {"set_live", (PyCFunction)(void (*)(void))channel_set_live, METH_FASTCALL, "set_live(slot, live)"},
    {"wake", (PyCFunction)channel_wake, METH_NOARGS, "stop the thread serving this channel"},
    {"close_fd", (PyCFunction)channel_close_fd, METH_NOARGS, "close the memfd (handed over)"},
    {"close", (PyCFunction)channel_close, METH_NOARGS, "close the memfd and unmap the channel"},
    {NULL},
};

static PyGetSetDef channel_getset[] = {
    {"fd", (getter)channel_get_fd, NULL, "the channel's memfd, -1 once handed over", NULL},
    {"budget", (getter)channel_get_budget, NULL, "ns the serving thread spins before it sleeps", NULL},
    {"waits", (getter)channel_get_waits, NULL, "(waits a spin ended, waits that slept)", NULL},
    {"spinning", (getter)channel_get_spinning, NULL, "whether both sides spin for each other now", NULL},
    {NULL},
};

static PyTypeObject ChannelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfiosim.preload._vfiosim_daemon.Channel",
    .tp_doc = "One connection's shared-memory channel (struct vchan), served by one thread.",
    .tp_basicsize = sizeof(Channel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = channel_new,
    .tp_dealloc = (destructor)channel_dealloc,
    .tp_methods = channel_methods,
    .tp_getset = channel_getset,
};

/* ---------------------------------------------------------------- a call's argument window */

/*
 * ArgWindow: the copy of the program's memory at a call's pointer argument
 * that the shim sends with the call (protocol F_WINDOW), and what the call
 * wrote in it ([lo, hi)).  transport/host.py's HostProcess owns one and
 * reuses it for every call; copy_from_user and copy_to_user of an ioctl's
 * struct land here.  In C because every windowed call opens, reads and
 * closes it: as Python methods those were a fifth of a MAP_DMA + UNMAP_DMA
 * pair's frames.  What falls outside the window is the caller's (host.py):
 * unpack(), read() and write() say "not inside" (None, None, False) and
 * change nothing then.
 */
typedef struct {
    PyObject_HEAD
    unsigned long long addr;
    Py_ssize_t len;
    PyObject *data;                    /* the bytes as sent, a bytearray once written */
    int writable;                      /* the program may write them (F_WINDOW_WRITABLE) */
    Py_ssize_t lo, hi;                 /* what the call wrote; lo >= hi: nothing */
    PyObject *layout;                  /* the struct.Struct last unpacked, and its size */
    Py_ssize_t layout_size;
} ArgWindow;

static PyObject *str_size, *str_unpack_from;

static PyObject *argwin_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "ArgWindow() takes no arguments");
        return NULL;
    }
    ArgWindow *w = (ArgWindow *)type->tp_alloc(type, 0);
    if (!w)
        return NULL;
    w->data = Py_NewRef(empty_bytes);
    return (PyObject *)w;
}

static void argwin_dealloc(ArgWindow *w)
{
    Py_XDECREF(w->data);
    Py_XDECREF(w->layout);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

/* The offset of [addr, addr + n) in the window, or -1 if it is not all inside
 * (an address that is no u64 is not). */
static Py_ssize_t argwin_offset(ArgWindow *w, PyObject *addr_obj, Py_ssize_t n)
{
    unsigned long long addr = PyLong_AsUnsignedLongLong(addr_obj);
    if (addr == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (n < 0 || addr < w->addr)
        return -1;
    unsigned long long off = addr - w->addr;
    if (off > (unsigned long long)w->len || (unsigned long long)n > (unsigned long long)w->len - off)
        return -1;
    return (Py_ssize_t)off;
}

/* open(addr, data, writable) -> self: the window of this call (nothing written yet). */
static PyObject *argwin_open(ArgWindow *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "open(addr, data, writable)");
        return NULL;
    }
    unsigned long long addr = PyLong_AsUnsignedLongLong(args[0]);
    if (addr == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *data = args[1];
    if (!PyBytes_CheckExact(data) && !PyByteArray_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "the window's data must be bytes or a bytearray");
        return NULL;
    }
    int writable = PyObject_IsTrue(args[2]);
    if (writable < 0)
        return NULL;
    Py_ssize_t len = PyBytes_CheckExact(data) ? PyBytes_GET_SIZE(data) : PyByteArray_GET_SIZE(data);
    Py_SETREF(w->data, Py_NewRef(data));
    w->addr = addr;
    w->len = len;
    w->writable = writable;
    w->lo = len;
    w->hi = 0;
    return Py_NewRef(w);
}

/* The window's bytes (valid until it is next written). */
static inline const char *argwin_bytes(ArgWindow *w)
{
    return PyBytes_CheckExact(w->data) ? PyBytes_AS_STRING(w->data) : PyByteArray_AS_STRING(w->data);
}

/* close() -> (offset, bytes) that the program stores back (what the call
 * wrote), or None; the window lets go of its data. */
static PyObject *argwin_close(ArgWindow *w, PyObject *unused)
{
    PyObject *out;
    if (w->lo >= w->hi)
        out = Py_NewRef(Py_None);
    else
        out = Py_BuildValue("(ny#)", w->lo, argwin_bytes(w) + w->lo, w->hi - w->lo);
    Py_SETREF(w->data, Py_NewRef(empty_bytes));
    w->len = w->lo = w->hi = 0;
    return out;
}

/* close_reply() -> close()'s (offset, bytes) as the reply's payload (the
 * offset a little-endian u32, then the bytes: what the shim stores back), or
 * None; what the daemon's request loop sends. */
static PyObject *argwin_close_reply(ArgWindow *w, PyObject *unused)
{
    PyObject *out;
    if (w->lo >= w->hi) {
        out = Py_NewRef(Py_None);
    } else {
        Py_ssize_t n = w->hi - w->lo;
        out = PyBytes_FromStringAndSize(NULL, 4 + n);
        if (out) {
            uint32_t off = (uint32_t)w->lo;
            unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
            p[0] = off & 0xff, p[1] = off >> 8 & 0xff, p[2] = off >> 16 & 0xff, p[3] = off >> 24;
            memcpy(p + 4, argwin_bytes(w) + w->lo, (size_t)n);
        }
    }
    Py_SETREF(w->data, Py_NewRef(empty_bytes));
    w->len = w->lo = w->hi = 0;
    return out;
}

/* unpack(addr, layout) -> layout.unpack_from(the window, its offset), or None
 * unless all layout.size bytes at addr are inside. */
static PyObject *argwin_unpack(ArgWindow *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "unpack(addr, layout)");
        return NULL;
    }
    PyObject *layout = args[1];
    if (layout != w->layout) {         /* (the same few layouts come back: their size is kept) */
        PyObject *size = PyObject_GetAttr(layout, str_size);
        if (!size)
            return NULL;
        Py_ssize_t n = PyLong_AsSsize_t(size);
        Py_DECREF(size);
        if (n == -1 && PyErr_Occurred())
            return NULL;
        Py_XSETREF(w->layout, Py_NewRef(layout));
        w->layout_size = n;
    }
    Py_ssize_t off = argwin_offset(w, args[0], w->layout_size);
    if (off < 0)
        Py_RETURN_NONE;
    PyObject *off_obj = PyLong_FromSsize_t(off);
    if (!off_obj)
        return NULL;
    PyObject *call[3] = {layout, w->data, off_obj};
    PyObject *out = PyObject_VectorcallMethod(str_unpack_from, call, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(off_obj);
    return out;
}

/* read(addr, n) -> the n bytes at addr, or None unless all inside. */
static PyObject *argwin_read(ArgWindow *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(addr, n)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t off = argwin_offset(w, args[0], n);
    if (off < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(argwin_bytes(w) + off, n);
}

/* write(addr, data) -> True if the window took all of data (the program may
 * write it and it is all inside), else False and nothing changed. */
static PyObject *argwin_write(ArgWindow *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write(addr, data)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t off = w->writable ? argwin_offset(w, args[0], view.len) : -1;
    if (off < 0) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    if (!PyByteArray_CheckExact(w->data)) {         /* its first write: a copy of its own */
        PyObject *copy = PyByteArray_FromObject(w->data);
        if (!copy) {
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_SETREF(w->data, copy);
    }
    memcpy(PyByteArray_AS_STRING(w->data) + off, view.buf, (size_t)view.len);
    if (view.len) {
        if (off < w->lo)
            w->lo = off;
        if (off + view.len > w->hi)
            w->hi = off + view.len;
    }
    PyBuffer_Release(&view);
    Py_RETURN_TRUE;
}

/* take_written() -> (addr, bytes) of what the call wrote, or None; the
 * window then holds nothing written (what HostProcess._flush_window() writes
 * through /proc/<pid>/mem before another path reads or writes those bytes). */
static PyObject *argwin_take_written(ArgWindow *w, PyObject *unused)
{
    if (w->lo >= w->hi)
        Py_RETURN_NONE;
    PyObject *out = Py_BuildValue("(Ky#)", w->addr + (unsigned long long)w->lo, argwin_bytes(w) + w->lo,
                                  w->hi - w->lo);
    if (out) {
        w->lo = w->len;
        w->hi = 0;
    }
    return out;
}

static PyObject *argwin_get_end(ArgWindow *w, void *unused)
{
    PyObject *a = PyLong_FromUnsignedLongLong(w->addr), *n = PyLong_FromSsize_t(w->len);
    PyObject *end = a && n ? PyNumber_Add(a, n) : NULL;
    Py_XDECREF(a);
    Py_XDECREF(n);
    return end;
}

static PyMethodDef argwin_methods[] = {
    {"open", (PyCFunction)(void (*)(void))argwin_open, METH_FASTCALL,
     "open(addr, data, writable) -> self: this call's window"},
    {"close", (PyCFunction)argwin_close, METH_NOARGS, "close() -> (offset, bytes written) or None"},
    {"close_reply", (PyCFunction)argwin_close_reply, METH_NOARGS,
     "close_reply() -> close()'s offset (u32, little-endian) and bytes as one bytes, or None"},
    {"unpack", (PyCFunction)(void (*)(void))argwin_unpack, METH_FASTCALL,
     "unpack(addr, layout) -> layout.unpack_from() of the window at addr, or None if not inside"},
    {"read", (PyCFunction)(void (*)(void))argwin_read, METH_FASTCALL,
     "read(addr, n) -> bytes, or None if not inside"},
    {"write", (PyCFunction)(void (*)(void))argwin_write, METH_FASTCALL,
     "write(addr, data) -> whether the window took it (writable, all inside)"},
    {"take_written", (PyCFunction)argwin_take_written, METH_NOARGS,
     "take_written() -> (addr, bytes) written so far, or None; then nothing is"},
    {NULL},
};

static PyMemberDef argwin_members[] = {
    {"addr", T_ULONGLONG, offsetof(ArgWindow, addr), READONLY, "the program's address of the first byte"},
    {"data", T_OBJECT, offsetof(ArgWindow, data), READONLY, "the bytes (a bytearray once written)"},
    {"writable", T_INT, offsetof(ArgWindow, writable), READONLY, "whether the program may write them"},
    {"lo", T_PYSSIZET, offsetof(ArgWindow, lo), READONLY, "the first byte written (lo >= hi: none)"},
    {"hi", T_PYSSIZET, offsetof(ArgWindow, hi), READONLY, "past the last byte written"},
    {NULL},
};

static PyGetSetDef argwin_getset[] = {
    {"end", (getter)argwin_get_end, NULL, "the program's address past the last byte", NULL},
    {NULL},
};

static PyTypeObject ArgWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfiosim.preload._vfiosim_daemon.ArgWindow",
    .tp_doc = "A call's copy of the program's memory at its pointer argument, and what the call wrote in it.",
    .tp_basicsize = sizeof(ArgWindow),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = argwin_new,
    .tp_dealloc = (destructor)argwin_dealloc,
    .tp_methods = argwin_methods,
    .tp_members = argwin_members,
    .tp_getset = argwin_getset,
};

/* ---------------------------------------------------------------- the module */

static PyMethodDef module_methods[] = {
    {"creds", py_creds, METH_VARARGS, "creds(pidfd, pid): the process's ids, capabilities and RLIMIT_MEMLOCK"},
    {"limits_same", py_limits_same, METH_VARARGS,
     "limits_same(pid, creds, what=3): its capabilities (what & 1) and RLIMIT_MEMLOCK (what & 2) are still "
     "those of creds"},
    {"as_user", py_as_user, METH_VARARGS, "as_user(uid, gid, groups): this thread takes the program's ids"},
    {"as_root", py_as_root, METH_VARARGS, "as_root(gid, groups): this thread returns to root"},
    {"kcmp_file", py_kcmp_file, METH_VARARGS, "kcmp(KCMP_FILE): 0 if both fds are the same open file"},
    {"pidfd_getfd", py_pidfd_getfd, METH_VARARGS, "pidfd_getfd(pidfd, fd)"},
    {"vma", py_vma, METH_VARARGS, "vma(maps_fd, addr, or_next): (start, end, PROCMAP flags, inode) or None"},
    {"vma_file", py_vma_file, METH_VARARGS,
     "vma_file(maps_fd, addr): (start, end, flags, inode, offset, dev major, dev minor) or None"},
    {"file_map", py_file_map, METH_VARARGS, "file_map(fd, offset, length): a shared mapping's address"},
    {"file_unmap", py_file_unmap, METH_VARARGS, "file_unmap(address, length)"},
    {"fs_type", py_fs_type, METH_VARARGS, "fs_type(fd): statfs f_type"},
    {"window_ranges", py_window_ranges, METH_VARARGS,
     "window_ranges(mem_fd, vaddr, page_shift, slots, bases, offs, lens, buffer, write)"},
    {"uread", py_uread, METH_VARARGS, "uread(maps_fd, mem_fd, addr, n): copy_from_user"},
    {"uwrite", py_uwrite, METH_VARARGS, "uwrite(maps_fd, mem_fd, addr, data): copy_to_user"},
    {"dma_read", py_dma_read, METH_VARARGS, "dma_read(mem_fd, addr, n): a device's read"},
    {"dma_read_into", py_dma_read_into, METH_VARARGS, "dma_read_into(mem_fd, addr, buffer)"},
    {"dma_write", py_dma_write, METH_VARARGS, "dma_write(mem_fd, addr, data): a device's write"},
    {"dma_read_ranges", py_dma_read_ranges, METH_VARARGS,
     "dma_read_ranges(mem_fd, addrs, lens, buffer): the ranges' bytes one after the other into buffer"},
    {"dma_write_ranges", py_dma_write_ranges, METH_VARARGS,
     "dma_write_ranges(mem_fd, addrs, lens, data): data's bytes to the ranges, in order"},
    {NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_vfiosim_daemon", "The daemon's side of the vfiosim run channel (vfiosim_daemon.c).",
    -1, module_methods,
};

PyMODINIT_FUNC PyInit__vfiosim_daemon(void)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    max_spinners = cpus > 2 ? (int)cpus - 1 : 1;
    if (PyType_Ready(&ChannelType) < 0 || PyType_Ready(&ArgWindowType) < 0 || PyType_Ready(&LimitsCheckType) < 0)
        return NULL;
    str_size = PyUnicode_InternFromString("size");
    str_unpack_from = PyUnicode_InternFromString("unpack_from");
    if (!str_size || !str_unpack_from)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (!empty_bytes)
        return NULL;
    if (PyModule_AddType(m, &ChannelType) < 0 || PyModule_AddType(m, &ArgWindowType) < 0 ||
        PyModule_AddType(m, &LimitsCheckType) < 0)
        return NULL;
    PyModule_AddIntConstant(m, "VD_POSTS", VD_POSTS);
    PyModule_AddIntConstant(m, "VD_STOPPED", VD_STOPPED);
    PyModule_AddIntConstant(m, "VD_MALFORMED", VD_MALFORMED);
    PyModule_AddIntConstant(m, "PROCMAP_READ", PROCMAP_QUERY_VMA_READABLE);
    PyModule_AddIntConstant(m, "PROCMAP_WRITE", PROCMAP_QUERY_VMA_WRITABLE);
    PyModule_AddIntConstant(m, "PROCMAP_EXEC", PROCMAP_QUERY_VMA_EXECUTABLE);
    PyModule_AddIntConstant(m, "PROCMAP_SHARED", PROCMAP_QUERY_VMA_SHARED);
    return m;
}
