/*
 * The C side of benchmarks/run_bench.py: a plain VFIO program (it knows
 * nothing of vfiosim) timing the calls issue 13 sets goals for.
 *
 *   bench_client syscall N                 N x ioctl(FIONREAD) on a pipe: the real syscall to compare with
 *   bench_client ioctl N                   N x ioctl(container, VFIO_GET_API_VERSION)
 *   bench_client mapunmap N IOMMU GROUP    N x (4 KiB MAP_DMA + UNMAP_DMA); IOMMU: type1v2, spapr1, spapr2
 *   bench_client store N IOMMU GROUP BDF   N x 32-bit store to edu's liveness register through the BAR mmap
 *   bench_client load N IOMMU GROUP BDF    N x 32-bit load of edu's identification register
 *   bench_client dma MIB IOMMU GROUP BDF   edu DMA of MIB x 1 MiB in 4 KiB transfers, RAM -> device -> RAM
 *   bench_client stress SECONDS GROUP      Type1v2 4 KiB MAP+UNMAP loop raced by an mlock/munlock thread
 *   bench_client memcpy MIB                memcpy of MIB x 1 MiB
 *   bench_client trap N                    N x a store that faults, stepped over by a SIGSEGV handler:
 *                                          the floor of any BAR access emulated by faulting
 *
 * Each prints one number: nanoseconds per operation, MB/s, or (stress) pairs done.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/vfio.h>
#include <pthread.h>
#include <signal.h>
#include <ucontext.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int iommu_type(const char *name)
{
    if (!strcmp(name, "type1v2"))
        return VFIO_TYPE1v2_IOMMU;
    if (!strcmp(name, "spapr1"))
        return VFIO_SPAPR_TCE_IOMMU;
    if (!strcmp(name, "spapr2"))
        return VFIO_SPAPR_TCE_v2_IOMMU;
    fprintf(stderr, "unknown IOMMU %s\n", name);
    exit(2);
}

/* A container with GROUP in it and the IOMMU set (v1 enabled); `buf` of
 * `size` bytes registered for sPAPR v2. */
static int container(const char *iommu, const char *group, void *buf, size_t size, int *gfd)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/vfio/%s", group);
    int c = open("/dev/vfio/vfio", O_RDWR), g = open(path, O_RDWR);
    if (c < 0 || g < 0)
        die("open");
    if (ioctl(g, VFIO_GROUP_SET_CONTAINER, &c))
        die("VFIO_GROUP_SET_CONTAINER");
    int type = iommu_type(iommu);
    if (ioctl(c, VFIO_SET_IOMMU, type))
        die("VFIO_SET_IOMMU");
    if (type == VFIO_SPAPR_TCE_IOMMU && ioctl(c, VFIO_IOMMU_ENABLE))
        die("VFIO_IOMMU_ENABLE");
    if (type == VFIO_SPAPR_TCE_v2_IOMMU) {
        struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf, .size = size};
        if (ioctl(c, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg))
            die("VFIO_IOMMU_SPAPR_REGISTER_MEMORY");
    }
    if (gfd)
        *gfd = g;
    return c;
}

static void map(int c, void *vaddr, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_map m = {.argsz = sizeof m, .flags = 3, .vaddr = (uintptr_t)vaddr, .iova = iova,
                                         .size = size};
    if (ioctl(c, VFIO_IOMMU_MAP_DMA, &m))
        die("VFIO_IOMMU_MAP_DMA");
}

static void unmap(int c, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = iova, .size = size};
    if (ioctl(c, VFIO_IOMMU_UNMAP_DMA, &u))
        die("VFIO_IOMMU_UNMAP_DMA");
}

/* BAR0 of the device BDF in GROUP (its container set up with IOMMU), bus mastering on. */
static volatile uint8_t *bar0(const char *iommu, const char *group, const char *bdf, void *buf, size_t size,
                              int *cfd)
{
    int g;
    int c = container(iommu, group, buf, size, &g);
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (d < 0)
        die("VFIO_GROUP_GET_DEVICE_FD");
    uint16_t cmd;
    off_t cfg = (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40;
    if (pread(d, &cmd, 2, cfg + 4) != 2)
        die("pread config");
    cmd |= 0x6;                                     /* memory space, bus master */
    if (pwrite(d, &cmd, 2, cfg + 4) != 2)
        die("pwrite config");
    void *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    if (p == MAP_FAILED)
        die("mmap BAR0");
    *cfd = c;
    return p;
}

static void skip_store(int sig, siginfo_t *si, void *ucv)
{
    (void)sig, (void)si;
    ((ucontext_t *)ucv)->uc_mcontext.gregs[REG_RIP] += 3;      /* movl %eax, 4(%rdx): 89 42 04 */
}

static volatile int stop_stress;

static void *mlocker(void *arg)
{
    uint8_t *p = arg;
    while (!stop_stress) {
        mlock(p, 4096);
        munlock(p, 4096);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    const char *mode = argv[1];
    if (!strcmp(mode, "syscall")) {
        long n = atol(argv[2]);
        int p[2], avail;
        if (pipe(p))
            die("pipe");
        for (int i = 0; i < 1000; i++)
            ioctl(p[0], FIONREAD, &avail);
        double t = now();
        for (long i = 0; i < n; i++)
            if (ioctl(p[0], FIONREAD, &avail))
                die("FIONREAD");
        printf("%.1f\n", (now() - t) / n * 1e9);
        return 0;
    }
    if (!strcmp(mode, "ioctl")) {
        long n = atol(argv[2]);
        int c = open("/dev/vfio/vfio", O_RDWR);
        if (c < 0)
            die("open");
        for (int i = 0; i < 200; i++)
            ioctl(c, VFIO_GET_API_VERSION);
        double t = now();
        for (long i = 0; i < n; i++)
            if (ioctl(c, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
                die("VFIO_GET_API_VERSION");
        printf("%.1f\n", (now() - t) / n * 1e9);
        return 0;
    }
    if ((!strcmp(mode, "mapunmap") && argc >= 5) || (!strcmp(mode, "mapbar") && argc >= 6)) {
        /* mapbar: with BAR0 mmapped, as QEMU and DPDK have their BARs (the daemon
         * then checks each mapping's decoding after every ioctl) */
        long n = atol(argv[2]);
        uint8_t *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 1, 1 << 20);
        int c;
        if (!strcmp(mode, "mapbar"))
            bar0(argv[3], argv[4], argv[5], buf, 1 << 20, &c);
        else
            c = container(argv[3], argv[4], buf, 1 << 20, NULL);
        for (int i = 0; i < 20; i++) {
            map(c, buf, 0, 4096);
            unmap(c, 0, 4096);
        }
        double t = now();
        for (long i = 0; i < n; i++) {
            map(c, buf, 0, 4096);
            unmap(c, 0, 4096);
        }
        printf("%.1f\n", (now() - t) / n * 1e9);
        return 0;
    }
    if ((!strcmp(mode, "store") || !strcmp(mode, "load")) && argc >= 6) {
        long n = atol(argv[2]);
        int c;
        volatile uint8_t *bar = bar0(argv[3], argv[4], argv[5], NULL, 0, &c);
        volatile uint32_t *live = (volatile uint32_t *)(bar + 0x04), *ident = (volatile uint32_t *)bar;
        uint32_t sink = 0;
        for (int i = 0; i < 100; i++)
            sink += *ident;
        *live = 1;
        if (*live != ~1u)
            die("liveness");
        double t = now();
        if (mode[0] == 's') {
            for (long i = 0; i < n; i++)
                *live = (uint32_t)i;
        } else {
            for (long i = 0; i < n; i++)
                sink += *ident;
        }
        double dt = now() - t;
        if (mode[0] == 's' && *live != ~(uint32_t)(n - 1))
            die("the last store did not land");
        if (mode[0] == 'l' && sink != (uint32_t)((n + 100) * 0x010000edull))
            die("loads");
        printf("%.1f\n", dt / n * 1e9);
        return 0;
    }
    if (!strcmp(mode, "dma") && argc >= 6) {
        long mib = atol(argv[2]);
        size_t size = (size_t)mib << 20;
        /* source, then destination */
        uint8_t *buf = mmap(NULL, 2 * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (size_t i = 0; i < size; i++)
            buf[i] = (uint8_t)(i * 7 + (i >> 12));
        memset(buf + size, 0, size);
        int c;
        volatile uint8_t *bar = bar0(argv[3], argv[4], argv[5], buf, 2 * size, &c);
        map(c, buf, 0, 2 * size);
        volatile uint64_t *src = (volatile uint64_t *)(bar + 0x80), *dst = (volatile uint64_t *)(bar + 0x88);
        volatile uint64_t *cnt = (volatile uint64_t *)(bar + 0x90), *cmd = (volatile uint64_t *)(bar + 0x98);
        double t = now();
        for (size_t off = 0; off < size; off += 4096) {
            *src = off;                              /* RAM -> device */
            *dst = 0x40000;
            *cnt = 4096;
            *cmd = 1;
            while (*cmd & 1)
                ;
            *src = 0x40000;                          /* device -> RAM */
            *dst = size + off;
            *cnt = 4096;
            *cmd = 3;
            while (*cmd & 1)
                ;
        }
        double dt = now() - t;
        if (memcmp(buf, buf + size, size))
            die("the data did not make the round trip");
        printf("%.1f\n", mib / dt * 1.048576);
        return 0;
    }
    if (!strcmp(mode, "stress") && argc >= 4) {
        double secs = atof(argv[2]);
        uint8_t *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 1, 1 << 20);
        int c = container("type1v2", argv[3], buf, 1 << 20, NULL);
        pthread_t th;
        pthread_create(&th, NULL, mlocker, buf + 8192);
        long pairs = 0;
        double t = now(), end = t + secs;
        while (now() < end) {
            for (int i = 0; i < 16; i++) {
                map(c, buf, 0, 4096);
                unmap(c, 0, 4096);
            }
            pairs += 16;
        }
        stop_stress = 1;
        pthread_join(th, NULL);
        printf("%ld\n", pairs);
        return 0;
    }
    if (!strcmp(mode, "trap")) {
        long n = atol(argv[2]);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = skip_store;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigaction(SIGSEGV, &sa, NULL);
        void *page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        double t = now();
        for (long i = 0; i < n; i++)
            __asm__ volatile(".byte 0x89, 0x42, 0x04" : : "a"((uint32_t)i), "d"(page) : "memory");
        printf("%.1f\n", (now() - t) / n * 1e9);
        return 0;
    }
    if (!strcmp(mode, "memcpy")) {
        long mib = atol(argv[2]);
        size_t size = (size_t)mib << 20;
        uint8_t *buf = mmap(NULL, size + (1 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 0x5a, size + (1 << 20));
        double best = 1e9;
        for (int r = 0; r < 5; r++) {
            double t = now();
            for (long i = 0; i < mib; i++)
                memcpy(buf + size, buf + ((size_t)i << 20), 1 << 20);
            double dt = now() - t;
            best = dt < best ? dt : best;
        }
        printf("%.1f\n", mib / best * 1.048576);
        return buf[size + 17] == 0x5a ? 0 : 1;
    }
    fprintf(stderr, "bad arguments\n");
    return 2;
}
