/*
 * vfiosim_preload.c -- the LD_PRELOAD shim of `vfiosim run`.
 *
 * Makes an unmodified program's VFIO system calls reach a simulated machine
 * served by a vfiosim daemon (src/vfiosim/transport/daemon.py), over a
 * SOCK_SEQPACKET Unix socket named by $VFIOSIM_SOCKET (protocol.py has the
 * message layout).  Without that variable the shim does nothing.
 *
 *  - open("/dev/vfio/..."): the shim makes a real placeholder fd (a memfd
 *    named "vfiosim:<kind>") and the daemon installs the simulated file at
 *    that same number, so fd numbers inside ioctl arguments resolve as they
 *    would on Linux.  ioctl/read/write/pread/pwrite/close/dup/fcntl/mmap on
 *    such fds are forwarded; pointers travel as integers and the daemon
 *    reads and writes the program's memory itself (process_vm_readv/writev).
 *  - /sys/bus/pci/devices, /sys/kernel/iommu_groups, /dev/vfio and the
 *    simulated devices' sysfs directories are rewritten to a fake tree
 *    ($VFIOSIM_ROOT, listed in $VFIOSIM_ROOT/prefixes); everything else is
 *    passed to libc untouched.
 *  - /proc/self/status: VmLck and VmPin include what the simulated kernel
 *    accounts.
 *  - mmap of a device region: the range is mapped PROT_NONE; a SIGSEGV
 *    handler decodes the faulting x86-64 MOV, performs the load or store on
 *    the simulated device (one round trip) and steps over the instruction.
 *  - fork(): the parent tells the daemon, the child connects anew.
 *  - set*id/setrlimit/prlimit/capset/prctl: the daemon re-reads the
 *    process's credentials and limits before the next call.
 *
 * If the daemon goes away, every forwarded call fails with EIO.
 *
 * Written for x86-64 Linux with glibc.  Depends only on libc.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <ucontext.h>
#include <unistd.h>
#include <linux/futex.h>
#include <linux/vfio.h>
#include <poll.h>
#include <sys/syscall.h>

#define EXPORT __attribute__((visibility("default")))

/* Paths are joined into PATH_MAX buffers with snprintf; a path too long to rewrite
 * is cut, and the kernel then answers ENOENT/ENAMETOOLONG as it would. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

/* ---------------------------------------------------------------- protocol */

#include "vfiosim_protocol.h"
#include "x86_alu.h"

_Static_assert(sizeof(struct vreq) == 64, "request header");
_Static_assert(sizeof(struct vrep) == 16, "reply header");
_Static_assert(sizeof(struct vchan) <= VCHAN_SIZE, "channel");

/* ---------------------------------------------------------------- libc */

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static FILE *(*real_fopen)(const char *, const char *);
static int (*real_close)(int);
static int (*real_ioctl)(int, unsigned long, ...);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pread)(int, void *, size_t, off_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_munmap)(void *, size_t);
static int (*real_stat)(const char *, struct stat *);
static int (*real_lstat)(const char *, struct stat *);
static int (*real_fstat)(int, struct stat *);
static int (*real_fstatat)(int, const char *, struct stat *, int);
static int (*real_statx)(int, const char *, int, unsigned int, struct statx *);
static int (*real_access)(const char *, int);
static int (*real_faccessat)(int, const char *, int, int);
static ssize_t (*real_readlink)(const char *, char *, size_t);
static ssize_t (*real_readlinkat)(int, const char *, char *, size_t);
static DIR *(*real_opendir)(const char *);
static char *(*real_realpath)(const char *, char *);
static pid_t (*real_fork)(void);
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);
static int (*real_close_range)(unsigned int, unsigned int, int);

static void *sym(const char *name)
{
    return dlsym(RTLD_NEXT, name);
}

static void resolve(void)
{
    static volatile int done;
    if (done)
        return;
    real_open = sym("open");
    real_openat = sym("openat");
    real_fopen = sym("fopen");
    real_close = sym("close");
    real_ioctl = sym("ioctl");
    real_read = sym("read");
    real_write = sym("write");
    real_pread = sym("pread");
    real_pwrite = sym("pwrite");
    real_dup = sym("dup");
    real_dup2 = sym("dup2");
    real_dup3 = sym("dup3");
    real_fcntl = sym("fcntl");
    real_mmap = sym("mmap");
    real_munmap = sym("munmap");
    real_stat = sym("stat");
    real_lstat = sym("lstat");
    real_fstat = sym("fstat");
    real_fstatat = sym("fstatat");
    real_statx = sym("statx");
    real_access = sym("access");
    real_faccessat = sym("faccessat");
    real_readlink = sym("readlink");
    real_readlinkat = sym("readlinkat");
    real_opendir = sym("opendir");
    real_realpath = sym("realpath");
    real_fork = sym("fork");
    real_sigaction = sym("sigaction");
    real_close_range = sym("close_range");
    done = 1;
}

/* ---------------------------------------------------------------- state */

#define VFD_MAX 65536
enum { K_NONE = 0, K_CONTAINER, K_GROUP, K_DEVICE, K_IOMMUFD, K_CDEV };
static unsigned char vfd[VFD_MAX];      /* kind of each simulated fd */
static int vminor[VFD_MAX];             /* group number of group fds, N of a /dev/vfio/devices/vfioN fd */
/* The simulated kernel's /dev/iommu (a misc device) and the vfio-dev cdev major,
 * as a 6.12.118 guest has them; transport/sysfs.py writes the same numbers into the
 * fake /dev and says why. */
#define IOMMUFD_MISC_MINOR 257
#define VFIO_CDEV_MAJOR 242

static int active;                      /* $VFIOSIM_SOCKET is set */
static int sock_fd = -1;
static pid_t sock_pid;
/* A word in a page the kernel empties in a child (MADV_WIPEONFORK, Linux
 * 4.14): non-zero while this is the process that connected.  It tells a child
 * made without our fork() (a raw clone, posix_spawn) from its parent without
 * a getpid() -- a system call on every request; NULL where the kernel
 * refused the advice (getpid() decides then).  A child that shares our
 * memory (posix_spawn's, until its exec) shares the word too: it makes no
 * call of ours before it execs. */
static volatile uint32_t *connected_here;
static int dead;                        /* the daemon went away: EIO from now on */
static volatile int creds_dirty;
static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;

static char root[PATH_MAX];
static size_t root_len;
#define MAX_PREFIXES 256
static char *prefixes[MAX_PREFIXES];
static size_t prefix_len[MAX_PREFIXES];
static int nprefixes;

static inline int is_vfio(int fd)
{
    return fd >= 0 && fd < VFD_MAX && vfd[fd] != K_NONE;
}

static void set_vfio(int fd, int kind, int minor)
{
    if (fd >= 0 && fd < VFD_MAX) {
        vfd[fd] = (unsigned char)kind;
        vminor[fd] = minor;
    }
}

/* ---------------------------------------------------------------- faults */

/*
 * The shim takes SIGSEGV (BAR accesses, below) and SIGBUS, and keeps the
 * program's own dispositions to chain to (its sigaction() and signal() see
 * and set those).  Both also recover the probes: loads and stores of the
 * program's memory that may fault, whose faulting instruction the handler
 * steps to a fixup instead, as the kernel's exception tables do for uaccess.
 */
static struct sigaction prog_segv;      /* the program's own SIGSEGV disposition */
static struct sigaction prog_bus;       /* and SIGBUS */
static int faults_installed;

static void fault_handler(int sig, siginfo_t *si, void *ucv);

static void install_fault_handlers(void)
{
    if (faults_installed)
        return;
    struct sigaction sa, old_segv, old_bus;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, &old_segv) == 0) {
        if (real_sigaction(SIGBUS, &sa, &old_bus) == 0) {
            prog_segv = old_segv;
            prog_bus = old_bus;
            faults_installed = 1;
        } else {
            real_sigaction(SIGSEGV, &old_segv, NULL);
        }
    }
}

/*
 * probe_copy(dst, src, n): copy n bytes, either side possibly the program's
 * memory; returns how many were NOT copied (0: all), stopping at the first
 * byte that faults.  probe_writable(addr): 0 if the byte at addr can be
 * written (an atomic OR of 0: nothing changes), 1 if that faults.
 */
size_t vfiosim_probe_copy(void *dst, const void *src, size_t n) __attribute__((visibility("hidden")));
int vfiosim_probe_writable(void *addr) __attribute__((visibility("hidden")));
extern const char vfiosim_probe_movs[] __attribute__((visibility("hidden")));
extern const char vfiosim_probe_movs_done[] __attribute__((visibility("hidden")));
extern const char vfiosim_probe_lock[] __attribute__((visibility("hidden")));
extern const char vfiosim_probe_lock_done[] __attribute__((visibility("hidden")));
__asm__(".text\n"
        ".globl vfiosim_probe_copy, vfiosim_probe_writable, vfiosim_probe_movs, vfiosim_probe_movs_done\n"
        ".globl vfiosim_probe_lock, vfiosim_probe_lock_done\n"
        ".hidden vfiosim_probe_copy, vfiosim_probe_writable, vfiosim_probe_movs, vfiosim_probe_movs_done\n"
        ".hidden vfiosim_probe_lock, vfiosim_probe_lock_done\n"
        ".type vfiosim_probe_copy, @function\n"
        "vfiosim_probe_copy:\n"
        "    mov %rdx, %rcx\n"
        "vfiosim_probe_movs:\n"
        "    rep movsb\n"                /* a fault leaves rcx = the bytes left */
        "vfiosim_probe_movs_done:\n"
        "    mov %rcx, %rax\n"
        "    ret\n"
        ".size vfiosim_probe_copy, .-vfiosim_probe_copy\n"
        ".type vfiosim_probe_writable, @function\n"
        "vfiosim_probe_writable:\n"
        "    xor %eax, %eax\n"
        "vfiosim_probe_lock:\n"
        "    lock orb $0, (%rdi)\n"
        "vfiosim_probe_lock_done:\n"
        "    ret\n"
        ".size vfiosim_probe_writable, .-vfiosim_probe_writable\n");

/* A fault inside a probe: resume at its fixup.  1 if it was one. */
static int probe_fixup(greg_t *gr)
{
    const char *ip = (const char *)gr[REG_RIP];
    if (ip == vfiosim_probe_movs) {
        gr[REG_RIP] = (greg_t)vfiosim_probe_movs_done;
        return 1;
    }
    if (ip == vfiosim_probe_lock) {
        gr[REG_RAX] = 1;
        gr[REG_RIP] = (greg_t)vfiosim_probe_lock_done;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- the connection */

static struct vchan *chan;              /* the shared-memory channel the hello reply gave us */

static ssize_t xsend(int s, struct msghdr *mh)
{
    ssize_t r;
    do
        r = sendmsg(s, mh, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    return r;
}

static ssize_t xrecv(int s, struct msghdr *mh)
{
    ssize_t r;
    do
        r = recvmsg(s, mh, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    return r;
}

/* A file descriptor the daemon sends on the socket (SCM_RIGHTS), with its message. */
static int recv_fd(int s, void *buf, size_t len, ssize_t *got)
{
    union {
        char b[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {buf, len};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.b;
    mh.msg_controllen = sizeof u.b;
    *got = xrecv(s, &mh);
    if (*got < 0)
        return -1;
    int fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

static void drop_channel(void)
{
    if (chan) {
        real_munmap(chan, VCHAN_SIZE);
        chan = NULL;
    }
}

static void lose_connection(void)
{
    if (sock_fd >= 0)
        real_close(sock_fd);
    sock_fd = -1;
    drop_channel();
    dead = 1;
}

static void say(const char *text)
{
    static int said;
    if (!said++)
        real_write(2, text, strlen(text));
}

/* Why a child could not connect of its own (an errno), said at its first VFIO
 * call: its calls, on the fds it inherited too, fail with EIO. */
static int child_err;

static void child_unconnected(int r)
{
    dead = 1;
    child_err = -r;
}

static void say_child_unconnected(void)
{
    char msg[256];
    snprintf(msg, sizeof msg, "vfiosim: process %d (uid %d) cannot reach the daemon: %s; its VFIO calls fail "
             "with EIO (a process that dropped privileges before it forked: see Limits in docs/run.md)\n",
             (int)getpid(), (int)geteuid(), strerror(child_err));
    say(msg);
}

/* Only these paths may be rewritten into the daemon's tree, whatever its prefixes file says. */
static int allowed_prefix(const char *p)
{
    static const char *const ok[] = {"/dev/vfio", "/sys/bus/pci/devices", "/sys/bus/pci/drivers/",
                                     "/sys/kernel/iommu_groups", "/sys/devices/pci", "/sys/class/vfio-dev",
                                     "/sys/module/vfio", "/sys/module/iommufd", "/sys/kernel/debug/iommu",
                                     "/sys/kernel/debug/vfio"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (strncmp(p, ok[i], strlen(ok[i])) == 0 && !strstr(p, "/.."))
            return 1;
    return 0;
}

static void load_prefixes(void)
{
    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/prefixes", root);
    int fd = real_open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return;
    char buf[32768];
    ssize_t n = 0, r;
    while (n < (ssize_t)sizeof buf - 1 && (r = real_read(fd, buf + n, sizeof buf - 1 - n)) > 0)
        n += r;
    real_close(fd);
    buf[n < 0 ? 0 : n] = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line && nprefixes < MAX_PREFIXES;
         line = strtok_r(NULL, "\n", &save)) {
        if (!allowed_prefix(line))
            continue;
        prefixes[nprefixes] = strdup(line);
        prefix_len[nprefixes] = strlen(line);
        nprefixes++;
    }
}

static void set_root(const char *r)
{
    if (!r || !*r || root_len)
        return;
    snprintf(root, sizeof root, "%s", r);
    root_len = strlen(root);
    load_prefixes();
}

/* Whether the connection (sock_fd, the channel) is this process's own, not a
 * parent's seen from a child that did not reconnect. */
static inline int connection_is_ours(void)
{
    if (connected_here)
        return *connected_here != 0;
    return sock_pid == getpid();
}

/* The connection just made is this process's. */
static void mark_connected_here(void)
{
    static int tried;
    if (!tried) {
        tried = 1;
        void *page = real_mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page != MAP_FAILED) {
            if (madvise(page, 4096, MADV_WIPEONFORK) == 0)
                connected_here = page;
            else
                real_munmap(page, 4096);
        }
    }
    if (connected_here)
        *connected_here = 1;
}

/* Connect, check who answers, say hello and map the channel; called with lk held.  0 or -errno. */
static int do_connect(uint32_t hello_flags)
{
    const char *path = getenv("VFIOSIM_SOCKET");
    if (!path)
        return -ENOENT;
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    struct sockaddr_un sa = {0};
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        real_close(s);
        return -(e == ENOENT || e == ECONNREFUSED ? EIO : e);
    }
    /* A daemon of another (non-root) user could serve us a tree of its choosing. */
    struct ucred peer;
    socklen_t plen = sizeof peer;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &peer, &plen) < 0 ||
        (peer.uid != 0 && peer.uid != getuid() && peer.uid != geteuid())) {
        say("vfiosim: the daemon on $VFIOSIM_SOCKET runs as another user: not using it\n");
        real_close(s);
        return -EACCES;
    }
    /* Keep the socket out of the way of the program's own fd numbers. */
    int high = real_fcntl(s, F_DUPFD_CLOEXEC, 900);
    if (high >= 0) {
        real_close(s);
        s = high;
    }
    struct timeval tv = {30, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct timeval tw = {10, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tw, sizeof tw);
    struct vreq rq = {0};
    rq.op = VOP_HELLO;
    rq.flags = hello_flags;
    rq.fd = rq.fd2 = -1;
    rq.a[0] = VFIOSIM_MAGIC_VERSION;
    /* The kernel vouches for these: the daemon knows the hello is ours. */
    union {
        char b[CMSG_SPACE(sizeof(struct ucred))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct iovec iov = {&rq, sizeof rq};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.b;
    mh.msg_controllen = sizeof u.b;
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_CREDENTIALS;
    c->cmsg_len = CMSG_LEN(sizeof(struct ucred));
    struct ucred me = {getpid(), getuid(), getgid()};
    memcpy(CMSG_DATA(c), &me, sizeof me);
    if (xsend(s, &mh) != sizeof rq) {
        real_close(s);
        return -EIO;
    }
    struct {
        struct vrep rp;
        char root[PATH_MAX];
    } reply;
    ssize_t n;
    int cfd = recv_fd(s, &reply, sizeof reply - 1, &n);
    if (n < (ssize_t)sizeof reply.rp || reply.rp.ret < 0 || cfd < 0) {
        if (cfd >= 0)
            real_close(cfd);
        real_close(s);
        return n >= (ssize_t)sizeof reply.rp && reply.rp.err ? -reply.rp.err : -EIO;
    }
    struct vchan *ch = real_mmap(NULL, VCHAN_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
    real_close(cfd);
    if (ch == MAP_FAILED || ch->magic != VFIOSIM_MAGIC_VERSION) {
        if (ch != MAP_FAILED)
            real_munmap(ch, VCHAN_SIZE);
        real_close(s);
        return -EIO;
    }
    ((char *)&reply)[n] = 0;
    set_root(reply.root);
    drop_channel();
    chan = ch;
    sock_fd = s;
    sock_pid = getpid();
    mark_connected_here();
    install_fault_handlers();
    return 0;
}

/* The daemon closed its end of the socket: it is gone. */
static int daemon_gone(void)
{
    struct pollfd p = {sock_fd, POLLRDHUP, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL));
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * Waiting for a reply.  Waking a thread that sleeps costs a futex wake-up
 * and, on an idle virtual CPU, an interrupt and a halt exit: tens of
 * microseconds on a VM, ten times a call.  So the program spins for the
 * reply (as its serving thread in the daemon spins for the next request,
 * vfiosim_daemon.c), but only while that is likely to pay:
 *  - for up to twice what the daemon took lately (learnt: a long call, a
 *    large map, makes it sleep at once);
 *  - while the serving thread is up (it was not asleep, or it took the
 *    request: taken_seq) and not on this CPU (it would need the CPU this
 *    spins on), or for a while if the call woke it;
 *  - until this thread is preempted (a gap between two looks at the clock):
 *    the CPU is wanted by others.
 * Guarded by lk.
 */
#define SPIN_MIN_NS 20000u
#define SPIN_MAX_NS 500000u
#define SPIN_WOKEN_NS 100000u           /* how long a serving thread this call woke may take to appear */
#define PREEMPTED_NS 30000u
static uint64_t spin_budget = 50000;

static void learn(uint64_t took, int caught)
{
    uint64_t b = spin_budget;
    if (caught || took < SPIN_MAX_NS) {
        uint64_t want = 2 * took + SPIN_MIN_NS;
        b = want > b ? want : (7 * b + want) / 8;
    } else {
        b /= 2;
    }
    spin_budget = b < SPIN_MIN_NS ? SPIN_MIN_NS : b > SPIN_MAX_NS ? SPIN_MAX_NS : b;
}

static inline int replied(uint32_t seq)
{
    if (__atomic_load_n(&chan->daemon.rep_seq, __ATOMIC_ACQUIRE) != seq)
        return 0;
    __atomic_store_n(&chan->prog.cpu, (uint32_t)sched_getcpu(), __ATOMIC_RELAXED);
    __atomic_store_n(&chan->prog.ack_seq, seq, __ATOMIC_RELEASE);
    return 1;
}

/* Wait for the reply to request `seq`: spin, then sleep on the daemon's word,
 * checking now and then that the daemon still lives.  0, or -1 if it is gone. */
static int await_reply(uint32_t seq, int woke)
{
    uint64_t start = now_ns(), prev = start, budget = spin_budget;
    uint32_t cpu = (uint32_t)sched_getcpu();
    __atomic_store_n(&chan->prog.cpu, cpu, __ATOMIC_RELAXED);
    int contended = 0;
    for (unsigned i = 0; __atomic_load_n(&chan->daemon.spin, __ATOMIC_RELAXED); i++) {
        if (replied(seq)) {
            learn(now_ns() - start, 1);
            return 0;
        }
        if ((i & 31) == 31) {
            uint64_t t = now_ns();
            if (t - start >= budget)
                break;
            if (!woke || __atomic_load_n(&chan->daemon.taken_seq, __ATOMIC_RELAXED) == seq)
                /* the serving thread is up (it was, or it took the request): not on our CPU */
                contended = __atomic_load_n(&chan->daemon.cpu, __ATOMIC_RELAXED) == cpu;
            else                      /* woken, not there yet: asleep still, or without a CPU */
                contended = t - start >= SPIN_WOKEN_NS;
            if (contended || (contended = t - prev >= PREEMPTED_NS))
                break;
            prev = t;
        }
        __builtin_ia32_pause();
    }
    if (contended)
        __atomic_store_n(&chan->prog.spin_fails, chan->prog.spin_fails + 1, __ATOMIC_RELAXED);
    for (;;) {
        if (daemon_gone())
            return -1;
        __atomic_store_n(&chan->prog.prog_waiting, 1, __ATOMIC_SEQ_CST);
        uint32_t cur = __atomic_load_n(&chan->daemon.rep_seq, __ATOMIC_SEQ_CST);
        if (cur != seq) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            syscall(SYS_futex, &chan->daemon.rep_seq, FUTEX_WAIT, cur, &ts, NULL, 0);
        }
        __atomic_store_n(&chan->prog.prog_waiting, 0, __ATOMIC_RELAXED);
        if (replied(seq)) {
            learn(now_ns() - start, 0);
            return 0;
        }
    }
}

static int calls_since_kick = 1;       /* a request since the last posted doorbell (guarded by lk) */

/* Tell the daemon there is work (a request, or a store with side effects);
 * called with lk held.  1 if its thread slept and was woken. */
static int kick_daemon(void)
{
    __atomic_store_n(&chan->prog.wake_seq, chan->prog.wake_seq + 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&chan->daemon.daemon_waiting, __ATOMIC_SEQ_CST))
        return 0;
    syscall(SYS_futex, &chan->prog.wake_seq, FUTEX_WAKE, 1, NULL, NULL, 0);
    return 1;
}

/* Make sure we have a connection of our own; called with lk held.  0 or errno. */
static int connected(void)
{
    if (sock_fd >= 0 && !connection_is_ours()) {
        /* A child made without our fork() (clone, posix_spawn): the channel is the parent's. */
        real_close(sock_fd);
        sock_fd = -1;
        drop_channel();               /* our view of the parent's channel: never write to it */
        int r = do_connect(VHELLO_FORK);
        if (r < 0)
            child_unconnected(r);
    }
    if (!dead && sock_fd < 0) {
        int r = do_connect(0);
        if (r < 0) {
            dead = (r == -EIO);
            return -r;
        }
    }
    if (dead && child_err)
        say_child_unconnected();
    return dead ? EIO : 0;
}

/* One request, one reply.  Returns the reply's ret; on failure -1 with *err set. */
static int64_t rpc_len(uint32_t op, uint32_t flags, int fd, int fd2, const uint64_t a[5], const void *payload,
                       uint32_t plen, void *out, uint32_t outmax, uint32_t *outlen, int *err)
{
    pthread_mutex_lock(&lk);
    int e = connected();
    if (e) {
        pthread_mutex_unlock(&lk);
        *err = e;
        return -1;
    }
    if (plen > VMAX_PAYLOAD)
        plen = VMAX_PAYLOAD;
    struct vreq *rq = &chan->req;
    rq->op = op;
    rq->flags = flags;
    if (creds_dirty) {
        creds_dirty = 0;
        rq->flags |= VF_REFRESH_CREDS;
    }
    rq->fd = fd;
    rq->fd2 = fd2;
    for (int i = 0; i < 5; i++)
        rq->a[i] = a ? a[i] : 0;
    rq->len = plen;
    rq->reserved = 0;
    if (plen)
        memcpy(chan->req_payload, payload, plen);
    uint32_t seq = chan->prog.req_seq + 1;
    __atomic_store_n(&chan->prog.req_seq, seq, __ATOMIC_RELEASE);
    calls_since_kick = 1;
    int woke = kick_daemon();
    if (await_reply(seq, woke) < 0) {
        lose_connection();
        pthread_mutex_unlock(&lk);
        *err = EIO;
        return -1;
    }
    int64_t ret = chan->rep.ret;
    int32_t rerr = chan->rep.err;
    uint32_t len = chan->rep.len;
    if (len > outmax)
        len = outmax;
    if (out && len)
        memcpy(out, chan->rep_payload, len);
    if (outlen)
        *outlen = len;
    pthread_mutex_unlock(&lk);
    if (ret < 0) {
        *err = rerr ? rerr : EIO;
        return -1;
    }
    *err = 0;
    return ret;
}

static int64_t rpc(uint32_t op, uint32_t flags, int fd, int fd2, const uint64_t a[5], const void *payload,
                   uint32_t plen, void *out, uint32_t outmax, int *err)
{
    return rpc_len(op, flags, fd, fd2, a, payload, plen, out, outmax, NULL, err);
}

/*
 * A call with a pointer argument `ptr` to `want` bytes (or an unknown number:
 * an ioctl's struct) sends along a copy of up to VWIN_MAX of them, not past
 * ptr's page, as the program itself can read them, and says whether it could
 * write them: the daemon's copy_from_user and copy_to_user of those bytes use
 * the copy, instead of two system calls each on the program's
 * /proc/<pid>/mem, and the reply says what to store back.  A byte the
 * program cannot read ends the copy there (the daemon then reads the rest,
 * and faults, as the kernel would).
 */
static int64_t call_window(uint32_t op, uint32_t flags, int fd, int fd2, uint64_t a0, uint64_t a1, uint64_t a2,
                           uint64_t a3, uint64_t ptr, size_t want)
{
    uint8_t win[VWIN_MAX];
    uint64_t a[5] = {a0, a1, a2, a3, 0};
    size_t n = 0;
    if (faults_installed && ptr >= 65536 && ptr < (1ull << 47) && want) {
        size_t room = 4096 - (ptr & 4095);
        n = want < room ? want : room;
        if (n > VWIN_MAX)
            n = VWIN_MAX;
        n -= vfiosim_probe_copy(win, (const void *)(uintptr_t)ptr, n);
        if (n) {
            flags |= VF_WINDOW;
            if (!vfiosim_probe_writable((void *)(uintptr_t)ptr))
                flags |= VF_WINDOW_WRITABLE;
            a[4] = ptr;
        }
    }
    struct {
        uint32_t offset;
        uint8_t data[VWIN_MAX];
    } back;
    uint32_t blen = 0;
    int err;
    int64_t r = rpc_len(op, flags, fd, fd2, a, win, (uint32_t)n, &back, sizeof back, &blen, &err);
    if (blen > sizeof back.offset) {
        size_t dlen = blen - sizeof back.offset;
        if ((flags & VF_WINDOW_WRITABLE) && back.offset <= n && dlen <= n - back.offset &&
            vfiosim_probe_copy((void *)(uintptr_t)(ptr + back.offset), back.data, dlen)) {
            errno = EFAULT;          /* it stopped being writable meanwhile: copy_to_user failed */
            return -1;
        }
    }
    if (r < 0)
        errno = err;
    return r;
}

/*
 * How much of an ioctl's argument to send along: VFIO's structs (and
 * iommufd's) begin with their size (argsz), and the kernel reads and writes
 * no more than that of a well-formed call, so a window of argsz bytes, at
 * least WIN_MIN (an int, a struct without argsz), is enough; a call that
 * reads past it (argsz too small: the kernel still reads minsz, then says
 * EINVAL) has the daemon read the rest itself.  Each 64 bytes sent is a
 * cache line the daemon's CPU must fetch from the program's: a MAP_DMA's 32
 * bytes are one line, where the whole VWIN_MAX was eight.
 */
#define WIN_MIN 64
static size_t ioctl_window_len(const void *arg)
{
    uint32_t argsz;
    uintptr_t p = (uintptr_t)arg;
    if (!faults_installed || p < 65536 || p >= (1ull << 47) || (p & 4095) > 4096 - sizeof argsz ||
        vfiosim_probe_copy(&argsz, arg, sizeof argsz))
        return VWIN_MAX;                    /* call_window() decides, as before */
    if (argsz <= WIN_MIN)
        return WIN_MIN;
    return argsz < VWIN_MAX ? (argsz + WIN_MIN - 1) & ~(size_t)(WIN_MIN - 1) : VWIN_MAX;
}

static int64_t call(uint32_t op, uint32_t flags, int fd, int fd2, uint64_t a0, uint64_t a1, uint64_t a2,
                    uint64_t a3)
{
    uint64_t a[5] = {a0, a1, a2, a3, 0};
    int err;
    int64_t r = rpc(op, flags, fd, fd2, a, NULL, 0, NULL, 0, &err);
    if (r < 0)
        errno = err;
    return r;
}

/* ---------------------------------------------------------------- paths */

/* Lexically normalise an absolute path ("//", "/./", "/.."). */
static int normalize(const char *in, char *out, size_t outsz)
{
    size_t o = 0;
    const char *p = in;
    if (*p != '/')
        return -1;
    while (*p) {
        while (*p == '/')
            p++;
        if (!*p)
            break;
        const char *e = strchrnul(p, '/');
        size_t n = (size_t)(e - p);
        if (n == 1 && p[0] == '.') {
            /* skip */
        } else if (n == 2 && p[0] == '.' && p[1] == '.') {
            while (o > 0 && out[o - 1] != '/')
                o--;
            if (o > 0)
                o--;
        } else {
            if (o + 1 + n + 1 > outsz)
                return -1;
            out[o++] = '/';
            memcpy(out + o, p, n);
            o += n;
        }
        p = e;
    }
    if (o == 0)
        out[o++] = '/';
    out[o] = 0;
    return 0;
}

enum { P_NONE, P_NODE, P_REWRITE, P_STATUS };

static int under(const char *path, const char *prefix, size_t len)
{
    return strncmp(path, prefix, len) == 0 && (path[len] == 0 || path[len] == '/');
}

static int is_status_path(const char *n)
{
    char mine[64];
    const char *rest = NULL;
    if (strncmp(n, "/proc/self/", 11) == 0)
        rest = n + 11;
    else if (strncmp(n, "/proc/thread-self/", 18) == 0)
        return strcmp(n + 18, "status") == 0;
    else {
        int k = snprintf(mine, sizeof mine, "/proc/%d/", (int)getpid());
        if (strncmp(n, mine, (size_t)k) == 0)
            rest = n + k;
    }
    if (!rest)
        return 0;
    if (strcmp(rest, "status") == 0)
        return 1;
    if (strncmp(rest, "task/", 5) == 0) {
        const char *q = rest + 5;
        while (*q >= '0' && *q <= '9')
            q++;
        return q > rest + 5 && strcmp(q, "/status") == 0;
    }
    return 0;
}

/* Classify a path; for P_NODE the normalised path, for P_REWRITE the path in the fake tree. */
static int classify(int dirfd, const char *path, char *buf, size_t bufsz)
{
    if (!active || !path || path[0] != '/')
        return P_NONE;
    (void)dirfd;                      /* absolute paths ignore dirfd */
    if (strncmp(path, "/dev/", 5) != 0 && strncmp(path, "/sys/", 5) != 0 && strncmp(path, "/proc/", 6) != 0 &&
        strncmp(path, "//", 2) != 0)
        return P_NONE;
    char n[PATH_MAX];
    if (normalize(path, n, sizeof n) < 0)
        return P_NONE;
    /* /dev/iommu is the simulated kernel's too: it exists exactly when the
     * machine's kernel has CONFIG_IOMMUFD, whatever the host has. */
    if ((strncmp(n, "/dev/vfio/", 10) == 0 && n[10]) || strcmp(n, "/dev/iommu") == 0) {
        snprintf(buf, bufsz, "%s", n);
        return P_NODE;
    }
    if (strncmp(n, "/proc/", 6) == 0)
        return is_status_path(n) && sock_fd >= 0 && !dead ? P_STATUS : P_NONE;
    /* In sysfs '..' follows the links it comes through (/sys/bus/pci/devices/BDF is a
     * link into /sys/devices): below a rewritten prefix, the path goes into the tree
     * as it is, and the tree's own links resolve it, as libpci's driver lookup needs. */
    const char *dotdot = strstr(path, "/..");
    while (dotdot && dotdot[3] != '/' && dotdot[3] != 0)
        dotdot = strstr(dotdot + 3, "/..");
    if (dotdot && strncmp(path, "/sys/", 5) == 0) {
        char head[PATH_MAX], hn[PATH_MAX];
        size_t len = (size_t)(dotdot - path);
        if (len < sizeof head) {
            memcpy(head, path, len);
            head[len] = 0;
            if (normalize(head, hn, sizeof hn) == 0)
                for (int i = 0; i < nprefixes; i++)
                    if (under(hn, prefixes[i], prefix_len[i]))
                        return (size_t)snprintf(buf, bufsz, "%s%s", root, path) >= bufsz ? P_NONE : P_REWRITE;
        }
    }
    for (int i = 0; i < nprefixes; i++) {
        if (under(n, prefixes[i], prefix_len[i])) {
            if ((size_t)snprintf(buf, bufsz, "%s%s", root, n) >= bufsz)
                return P_NONE;
            return P_REWRITE;
        }
    }
    return P_NONE;
}

/* ---------------------------------------------------------------- /proc/self/status */

static void put_line(char *out, size_t *o, size_t cap, const char *text)
{
    size_t n = strlen(text);
    if (*o + n < cap) {
        memcpy(out + *o, text, n);
        *o += n;
    }
}

static int status_open(const char *path, int flags)
{
    int fd = real_open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    enum { CAP = 32768 };
    char *in = malloc(CAP), *out = malloc(CAP + 512);
    if (!in || !out) {
        free(in);
        free(out);
        real_close(fd);
        errno = ENOMEM;
        return -1;
    }
    size_t n = 0;
    ssize_t r;
    while (n < CAP - 1 && (r = real_read(fd, in + n, CAP - 1 - n)) > 0)
        n += (size_t)r;
    real_close(fd);
    in[n] = 0;
    uint64_t sim[2] = {0, 0};
    int err;
    uint64_t a[5] = {0};
    if (rpc(VOP_STATUS, 0, -1, -1, a, NULL, 0, sim, sizeof sim, &err) < 0) {
        sim[0] = sim[1] = 0;
    }
    size_t o = 0;
    char *save = NULL;
    for (char *line = strtok_r(in, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char tmp[128];
        if (strncmp(line, "VmLck:", 6) == 0 || strncmp(line, "VmPin:", 6) == 0) {
            unsigned long long real_kb = strtoull(line + 6, NULL, 10);
            unsigned long long v = real_kb + (line[2] == 'L' ? sim[0] : sim[1]);
            snprintf(tmp, sizeof tmp, "%.6s\t%8llu kB\n", line, v);
            put_line(out, &o, CAP + 512, tmp);
        } else {
            put_line(out, &o, CAP + 512, line);
            put_line(out, &o, CAP + 512, "\n");
        }
    }
    int m = memfd_create("proc-status", (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (m >= 0) {
        size_t w = 0;
        while (w < o && (r = real_write(m, out + w, o - w)) > 0)
            w += (size_t)r;
        lseek(m, 0, SEEK_SET);
    }
    free(in);
    free(out);
    return m;
}

/* ---------------------------------------------------------------- open and close */

static int vfio_open(const char *path, int flags, mode_t mode)
{
    const char *name = path + 10;     /* after "/dev/vfio/" */
    int kind, minor = 0;
    char label[64];
    if (strcmp(path, "/dev/iommu") == 0) {
        kind = K_IOMMUFD;
        snprintf(label, sizeof label, "vfiosim:iommufd");
    } else if (strncmp(name, "devices/vfio", 12) == 0) {
        kind = K_CDEV;                /* a device cdev: the device fd itself */
        minor = atoi(name + 12);
        snprintf(label, sizeof label, "vfiosim:device:cdev:%d", minor);
    } else if (strcmp(name, "vfio") == 0) {
        kind = K_CONTAINER;
        snprintf(label, sizeof label, "vfiosim:container");
    } else {
        kind = K_GROUP;
        minor = atoi(name);
        snprintf(label, sizeof label, "vfiosim:group:%d", minor);
    }
    int ph = memfd_create(label, (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    if (ph < 0)
        return -1;
    if (ph >= VFD_MAX) {
        real_close(ph);
        errno = EMFILE;
        return -1;
    }
    if ((flags & O_ACCMODE) != O_RDWR || (flags & O_NONBLOCK)) {
        /* Reopen it with the program's access mode, so F_GETFL reports what it asked for. */
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", ph);
        int acc = (flags & O_ACCMODE) == O_ACCMODE ? O_RDWR : (flags & O_ACCMODE);
        int re = real_open(self, acc | (flags & O_NONBLOCK) | O_CLOEXEC);
        if (re >= 0) {
            real_dup3(re, ph, flags & O_CLOEXEC);
            real_close(re);
        }
    }
    uint64_t a[5] = {(uint64_t)(unsigned)flags, mode, 0, 0, 0};
    int err;
    int64_t r = rpc(VOP_OPEN, 0, ph, -1, a, path, (uint32_t)strlen(path), NULL, 0, &err);
    if (r < 0) {
        real_close(ph);
        errno = err;
        return -1;
    }
    set_vfio(ph, kind, minor);
    return ph;
}

static int do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
    char buf[PATH_MAX];
    switch (classify(dirfd, path, buf, sizeof buf)) {
    case P_NODE:
        return vfio_open(buf, flags, mode);
    case P_REWRITE:
        return real_openat(dirfd, buf, flags, mode);
    case P_STATUS:
        return status_open(path, flags);
    default:
        return real_openat(dirfd, path, flags, mode);
    }
}

#define MODE_ARG(flags, mode)                          \
    mode_t mode = 0;                                   \
    if ((flags) & (O_CREAT | __O_TMPFILE)) {           \
        va_list ap;                                    \
        va_start(ap, flags);                           \
        mode = (mode_t)va_arg(ap, int);                \
        va_end(ap);                                    \
    }

EXPORT int open(const char *path, int flags, ...)
{
    resolve();
    MODE_ARG(flags, mode);
    return do_openat(AT_FDCWD, path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    resolve();
    MODE_ARG(flags, mode);
    return do_openat(AT_FDCWD, path, flags, mode);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    resolve();
    MODE_ARG(flags, mode);
    return do_openat(dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    resolve();
    MODE_ARG(flags, mode);
    return do_openat(dirfd, path, flags, mode);
}

EXPORT int __open_2(const char *path, int flags)
{
    resolve();
    return do_openat(AT_FDCWD, path, flags, 0);
}

EXPORT int __open64_2(const char *path, int flags)
{
    resolve();
    return do_openat(AT_FDCWD, path, flags, 0);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
    resolve();
    return do_openat(dirfd, path, flags, 0);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
    resolve();
    return do_openat(dirfd, path, flags, 0);
}

static FILE *do_fopen(const char *path, const char *mode)
{
    char buf[PATH_MAX];
    switch (classify(AT_FDCWD, path, buf, sizeof buf)) {
    case P_REWRITE:
        return real_fopen(buf, mode);
    case P_STATUS: {
        int fd = status_open(path, strchr(mode, 'e') ? O_CLOEXEC : 0);
        if (fd < 0)
            return NULL;
        FILE *f = fdopen(fd, "r");
        if (!f)
            real_close(fd);
        return f;
    }
    case P_NODE: {
        int flags = strchr(mode, '+') ? O_RDWR : mode[0] == 'r' ? O_RDONLY : O_WRONLY;
        int fd = vfio_open(buf, flags | (strchr(mode, 'e') ? O_CLOEXEC : 0), 0);
        if (fd < 0)
            return NULL;
        return fdopen(fd, mode);
    }
    default:
        return real_fopen(path, mode);
    }
}

EXPORT FILE *fopen(const char *path, const char *mode)
{
    resolve();
    return do_fopen(path, mode);
}

EXPORT FILE *fopen64(const char *path, const char *mode)
{
    resolve();
    return do_fopen(path, mode);
}

static void forget(int fd)
{
    if (is_vfio(fd)) {
        vfd[fd] = K_NONE;
        int saved = errno;
        call(VOP_CLOSE, 0, fd, -1, 0, 0, 0, 0);
        errno = saved;
    }
}

EXPORT int close(int fd)
{
    resolve();
    if (fd >= 0 && fd == sock_fd && connection_is_ours())
        return 0;                     /* our connection: a close-everything loop must not cut it */
    forget(fd);
    return real_close(fd);
}

EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
    resolve();
    for (unsigned int fd = first; fd <= last && fd < VFD_MAX; fd++) {
        if (!is_vfio((int)fd))
            continue;
        if (flags & CLOSE_RANGE_CLOEXEC)
            call(VOP_SETFD, 0, (int)fd, -1, 1, 0, 0, 0);
        else
            forget((int)fd);
    }
    if (!real_close_range) {
        errno = ENOSYS;
        return -1;
    }
    unsigned int s = (unsigned int)sock_fd;
    if (sock_fd >= 0 && connection_is_ours() && first <= s && s <= last) {
        /* Keep our connection open. */
        int r = 0;
        if (s > first)
            r = real_close_range(first, s - 1, flags);
        if (r == 0 && s < last)
            r = real_close_range(s + 1, last, flags);
        return r;
    }
    return real_close_range(first, last, flags);
}

/* glibc's closefrom() calls close_range() inside libc, past the wrapper above. */
EXPORT void closefrom(int lowfd)
{
    resolve();
    close_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0u, 0);
}

/* ---------------------------------------------------------------- dup and fcntl */

/* After a real dup of a simulated fd to `newfd`. */
static void dup_done(int oldfd, int newfd, int cloexec)
{
    if (newfd < 0 || newfd >= VFD_MAX)
        return;
    int saved = errno;
    if (call(VOP_DUP, 0, oldfd, newfd, cloexec ? 1 : 0, 0, 0, 0) >= 0)
        set_vfio(newfd, vfd[oldfd], vminor[oldfd]);
    errno = saved;
}

EXPORT int dup(int fd)
{
    resolve();
    int n = real_dup(fd);
    if (n >= 0 && is_vfio(fd))
        dup_done(fd, n, 0);
    return n;
}

static int do_dup3(int oldfd, int newfd, int flags, int is_dup2)
{
    int n = is_dup2 ? real_dup2(oldfd, newfd) : real_dup3(oldfd, newfd, flags);
    if (n < 0 || oldfd == newfd)
        return n;
    if (is_vfio(oldfd)) {
        if (is_vfio(newfd))
            vfd[newfd] = K_NONE;      /* the daemon's dup2 replaces it */
        dup_done(oldfd, newfd, flags & O_CLOEXEC);
    } else if (is_vfio(newfd)) {
        forget(newfd);                 /* newfd now names a file of the host */
    }
    return n;
}

EXPORT int dup2(int oldfd, int newfd)
{
    resolve();
    return do_dup3(oldfd, newfd, 0, 1);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    resolve();
    return do_dup3(oldfd, newfd, flags, 0);
}

static int do_fcntl(int fd, int cmd, void *arg)
{
    int r = real_fcntl(fd, cmd, arg);
    if (r < 0 || !is_vfio(fd))
        return r;
    switch (cmd) {
    case F_DUPFD:
    case F_DUPFD_CLOEXEC:
        dup_done(fd, r, cmd == F_DUPFD_CLOEXEC);
        break;
    case F_SETFD: {
        int saved = errno;
        call(VOP_SETFD, 0, fd, -1, ((long)arg & FD_CLOEXEC) ? 1 : 0, 0, 0, 0);
        errno = saved;
        break;
    }
    }
    return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    resolve();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return do_fcntl(fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
    resolve();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return do_fcntl(fd, cmd, arg);
}

/* ---------------------------------------------------------------- ioctl, read, write */

EXPORT int ioctl(int fd, unsigned long request, ...)
{
    resolve();
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!is_vfio(fd))
        return real_ioctl(fd, request, arg);
    unsigned int cmd = (unsigned int)request;
    if (cmd == FIOCLEX || cmd == FIONCLEX || cmd == FIONBIO)
        real_ioctl(fd, request, arg);
    int ph = -1;
    if (cmd == VFIO_GROUP_GET_DEVICE_FD) {
        ph = memfd_create("vfiosim:device", MFD_CLOEXEC);
        if (ph < 0)
            return -1;
        if (ph >= VFD_MAX) {
            real_close(ph);
            errno = EMFILE;
            return -1;
        }
    }
    int64_t r = call_window(VOP_IOCTL, 0, fd, ph, cmd, (uint64_t)(uintptr_t)arg, 0, 0, (uint64_t)(uintptr_t)arg,
                            ioctl_window_len(arg));
    if (ph >= 0) {
        if (r == ph) {
            set_vfio(ph, K_DEVICE, 0);
        } else {
            int saved = errno;
            real_close(ph);
            errno = saved;
        }
    }
    return (int)r;
}

static ssize_t rw(uint32_t op, int fd, const void *buf, size_t count, off_t off, int positional)
{
    return (ssize_t)call_window(op, positional ? VRW_POSITIONAL : 0, fd, -1, (uint64_t)(uintptr_t)buf, count,
                                (uint64_t)off, 0, (uint64_t)(uintptr_t)buf, count);
}

EXPORT ssize_t read(int fd, void *buf, size_t count)
{
    resolve();
    if (!is_vfio(fd))
        return real_read(fd, buf, count);
    return rw(VOP_READ, fd, buf, count, 0, 0);
}

EXPORT ssize_t write(int fd, const void *buf, size_t count)
{
    resolve();
    if (!is_vfio(fd))
        return real_write(fd, buf, count);
    return rw(VOP_WRITE, fd, buf, count, 0, 0);
}

EXPORT ssize_t pread(int fd, void *buf, size_t count, off_t off)
{
    resolve();
    if (!is_vfio(fd))
        return real_pread(fd, buf, count, off);
    return rw(VOP_READ, fd, buf, count, off, 1);
}

EXPORT ssize_t pread64(int fd, void *buf, size_t count, off_t off)
{
    return pread(fd, buf, count, off);
}

EXPORT ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
    resolve();
    if (!is_vfio(fd))
        return real_pwrite(fd, buf, count, off);
    return rw(VOP_WRITE, fd, buf, count, off, 1);
}

EXPORT ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off)
{
    return pwrite(fd, buf, count, off);
}

/* _FORTIFY_SOURCE builds call these when the destination's size is known at
 * compile time but the length is not (QEMU's vfio_pci_read_config() reads `len`
 * bytes of config space into a uint32_t this way); glibc's own versions make
 * the system call directly, past the wrappers above, so they are wrapped too. */
extern void __chk_fail(void) __attribute__((noreturn));

EXPORT ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
    if (count > buflen)
        __chk_fail();
    return read(fd, buf, count);
}

EXPORT ssize_t __pread_chk(int fd, void *buf, size_t count, off_t off, size_t buflen)
{
    if (count > buflen)
        __chk_fail();
    return pread(fd, buf, count, off);
}

EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t count, off_t off, size_t buflen)
{
    if (count > buflen)
        __chk_fail();
    return pread(fd, buf, count, off);
}

/* ---------------------------------------------------------------- stat and friends */

static int node_info(const char *fake, unsigned *maj, unsigned *min, unsigned *mode, unsigned *uid, unsigned *gid)
{
    int fd = real_open(fake, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char b[128];
    ssize_t n = real_read(fd, b, sizeof b - 1);
    real_close(fd);
    if (n <= 0)
        return -1;
    b[n] = 0;
    return sscanf(b, "%u %u %o %u %u", maj, min, mode, uid, gid) == 5 ? 0 : -1;
}

static void patch_node_stat(const char *fake, struct stat *st)
{
    unsigned maj, min, mode, uid, gid;
    if (node_info(fake, &maj, &min, &mode, &uid, &gid) == 0) {
        st->st_mode = S_IFCHR | mode;
        st->st_rdev = makedev(maj, min);
        st->st_uid = uid;
        st->st_gid = gid;
        st->st_size = 0;
        st->st_blocks = 0;
    }
}

static int node_of_fd(int fd, char *buf, size_t n);

static void patch_fd_stat(int fd, struct stat *st)
{
    char node[64], fake[PATH_MAX + 64];
    switch (vfd[fd]) {
    case K_CONTAINER:
    case K_GROUP:
        /* The node's owner and mode, as the daemon's tree has them now (after a chown, say). */
        st->st_mode = S_IFCHR | (vfd[fd] == K_CONTAINER ? 0666 : 0600);
        st->st_rdev = vfd[fd] == K_CONTAINER ? makedev(10, 196) : makedev(243, vminor[fd]);
        if (node_of_fd(fd, node, sizeof node)) {
            snprintf(fake, sizeof fake, "%s%s", root, node);
            patch_node_stat(fake, st);
        }
        break;
    case K_DEVICE:
        st->st_mode = 0600;            /* an anonymous inode */
        st->st_rdev = 0;
        break;
    case K_CDEV:
        st->st_mode = S_IFCHR | 0600;
        st->st_rdev = makedev(VFIO_CDEV_MAJOR, vminor[fd]);
        break;
    case K_IOMMUFD:
        st->st_mode = S_IFCHR | 0660;
        st->st_rdev = makedev(10, IOMMUFD_MISC_MINOR);
        break;
    }
    st->st_size = 0;
}

static int do_fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
    char buf[PATH_MAX];
    if (path && !*path && (flags & AT_EMPTY_PATH)) {
        int r = real_fstatat(dirfd, path, st, flags);
        if (r == 0 && is_vfio(dirfd))
            patch_fd_stat(dirfd, st);
        return r;
    }
    int c = classify(dirfd, path, buf, sizeof buf);
    if (c == P_NODE) {
        char fake[PATH_MAX + 16];
        snprintf(fake, sizeof fake, "%s%s", root, buf);
        int r = real_fstatat(AT_FDCWD, fake, st, flags);
        if (r == 0)
            patch_node_stat(fake, st);
        return r;
    }
    if (c == P_REWRITE)
        return real_fstatat(AT_FDCWD, buf, st, flags);
    return real_fstatat(dirfd, path, st, flags);
}

EXPORT int stat(const char *path, struct stat *st)
{
    resolve();
    return do_fstatat(AT_FDCWD, path, st, 0);
}

EXPORT int stat64(const char *path, struct stat64 *st)
{
    resolve();
    return do_fstatat(AT_FDCWD, path, (struct stat *)st, 0);
}

EXPORT int lstat(const char *path, struct stat *st)
{
    resolve();
    return do_fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

EXPORT int lstat64(const char *path, struct stat64 *st)
{
    resolve();
    return do_fstatat(AT_FDCWD, path, (struct stat *)st, AT_SYMLINK_NOFOLLOW);
}

EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
    resolve();
    return do_fstatat(dirfd, path, st, flags);
}

EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
    resolve();
    return do_fstatat(dirfd, path, (struct stat *)st, flags);
}

EXPORT int fstat(int fd, struct stat *st)
{
    resolve();
    int r = real_fstat(fd, st);
    if (r == 0 && is_vfio(fd))
        patch_fd_stat(fd, st);
    return r;
}

EXPORT int fstat64(int fd, struct stat64 *st)
{
    return fstat(fd, (struct stat *)st);
}

/* statx() accepts a NULL path with AT_EMPTY_PATH (Linux 6.11); glibc declares it nonnull. */
__attribute__((noinline)) static int empty_path(const char *p)
{
    return !p || !*p;
}

/* Programs built against glibc before 2.33 call these (x86-64: ver 1, struct stat as today). */
EXPORT int __xstat(int ver, const char *path, struct stat *st)
{
    (void)ver;
    resolve();
    return do_fstatat(AT_FDCWD, path, st, 0);
}

EXPORT int __xstat64(int ver, const char *path, struct stat64 *st)
{
    return __xstat(ver, path, (struct stat *)st);
}

EXPORT int __lxstat(int ver, const char *path, struct stat *st)
{
    (void)ver;
    resolve();
    return do_fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

EXPORT int __lxstat64(int ver, const char *path, struct stat64 *st)
{
    return __lxstat(ver, path, (struct stat *)st);
}

EXPORT int __fxstat(int ver, int fd, struct stat *st)
{
    (void)ver;
    return fstat(fd, st);
}

EXPORT int __fxstat64(int ver, int fd, struct stat64 *st)
{
    (void)ver;
    return fstat(fd, (struct stat *)st);
}

EXPORT int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
    (void)ver;
    resolve();
    return do_fstatat(dirfd, path, st, flags);
}

EXPORT int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
    return __fxstatat(ver, dirfd, path, (struct stat *)st, flags);
}

EXPORT int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *stx)
{
    resolve();
    char buf[PATH_MAX];
    int c = classify(dirfd, path, buf, sizeof buf);
    int r;
    if (c == P_NODE) {
        char fake[PATH_MAX + 16];
        snprintf(fake, sizeof fake, "%s%s", root, buf);
        r = real_statx(AT_FDCWD, fake, flags, mask, stx);
        unsigned maj, min, mode, uid, gid;
        if (r == 0 && node_info(fake, &maj, &min, &mode, &uid, &gid) == 0) {
            stx->stx_mode = (uint16_t)(S_IFCHR | mode);
            stx->stx_rdev_major = maj;
            stx->stx_rdev_minor = min;
            stx->stx_uid = uid;
            stx->stx_gid = gid;
            stx->stx_size = 0;
        }
        return r;
    }
    if (c == P_REWRITE)
        return real_statx(AT_FDCWD, buf, flags, mask, stx);
    r = real_statx(dirfd, path, flags, mask, stx);
    if (r == 0 && (flags & AT_EMPTY_PATH) && is_vfio(dirfd) && empty_path(path)) {
        struct stat st;
        memset(&st, 0, sizeof st);
        patch_fd_stat(dirfd, &st);
        stx->stx_mode = (uint16_t)st.st_mode;
        stx->stx_rdev_major = major(st.st_rdev);
        stx->stx_rdev_minor = minor(st.st_rdev);
        stx->stx_size = 0;
    }
    return r;
}

static const char *mapped(int dirfd, const char *path, char *buf, size_t bufsz)
{
    int c = classify(dirfd, path, buf, bufsz);
    if (c == P_NODE) {
        char tmp[PATH_MAX];
        snprintf(tmp, sizeof tmp, "%s", buf);
        snprintf(buf, bufsz, "%s%s", root, tmp);
        return buf;
    }
    return c == P_REWRITE ? buf : path;
}

/* ---------------------------------------------------------------- chown and chmod of /dev/vfio */

/* The node a simulated fd was opened from (containers and groups), or 0. */
static int node_of_fd(int fd, char *buf, size_t n)
{
    if (!is_vfio(fd) || vfd[fd] == K_DEVICE)
        return 0;
    if (vfd[fd] == K_CONTAINER)
        snprintf(buf, n, "/dev/vfio/vfio");
    else
        snprintf(buf, n, "/dev/vfio/%d", vminor[fd]);
    return 1;
}

static int setattr(const char *node, uint32_t flags, uid_t uid, gid_t gid, mode_t mode)
{
    uint64_t a[5] = {(uint64_t)(int64_t)(int32_t)uid, (uint64_t)(int64_t)(int32_t)gid, mode, 0, 0};
    int err;
    if (rpc(VOP_SETATTR, flags, -1, -1, a, node, (uint32_t)strlen(node), NULL, 0, &err) < 0) {
        errno = err;
        return -1;
    }
    return 0;
}

static int do_fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
    static int (*real)(int, const char *, uid_t, gid_t, int);
    if (!real)
        real = sym("fchownat");
    char buf[PATH_MAX];
    if (path && !*path && (flags & AT_EMPTY_PATH) && node_of_fd(dirfd, buf, sizeof buf))
        return setattr(buf, VSETATTR_OWNER, uid, gid, 0);
    int c = classify(dirfd, path, buf, sizeof buf);
    if (c == P_NODE)
        return setattr(buf, VSETATTR_OWNER, uid, gid, 0);
    return real(c == P_REWRITE ? AT_FDCWD : dirfd, c == P_REWRITE ? buf : path, uid, gid, flags);
}

static int do_fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
    static int (*real)(int, const char *, mode_t, int);
    if (!real)
        real = sym("fchmodat");
    char buf[PATH_MAX];
    int c = classify(dirfd, path, buf, sizeof buf);
    if (c == P_NODE)
        return setattr(buf, VSETATTR_MODE, 0, 0, mode);
    return real(c == P_REWRITE ? AT_FDCWD : dirfd, c == P_REWRITE ? buf : path, mode, flags);
}

EXPORT int chown(const char *path, uid_t uid, gid_t gid)
{
    resolve();
    return do_fchownat(AT_FDCWD, path, uid, gid, 0);
}

EXPORT int lchown(const char *path, uid_t uid, gid_t gid)
{
    resolve();
    return do_fchownat(AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW);
}

EXPORT int fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
    resolve();
    return do_fchownat(dirfd, path, uid, gid, flags);
}

EXPORT int fchown(int fd, uid_t uid, gid_t gid)
{
    static int (*real)(int, uid_t, gid_t);
    resolve();
    if (!real)
        real = sym("fchown");
    char buf[64];
    if (node_of_fd(fd, buf, sizeof buf))
        return setattr(buf, VSETATTR_OWNER, uid, gid, 0);
    return real(fd, uid, gid);
}

EXPORT int chmod(const char *path, mode_t mode)
{
    resolve();
    return do_fchmodat(AT_FDCWD, path, mode, 0);
}

EXPORT int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
    resolve();
    return do_fchmodat(dirfd, path, mode, flags);
}

EXPORT int fchmod(int fd, mode_t mode)
{
    static int (*real)(int, mode_t);
    resolve();
    if (!real)
        real = sym("fchmod");
    char buf[64];
    if (node_of_fd(fd, buf, sizeof buf))
        return setattr(buf, VSETATTR_MODE, 0, 0, mode);
    return real(fd, mode);
}

EXPORT int access(const char *path, int mode)
{
    resolve();
    char buf[PATH_MAX];
    return real_access(mapped(AT_FDCWD, path, buf, sizeof buf), mode);
}

EXPORT int faccessat(int dirfd, const char *path, int mode, int flags)
{
    resolve();
    char buf[PATH_MAX];
    const char *p = mapped(dirfd, path, buf, sizeof buf);
    return real_faccessat(p == path ? dirfd : AT_FDCWD, p, mode, flags);
}

EXPORT ssize_t readlink(const char *path, char *out, size_t n)
{
    resolve();
    char buf[PATH_MAX];
    return real_readlink(mapped(AT_FDCWD, path, buf, sizeof buf), out, n);
}

EXPORT ssize_t readlinkat(int dirfd, const char *path, char *out, size_t n)
{
    resolve();
    char buf[PATH_MAX];
    const char *p = mapped(dirfd, path, buf, sizeof buf);
    return real_readlinkat(p == path ? dirfd : AT_FDCWD, p, out, n);
}

EXPORT DIR *opendir(const char *path)
{
    resolve();
    char buf[PATH_MAX];
    return real_opendir(mapped(AT_FDCWD, path, buf, sizeof buf));
}

static char *do_realpath(const char *path, char *resolved)
{
    char buf[PATH_MAX];
    const char *p = mapped(AT_FDCWD, path, buf, sizeof buf);
    char *r = real_realpath(p, resolved);
    if (r && p != path && root_len && strncmp(r, root, root_len) == 0 && r[root_len] == '/')
        memmove(r, r + root_len, strlen(r + root_len) + 1);
    return r;
}

EXPORT char *realpath(const char *path, char *resolved)
{
    resolve();
    return do_realpath(path, resolved);
}

EXPORT char *__realpath_chk(const char *path, char *resolved, size_t resolvedlen)
{
    if (resolvedlen < PATH_MAX)
        __chk_fail();
    resolve();
    return do_realpath(path, resolved);
}

EXPORT ssize_t __readlink_chk(const char *path, char *out, size_t n, size_t outlen)
{
    if (n > outlen)
        __chk_fail();
    return readlink(path, out, n);
}

EXPORT ssize_t __readlinkat_chk(int dirfd, const char *path, char *out, size_t n, size_t outlen)
{
    if (n > outlen)
        __chk_fail();
    return readlinkat(dirfd, path, out, n);
}

EXPORT char *canonicalize_file_name(const char *path)
{
    resolve();
    return do_realpath(path, NULL);
}

/* ---------------------------------------------------------------- mmap of device regions */

struct region {
    uintptr_t start, end;             /* what is still mapped */
    uintptr_t base;                   /* where the mapping began: offsets are from here */
    uint64_t handle;
    int slot;                         /* the channel's live flag for it, or -1: no posting */
    int nposted;
    struct vmap_post posted[VMAP_MAX_POSTED];    /* stores here may be posted */
};
#define MAX_REGIONS 64
static struct region regions[MAX_REGIONS];
static volatile int nregions;

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    resolve();
    if (!is_vfio(fd))
        return real_mmap(addr, len, prot, flags, fd, off);
    long page = sysconf(_SC_PAGESIZE);
    size_t rlen = (len + (size_t)page - 1) & ~((size_t)page - 1);
    if (len == 0 || (off & (page - 1))) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    int shared = (flags & MAP_TYPE) == MAP_SHARED || (flags & MAP_TYPE) == MAP_SHARED_VALIDATE;
    /* The placeholder: inaccessible private memory, whose accesses the SIGSEGV
     * handler emulates.  The daemon learns where it is (the kernel sees a
     * device mapping there: peer-to-peer DMA maps it).  Unless the program
     * chose the place, the place is taken first; a fixed one only once the
     * driver has accepted the mapping, as mmap(2) replaces nothing on failure. */
    int fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE);
    void *p = addr;
    if (!fixed) {
        p = real_mmap(addr, rlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return MAP_FAILED;
    }
    struct vmap vm;
    memset(&vm, 0, sizeof vm);
    uint64_t a[5] = {(uint64_t)off, rlen, (uint64_t)(unsigned)prot, (uint64_t)shared, (uint64_t)(uintptr_t)p};
    int err;
    int64_t h = rpc(VOP_MMAP, 0, fd, -1, a, NULL, 0, &vm, sizeof vm, &err);
    if (h < 0 || nregions >= MAX_REGIONS) {
        if (h >= 0) {
            call(VOP_MUNMAP, 0, -1, -1, (uint64_t)h, 0, 0, 0);
            err = ENOMEM;
        }
        if (!fixed)
            real_munmap(p, rlen);
        errno = err;
        return MAP_FAILED;
    }
    if (fixed) {
        p = real_mmap(addr, rlen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | fixed, -1, 0);
        if (p == MAP_FAILED) {
            int saved = errno;
            call(VOP_MUNMAP, 0, -1, -1, (uint64_t)h, 0, 0, 0);
            errno = saved;
            return MAP_FAILED;
        }
    }
    pthread_mutex_lock(&lk);
    install_fault_handlers();
    struct region *g = &regions[nregions];
    g->start = g->base = (uintptr_t)p;
    g->end = (uintptr_t)p + rlen;
    g->handle = (uint64_t)h;
    g->slot = vm.slot < VLIVE ? (int)vm.slot : -1;
    g->nposted = vm.nposted <= VMAP_MAX_POSTED ? (int)vm.nposted : 0;
    memcpy(g->posted, vm.posted, sizeof g->posted);
    __atomic_store_n(&nregions, nregions + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&lk);
    return p;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap(addr, len, prot, flags, fd, off);
}

EXPORT int munmap(void *addr, size_t len)
{
    resolve();
    int r = real_munmap(addr, len);
    if (r < 0 || !nregions)
        return r;
    uintptr_t s = (uintptr_t)addr, e = s + len;
    uint64_t drop[MAX_REGIONS];
    int ndrop = 0;
    pthread_mutex_lock(&lk);
    for (int i = 0; i < nregions;) {
        struct region *g = &regions[i];
        if (e <= g->start || s >= g->end) {
            i++;
            continue;
        }
        if (s <= g->start && e >= g->end) {
            drop[ndrop++] = g->handle;
            regions[i] = regions[nregions - 1];
            nregions--;
            continue;
        }
        if (s <= g->start)
            g->start = e;             /* the head went */
        else if (e >= g->end)
            g->end = s;               /* the tail went */
        i++;                          /* (a hole in the middle: the region keeps both ends) */
    }
    pthread_mutex_unlock(&lk);
    int saved = errno;
    for (int i = 0; i < ndrop; i++)
        call(VOP_MUNMAP, 0, -1, -1, drop[i], 0, 0, 0);
    errno = saved;
    return r;
}

/* x86-64 decoding of the loads and stores a driver makes to a BAR: MOV,
 * MOVZX, MOVSX, MOVSXD.  Run-ahead (below) also steps over NOPs and LEAs,
 * which touch no memory and no flags, as compilers put them between a
 * doorbell store and the polling loop after it. */
enum { INSN_MOV, INSN_NOP, INSN_LEA };

struct insn {
    int len;                          /* bytes */
    int kind;                         /* INSN_* */
    int store;                        /* 1: store to memory */
    int size;                         /* memory operand bytes */
    int dsize;                        /* destination register bytes (loads, LEA) */
    int sext;                         /* sign-extend the loaded value */
    int reg;                          /* register number 0-15 */
    int high8;                        /* AH/CH/DH/BH */
    int has_imm;
    uint64_t imm;
    /* The memory operand, for computing its address (run-ahead): */
    int base, index;                  /* register numbers 0-15, or -1: none */
    int scale;                        /* index * (1 << scale) */
    int riprel;                       /* relative to the next instruction */
    int64_t disp;
    int unaddressable;                /* fs/gs override or 32-bit addressing: not computed */
};

static const int gregmap[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI,
                                REG_R8,  REG_R9,  REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15};

/* Decode the instruction at p, of which only `avail` bytes may be read;
 * 0, or -1 if it is none of the forms above (or longer than avail). */
static int decode(const uint8_t *p, size_t avail, struct insn *in)
{
    size_t i = 0;
    int opsize16 = 0, rex = 0;
#define NEED(n) do { if (i + (n) > avail) return -1; } while (0)
    memset(in, 0, sizeof *in);
    for (;;) {
        NEED(1);
        uint8_t b = p[i];
        if (b == 0x66) {
            opsize16 = 1;
        } else if (b == 0x64 || b == 0x65 || b == 0x67) {
            in->unaddressable = 1;    /* fs/gs base, or a 32-bit address: the handler is told the address */
        } else if (b != 0x2e && b != 0x3e && b != 0x26 && b != 0x36) {
            break;                    /* (cs/ds/es/ss overrides are void in 64-bit mode) */
        }
        if (++i > 8)
            return -1;
    }
    if ((p[i] & 0xf0) == 0x40)
        rex = p[i++];
    int W = rex & 8;
    int opsz = W ? 8 : opsize16 ? 2 : 4;
    NEED(1);
    uint8_t op = p[i++];
    int imm_bytes = 0;
    if (op == 0x0f) {
        NEED(1);
        op = p[i++];
        in->store = 0;
        in->dsize = opsz;
        switch (op) {
        case 0xb6: in->size = 1; break;
        case 0xb7: in->size = 2; break;
        case 0xbe: in->size = 1; in->sext = 1; break;
        case 0xbf: in->size = 2; in->sext = 1; break;
        case 0x1f: in->kind = INSN_NOP; in->dsize = 0; break;     /* nopw/nopl with a ModRM */
        default: return -1;
        }
    } else {
        switch (op) {
        case 0x88: in->store = 1; in->size = 1; break;
        case 0x89: in->store = 1; in->size = opsz; break;
        case 0x8a: in->size = in->dsize = 1; break;
        case 0x8b: in->size = in->dsize = opsz; break;
        case 0x63:
            if (!W)
                return -1;
            in->size = 4; in->dsize = 8; in->sext = 1;
            break;
        case 0xc6: in->store = 1; in->size = 1; in->has_imm = 1; imm_bytes = 1; break;
        case 0xc7: in->store = 1; in->size = opsz; in->has_imm = 1; imm_bytes = opsz == 2 ? 2 : 4; break;
        case 0x8d: in->kind = INSN_LEA; in->dsize = opsz; break;
        case 0x90:
            if (rex & 1)
                return -1;            /* xchg %r8, %rax */
            in->kind = INSN_NOP;
            in->len = (int)i;
            return 0;
        default: return -1;
        }
    }
    NEED(1);
    uint8_t modrm = p[i++];
    int mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7;
    if (in->kind == INSN_NOP && reg != 0)
        return -1;                    /* (0f 1f /1-7: reserved hints) */
    if (mod == 3) {
        if (in->kind != INSN_NOP)
            return -1;
        in->len = (int)i;
        return 0;
    }
    if (in->has_imm && reg != 0)
        return -1;
    in->base = in->index = -1;
    int disp_bytes = mod == 1 ? 1 : mod == 2 ? 4 : 0;
    if (rm == 4) {
        NEED(1);
        uint8_t sib = p[i++];
        int index = ((sib >> 3) & 7) | ((rex & 2) ? 8 : 0);
        if (index != 4)
            in->index = index;        /* (100 without REX.X: no index) */
        in->scale = sib >> 6;
        if (mod == 0 && (sib & 7) == 5)
            disp_bytes = 4;           /* no base */
        else
            in->base = (sib & 7) | ((rex & 1) ? 8 : 0);
    } else if (mod == 0 && rm == 5) {
        in->riprel = 1;
        disp_bytes = 4;
    } else {
        in->base = rm | ((rex & 1) ? 8 : 0);
    }
    NEED((size_t)disp_bytes);
    if (disp_bytes == 1) {
        in->disp = (int8_t)p[i];
    } else if (disp_bytes == 4) {
        int32_t d;
        memcpy(&d, p + i, 4);
        in->disp = d;
    }
    i += (size_t)disp_bytes;
    in->reg = reg | ((rex & 4) ? 8 : 0);
    in->high8 = (in->size == 1 && !in->has_imm && !rex && reg >= 4 && (op == 0x88 || op == 0x8a));
    if (in->high8)
        in->reg = reg - 4;
    if (imm_bytes) {
        NEED((size_t)imm_bytes);
        uint64_t v = 0;
        memcpy(&v, p + i, (size_t)imm_bytes);
        if (imm_bytes == 4 && opsz == 8)
            v = (uint64_t)(int64_t)(int32_t)v;
        in->imm = v;
        i += (size_t)imm_bytes;
    }
    in->len = (int)i;
    return 0;
#undef NEED
}

/* The address of the memory operand of `in` (ending at next_rip), from the
 * registers; 0 if it cannot be computed here. */
static int effective_address(const struct insn *in, const greg_t *gr, uintptr_t next_rip, uintptr_t *ea)
{
    if (in->unaddressable)
        return 0;
    uint64_t a = (uint64_t)in->disp;
    if (in->riprel)
        a += next_rip;
    if (in->base >= 0)
        a += (uint64_t)gr[gregmap[in->base]];
    if (in->index >= 0)
        a += (uint64_t)gr[gregmap[in->index]] << in->scale;
    *ea = (uintptr_t)a;
    return 1;
}

static uint64_t mask_of(int size)
{
    return size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
}

static void fault_fatal(int sig, const char *why, uintptr_t addr)
{
    char msg[160];
    int n = snprintf(msg, sizeof msg, "vfiosim: device mapping access at %#lx: %s\n", (unsigned long)addr, why);
    if (n > 0)
        real_write(2, msg, (size_t)n);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(sig, &dfl, NULL);
    if (sig != SIGSEGV)
        raise(sig);
}

/* The daemon's serving thread may need this CPU to take a doorbell just
 * posted: a program that goes on polling memory for the result (a polling
 * driver) would keep it off until the scheduler preempts the program, a time
 * slice later.  So give the CPU up until the thread has taken the posts up to
 * `upto` -- at once if it runs elsewhere -- for at most a millisecond.
 * Called with lk held. */
#define YIELD_MAX_NS 1000000u
static void yield_until_taken(uint32_t upto)
{
    uint64_t start = now_ns();
    while ((int32_t)(__atomic_load_n(&chan->daemon.ring_tail, __ATOMIC_ACQUIRE) - upto) < 0 &&
           now_ns() - start < YIELD_MAX_NS)
        sched_yield();
}

/* A store the device model declared (and decoding is on): into the channel's
 * ring, performed by the daemon, in order, before anything the program asks
 * for next -- a posted write, as PCIe's.  A store with side effects (a
 * doorbell, a command) also wakes the daemon, which performs it at once;
 * one without waits for the next call.  1 if it was posted. */
static int post_store(const struct region *g, uint64_t off, uint32_t size, uint64_t value)
{
    if (g->slot < 0)
        return 0;
    int ok = 0, kick = 0;
    for (int i = 0; i < g->nposted; i++)
        if (g->posted[i].offset <= off && off + size <= g->posted[i].offset + g->posted[i].length) {
            ok = 1;
            kick = g->posted[i].flags & VPOST_KICK;
            break;
        }
    if (!ok)
        return 0;
    pthread_mutex_lock(&lk);
    /* (No getpid() here, a system call on every store: a child made with a raw
     * clone() that stores before any other VFIO call posts into its parent's
     * ring, on the same device mapping.) */
    ok = chan && !dead && __atomic_load_n(&chan->live[g->slot], __ATOMIC_ACQUIRE);
    uint32_t upto = 0, cpu = 0;
    int yield = 0;
    if (ok) {
        uint32_t head = chan->prog.ring_head;
        if (head - __atomic_load_n(&chan->daemon.ring_tail, __ATOMIC_ACQUIRE) >= VRING) {
            ok = 0;                   /* full: this one goes as a call, which performs the others first */
        } else {
            struct vpost *e = &chan->ring[head % VRING];
            e->handle = g->handle;
            e->offset = off;
            e->value = value;
            e->size = size;
            e->flags = kick ? VPOST_KICK : 0;
            __atomic_store_n(&chan->prog.ring_head, head + 1, __ATOMIC_RELEASE);
            if (kick) {
                /* where we run, for the daemon's choice to spin for the next kick (not on our CPU) */
                cpu = (uint32_t)sched_getcpu();
                __atomic_store_n(&chan->prog.cpu, cpu, __ATOMIC_RELAXED);
                /* Woken, its thread may well be placed on this CPU; or it last ran here.  Only
                 * for a program that polls memory between doorbells: one that makes a call
                 * after its doorbell (a status load) has the daemon take both in one go. */
                int woke = kick_daemon();
                yield = !calls_since_kick && (woke || __atomic_load_n(&chan->daemon.cpu, __ATOMIC_RELAXED) == cpu);
                calls_since_kick = 0;
                upto = head + 1;
            }
        }
    }
    if (yield)
        yield_until_taken(upto);      /* (lk held: the channel stays mapped) */
    pthread_mutex_unlock(&lk);
    return ok;
}

/* One MOV of decoded `in` on device memory at addr, in region g: a store
 * posted or made as a call, a load as a call whose value goes into the
 * destination register.  0, or the errno of the failed access. */
static int emulate_access(const struct region *g, uintptr_t addr, const struct insn *in, greg_t *gr)
{
    uint64_t off = addr - g->base;
    uint64_t a[5] = {g->handle, off, (uint64_t)in->size, 0, 0};
    int err;
    if (in->store) {
        uint64_t v;
        if (in->has_imm) {
            v = in->imm;
        } else {
            v = (uint64_t)gr[gregmap[in->reg]];
            if (in->high8)
                v >>= 8;
        }
        a[3] = v & mask_of(in->size);
        if (post_store(g, off, (uint32_t)in->size, a[3]))
            return 0;
        return rpc(VOP_MMIO, VMMIO_WRITE, -1, -1, a, NULL, 0, NULL, 0, &err) < 0 ? err : 0;
    }
    uint64_t v = 0;
    if (rpc(VOP_MMIO, 0, -1, -1, a, NULL, 0, &v, sizeof v, &err) < 0)
        return err;
    v &= mask_of(in->size);
    if (in->sext && in->size < 8) {
        int shift = 64 - 8 * in->size;
        v = (uint64_t)(((int64_t)(v << shift)) >> shift);
    }
    greg_t *dst = &gr[gregmap[in->reg]];
    uint64_t cur = (uint64_t)*dst;
    switch (in->dsize) {
    case 1:
        if (in->high8)
            cur = (cur & ~0xff00ull) | ((v & 0xff) << 8);
        else
            cur = (cur & ~0xffull) | (v & 0xff);
        break;
    case 2:
        cur = (cur & ~0xffffull) | (v & 0xffff);
        break;
    case 4:
        cur = v & 0xffffffffull;      /* a 32-bit destination zero-extends */
        break;
    default:
        cur = v;
    }
    *dst = (greg_t)cur;
    return 0;
}

static struct region *region_at(uintptr_t addr, int n)
{
    for (int i = 0; i < n; i++)
        if (regions[i].start <= addr && addr < regions[i].end)
            return &regions[i];
    return NULL;
}

/*
 * Traps and accesses performed without one, for tests and benchmarks:
 * BAR accesses that trapped, and those the handler ran ahead to.
 */
EXPORT unsigned long vfiosim_bar_traps, vfiosim_bar_run_ahead;

#define RUN_AHEAD_MAX 1024            /* instructions after one trap */
#define RUN_AHEAD_IDLE 32             /* instructions without a device access: the run is over */

/* An XK_ALU op of x86_alu.h on the interrupted registers. */
static void run_alu(const struct x86_op *o, greg_t *gr)
{
    uint64_t r[16], flags = (uint64_t)gr[REG_EFL];
    for (int i = 0; i < 16; i++)
        r[i] = (uint64_t)gr[gregmap[i]];
    x86_exec(o, r, &flags);
    gr[gregmap[o->dst]] = (greg_t)r[o->dst];          /* (the only register an op writes) */
    gr[REG_EFL] = (greg_t)flags;
}

/*
 * Run-ahead: a driver's BAR accesses come in runs (the address, count and
 * command registers of a DMA, then a load polling its status) and loops (a
 * register stored or polled N times), and each trap costs more than the
 * access.  After the faulting instruction, the handler emulates the
 * instructions that follow it too, in program order with the same
 * semantics: a MOV whose memory operand lies in a device mapping, a NOP or
 * LEA, and the register-only arithmetic, moves and relative jumps of
 * x86_alu.h (with EFLAGS).  It stops at anything else (a memory access
 * that is not a device's, a call, a system call, an instruction it does not
 * know), after RUN_AHEAD_IDLE instructions without a device access (the
 * program has moved on to other work), or after RUN_AHEAD_MAX; the CPU then
 * resumes natively at that instruction (a later BAR access traps anew).  It
 * reads code only from the page(s) the faulting instruction came from,
 * [code_start, code_end): those the CPU just executed, so an instruction it
 * could not fetch (unmapped, not executable) is never emulated; a jump out
 * of them ends the run with RIP at its target.  Not while single-stepping
 * (EFLAGS.TF), where every instruction must trap on its own.  A failed
 * access stops the program as one that faulted itself would, with RIP at it.
 */
static void run_ahead(greg_t *gr, uintptr_t code_start, uintptr_t code_end)
{
    if (gr[REG_EFL] & 0x100)
        return;
    int n = __atomic_load_n(&nregions, __ATOMIC_ACQUIRE);
    for (int k = 0, idle = 0; k < RUN_AHEAD_MAX && idle < RUN_AHEAD_IDLE; k++, idle++) {
        uintptr_t rip = (uintptr_t)gr[REG_RIP];
        if (rip < code_start || rip >= code_end)
            return;
        uint8_t code[15];
        size_t avail = code_end - rip < sizeof code ? code_end - rip : sizeof code;
        if (vfiosim_probe_copy(code, (const void *)rip, avail))
            return;                   /* (another thread unmapped it) */
        struct insn in;
        if (decode(code, avail, &in) < 0) {
            struct x86_op op;
            if (x86_decode_op(code, avail, &op) < 0)
                return;
            uintptr_t next = rip + (uintptr_t)op.len;
            if (op.kind == XK_ALU)
                run_alu(&op, gr);
            else if (op.kind == XK_JMP || (op.kind == XK_JCC && x86_cond(op.cc, (uint64_t)gr[REG_EFL])))
                next += (uintptr_t)op.rel;
            gr[REG_RIP] = (greg_t)next;
            continue;
        }
        uintptr_t next = rip + (uintptr_t)in.len, ea;
        if (in.kind == INSN_NOP) {
            gr[REG_RIP] = (greg_t)next;
            continue;
        }
        if (!effective_address(&in, gr, next, &ea))
            return;
        if (in.kind == INSN_LEA) {
            greg_t *dst = &gr[gregmap[in.reg]];
            if (in.dsize == 2)
                *dst = (greg_t)(((uint64_t)*dst & ~0xffffull) | (ea & 0xffff));
            else
                *dst = (greg_t)(in.dsize == 4 ? ea & 0xffffffffull : ea);
            gr[REG_RIP] = (greg_t)next;
            continue;
        }
        const struct region *g = region_at(ea, n);
        if (!g || ea + (uintptr_t)in.size > g->end || ea + (uintptr_t)in.size < ea)
            return;
        int err = emulate_access(g, ea, &in, gr);
        if (err) {
            fault_fatal(SIGBUS, strerror(err), ea);
            return;
        }
        __atomic_fetch_add(&vfiosim_bar_run_ahead, 1, __ATOMIC_RELAXED);
        gr[REG_RIP] = (greg_t)next;
        idle = -1;                    /* (incremented to 0 by the loop) */
    }
}

static void fault_handler(int sig, siginfo_t *si, void *ucv)
{
    int saved_errno = errno;
    ucontext_t *uc = ucv;
    greg_t *gr = uc->uc_mcontext.gregs;
    if (probe_fixup(gr))
        return;
    uintptr_t addr = (uintptr_t)si->si_addr;
    const struct region *g = region_at(addr, sig == SIGSEGV ? __atomic_load_n(&nregions, __ATOMIC_ACQUIRE) : 0);
    if (!g) {
        /* Not ours: the program's handler, or the default action. */
        const struct sigaction *prog = sig == SIGSEGV ? &prog_segv : &prog_bus;
        if (prog->sa_flags & SA_SIGINFO) {
            if (prog->sa_sigaction) {
                prog->sa_sigaction(sig, si, ucv);
                errno = saved_errno;
                return;
            }
        } else if (prog->sa_handler != SIG_DFL && prog->sa_handler != SIG_IGN) {
            prog->sa_handler(sig);
            errno = saved_errno;
            return;
        }
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(sig, &dfl, NULL);
        errno = saved_errno;
        return;                       /* the access faults again, with the default action */
    }
    __atomic_fetch_add(&vfiosim_bar_traps, 1, __ATOMIC_RELAXED);
    uintptr_t rip = (uintptr_t)gr[REG_RIP];
    struct insn in;
    if (decode((const uint8_t *)rip, 15, &in) < 0 || in.kind != INSN_MOV) {
        fault_fatal(SIGSEGV, "unsupported instruction (only MOV/MOVZX/MOVSX of 1-8 bytes are emulated)", addr);
        errno = saved_errno;
        return;
    }
    int err = emulate_access(g, addr, &in, gr);
    if (err) {
        fault_fatal(SIGBUS, strerror(err), addr);
        errno = saved_errno;
        return;
    }
    gr[REG_RIP] = (greg_t)(rip + (uintptr_t)in.len);
    run_ahead(gr, rip & ~(uintptr_t)4095, ((rip + (uintptr_t)in.len - 1) | 4095) + 1);
    errno = saved_errno;
}

/* The program's own SIGSEGV and SIGBUS handlers are kept and chained to. */
EXPORT int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
    resolve();
    if ((sig != SIGSEGV && sig != SIGBUS) || !faults_installed)
        return real_sigaction(sig, act, old);
    struct sigaction *prog = sig == SIGSEGV ? &prog_segv : &prog_bus;
    if (old)
        *old = *prog;
    if (act)
        *prog = *act;
    return 0;
}

EXPORT sighandler_t signal(int sig, sighandler_t handler)
{
    resolve();
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, &old) < 0)
        return SIG_ERR;
    return old.sa_handler;
}

/* ---------------------------------------------------------------- processes */

EXPORT pid_t fork(void)
{
    resolve();
    int was_connected = active && sock_fd >= 0 && !dead;
    pid_t pid = real_fork();
    if (pid == 0) {
        pthread_mutex_init(&lk, NULL);
        if (was_connected) {
            real_close(sock_fd);
            sock_fd = -1;
            drop_channel();           /* our view of the parent's channel */
            int r = do_connect(VHELLO_FORK);
            if (r < 0)
                child_unconnected(r);
        }
    } else if (pid > 0 && was_connected) {
        int saved = errno;
        call(VOP_FORK, 0, -1, -1, (uint64_t)pid, 0, 0, 0);
        errno = saved;
    }
    return pid;
}

EXPORT pid_t vfork(void)
{
    return fork();
}

#define CREDS_WRAPPER(ret, name, params, args)            \
    EXPORT ret name params                               \
    {                                                    \
        static ret(*real) params;                        \
        if (!real)                                       \
            real = sym(#name);                           \
        ret rv_ = real args;                             \
        creds_dirty = 1;                                 \
        return rv_;                                      \
    }

CREDS_WRAPPER(int, setuid, (uid_t u), (u))
CREDS_WRAPPER(int, seteuid, (uid_t u), (u))
CREDS_WRAPPER(int, setreuid, (uid_t r, uid_t e), (r, e))
CREDS_WRAPPER(int, setresuid, (uid_t r, uid_t e, uid_t s), (r, e, s))
CREDS_WRAPPER(int, setgid, (gid_t g), (g))
CREDS_WRAPPER(int, setegid, (gid_t g), (g))
CREDS_WRAPPER(int, setregid, (gid_t r, gid_t e), (r, e))
CREDS_WRAPPER(int, setresgid, (gid_t r, gid_t e, gid_t s), (r, e, s))
CREDS_WRAPPER(int, setgroups, (size_t n, const gid_t *l), (n, l))
CREDS_WRAPPER(int, setrlimit, (__rlimit_resource_t r, const struct rlimit *l), (r, l))
CREDS_WRAPPER(int, setrlimit64, (__rlimit_resource_t r, const struct rlimit64 *l), (r, l))
CREDS_WRAPPER(int, prlimit, (pid_t p, __rlimit_resource_t r, const struct rlimit *n, struct rlimit *o), (p, r, n, o))
CREDS_WRAPPER(int, prlimit64, (pid_t p, __rlimit_resource_t r, const struct rlimit64 *n, struct rlimit64 *o),
              (p, r, n, o))
CREDS_WRAPPER(int, capset, (void *h, const void *d), (h, d))

EXPORT int prctl(int option, ...)
{
    static int (*real)(int, ...);
    if (!real)
        real = sym("prctl");
    va_list ap;
    va_start(ap, option);
    unsigned long a2 = va_arg(ap, unsigned long), a3 = va_arg(ap, unsigned long);
    unsigned long a4 = va_arg(ap, unsigned long), a5 = va_arg(ap, unsigned long);
    va_end(ap);
    int r = real(option, a2, a3, a4, a5);
    creds_dirty = 1;
    return r;
}

/* ---------------------------------------------------------------- start-up */

__attribute__((constructor)) static void vfiosim_init(void)
{
    resolve();
    const char *s = getenv("VFIOSIM_SOCKET");
    if (!s || !*s)
        return;
    active = 1;
    set_root(getenv("VFIOSIM_ROOT"));
    /* After exec: simulated fds that survived it are memfds named vfiosim:*. */
    DIR *d = real_opendir("/proc/self/fd");
    int found = 0;
    if (d) {
        int dfd = dirfd(d);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] < '0' || e->d_name[0] > '9')
                continue;
            int fd = atoi(e->d_name);
            if (fd == dfd || fd >= VFD_MAX)
                continue;
            char link[256];
            ssize_t n = real_readlinkat(dfd, e->d_name, link, sizeof link - 1);
            if (n <= 0)
                continue;
            link[n] = 0;
            if (strncmp(link, "/memfd:vfiosim:", 15) != 0)
                continue;
            const char *kind = link + 15;
            if (strncmp(kind, "container", 9) == 0)
                set_vfio(fd, K_CONTAINER, 0);
            else if (strncmp(kind, "group:", 6) == 0)
                set_vfio(fd, K_GROUP, atoi(kind + 6));
            else if (strncmp(kind, "iommufd", 7) == 0)
                set_vfio(fd, K_IOMMUFD, 0);
            else if (strncmp(kind, "device:cdev:", 12) == 0)
                set_vfio(fd, K_CDEV, atoi(kind + 12));
            else
                set_vfio(fd, K_DEVICE, 0);
            found = 1;
        }
        closedir(d);
    }
    if (found) {
        pthread_mutex_lock(&lk);
        if (do_connect(0) < 0)
            dead = 1;
        pthread_mutex_unlock(&lk);
    }
}
