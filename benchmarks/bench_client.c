/*
 * The C side of benchmarks/run_bench.py.
 *
 *   bench_client ioctl N        N x ioctl(container, VFIO_GET_API_VERSION) through the shim
 *   bench_client echo SOCK N    N x 64-byte request / 16-byte reply on a SOCK_SEQPACKET socket
 *   bench_client dma MIB        edu DMA of MIB x 1 MiB, RAM -> device (4 KiB per command) over sPAPR
 *   bench_client memcpy MIB     memcpy of MIB x 1 MiB
 * Each prints one number: nanoseconds per operation, or MB/s.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    if (!strcmp(argv[1], "ioctl")) {
        long n = atol(argv[2]);
        int c = open("/dev/vfio/vfio", O_RDWR);
        if (c < 0)
            return 1;
        for (int i = 0; i < 100; i++)
            ioctl(c, VFIO_GET_API_VERSION);
        double t = now();
        for (long i = 0; i < n; i++)
            if (ioctl(c, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
                return 1;
        printf("%.0f\n", (now() - t) / n * 1e9);
        return 0;
    }
    if (!strcmp(argv[1], "echo")) {
        long n = atol(argv[3]);
        int s = socket(AF_UNIX, SOCK_SEQPACKET, 0);
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", argv[2]);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa))
            return 1;
        char req[64] = {0}, rep[16];
        for (int i = 0; i < 100; i++) {
            send(s, req, sizeof req, 0);
            recv(s, rep, sizeof rep, 0);
        }
        double t = now();
        for (long i = 0; i < n; i++) {
            if (send(s, req, sizeof req, 0) != sizeof req || recv(s, rep, sizeof rep, 0) != sizeof rep)
                return 1;
        }
        printf("%.0f\n", (now() - t) / n * 1e9);
        return 0;
    }
    long mib = atol(argv[2]);
    size_t size = (size_t)mib << 20;
    uint8_t *buf = mmap(NULL, size + (1 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 0x5a, size + (1 << 20));
    if (!strcmp(argv[1], "memcpy")) {
        double t = now();
        for (long i = 0; i < mib; i++)
            memcpy(buf + size, buf + ((size_t)i << 20), 1 << 20);
        double dt = now() - t;
        printf("%.1f\n", mib / dt * 1.048576);
        return buf[size + 17] == 0x5a ? 0 : 1;
    }
    /* dma: the sPAPR flow of examples/spapr_edu_dma.c, then 4 KiB DMA commands */
    int c = open("/dev/vfio/vfio", O_RDWR), g = open("/dev/vfio/0", O_RDWR);
    ioctl(g, VFIO_GROUP_SET_CONTAINER, &c);
    ioctl(c, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU);
    struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf, .size = size};
    if (ioctl(c, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg))
        return 1;
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf, .iova = 0,
                                           .size = size};
    if (ioctl(c, VFIO_IOMMU_MAP_DMA, &map))
        return 1;
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argc > 3 ? argv[3] : "0000:00:00.0");
    uint16_t cmd = 0x6;
    pwrite(d, &cmd, 2, (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40 | 4);
    volatile uint8_t *bar = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    double t = now();
    for (size_t off = 0; off < size; off += 4096) {
        *(volatile uint64_t *)(bar + 0x80) = off;
        *(volatile uint64_t *)(bar + 0x88) = 0x40000;
        *(volatile uint64_t *)(bar + 0x90) = 4096;
        *(volatile uint64_t *)(bar + 0x98) = 1;
    }
    double dt = now() - t;
    printf("%.1f\n", mib / dt * 1.048576);
    return 0;
}
