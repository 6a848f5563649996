/* A VFIO workload that never stops: the target of the SIGKILL tests.
 *
 *   churn spapr|type1 GROUP BDF
 *
 * Over and over: a container and the group, the IOMMU, (ENABLE), a device
 * fd, a 1 MiB buffer mapped for DMA in pieces, an edu DMA through it,
 * some unmapped again, an eventfd for the device's INTx, and -- every
 * third round -- a forked child that uses the same container and exits.
 * Everything is left open for the next round to pile on, until the test
 * kills the process at some random point.  Prints "round N" as it goes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static int type1;

static void map(int c, void *va, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_map m = { .argsz = sizeof m, .flags = 3, .vaddr = (uintptr_t)va,
                                          .iova = iova, .size = size };
    ioctl(c, VFIO_IOMMU_MAP_DMA, &m);
}

static void unmap(int c, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof u, .iova = iova, .size = size };
    ioctl(c, VFIO_IOMMU_UNMAP_DMA, &u);
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    type1 = !strcmp(argv[1], "type1");
    char path[64];
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[2]);
    uint64_t base = type1 ? 0x100000 : 0;
    int prev[3] = { -1, -1, -1 };
    char *prevbuf = NULL;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int round = 0;; round++) {
        int c = open("/dev/vfio/vfio", O_RDWR);
        if (prev[0] >= 0) {               /* what the last round left open goes now */
            for (int i = 0; i < 3; i++)
                close(prev[i]);
            munmap(prevbuf, 1 << 20);
            prev[0] = -1;
        }
        int g = open(path, O_RDWR);
        if (g < 0) {
            printf("round %d: open %s: %s\n", round, path, strerror(errno));
            return 1;
        }
        ioctl(g, VFIO_GROUP_SET_CONTAINER, &c);
        ioctl(c, VFIO_SET_IOMMU, type1 ? VFIO_TYPE1v2_IOMMU : VFIO_SPAPR_TCE_IOMMU);
        if (!type1)
            ioctl(c, VFIO_IOMMU_ENABLE);
        int dev = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[3]);
        char *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 0x5a, 1 << 20);
        for (int i = 0; i < 16; i++)
            map(c, buf + i * 65536, base + i * 65536, 65536);
        if (dev >= 0) {
            uint16_t cmd = 0x6;
            pwrite(dev, &cmd, 2, ((uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4);
            uint64_t regs[4] = { 0x40000, base + 0x1000, 4096, 3 };      /* RAM -> device */
            for (int i = 0; i < 4; i++)
                pwrite(dev, &regs[i], 8, 0x80 + 8 * i);
            int efd = eventfd(0, EFD_CLOEXEC);
            char irqbuf[sizeof(struct vfio_irq_set) + 4];
            struct vfio_irq_set *set = (void *)irqbuf;
            set->argsz = sizeof irqbuf;
            set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
            set->index = VFIO_PCI_INTX_IRQ_INDEX;
            set->start = 0;
            set->count = 1;
            memcpy(set->data, &efd, 4);
            ioctl(dev, VFIO_DEVICE_SET_IRQS, set);
        }
        for (int i = 0; i < 16; i += 2)
            unmap(c, base + i * 65536, 65536);
        if (round % 3 == 2) {
            pid_t pid = fork();
            if (pid == 0) {
                map(c, buf, base + (1 << 21), 65536);
                unmap(c, base + 65536, 65536);
                _exit(0);
            }
            waitpid(pid, NULL, 0);
        }
        printf("round %d\n", round);
        /* Every other round leaves everything open until the next one has
         * its container: the kill finds more to clean up. */
        if (round % 2) {
            close(dev);
            close(g);
            close(c);
            munmap(buf, 1 << 20);
        } else {
            prev[0] = dev, prev[1] = g, prev[2] = c;
            prevbuf = buf;
        }
    }
}
