/*
 * libvfiosim_record.so: the pass-through recording shim of `vfiosim record`.
 *
 * LD_PRELOAD it into a program that uses a real /dev/vfio and every VFIO call the
 * program makes is written to $VFIOSIM_RECORD as a line of the trace format of
 * record (docs/trace-format.md), after the call has been made exactly as the
 * program asked: the shim passes every argument through untouched and returns what
 * the kernel returned, errno included.  It adds nothing else and changes nothing
 * (it keeps one fd open on the trace file, above the program's fds).
 *
 * What it records, for calls on fds opened from /dev/vfio (and the device fds
 * VFIO_GROUP_GET_DEVICE_FD returns, and their dups):
 *   open, close, dup, ioctl (the request number, the argument's bytes before and
 *   after the call, argsz of them, at most 64 KiB; a dirty bitmap's words; the
 *   mapping a vaddr lies in, from /proc/self/maps), read/write/pread/pwrite (the
 *   bytes, at most 4 KiB), mmap/munmap of a device fd, fork, and setrlimit of
 *   RLIMIT_MEMLOCK, credential changes (setuid and friends, capset), and chown of
 *   a VFIO node (an administrator giving a user the device); after each, VmLck and
 *   VmPin from /proc/self/status.
 * It knows each ioctl's *kind* of argument (none, a value, a pointer to an fd, a
 * string, a struct with argsz, and where the bitmap pointer of the dirty-tracking
 * calls is), not the structs' fields: vfiosim decodes the bytes when it reads the
 * trace.  The first process to open the trace writes its header: the kernel, the
 * IOMMU groups and devices from sysfs, the IOMMU drivers and what the platform says
 * of its DMA windows, and the process's credentials and limits.
 *
 * Built by `pip install` (setup.py) or on first use (vfiosim.tracing.record), and
 * cross-compiled for the QEMU guests (vfiosim.qemu.record).  Depends on libc only.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_FD 65536
#define MAX_ARG 65536
#define MAX_DATA 4096
#define TRACE_FD_MIN 900

enum kind { K_NONE = 0, K_CONTAINER = 1, K_GROUP = 2, K_DEVICE = 3, K_IOMMUFD = 4 };
static const char *kind_names[] = {"", "vfio-container", "vfio-group", "vfio-device", "iommufd"};

struct fdinfo {
    unsigned char kind;
    int iommu_type;     /* the container's VFIO_SET_IOMMU type, 0 before */
};
static struct fdinfo fds[MAX_FD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int trace_fd = -1;
static const char *trace_path;
static const char *scenario;
static int appending;

/* device mappings: address -> length (a program rarely has more than a few) */
#define MAX_MAPS 256
static struct { uintptr_t addr; size_t len; } maps[MAX_MAPS];

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
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
static pid_t (*real_fork)(void);
static int (*real_setrlimit)(int, const struct rlimit *);
static int (*real_prlimit)(pid_t, int, const struct rlimit *, struct rlimit *);
static int (*real_close_range)(unsigned int, unsigned int, int);
static int (*real_setuid)(uid_t);
static int (*real_seteuid)(uid_t);
static int (*real_setreuid)(uid_t, uid_t);
static int (*real_setresuid)(uid_t, uid_t, uid_t);
static int (*real_chown)(const char *, uid_t, gid_t);
static int (*real_capset)(void *, const void *);

static void resolve(void)
{
    if (real_open)
        return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_close = dlsym(RTLD_NEXT, "close");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_read = dlsym(RTLD_NEXT, "read");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pread = dlsym(RTLD_NEXT, "pread");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_dup = dlsym(RTLD_NEXT, "dup");
    real_dup2 = dlsym(RTLD_NEXT, "dup2");
    real_dup3 = dlsym(RTLD_NEXT, "dup3");
    real_fcntl = dlsym(RTLD_NEXT, "fcntl");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    real_munmap = dlsym(RTLD_NEXT, "munmap");
    real_fork = dlsym(RTLD_NEXT, "fork");
    real_setrlimit = dlsym(RTLD_NEXT, "setrlimit");
    real_prlimit = dlsym(RTLD_NEXT, "prlimit");
    real_close_range = dlsym(RTLD_NEXT, "close_range");
    real_setuid = dlsym(RTLD_NEXT, "setuid");
    real_seteuid = dlsym(RTLD_NEXT, "seteuid");
    real_setreuid = dlsym(RTLD_NEXT, "setreuid");
    real_setresuid = dlsym(RTLD_NEXT, "setresuid");
    real_chown = dlsym(RTLD_NEXT, "chown");
    real_capset = dlsym(RTLD_NEXT, "capset");
}

/* -- a growable string: one trace line ---------------------------------------------------------- */

struct sb {
    char *p;
    size_t n, cap;
};

static void sb_need(struct sb *s, size_t more)
{
    if (s->n + more + 1 <= s->cap)
        return;
    size_t cap = s->cap ? s->cap : 1024;
    while (cap < s->n + more + 1)
        cap *= 2;
    char *p = realloc(s->p, cap);
    if (!p)
        abort();
    s->p = p;
    s->cap = cap;
}

static void sb_add(struct sb *s, const char *text)
{
    size_t l = strlen(text);
    sb_need(s, l);
    memcpy(s->p + s->n, text, l + 1);
    s->n += l;
}

static void sb_printf(struct sb *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sb *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int l = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    sb_need(s, (size_t)l);
    va_start(ap, fmt);
    vsnprintf(s->p + s->n, (size_t)l + 1, fmt, ap);
    va_end(ap);
    s->n += (size_t)l;
}

static void sb_hex(struct sb *s, const uint8_t *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    sb_need(s, 2 * n);
    for (size_t i = 0; i < n; i++) {
        s->p[s->n++] = digits[p[i] >> 4];
        s->p[s->n++] = digits[p[i] & 15];
    }
    s->p[s->n] = 0;
}

static void sb_str(struct sb *s, const char *text)
{
    sb_add(s, "\"");
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if (*c == '"' || *c == '\\')
            sb_printf(s, "\\%c", *c);
        else if (*c < 0x20 || *c >= 0x7f)
            sb_printf(s, "\\u%04x", *c);
        else
            sb_printf(s, "%c", *c);
    }
    sb_add(s, "\"");
}

/* -- the trace file ------------------------------------------------------------------------------- */

static void put_line(struct sb *s)
{
    sb_add(s, "\n");
    pthread_mutex_lock(&lock);
    size_t off = 0;
    while (trace_fd >= 0 && off < s->n) {
        ssize_t w = real_write(trace_fd, s->p + off, s->n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    pthread_mutex_unlock(&lock);
    free(s->p);
    s->p = NULL;
    s->n = s->cap = 0;
}

/* Read a small file (sysfs, /proc) whole; returns its length or -1. */
static ssize_t slurp(const char *path, char *buf, size_t cap)
{
    int fd = real_open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = real_read(fd, buf + n, cap - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    real_close(fd);
    buf[n] = 0;
    return (ssize_t)n;
}

static void chomp(char *s)
{
    size_t l = strlen(s);
    while (l && (s[l - 1] == '\n' || s[l - 1] == ' '))
        s[--l] = 0;
}

static long status_kb(const char *text, const char *key)
{
    const char *p = strstr(text, key);
    return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

static void add_status(struct sb *s)
{
    char buf[8192];
    if (slurp("/proc/self/status", buf, sizeof buf) <= 0)
        return;
    sb_printf(s, ", \"vmlck_kb\": %ld, \"vmpin_kb\": %ld", status_kb(buf, "\nVmLck:"), status_kb(buf, "\nVmPin:"));
}

static void begin(struct sb *s, const char *call)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    sb_printf(s, "{\"pid\": %d, \"time\": %.6f, \"call\": \"%s\"", (int)getpid(),
              (double)ts.tv_sec + ts.tv_nsec / 1e9, call);
    if (appending && scenario)
        sb_add(s, ", \"scenario\": "), sb_str(s, scenario);
}

static void end(struct sb *s, long ret, int err)
{
    sb_printf(s, ", \"ret\": %ld, \"errno\": %d", ret, ret < 0 ? err : 0);
    add_status(s);
    sb_add(s, "}");
    put_line(s);
}

static void add_fd(struct sb *s, int fd)
{
    sb_printf(s, ", \"fd\": %d", fd);
    if (fd >= 0 && fd < MAX_FD && fds[fd].kind)
        sb_printf(s, ", \"fd_kind\": \"%s\"", kind_names[fds[fd].kind]);
}

/* -- the program's memory, read without faulting ------------------------------------------------- */

static size_t peek(uintptr_t addr, void *buf, size_t n)
{
    if (!n)
        return 0;
    struct iovec local = {buf, n}, remote = {(void *)addr, n};
    ssize_t r = syscall(SYS_process_vm_readv, getpid(), &local, 1UL, &remote, 1UL, 0UL);
    return r < 0 ? 0 : (size_t)r;
}

/* The mapping of /proc/self/maps that holds addr, and those after it up to end
 * when they follow on without a gap. */
static void add_vma(struct sb *s, const char *field, uint64_t addr, uint64_t size)
{
    static char buf[1 << 20];
    ssize_t n = slurp("/proc/self/maps", buf, sizeof buf);
    sb_printf(s, "\"%s\": {", field);
    int found = 0, spans = 0;
    uint64_t first = 0, last_end = 0, end = addr + (size ? size : 1);
    char *save = NULL;
    struct sb span = {0};
    for (char *line = n > 0 ? strtok_r(buf, "\n", &save) : NULL; line; line = strtok_r(NULL, "\n", &save)) {
        unsigned long long lo, hi;
        char perms[8];
        if (sscanf(line, "%llx-%llx %7s", &lo, &hi, perms) != 3)
            continue;
        if (!found) {
            if (addr >= lo && addr < hi) {
                found = 1;
                first = lo;
                last_end = hi;
                sb_printf(s, "\"vma\": [%llu, %llu, \"%s\"], \"offset\": %llu", lo, hi, perms,
                          (unsigned long long)(addr - lo));
                sb_printf(&span, "[%llu, %llu, \"%s\"]", lo, hi, perms);
                spans = 1;
            }
            continue;
        }
        if (last_end >= end || lo != last_end || spans >= 8)
            break;
        sb_printf(&span, ", [%llu, %llu, \"%s\"]", lo, hi, perms);
        last_end = hi;
        spans++;
    }
    (void)first;
    if (!found)
        sb_add(s, "\"vma\": null, \"offset\": 0");
    else if (spans > 1)
        sb_printf(s, ", \"span\": [%s]", span.p);
    sb_add(s, "}");
    free(span.p);
}

/* -- the header ----------------------------------------------------------------------------------- */

static void header_file(struct sb *s, const char *key, const char *path, int first)
{
    char buf[4096];
    if (slurp(path, buf, sizeof buf) < 0)
        return;
    chomp(buf);
    sb_printf(s, "%s\"%s\": ", first ? "" : ", ", key);
    sb_str(s, buf);
}

static void header_devices(struct sb *groups, struct sb *devices)
{
    DIR *d = opendir("/sys/kernel/iommu_groups");
    struct dirent *e;
    int ng = 0, nd = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], buf[4096];
        sb_printf(groups, "%s{\"id\": %s, \"devices\": [", ng++ ? ", " : "", e->d_name);
        snprintf(path, sizeof path, "/sys/kernel/iommu_groups/%s/devices", e->d_name);
        DIR *dd = opendir(path);
        struct dirent *f;
        int k = 0;
        while (dd && (f = readdir(dd))) {
            if (f->d_name[0] == '.')
                continue;
            sb_printf(groups, "%s\"%s\"", k++ ? ", " : "", f->d_name);
            sb_printf(devices, "%s{\"bdf\": \"%s\", \"iommu_group\": %s", nd++ ? ", " : "", f->d_name, e->d_name);
            static const char *attrs[] = {"vendor", "device", "class", "subsystem_vendor", "subsystem_device",
                                          "revision", NULL};
            for (int i = 0; attrs[i]; i++) {
                snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/%s", f->d_name, attrs[i]);
                if (slurp(path, buf, sizeof buf) > 0) {
                    chomp(buf);
                    sb_printf(devices, ", \"%s\": ", attrs[i]);
                    sb_str(devices, buf);
                }
            }
            snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", f->d_name);
            ssize_t l = readlink(path, buf, sizeof buf - 1);
            buf[l > 0 ? l : 0] = 0;
            char *slash = strrchr(buf, '/');
            sb_add(devices, ", \"driver\": ");
            sb_str(devices, slash ? slash + 1 : buf);
            sb_add(devices, "}");
        }
        if (dd)
            closedir(dd);
        sb_add(groups, "]");
        snprintf(path, sizeof path, "/sys/kernel/iommu_groups/%s/type", e->d_name);
        header_file(groups, "type", path, 0);
        snprintf(path, sizeof path, "/sys/kernel/iommu_groups/%s/reserved_regions", e->d_name);
        header_file(groups, "reserved_regions", path, 0);
        sb_add(groups, "}");
    }
    if (d)
        closedir(d);
}

/* pseries: each PHB's node in the device tree has its default DMA window
 * ("ibm,dma-window": LIOBN, bus address, size) and its PCI domain. */
static void header_windows(struct sb *s)
{
    DIR *d = opendir("/proc/device-tree");
    struct dirent *e;
    int n = 0;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, "pci@", 4))
            continue;
        char path[512];
        uint8_t win[64], dom[16];
        snprintf(path, sizeof path, "/proc/device-tree/%s/ibm,dma-window", e->d_name);
        ssize_t wl = slurp(path, (char *)win, sizeof win);
        if (wl <= 1)
            continue;
        snprintf(path, sizeof path, "/proc/device-tree/%s/linux,pci-domain", e->d_name);
        ssize_t dl = slurp(path, (char *)dom, sizeof dom);
        sb_printf(s, "%s{\"node\": \"%s\", \"ibm,dma-window\": \"", n++ ? ", " : "", e->d_name);
        sb_hex(s, win, (size_t)wl);
        sb_add(s, "\"");
        if (dl >= 4)
            sb_printf(s, ", \"domain\": %u", (unsigned)dom[0] << 24 | dom[1] << 16 | dom[2] << 8 | dom[3]);
        sb_add(s, "}");
    }
    if (d)
        closedir(d);
}

static void header_iommu(struct sb *s)
{
    static const char *drivers[] = {"vfio_iommu_type1", "vfio_iommu_spapr_tce", "vfio", "vfio_pci", "iommufd", NULL};
    char path[512];
    struct stat st;
    int n = 0;
    sb_add(s, "\"modules\": [");
    for (int i = 0; drivers[i]; i++) {
        snprintf(path, sizeof path, "/sys/module/%s", drivers[i]);
        if (stat(path, &st) == 0)
            sb_printf(s, "%s\"%s\"", n++ ? ", " : "", drivers[i]);
    }
    sb_add(s, "], \"units\": [");
    DIR *d = opendir("/sys/class/iommu");
    struct dirent *e;
    n = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        sb_printf(s, "%s{\"name\": \"%s\"", n++ ? ", " : "", e->d_name);
        static const char *attrs[] = {"cap", "ecap", "version", NULL};
        for (int i = 0; attrs[i]; i++) {
            snprintf(path, sizeof path, "/sys/class/iommu/%s/intel-iommu/%s", e->d_name, attrs[i]);
            header_file(s, attrs[i], path, 0);
        }
        sb_add(s, "}");
    }
    if (d)
        closedir(d);
    sb_add(s, "]");
}

/* The kernel's VFIO and iommufd options (kernel/config.py's symbols), as "NAME=y"
 * or "NAME=n": from the kernel's .config in /boot when it is there, else from what
 * the kernel shows (device nodes, sysfs, the modules loaded).  Under --simulated,
 * $VFIOSIM_RECORD_KERNEL_CONFIG says what the simulated machine has. */
static const char *config_symbols[] = {"VFIO_GROUP", "VFIO_CONTAINER", "IOMMUFD", "VFIO_DEVICE_CDEV",
                                       "IOMMUFD_VFIO_CONTAINER", NULL};

static int path_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Whether an entry of dir named prefix* has the file inside. */
static int any_entry(const char *dir, const char *prefix, const char *inside)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = 0;
    while (d && !found && (e = readdir(d))) {
        if (e->d_name[0] == '.' || strncmp(e->d_name, prefix, strlen(prefix)))
            continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s/%s", dir, e->d_name, inside);
        found = path_exists(path);
    }
    if (d)
        closedir(d);
    return found;
}

/* /dev/vfio/<N> (or noiommu-<N>): the group interface. */
static int has_group_node(void)
{
    DIR *d = opendir("/dev/vfio");
    struct dirent *e;
    int found = 0;
    while (d && !found && (e = readdir(d)))
        found = (e->d_name[0] >= '0' && e->d_name[0] <= '9') || !strncmp(e->d_name, "noiommu-", 8);
    if (d)
        closedir(d);
    return found;
}

static void header_kernel_config(struct sb *s, const struct utsname *u)
{
    const char *given = getenv("VFIOSIM_RECORD_KERNEL_CONFIG");
    int on[5] = {0};
    char from[512];
    static char text[1 << 18];
    if (given && *given) {
        for (int i = 0; config_symbols[i]; i++) {
            char want[64];
            snprintf(want, sizeof want, "%s=y", config_symbols[i]);
            size_t l = strlen(want);
            for (const char *p = strstr(given, want); p && !on[i]; p = strstr(p + 1, want))
                on[i] = (p == given || p[-1] == ',') && (p[l] == ',' || !p[l]);
        }
        snprintf(from, sizeof from, "the simulated machine");
    } else {
        snprintf(from, sizeof from, "/boot/config-%s", u->release);
        if (slurp(from, text, sizeof text) > 0) {
            for (int i = 0; config_symbols[i]; i++) {       /* built in, or a module */
                char y[80], m[80];
                snprintf(y, sizeof y, "\nCONFIG_%s=y\n", config_symbols[i]);
                snprintf(m, sizeof m, "\nCONFIG_%s=m\n", config_symbols[i]);
                on[i] = strstr(text, y) || strstr(text, m);
            }
        } else {
            /* What the kernel shows.  VFIO's own container needs its IOMMU driver
             * (vfio_iommu_type1 or vfio_iommu_spapr_tce, loaded with vfio); without
             * one, iommufd serves /dev/vfio/vfio.  A cdev has a dev_t, so its
             * vfio-dev device has a "dev" attribute (6.1+ registers the device
             * whatever the configuration). */
            snprintf(from, sizeof from, "/dev and sysfs (no /boot/config-%s)", u->release);
            int iommufd = path_exists("/dev/iommu") || path_exists("/sys/module/iommufd");
            int type_driver = path_exists("/sys/module/vfio_iommu_type1") ||
                              path_exists("/sys/module/vfio_iommu_spapr_tce");
            int cdev = path_exists("/dev/vfio/devices") || any_entry("/sys/class/vfio-dev", "vfio", "dev");
            int container_node = path_exists("/dev/vfio/vfio");
            int groups = has_group_node();
            on[2] = iommufd;
            on[3] = cdev;
            on[4] = iommufd && container_node && !type_driver;
            on[1] = container_node && !on[4];
            on[0] = groups || !cdev;
        }
    }
    sb_add(s, ", \"kernel_config\": [");
    for (int i = 0; config_symbols[i]; i++)
        sb_printf(s, "%s\"%s=%c\"", i ? ", " : "", config_symbols[i], on[i] ? 'y' : 'n');
    sb_add(s, "], \"kernel_config_from\": ");
    sb_str(s, from);
}

static const char *platform_name(const struct utsname *u)
{
    static char buf[64];
    const char *forced = getenv("VFIOSIM_RECORD_PLATFORM");
    if (forced && *forced)
        return forced;
    if (!strncmp(u->machine, "x86", 3))
        return "x86";
    if (!strncmp(u->machine, "ppc", 3)) {
        static char cpuinfo[65536];
        if (slurp("/proc/cpuinfo", cpuinfo, sizeof cpuinfo) > 0) {
            char *p = strstr(cpuinfo, "\nplatform\t: ");
            if (p && sscanf(p + 12, "%63s", buf) == 1) {
                if (!strcmp(buf, "pSeries"))
                    return "pseries";
                if (!strcmp(buf, "PowerNV"))
                    return "powernv";
                return buf;
            }
        }
    }
    return "";
}

static void write_header(void)
{
    struct sb s = {0}, groups = {0}, devices = {0}, windows = {0}, iommu = {0};
    struct utsname u;
    uname(&u);
    header_devices(&groups, &devices);
    header_windows(&windows);
    header_iommu(&iommu);
    char status[8192], cmdline[4096];
    slurp("/proc/self/status", status, sizeof status);
    ssize_t cl = slurp("/proc/self/cmdline", cmdline, sizeof cmdline);
    struct rlimit rl = {0, 0};
    getrlimit(RLIMIT_MEMLOCK, &rl);
    const char *cap = strstr(status, "\nCapEff:");
    char capeff[32] = "";
    if (cap)
        sscanf(cap + 8, " %31s", capeff);
    const char *source = getenv("VFIOSIM_RECORD_SOURCE");      /* "simulator" under vfiosim run's shim */
    sb_printf(&s, "{\"format\": \"vfiosim-trace\", \"version\": 1, \"source\": \"%s\", "
                  "\"recorder\": \"vfiosim record (libvfiosim_record.so)\"",
              source && *source ? source : "kernel");
    if (scenario)
        sb_add(&s, ", \"scenario\": "), sb_str(&s, scenario);
    sb_add(&s, ", \"system\": {\"kernel\": ");
    if (source && !strcmp(source, "simulator")) {      /* the host's kernel only hosts the simulator */
        sb_add(&s, "\"vfiosim (simulated machine)\", \"host_kernel\": ");
    }
    sb_str(&s, u.release);
    sb_add(&s, ", \"kernel_version\": ");
    sb_str(&s, u.version);
    sb_printf(&s, ", \"machine\": \"%s\", \"page_size\": %ld, \"platform\": \"%s\"}", u.machine,
              sysconf(_SC_PAGESIZE), platform_name(&u));
    header_kernel_config(&s, &u);
    sb_printf(&s, ", \"iommu\": {%s}", iommu.p ? iommu.p : "");
    sb_printf(&s, ", \"groups\": [%s], \"devices\": [%s]", groups.p ? groups.p : "", devices.p ? devices.p : "");
    sb_printf(&s, ", \"windows\": [%s]", windows.p ? windows.p : "");
    sb_printf(&s, ", \"process\": {\"pid\": %d, \"uid\": %d, \"euid\": %d, \"cap_eff\": \"%s\", "
                  "\"rlimit_memlock\": [%lld, %lld], \"vmlck_kb\": %ld, \"vmpin_kb\": %ld, \"argv\": [",
              (int)getpid(), (int)getuid(), (int)geteuid(), capeff,
              rl.rlim_cur == RLIM_INFINITY ? -1LL : (long long)rl.rlim_cur,
              rl.rlim_max == RLIM_INFINITY ? -1LL : (long long)rl.rlim_max,
              status_kb(status, "\nVmLck:"), status_kb(status, "\nVmPin:"));
    for (ssize_t i = 0, k = 0; i < cl; i += (ssize_t)strlen(cmdline + i) + 1, k++) {
        if (k)
            sb_add(&s, ", ");
        sb_str(&s, cmdline + i);
    }
    sb_add(&s, "]}}");
    free(groups.p);
    free(devices.p);
    free(windows.p);
    free(iommu.p);
    put_line(&s);
}

/* What an open of a VFIO node gives (a real kernel's path, or the name of vfiosim
 * run's placeholder memfd under --simulated): /dev/vfio/vfio a container (an
 * iommufd when IOMMUFD_VFIO_CONTAINER serves it: its ioctls are told apart by
 * number), /dev/vfio/devices/vfioN a device (the cdev), /dev/vfio/N a group. */
static int node_kind(const char *path)
{
    if (!strcmp(path, "/dev/iommu") || !strncmp(path, "/memfd:vfiosim:iommufd", 22))
        return K_IOMMUFD;
    if (!strcmp(path, "/dev/vfio/vfio") || !strncmp(path, "/memfd:vfiosim:container", 24))
        return K_CONTAINER;
    if (!strncmp(path, "/dev/vfio/devices/", 18) || !strncmp(path, "/memfd:vfiosim:device", 21))
        return K_DEVICE;
    return K_GROUP;
}

/* Fds the program holds when this image starts (after an exec): VFIO files keep
 * their kind, as /proc/self/fd names them. */
static void adopt_inherited(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int adopted = 0;
    while (d && (e = readdir(d))) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd < 0 || fd >= MAX_FD || fd == trace_fd)
            continue;
        char path[64], link[256];
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t l = readlink(path, link, sizeof link - 1);
        if (l <= 0)
            continue;
        link[l] = 0;
        /* A real kernel's nodes, or the placeholders of vfiosim run's shim (--simulated). */
        if (!strcmp(link, "/dev/iommu") || !strncmp(link, "/memfd:vfiosim:iommufd", 22))
            fds[fd].kind = K_IOMMUFD;
        else if (!strncmp(link, "/dev/vfio/", 10) || !strncmp(link, "/memfd:vfiosim:", 15))
            fds[fd].kind = node_kind(link);
        else if (!strcmp(link, "anon_inode:[vfio-device]"))
            fds[fd].kind = K_DEVICE;
        adopted += fds[fd].kind != K_NONE;
    }
    if (d)
        closedir(d);
    if (adopted) {
        /* A new image in a process that holds VFIO files: it exec()ed.  (One that holds
         * none needs no record: a replay sees its first open as a new process's.) */
        struct sb s = {0};
        begin(&s, "exec");
        sb_printf(&s, ", \"detail\": \"a new program image holding %d VFIO file(s)\"", adopted);
        end(&s, 0, 0);
    }
}

__attribute__((constructor)) static void init(void)
{
    resolve();
    trace_path = getenv("VFIOSIM_RECORD");
    scenario = getenv("VFIOSIM_RECORD_SCENARIO");
    if (!trace_path || !*trace_path)
        return;
    int fd = real_open(trace_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "vfiosim record: cannot open the trace %s: %s\n", trace_path, strerror(errno));
        return;
    }
    /* Out of the program's way: a program that counts on the lowest free fd still gets it. */
    int high = real_fcntl(fd, F_DUPFD_CLOEXEC, TRACE_FD_MIN);
    if (high >= 0) {
        real_close(fd);
        fd = high;
    }
    trace_fd = fd;
    if (flock(fd, LOCK_EX) == 0) {
        struct stat st;
        if (fstat(fd, &st) == 0 && st.st_size == 0)
            write_header();
        else
            appending = getenv("VFIOSIM_RECORD_APPEND") != NULL;
        flock(fd, LOCK_UN);
    }
    adopt_inherited();
}

__attribute__((destructor)) static void fini(void)
{
    if (trace_fd < 0)
        return;
    struct sb s = {0};
    begin(&s, "exit");
    sb_add(&s, ", \"detail\": \"exited\"}");
    put_line(&s);
}

static inline int tracked(int fd)
{
    return trace_fd >= 0 && fd >= 0 && fd < MAX_FD && fds[fd].kind;
}

static int vfio_path(const char *path)
{
    return trace_fd >= 0 && path && (!strncmp(path, "/dev/vfio/", 10) || !strcmp(path, "/dev/iommu"));
}

/* -- open, close, dup ----------------------------------------------------------------------------- */

static int record_open(const char *path, int flags, int ret, int err)
{
    if (ret >= 0 && ret < MAX_FD) {
        fds[ret].kind = (unsigned char)node_kind(path);
        fds[ret].iommu_type = 0;
    }
    struct sb s = {0};
    begin(&s, "open");
    sb_add(&s, ", \"path\": ");
    sb_str(&s, path);
    sb_printf(&s, ", \"flags\": %d", flags);
    if (ret >= 0)
        add_fd(&s, ret);
    end(&s, ret, err);
    errno = err;
    return ret;
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode, int at)
{
    resolve();
    int ret = at ? real_openat(dirfd, path, flags, mode) : real_open(path, flags, mode);
    /* (opendir("/dev/vfio/devices") is no VFIO file) */
    if (!vfio_path(path) || (at && dirfd != AT_FDCWD) || (flags & O_DIRECTORY))
        return ret;
    return record_open(path, flags, ret, errno);
}

EXPORT int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | __O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return do_open(AT_FDCWD, path, flags, mode, 0);
}
EXPORT int open64(const char *path, int flags, ...) __attribute__((alias("open")));

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | __O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return do_open(dirfd, path, flags, mode, 1);
}
EXPORT int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));
EXPORT int __open_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, 0); }
EXPORT int __open64_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, 0); }
EXPORT int __openat_2(int dirfd, const char *path, int flags) { return do_open(dirfd, path, flags, 0, 1); }
EXPORT int __openat64_2(int dirfd, const char *path, int flags) { return do_open(dirfd, path, flags, 0, 1); }

EXPORT int close(int fd)
{
    resolve();
    if (fd == trace_fd && trace_fd >= 0) {
        errno = EBADF;           /* ours, not the program's: as if it were not open */
        return -1;
    }
    int was = tracked(fd);
    int kind = was ? fds[fd].kind : 0;
    int ret = real_close(fd);
    if (!was)
        return ret;
    int err = errno;
    fds[fd].kind = K_NONE;
    struct sb s = {0};
    begin(&s, "close");
    sb_printf(&s, ", \"fd\": %d, \"fd_kind\": \"%s\"", fd, kind_names[kind]);
    end(&s, ret, err);
    errno = err;
    return ret;
}

EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
    resolve();
    /* Our trace fd stays open: close around it. */
    int ret;
    if (trace_fd >= 0 && (unsigned)trace_fd >= first && (unsigned)trace_fd <= last) {
        ret = 0;
        if ((unsigned)trace_fd > first)
            ret |= real_close_range(first, (unsigned)trace_fd - 1, flags);
        if ((unsigned)trace_fd < last)
            ret |= real_close_range((unsigned)trace_fd + 1, last, flags);
    } else {
        ret = real_close_range(first, last, flags);
    }
    int err = errno;
    if (ret == 0 && !(flags & CLOSE_RANGE_CLOEXEC)) {
        for (unsigned fd = first; fd <= last && fd < MAX_FD; fd++) {
            if (!tracked((int)fd))
                continue;
            struct sb s = {0};
            begin(&s, "close");
            sb_printf(&s, ", \"fd\": %u, \"fd_kind\": \"%s\"", fd, kind_names[fds[fd].kind]);
            fds[fd].kind = K_NONE;
            end(&s, 0, 0);
        }
    }
    errno = err;
    return ret;
}

static int record_dup(int old, int ret, int err)
{
    if (ret >= 0 && ret < MAX_FD)
        fds[ret] = fds[old];
    struct sb s = {0};
    begin(&s, "dup");
    add_fd(&s, old);
    sb_printf(&s, ", \"newfd\": %d", ret);
    end(&s, ret, err);
    errno = err;
    return ret;
}

EXPORT int dup(int old)
{
    resolve();
    int ret = real_dup(old);
    return tracked(old) ? record_dup(old, ret, errno) : ret;
}

EXPORT int dup2(int old, int new)
{
    resolve();
    if (new == trace_fd && trace_fd >= 0) {     /* the program wants our number: move the trace */
        int moved = real_fcntl(trace_fd, F_DUPFD_CLOEXEC, TRACE_FD_MIN + 1);
        if (moved >= 0) {
            real_close(trace_fd);
            trace_fd = moved;
        }
    }
    int was = tracked(new) && new != old;
    int ret = real_dup2(old, new);
    if (ret >= 0 && was && !tracked(old))
        fds[new].kind = K_NONE;
    return tracked(old) ? record_dup(old, ret, errno) : ret;
}

EXPORT int dup3(int old, int new, int flags)
{
    resolve();
    int ret = real_dup3(old, new, flags);
    return tracked(old) ? record_dup(old, ret, errno) : ret;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
    resolve();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    int ret = real_fcntl(fd, cmd, arg);
    if ((cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && tracked(fd))
        return record_dup(fd, ret, errno);
    return ret;
}
EXPORT int fcntl64(int fd, int cmd, ...) __attribute__((alias("fcntl")));

/* -- ioctl -------------------------------------------------------------------------------------- */

enum argkind { A_UNKNOWN, A_NONE, A_VALUE, A_FDPTR, A_STRING, A_STRUCT };

static enum argkind arg_kind(int kind, int type1, int nr, size_t *minsz)
{
    *minsz = 4;
    int off = nr - VFIO_BASE;
    switch (kind) {
    case K_CONTAINER:
        switch (off) {
        case 0: return A_NONE;
        case 1: case 2: return A_VALUE;
        case 12: *minsz = type1 ? sizeof(struct vfio_iommu_type1_info) : sizeof(struct vfio_iommu_spapr_tce_info);
            return A_STRUCT;
        case 13: *minsz = sizeof(struct vfio_iommu_type1_dma_map); return A_STRUCT;
        case 14: *minsz = sizeof(struct vfio_iommu_type1_dma_unmap); return A_STRUCT;
        case 15: case 16: return A_NONE;
        case 17: *minsz = type1 ? sizeof(struct vfio_iommu_type1_dirty_bitmap)
                                : sizeof(struct vfio_iommu_spapr_register_memory);
            return A_STRUCT;
        case 18: *minsz = sizeof(struct vfio_iommu_spapr_register_memory); return A_STRUCT;
        case 19: *minsz = sizeof(struct vfio_iommu_spapr_tce_create); return A_STRUCT;
        case 20: *minsz = sizeof(struct vfio_iommu_spapr_tce_remove); return A_STRUCT;
        case 21: *minsz = sizeof(struct vfio_eeh_pe_op); return A_STRUCT;
        }
        return A_UNKNOWN;
    case K_GROUP:
        switch (off) {
        case 3: *minsz = sizeof(struct vfio_group_status); return A_STRUCT;
        case 4: return A_FDPTR;
        case 5: return A_NONE;
        case 6: return A_STRING;
        }
        return A_UNKNOWN;
    case K_DEVICE:
        switch (off) {
        case 7: *minsz = sizeof(struct vfio_device_info); return A_STRUCT;
        case 8: *minsz = sizeof(struct vfio_region_info); return A_STRUCT;
        case 9: *minsz = sizeof(struct vfio_irq_info); return A_STRUCT;
        case 10: *minsz = sizeof(struct vfio_irq_set); return A_STRUCT;
        case 11: return A_NONE;
        case 12: *minsz = sizeof(struct vfio_pci_hot_reset_info); return A_STRUCT;
        case 13: *minsz = sizeof(struct vfio_pci_hot_reset); return A_STRUCT;
        case 14: *minsz = sizeof(struct vfio_device_gfx_plane_info); return A_STRUCT;
        case 15: return A_FDPTR;
        case 16: *minsz = sizeof(struct vfio_device_ioeventfd); return A_STRUCT;
        case 17: *minsz = sizeof(struct vfio_device_feature); return A_STRUCT;
        /* the cdev (6.6): VFIO_DEVICE_BIND_IOMMUFD, ATTACH_ and DETACH_IOMMUFD_PT */
        case 18: *minsz = 16; return A_STRUCT;
        case 19: *minsz = 12; return A_STRUCT;
        case 20: *minsz = 8; return A_STRUCT;
        }
        return A_UNKNOWN;
    }
    return A_UNKNOWN;
}

/* -- iommufd (<linux/iommufd.h> of Linux 6.12) ------------------------------------------------------
 * The host's headers may predate iommufd (6.2) and the cdev (6.6), so the recorder
 * carries what it needs: each struct's size, where its user addresses lie and how
 * long the buffers they point to are.  Every iommufd ioctl is _IO(';', 0x80 + n) and
 * its struct starts with its size, as VFIO's start with argsz.  /dev/iommu answers
 * them, and so does /dev/vfio/vfio when IOMMUFD_VFIO_CONTAINER serves it. */
#define IOMMUFD_NR_BASE 0x80
static const size_t iommufd_sizes[] = {
    8,  /* 0x80 IOMMU_DESTROY */           12, /* 0x81 IOMMU_IOAS_ALLOC */
    24, /* 0x82 IOMMU_IOAS_ALLOW_IOVAS */  40, /* 0x83 IOMMU_IOAS_COPY */
    32, /* 0x84 IOMMU_IOAS_IOVA_RANGES */  40, /* 0x85 IOMMU_IOAS_MAP */
    24, /* 0x86 IOMMU_IOAS_UNMAP */        24, /* 0x87 IOMMU_OPTION */
    12, /* 0x88 IOMMU_VFIO_IOAS */         48, /* 0x89 IOMMU_HWPT_ALLOC */
    40, /* 0x8a IOMMU_GET_HW_INFO */       16, /* 0x8b IOMMU_HWPT_SET_DIRTY_TRACKING */
    48, /* 0x8c IOMMU_HWPT_GET_DIRTY_BITMAP */ 32, /* 0x8d IOMMU_HWPT_INVALIDATE */
    16, /* 0x8e IOMMU_FAULT_QUEUE_ALLOC */
};
#define N_IOMMUFD (sizeof iommufd_sizes / sizeof iommufd_sizes[0])

static int is_iommufd_nr(int kind, int nr)
{
    return (kind == K_IOMMUFD || kind == K_CONTAINER) && nr >= IOMMUFD_NR_BASE &&
           (size_t)(nr - IOMMUFD_NR_BASE) < N_IOMMUFD;
}

/* A buffer an argument points to, kept in the trace ("user": its bytes, read before
 * the call for what the kernel reads, after it for what the kernel writes). */
enum lenkind { L_COUNT, L_PRODUCT, L_LEN32, L_BITMAP };
struct userbuf {
    int nr;
    const char *field;
    size_t at;            /* the pointer's offset in the struct */
    int out;              /* the kernel writes it (else reads it) */
    enum lenkind how;     /* its length: */
    size_t a, b;          /* L_COUNT: u32 count at a of b-byte elements; L_PRODUCT: u32 at a times u32 at b;
                             L_LEN32: u32 at a; L_BITMAP: one bit per page, u64 length at a, u64 page size at b */
};
static const struct userbuf userbufs[] = {
    {0x82, "allowed_iovas", 16, 0, L_COUNT, 8, 16},     /* IOMMU_IOAS_ALLOW_IOVAS: iommu_iova_range[num_iovas] */
    {0x84, "allowed_iovas", 16, 1, L_COUNT, 8, 16},     /* IOMMU_IOAS_IOVA_RANGES */
    {0x89, "data_uptr", 32, 0, L_LEN32, 28, 0},          /* IOMMU_HWPT_ALLOC: data_len bytes */
    {0x8a, "data_uptr", 16, 1, L_LEN32, 12, 0},          /* IOMMU_GET_HW_INFO: data_len bytes */
    {0x8c, "data", 40, 1, L_BITMAP, 24, 32},             /* IOMMU_HWPT_GET_DIRTY_BITMAP: __u64 words */
    {0x8d, "data_uptr", 8, 0, L_PRODUCT, 20, 24},        /* IOMMU_HWPT_INVALIDATE: entry_len * entry_num */
};
#define N_USERBUFS (sizeof userbufs / sizeof userbufs[0])

static uint64_t field_u32(const uint8_t *buf, size_t n, size_t at)
{
    uint32_t v = 0;
    if (at + 4 <= n)
        memcpy(&v, buf + at, 4);
    return v;
}

static uint64_t field_u64(const uint8_t *buf, size_t n, size_t at)
{
    uint64_t v = 0;
    if (at + 8 <= n)
        memcpy(&v, buf + at, 8);
    return v;
}

/* Where a user buffer of this call lies and how long it is (0: none; the struct the
 * program passed, by its own size, does not reach the pointer). */
static size_t userbuf_len(const struct userbuf *u, const uint8_t *buf, size_t n, uint64_t *addr)
{
    *addr = 0;
    if (field_u32(buf, n, 0) < u->at + 8 || n < u->at + 8)
        return 0;
    *addr = field_u64(buf, n, u->at);
    uint64_t len = 0;
    switch (u->how) {
    case L_COUNT: len = field_u32(buf, n, u->a) * u->b; break;
    case L_PRODUCT: len = field_u32(buf, n, u->a) * field_u32(buf, n, u->b); break;
    case L_LEN32: len = field_u32(buf, n, u->a); break;
    case L_BITMAP: {              /* iova_bitmap_alloc(): a bit per 1 << __ffs(page_size) bytes */
        uint64_t pgsize = field_u64(buf, n, u->b);
        uint64_t pages = pgsize ? field_u64(buf, n, u->a) >> __builtin_ctzll(pgsize) : 0;
        len = (pages + 63) / 64 * 8;
        break;
    }
    }
    return len > MAX_ARG ? MAX_ARG : (size_t)len;
}

static void add_userbuf(struct sb *s, const char *field, const char *dir, uint64_t addr, size_t len, int *first)
{
    uint8_t *copy = len ? malloc(len) : NULL;
    size_t m = copy ? peek((uintptr_t)addr, copy, len) : 0;
    if (m) {
        sb_printf(s, "%s\"%s\": {\"%s\": \"", *first ? "" : ", ", field, dir);
        sb_hex(s, copy, m);
        sb_add(s, "\"}");
        *first = 0;
    }
    free(copy);
}

static int is_type1(int iommu_type)
{
    return iommu_type == VFIO_TYPE1_IOMMU || iommu_type == VFIO_TYPE1v2_IOMMU || iommu_type == 6;
}

/* The bitmap a dirty-tracking call writes: its address and length (0: none). */
static void bitmap_of(const uint8_t *buf, size_t n, int off, uint64_t *data, size_t *len)
{
    *data = 0;
    *len = 0;
    uint32_t flags;
    if (n < 8)
        return;
    memcpy(&flags, buf + 4, 4);
    size_t at;
    if (off == 14 && (flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP))
        at = sizeof(struct vfio_iommu_type1_dma_unmap);
    else if (off == 17 && (flags & VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP))
        at = sizeof(struct vfio_iommu_type1_dirty_bitmap) + 16;     /* iova, size, then the vfio_bitmap */
    else
        return;
    if (n < at + 24)
        return;
    uint64_t size;
    memcpy(&size, buf + at + 8, 8);
    memcpy(data, buf + at + 16, 8);
    *len = (size_t)((size + 7) / 8 * 8);
    if (*len > MAX_ARG)
        *len = MAX_ARG;
}

static void add_fdinfo(struct sb *s, const int32_t *list, size_t n, int *first)
{
    for (size_t i = 0; i < n; i++) {
        if (list[i] < 0 || tracked(list[i]))
            continue;
        char path[64], link[256];
        snprintf(path, sizeof path, "/proc/self/fd/%d", list[i]);
        ssize_t l = readlink(path, link, sizeof link - 1);
        link[l > 0 ? l : 0] = 0;
        sb_printf(s, "%s\"%d\": ", *first ? "" : ", ", list[i]);
        sb_str(s, l > 0 ? link : "(not open)");
        *first = 0;
    }
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *argp = va_arg(ap, void *);
    va_end(ap);
    resolve();
    if (!tracked(fd) || ((request >> 8) & 0xff) != VFIO_TYPE)      /* VFIO's ';', iommufd's too */
        return real_ioctl(fd, request, argp);

    int kind = fds[fd].kind;
    int iommu_type = fds[fd].iommu_type;
    int nr = (int)(request & 0xff);
    int off = nr - VFIO_BASE;
    /* An iommufd answers VFIO's container ioctls below its own numbers (vfio_compat.c). */
    int container = kind == K_CONTAINER || kind == K_IOMMUFD;
    int iommufd_nr = is_iommufd_nr(kind, nr);
    size_t minsz = 4;
    enum argkind ak = iommufd_nr ? (minsz = iommufd_sizes[nr - IOMMUFD_NR_BASE], A_STRUCT)
                                 : arg_kind(container ? K_CONTAINER : kind, is_type1(iommu_type), nr, &minsz);
    uintptr_t arg = (uintptr_t)argp;
    uint8_t *before = NULL;
    size_t n = 0;
    int fault = 0;
    if (ak == A_STRUCT) {
        uint32_t argsz = 0;
        if (peek(arg, &argsz, 4) != 4) {
            fault = 1;
        } else {
            size_t want = argsz > minsz ? argsz : minsz;
            if (want > MAX_ARG)
                want = MAX_ARG;
            before = malloc(want);
            n = before ? peek(arg, before, want) : 0;
        }
    } else if (ak == A_FDPTR) {
        before = malloc(4);
        n = before ? peek(arg, before, 4) : 0;
        fault = n != 4;
    } else if (ak == A_STRING) {
        before = calloc(1, 256);
        n = before ? peek(arg, before, 255) : 0;
        fault = n == 0;
        if (!fault) {
            size_t l = strnlen((char *)before, n);
            n = l < n ? l + 1 : n;
        }
    }
    uint64_t bm_data = 0;
    size_t bm_len = 0;
    if (container && !iommufd_nr && is_type1(iommu_type) && before)
        bitmap_of(before, n, off, &bm_data, &bm_len);
    /* The buffers the argument points to: what the kernel will read, now. */
    const struct userbuf *ub = NULL;
    uint64_t ub_addr = 0;
    size_t ub_len = 0;
    struct sb users = {0};
    int users_first = 1;
    for (size_t i = 0; iommufd_nr && before && i < N_USERBUFS; i++)
        if (userbufs[i].nr == nr) {
            ub = &userbufs[i];
            ub_len = userbuf_len(ub, before, n, &ub_addr);
            if (!ub->out)
                add_userbuf(&users, ub->field, "in", ub_addr, ub_len, &users_first);
        }

    long ret = real_ioctl(fd, request, argp);
    int err = errno;

    if (kind == K_GROUP && off == 6 && ret >= 0 && ret < MAX_FD) {
        fds[ret].kind = K_DEVICE;
        fds[ret].iommu_type = 0;
    }
    if (container && off == 2 && ret == 0)
        fds[fd].iommu_type = (int)arg;
    if (ub && ub->out)
        add_userbuf(&users, ub->field, "out", ub_addr, ub_len, &users_first);

    struct sb s = {0};
    begin(&s, "ioctl");
    add_fd(&s, fd);
    sb_printf(&s, ", \"request\": %lu", request);
    if (container && iommu_type)
        sb_printf(&s, ", \"iommu_type\": %d", iommu_type);
    sb_printf(&s, ", \"raw\": {\"arg\": %llu", (unsigned long long)arg);
    if (fault) {
        sb_add(&s, ", \"fault\": true");
    } else if (before && n) {
        sb_add(&s, ", \"in\": \"");
        sb_hex(&s, before, n);
        sb_add(&s, "\"");
        if (ak == A_STRUCT) {
            uint8_t *after = malloc(n);
            size_t m = after ? peek(arg, after, n) : 0;
            if (m == n) {
                sb_add(&s, ", \"out\": \"");
                sb_hex(&s, after, m);
                sb_add(&s, "\"");
            }
            free(after);
        }
        if (bm_data && bm_len) {
            uint8_t *bits = malloc(bm_len);
            size_t m = bits ? peek((uintptr_t)bm_data, bits, bm_len) : 0;
            if (m) {
                sb_add(&s, ", \"bitmap\": \"");
                sb_hex(&s, bits, m);
                sb_add(&s, "\"");
            }
            free(bits);
        }
        if (users.p)
            sb_printf(&s, ", \"user\": {%s}", users.p);
    }
    sb_add(&s, "}");
    /* Where the user addresses lie: MAP_DMA, (UN)REGISTER_MEMORY, IOAS_MAP, the buffers above. */
    if (container && !iommufd_nr && before && n >= 24 && !fault &&
        (off == 13 || (!is_type1(iommu_type) && (off == 17 || off == 18)))) {
        uint64_t vaddr, size;
        memcpy(&vaddr, before + 8, 8);
        memcpy(&size, before + (off == 13 ? 24 : 16), 8);
        if (off != 13 || n >= 32) {
            sb_add(&s, ", \"mem\": {");
            add_vma(&s, "vaddr", vaddr, size);
            sb_add(&s, "}");
        }
    } else if (iommufd_nr && nr == 0x85 && before && n >= 32 && !fault) {        /* IOMMU_IOAS_MAP */
        sb_add(&s, ", \"mem\": {");
        add_vma(&s, "user_va", field_u64(before, n, 16), field_u64(before, n, 24));
        sb_add(&s, "}");
    } else if (ub && ub_addr) {
        sb_add(&s, ", \"mem\": {");
        add_vma(&s, ub->field, ub_addr, ub_len);
        sb_add(&s, "}");
    }
    /* The other fds inside the argument: what they are. */
    if (kind == K_DEVICE && before && !fault) {
        int first = 1;
        sb_add(&s, ", \"fds\": {");
        if (off == 10 && n >= sizeof(struct vfio_irq_set)) {
            struct vfio_irq_set hdr;
            memcpy(&hdr, before, sizeof hdr);
            if (hdr.flags & VFIO_IRQ_SET_DATA_EVENTFD) {
                size_t count = (n - sizeof hdr) / 4;
                if (count > hdr.count)
                    count = hdr.count;
                add_fdinfo(&s, (const int32_t *)(before + sizeof hdr), count, &first);
            }
        } else if (off == 16 && n >= sizeof(struct vfio_device_ioeventfd)) {
            int32_t efd;
            memcpy(&efd, before + offsetof(struct vfio_device_ioeventfd, fd), 4);
            add_fdinfo(&s, &efd, 1, &first);
        } else if (off == 18 && n >= 12) {             /* VFIO_DEVICE_BIND_IOMMUFD's iommufd */
            int32_t ifd;
            memcpy(&ifd, before + 8, 4);
            add_fdinfo(&s, &ifd, 1, &first);
        }
        sb_add(&s, "}");
    }
    free(before);
    free(users.p);
    end(&s, ret, err);
    errno = err;
    return (int)ret;
}

/* -- read and write ------------------------------------------------------------------------------- */

static void record_rw(const char *call, int fd, const void *buf, size_t count, off_t offset, int positional,
                      ssize_t ret, int err)
{
    struct sb s = {0};
    begin(&s, call);
    add_fd(&s, fd);
    sb_printf(&s, ", \"count\": %zu", count);
    if (positional)
        sb_printf(&s, ", \"offset\": %lld", (long long)offset);
    size_t n = !strcmp(call, "write") ? count : (ret > 0 ? (size_t)ret : 0);
    if (n > MAX_DATA)
        n = MAX_DATA;
    if (n) {
        uint8_t *copy = malloc(n);
        size_t m = copy ? peek((uintptr_t)buf, copy, n) : 0;
        if (m) {
            sb_add(&s, ", \"data\": \"");
            sb_hex(&s, copy, m);
            sb_add(&s, "\"");
        }
        free(copy);
    }
    end(&s, (long)ret, err);
    errno = err;
}

EXPORT ssize_t read(int fd, void *buf, size_t count)
{
    resolve();
    ssize_t ret = real_read(fd, buf, count);
    if (tracked(fd))
        record_rw("read", fd, buf, count, 0, 0, ret, errno);
    return ret;
}

EXPORT ssize_t write(int fd, const void *buf, size_t count)
{
    resolve();
    ssize_t ret = real_write(fd, buf, count);
    if (tracked(fd))
        record_rw("write", fd, buf, count, 0, 0, ret, errno);
    return ret;
}

EXPORT ssize_t pread(int fd, void *buf, size_t count, off_t offset)
{
    resolve();
    ssize_t ret = real_pread(fd, buf, count, offset);
    if (tracked(fd))
        record_rw("read", fd, buf, count, offset, 1, ret, errno);
    return ret;
}
EXPORT ssize_t pread64(int fd, void *buf, size_t count, off_t offset) __attribute__((alias("pread")));

EXPORT ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
{
    resolve();
    ssize_t ret = real_pwrite(fd, buf, count, offset);
    if (tracked(fd))
        record_rw("write", fd, buf, count, offset, 1, ret, errno);
    return ret;
}
EXPORT ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) __attribute__((alias("pwrite")));

/* _FORTIFY_SOURCE builds (QEMU) call these; glibc's versions make the system call directly. */
extern void __chk_fail(void) __attribute__((noreturn));
EXPORT ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen)
{
    if (count > buflen)
        __chk_fail();
    return read(fd, buf, count);
}
EXPORT ssize_t __pread_chk(int fd, void *buf, size_t count, off_t offset, size_t buflen)
{
    if (count > buflen)
        __chk_fail();
    return pread(fd, buf, count, offset);
}
EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t count, off_t offset, size_t buflen)
{
    if (count > buflen)
        __chk_fail();
    return pread(fd, buf, count, offset);
}

/* -- device mappings ---------------------------------------------------------------------------- */

EXPORT void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    resolve();
    void *ret = real_mmap(addr, length, prot, flags, fd, offset);
    if (!tracked(fd))
        return ret;
    int err = errno;
    if (ret != MAP_FAILED) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < MAX_MAPS; i++)
            if (!maps[i].len) {
                maps[i].addr = (uintptr_t)ret;
                maps[i].len = length;
                break;
            }
        pthread_mutex_unlock(&lock);
    }
    struct sb s = {0};
    begin(&s, "mmap");
    add_fd(&s, fd);
    sb_printf(&s, ", \"offset\": %lld, \"length\": %zu, \"prot\": %d, \"flags\": %d, \"shared\": %s",
              (long long)offset, length, prot, flags, (flags & MAP_SHARED) ? "true" : "false");
    end(&s, ret == MAP_FAILED ? -1 : (long)(uintptr_t)ret, err);
    errno = err;
    return ret;
}
EXPORT void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    __attribute__((alias("mmap")));

EXPORT int munmap(void *addr, size_t length)
{
    resolve();
    int ret = real_munmap(addr, length);
    int err = errno;
    int hit = -1;
    if (trace_fd >= 0 && ret == 0) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < MAX_MAPS; i++)
            if (maps[i].len && maps[i].addr == (uintptr_t)addr) {
                hit = i;
                maps[i].len = 0;
                break;
            }
        pthread_mutex_unlock(&lock);
    }
    if (hit >= 0) {
        struct sb s = {0};
        begin(&s, "munmap");
        sb_printf(&s, ", \"addr\": %llu, \"length\": %zu", (unsigned long long)(uintptr_t)addr, length);
        end(&s, ret, err);
    }
    errno = err;
    return ret;
}

/* -- processes and limits ------------------------------------------------------------------------- */

/* The parent writes the fork record before the child may write anything: the child
 * waits for it on a pipe, so that a replay forks before it sees the child's calls. */
EXPORT pid_t fork(void)
{
    resolve();
    if (trace_fd < 0)
        return real_fork();
    int p[2];
    int have_pipe = pipe2(p, O_CLOEXEC) == 0;
    pid_t ret = real_fork();
    int err = errno;
    if (ret == 0) {
        if (have_pipe) {
            char c;
            real_close(p[1]);
            while (real_read(p[0], &c, 1) < 0 && errno == EINTR)
                ;
            real_close(p[0]);
        }
        pthread_mutex_init(&lock, NULL);
        return 0;
    }
    if (ret > 0) {
        struct sb s = {0};
        begin(&s, "fork");
        sb_printf(&s, ", \"child\": %d", (int)ret);
        end(&s, 0, 0);
    }
    if (have_pipe) {
        real_close(p[0]);
        real_close(p[1]);          /* the child's read returns 0: go */
    }
    errno = err;
    return ret;
}

static void record_rlimit(int resource, const struct rlimit *want, int ret, int err)
{
    struct rlimit now = {0, 0};
    getrlimit(resource, &now);
    struct sb s = {0};
    begin(&s, "setrlimit");
    sb_printf(&s, ", \"resource\": %d, \"cur\": %lld, \"max\": %lld, \"now\": [%lld, %lld]", resource,
              want->rlim_cur == RLIM_INFINITY ? -1LL : (long long)want->rlim_cur,
              want->rlim_max == RLIM_INFINITY ? -1LL : (long long)want->rlim_max,
              now.rlim_cur == RLIM_INFINITY ? -1LL : (long long)now.rlim_cur,
              now.rlim_max == RLIM_INFINITY ? -1LL : (long long)now.rlim_max);
    end(&s, ret, err);
    errno = err;
}

EXPORT int setrlimit(__rlimit_resource_t resource, const struct rlimit *rl)
{
    resolve();
    int ret = real_setrlimit(resource, rl);
    if (trace_fd >= 0 && resource == RLIMIT_MEMLOCK)
        record_rlimit(resource, rl, ret, errno);
    return ret;
}
EXPORT int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *rl)
{
    struct rlimit r = {(rlim_t)rl->rlim_cur, (rlim_t)rl->rlim_max};
    return setrlimit(resource, &r);
}

EXPORT int prlimit(pid_t pid, __rlimit_resource_t resource, const struct rlimit *rl, struct rlimit *old)
{
    resolve();
    int ret = real_prlimit(pid, resource, rl, old);
    if (trace_fd >= 0 && resource == RLIMIT_MEMLOCK && rl && (pid == 0 || pid == getpid()))
        record_rlimit(resource, rl, ret, errno);
    return ret;
}
EXPORT int prlimit64(pid_t pid, __rlimit_resource_t resource, const struct rlimit64 *rl, struct rlimit64 *old)
{
    /* On 64-bit Linux struct rlimit and rlimit64 are the same two 64-bit words. */
    return prlimit(pid, resource, (const struct rlimit *)rl, (struct rlimit *)old);
}

/* Credentials: what the process has after a change (the kernel checks them, so a
 * replay takes them over). */
static void record_creds(const char *call, int ret, int err)
{
    char status[8192], capeff[32] = "";
    unsigned r = 0, e = 0, sv = 0;
    if (slurp("/proc/self/status", status, sizeof status) > 0) {
        const char *u = strstr(status, "\nUid:");
        if (u)
            sscanf(u + 5, "%u %u %u", &r, &e, &sv);
        const char *c = strstr(status, "\nCapEff:");
        if (c)
            sscanf(c + 8, " %31s", capeff);
    }
    struct sb s = {0};
    begin(&s, "setuid");
    sb_printf(&s, ", \"detail\": \"%s\", \"now\": {\"uid\": %u, \"euid\": %u, \"suid\": %u, \"cap_eff\": \"%s\"}",
              call, r, e, sv, capeff);
    end(&s, ret, err);
    errno = err;
}

EXPORT int setuid(uid_t uid)
{
    resolve();
    int ret = real_setuid(uid);
    if (trace_fd >= 0)
        record_creds("setuid", ret, errno);
    return ret;
}

EXPORT int seteuid(uid_t uid)
{
    resolve();
    int ret = real_seteuid(uid);
    if (trace_fd >= 0)
        record_creds("seteuid", ret, errno);
    return ret;
}

EXPORT int setreuid(uid_t r, uid_t e)
{
    resolve();
    int ret = real_setreuid(r, e);
    if (trace_fd >= 0)
        record_creds("setreuid", ret, errno);
    return ret;
}

EXPORT int setresuid(uid_t r, uid_t e, uid_t sv)
{
    resolve();
    int ret = real_setresuid(r, e, sv);
    if (trace_fd >= 0)
        record_creds("setresuid", ret, errno);
    return ret;
}

/* capset(2) (glibc's wrapper, libcap's too): the capabilities change as the uid's do. */
EXPORT int capset(void *header, const void *data)
{
    resolve();
    int ret = real_capset(header, data);
    if (trace_fd >= 0)
        record_creds("capset", ret, errno);
    return ret;
}

/* chown of a VFIO node: who may open it afterwards (a replay gives its node the
 * same owner). */
EXPORT int chown(const char *path, uid_t uid, gid_t gid)
{
    resolve();
    int ret = real_chown(path, uid, gid), err = errno;
    if (vfio_path(path)) {
        struct sb s = {0};
        begin(&s, "chown");
        sb_add(&s, ", \"path\": ");
        sb_str(&s, path);
        sb_printf(&s, ", \"uid\": %d, \"gid\": %d", (int)uid, (int)gid);
        end(&s, ret, err);
    }
    errno = err;
    return ret;
}
