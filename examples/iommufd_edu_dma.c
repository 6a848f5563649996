/*
 * The iommufd example of the kernel's VFIO documentation
 * (Documentation/driver-api/vfio.rst, "VFIO device cdev" and "IOMMUFD and
 * vfio_iommu_type1"), carried on until QEMU's "edu" PCI device has moved a
 * buffer through the IOMMU: RAM -> device -> RAM.
 *
 * A plain iommufd program: it knows nothing of vfiosim.  On a Linux 6.6+ x86
 * host built with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV, with an edu
 * device bound to vfio-pci, it runs as it is; anywhere else:
 *
 *     vfiosim run --machine x86 --kernel-config iommufd -- ./iommufd_edu_dma [BDF [/dev/vfio/devices/vfioN [BYTES]]]
 *
 * The cdev is found in sysfs (/sys/bus/pci/devices/BDF/vfio-dev/vfioN) unless
 * named (an empty BDF or cdev: found as without it); BYTES per transfer, 4096 by
 * default.  Build against the 6.12 uAPI headers (<linux/iommufd.h> is 6.2+):
 * cc -O2 -Wall -isystem /path/to/6.12/include -o iommufd_edu_dma iommufd_edu_dma.c
 * Exit status 0 when every byte made the round trip.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/iommufd.h>
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
#define CHUNK 4096                      /* edu's DMA buffer */
#define MAP_SIZE (1024 * 1024)

static void die(const char *what)
{
    fprintf(stderr, "iommufd_edu_dma: %s: %s\n", what, strerror(errno));
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

/* /sys/bus/pci/devices/BDF/vfio-dev/vfioN -> /dev/vfio/devices/vfioN */
static int find_cdev(const char *bdf, char *out, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vfio-dev", bdf);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while (found < 0 && (e = readdir(d)))
        if (!strncmp(e->d_name, "vfio", 4)) {
            snprintf(out, n, "/dev/vfio/devices/%s", e->d_name);
            found = 0;
        }
    closedir(d);
    return found;
}

static long status_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t k = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, k))
            v = strtol(line + k, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

static void wait_irq(int efd, volatile uint32_t *bar)
{
    struct pollfd p = {.fd = efd, .events = POLLIN};
    if (poll(&p, 1, 5000) != 1)
        die("no interrupt from the device within 5 s");
    uint64_t count;
    if (read(efd, &count, sizeof count) != sizeof count)
        die("read eventfd");
    uint32_t status = bar[EDU_IRQ_STATUS / 4];
    bar[EDU_IRQ_ACK / 4] = status;          /* acknowledge */
}

/* Bytes per transfer: QEMU 7.2's edu refuses a DMA that ends at the very end of its
 * buffer (it aborts the whole VM: "DMA range ... out of bounds"), so in such a guest
 * ask for less than 4096. */
static unsigned chunk = CHUNK;

static void dma(volatile uint32_t *bar, int efd, uint64_t src, uint64_t dst, uint32_t cmd)
{
    *(volatile uint64_t *)((volatile char *)bar + EDU_DMA_SRC) = src;
    *(volatile uint64_t *)((volatile char *)bar + EDU_DMA_DST) = dst;
    *(volatile uint64_t *)((volatile char *)bar + EDU_DMA_CNT) = chunk;
    *(volatile uint64_t *)((volatile char *)bar + EDU_DMA_CMD) = cmd | DMA_RUN | DMA_IRQ;
    wait_irq(efd, bar);
}

int main(int argc, char **argv)
{
    char bdf[256], cdev[512];

    if (argc > 3)
        chunk = (unsigned)strtoul(argv[3], NULL, 0);
    if (!chunk || chunk > CHUNK) {
        fprintf(stderr, "iommufd_edu_dma: BYTES must be 1..%d\n", CHUNK);
        return 1;
    }
    if (argc > 1 && argv[1][0])
        snprintf(bdf, sizeof bdf, "%s", argv[1]);
    else if (find_edu(bdf, sizeof bdf) < 0) {
        fprintf(stderr, "iommufd_edu_dma: no edu device bound to vfio-pci\n");
        return 1;
    }
    if (argc > 2 && argv[2][0])
        snprintf(cdev, sizeof cdev, "%s", argv[2]);
    else if (find_cdev(bdf, cdev, sizeof cdev) < 0) {
        fprintf(stderr, "iommufd_edu_dma: %s has no vfio-dev directory in sysfs (not bound to vfio-pci, or a "
                        "kernel older than 6.1)\n", bdf);
        return 1;
    }
    printf("device %s, cdev %s\n", bdf, cdev);

    /* The cdev: nothing but VFIO_DEVICE_BIND_IOMMUFD until it is bound */
    int cdev_fd = open(cdev, O_RDWR);
    if (cdev_fd < 0)
        die(cdev);
    int iommufd = open("/dev/iommu", O_RDWR);
    if (iommufd < 0)
        die("open /dev/iommu (a kernel without CONFIG_IOMMUFD?)");

    struct vfio_device_bind_iommufd bind = {.argsz = sizeof(bind), .flags = 0, .iommufd = iommufd};
    if (ioctl(cdev_fd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
        die("VFIO_DEVICE_BIND_IOMMUFD");

    struct iommu_ioas_alloc alloc_data = {.size = sizeof(alloc_data), .flags = 0};
    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc_data))
        die("IOMMU_IOAS_ALLOC");
    struct vfio_device_attach_iommufd_pt attach_data = {.argsz = sizeof(attach_data), .flags = 0,
                                                        .pt_id = alloc_data.out_ioas_id};
    if (ioctl(cdev_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach_data))
        die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
    printf("device %u bound, attached to IOAS %u through HWPT %u\n", bind.out_devid, alloc_data.out_ioas_id,
           attach_data.pt_id);

    /* What the IOMMU can map now that the device is attached */
    struct iommu_iova_range ranges[8];
    struct iommu_ioas_iova_ranges iova_ranges = {.size = sizeof(iova_ranges), .ioas_id = alloc_data.out_ioas_id,
                                                 .num_iovas = 8, .allowed_iovas = (uintptr_t)ranges};
    if (ioctl(iommufd, IOMMU_IOAS_IOVA_RANGES, &iova_ranges))
        die("IOMMU_IOAS_IOVA_RANGES");
    for (unsigned i = 0; i < iova_ranges.num_iovas && i < 8; i++)
        printf("usable IOVA %#llx..%#llx\n", (unsigned long long)ranges[i].start, (unsigned long long)ranges[i].last);

    /* Allocate some space and setup a DMA mapping */
    uint8_t *buf = mmap(0, MAP_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, 0, 0);
    if (buf == MAP_FAILED)
        die("mmap");
    struct iommu_ioas_map map = {
        .size = sizeof(map),
        .flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_FIXED_IOVA,
        .ioas_id = alloc_data.out_ioas_id,
        .user_va = (uintptr_t)buf,
        .length = MAP_SIZE,
        .iova = 0x100000,                 /* 1MB at 1MB from the device's view */
    };
    if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
        die("IOMMU_IOAS_MAP");
    printf("mapped 1 MiB at iova %#llx: VmLck %ld kB, VmPin %ld kB\n", (unsigned long long)map.iova,
           status_kb("VmLck:"), status_kb("VmPin:"));

    /* BAR0, mmapped */
    struct vfio_region_info reg = {.argsz = sizeof(reg), .index = VFIO_PCI_BAR0_REGION_INDEX};
    if (ioctl(cdev_fd, VFIO_DEVICE_GET_REGION_INFO, &reg))
        die("VFIO_DEVICE_GET_REGION_INFO");
    if (!(reg.flags & VFIO_REGION_INFO_FLAG_MMAP))
        die("BAR0 cannot be mmapped");
    volatile uint32_t *bar = mmap(NULL, reg.size, PROT_READ | PROT_WRITE, MAP_SHARED, cdev_fd, (off_t)reg.offset);
    if (bar == MAP_FAILED)
        die("mmap BAR0");
    printf("edu identification %#x\n", bar[0]);

    /* Bus mastering on, through config space */
    struct vfio_region_info cfg = {.argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX};
    if (ioctl(cdev_fd, VFIO_DEVICE_GET_REGION_INFO, &cfg))
        die("config region info");
    uint16_t cmd;
    if (pread(cdev_fd, &cmd, 2, (off_t)cfg.offset + 4) != 2)
        die("read PCI_COMMAND");
    cmd |= 0x6;                               /* memory + bus master */
    if (pwrite(cdev_fd, &cmd, 2, (off_t)cfg.offset + 4) != 2)
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
    if (ioctl(cdev_fd, VFIO_DEVICE_SET_IRQS, irq))
        die("VFIO_DEVICE_SET_IRQS");

    /* RAM -> device -> RAM, up to 4 KiB (edu's buffer), through the IOAS's HWPT */
    for (unsigned i = 0; i < chunk; i++)
        buf[i] = (uint8_t)(i * 7 + 3);
    memset(buf + CHUNK, 0, chunk);
    dma(bar, efd, map.iova, EDU_BUFFER, 0);
    dma(bar, efd, EDU_BUFFER, map.iova + CHUNK, DMA_TO_RAM);
    int ok = memcmp(buf, buf + CHUNK, chunk) == 0;
    printf("DMA round trip of %u bytes: %s\n", chunk, ok ? "verified" : "MISMATCH");

    /* Tear down: detach, unmap, unbind (closing the cdev) */
    munmap((void *)bar, reg.size);
    struct vfio_device_detach_iommufd_pt detach = {.argsz = sizeof(detach), .flags = 0};
    if (ioctl(cdev_fd, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach))
        die("VFIO_DEVICE_DETACH_IOMMUFD_PT");
    printf("detached: VmPin %ld kB (no domain, nothing pinned)\n", status_kb("VmPin:"));
    struct iommu_ioas_unmap unmap = {.size = sizeof(unmap), .ioas_id = alloc_data.out_ioas_id, .iova = map.iova,
                                     .length = map.length};
    if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
        die("IOMMU_IOAS_UNMAP");
    close(cdev_fd);
    close(iommufd);
    return ok ? 0 : 2;
}
