/*
 * The sPAPR TCE example of the kernel's VFIO documentation
 * (Documentation/driver-api/vfio.rst), carried on until QEMU's "edu" PCI
 * device has moved a buffer through the TCE table: RAM -> device -> RAM.
 *
 * A plain VFIO program: it knows nothing of vfiosim.  On a POWER host with an
 * edu device bound to vfio-pci it runs as it is; anywhere else:
 *
 *     vfiosim run -- ./spapr_edu_dma [BDF [BYTES]]
 *
 * Build: cc -O2 -Wall -o spapr_edu_dma spapr_edu_dma.c
 * Exit status 0 when every byte made the round trip.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_ACK 0x64
#define EDU_BUFFER 0x40000
#define DMA_RUN 1
#define DMA_TO_RAM 2
#define DMA_IRQ 4
#define CHUNK_MAX 4096                  /* edu's DMA buffer */

/* Bytes per DMA (argument 2; default 4096).  QEMU's emulated edu before 8.2.1 refuses a
 * DMA that ends exactly at the end of its buffer ("edu: fix DMA range upper bound
 * check"), so against it (in a QEMU guest) move less, e.g. 2048. */
static unsigned chunk = CHUNK_MAX;

static void die(const char *what)
{
    fprintf(stderr, "spapr_edu_dma: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int read_sysfs(const char *path, char *out, size_t n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    if (!fgets(out, (int)n, f)) {
        fclose(f);
        return -1;
    }
    fclose(f);
    out[strcspn(out, "\n")] = 0;
    return 0;
}

/* The first edu device (1234:11e8) bound to vfio-pci, from sysfs. */
static int find_edu(char *bdf, size_t n)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while (found < 0 && (e = readdir(d))) {
        char path[512], v[32], dv[32], drv[512];
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if (read_sysfs(path, v, sizeof v) < 0 || strcmp(v, "0x1234"))
            continue;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", e->d_name);
        if (read_sysfs(path, dv, sizeof dv) < 0 || strcmp(dv, "0x11e8"))
            continue;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver", e->d_name);
        ssize_t l = readlink(path, drv, sizeof drv - 1);
        if (l < 0)
            continue;
        drv[l] = 0;
        if (strcmp(basename(drv), "vfio-pci"))
            continue;
        snprintf(bdf, n, "%s", e->d_name);
        found = 0;
    }
    closedir(d);
    return found;
}

static long vmlck_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmLck:", 6))
            v = strtol(line + 6, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

/* A PCI device's registers are little-endian.  QEMU's emulated edu is not: it is
 * DEVICE_NATIVE_ENDIAN, big-endian on a ppc64 target, so in a pseries guest every
 * access is byte-swapped.  The identification register (0x010000ed) tells. */
static int swapped;

static uint32_t rd32(volatile uint32_t *bar, unsigned off)
{
    uint32_t v = bar[off / 4];
    return swapped ? __builtin_bswap32(v) : v;
}

static void wr32(volatile uint32_t *bar, unsigned off, uint32_t v)
{
    bar[off / 4] = swapped ? __builtin_bswap32(v) : v;
}

static void wr64(volatile uint32_t *bar, unsigned off, uint64_t v)
{
    *(volatile uint64_t *)((volatile char *)bar + off) = swapped ? __builtin_bswap64(v) : v;
}

static void wait_irq(int efd, volatile uint32_t *bar)
{
    struct pollfd p = {.fd = efd, .events = POLLIN};
    if (poll(&p, 1, 5000) != 1)
        die("no interrupt from the device within 5 s");
    uint64_t count;
    if (read(efd, &count, sizeof count) != sizeof count)
        die("read eventfd");
    uint32_t status = rd32(bar, EDU_IRQ_STATUS);
    wr32(bar, EDU_IRQ_ACK, status);         /* acknowledge */
}

static void dma(volatile uint32_t *bar, int efd, uint64_t src, uint64_t dst, uint32_t cmd)
{
    wr64(bar, EDU_DMA_SRC, src);
    wr64(bar, EDU_DMA_DST, dst);
    wr64(bar, EDU_DMA_CNT, chunk);
    wr64(bar, EDU_DMA_CMD, cmd | DMA_RUN | DMA_IRQ);
    wait_irq(efd, bar);
}

int main(int argc, char **argv)
{
    int container, group, device;
    char bdf[256], path[512], link[512];
    struct vfio_group_status group_status = {.argsz = sizeof(group_status)};
    struct vfio_iommu_spapr_tce_info spapr_iommu_info = {.argsz = sizeof(spapr_iommu_info)};
    struct vfio_iommu_type1_dma_map dma_map = {.argsz = sizeof(dma_map)};

    if (argc > 2)
        chunk = (unsigned)strtoul(argv[2], NULL, 0);
    if (!chunk || chunk > CHUNK_MAX) {
        fprintf(stderr, "%s: BYTES must be 1..%d\n", argv[0], CHUNK_MAX);
        return 1;
    }
    if (argc > 1 && argv[1][0])
        snprintf(bdf, sizeof bdf, "%s", argv[1]);
    else if (find_edu(bdf, sizeof bdf) < 0) {
        fprintf(stderr, "spapr_edu_dma: no edu device bound to vfio-pci\n");
        return 1;
    }
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t l = readlink(path, link, sizeof link - 1);
    if (l < 0)
        die(path);
    link[l] = 0;
    int group_id = atoi(basename(link));
    printf("device %s in IOMMU group %d\n", bdf, group_id);

    /* Create a new container */
    container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        die("open /dev/vfio/vfio");
    if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
        die("unknown API version");
    if (!ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU))
        die("no sPAPR TCE IOMMU");

    /* Open the group */
    snprintf(path, sizeof path, "/dev/vfio/%d", group_id);
    group = open(path, O_RDWR);
    if (group < 0)
        die(path);

    /* Test the group is viable and available */
    ioctl(group, VFIO_GROUP_GET_STATUS, &group_status);
    if (!(group_status.flags & VFIO_GROUP_FLAGS_VIABLE))
        die("group is not viable");

    /* Add the group to the container */
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        die("VFIO_GROUP_SET_CONTAINER");

    /* Enable the IOMMU model we want */
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU))
        die("VFIO_SET_IOMMU");

    /* Get addition sPAPR IOMMU info */
    if (ioctl(container, VFIO_IOMMU_SPAPR_TCE_GET_INFO, &spapr_iommu_info))
        die("VFIO_IOMMU_SPAPR_TCE_GET_INFO");
    printf("DMA window %#llx+%#llx\n", (unsigned long long)spapr_iommu_info.dma32_window_start,
           (unsigned long long)spapr_iommu_info.dma32_window_size);

    if (ioctl(container, VFIO_IOMMU_ENABLE))
        die("VFIO_IOMMU_ENABLE (RLIMIT_MEMLOCK too low?)");
    printf("enabled: VmLck %ld kB\n", vmlck_kb());

    /* Allocate some space and setup a DMA mapping */
    uint8_t *buf = mmap(0, 1024 * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, 0, 0);
    if (buf == MAP_FAILED)
        die("mmap");
    dma_map.vaddr = (uintptr_t)buf;
    dma_map.size = 1024 * 1024;
    dma_map.iova = spapr_iommu_info.dma32_window_start; /* 1MB at the start of the window */
    dma_map.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    /* Check here is .iova/.size are within DMA window from spapr_iommu_info */
    if (dma_map.iova + dma_map.size > spapr_iommu_info.dma32_window_start + spapr_iommu_info.dma32_window_size)
        die("the buffer does not fit the DMA window");
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &dma_map))
        die("VFIO_IOMMU_MAP_DMA");
    printf("mapped 1 MiB at iova %#llx: VmLck %ld kB\n", (unsigned long long)dma_map.iova, vmlck_kb());

    /* Get a file descriptor for the device */
    device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (device < 0)
        die("VFIO_GROUP_GET_DEVICE_FD");

    /* BAR0, mmapped */
    struct vfio_region_info reg = {.argsz = sizeof(reg), .index = VFIO_PCI_BAR0_REGION_INDEX};
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &reg))
        die("VFIO_DEVICE_GET_REGION_INFO");
    if (!(reg.flags & VFIO_REGION_INFO_FLAG_MMAP))
        die("BAR0 cannot be mmapped");
    volatile uint32_t *bar = mmap(NULL, reg.size, PROT_READ | PROT_WRITE, MAP_SHARED, device, (off_t)reg.offset);
    if (bar == MAP_FAILED)
        die("mmap BAR0");
    swapped = bar[0] == __builtin_bswap32(0x010000edu);
    printf("edu identification %#x%s\n", rd32(bar, 0), swapped ? " (big-endian registers: QEMU's own edu)" : "");

    /* Bus mastering on, through config space */
    struct vfio_region_info cfg = {.argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX};
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg))
        die("config region info");
    uint16_t cmd;
    if (pread(device, &cmd, 2, (off_t)cfg.offset + 4) != 2)
        die("read PCI_COMMAND");
    cmd |= 0x6;                               /* memory + bus master */
    if (pwrite(device, &cmd, 2, (off_t)cfg.offset + 4) != 2)
        die("write PCI_COMMAND");

    /* MSI to an eventfd */
    int efd = eventfd(0, EFD_CLOEXEC);
    char irqbuf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
    struct vfio_irq_set *irq = (struct vfio_irq_set *)irqbuf;
    irq->argsz = sizeof irqbuf;
    irq->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    irq->index = VFIO_PCI_MSI_IRQ_INDEX;
    irq->start = 0;
    irq->count = 1;
    memcpy(irq->data, &efd, sizeof efd);
    if (ioctl(device, VFIO_DEVICE_SET_IRQS, irq))
        die("VFIO_DEVICE_SET_IRQS");

    /* RAM -> device -> RAM, 4 KiB at a time (edu's buffer), through the TCE table */
    for (unsigned i = 0; i < chunk; i++)
        buf[i] = (uint8_t)(i * 7 + 3);
    memset(buf + CHUNK_MAX, 0, chunk);
    dma(bar, efd, dma_map.iova, EDU_BUFFER, 0);
    dma(bar, efd, EDU_BUFFER, dma_map.iova + CHUNK_MAX, DMA_TO_RAM);
    int ok = memcmp(buf, buf + CHUNK_MAX, chunk) == 0;
    printf("DMA round trip of %u bytes: %s\n", chunk, ok ? "verified" : "MISMATCH");

    /* Reset (when the device can be reset), tear down */
    struct vfio_device_info info = {.argsz = sizeof(info)};
    if (ioctl(device, VFIO_DEVICE_GET_INFO, &info))
        die("VFIO_DEVICE_GET_INFO");
    if ((info.flags & VFIO_DEVICE_FLAGS_RESET) && ioctl(device, VFIO_DEVICE_RESET))
        die("VFIO_DEVICE_RESET");
    munmap((void *)bar, reg.size);
    close(device);
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap), .iova = dma_map.iova, .size = dma_map.size};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap))
        die("VFIO_IOMMU_UNMAP_DMA");
    ioctl(container, VFIO_IOMMU_DISABLE);
    printf("unmapped and disabled: VmLck %ld kB\n", vmlck_kb());
    close(group);
    close(container);
    return ok ? 0 : 2;
}
