/* An MSI-X user of a VFIO device, knowing nothing of vfiosim (tests/test_msix.py
 * runs it under `vfiosim run` against tests/msix_device.py's "msix-test" model).
 *
 *   msix_probe GROUP BDF type1|spapr
 *
 * Finds the MSI-X capability in config space, checks the region info of the
 * table's BAR for VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, wires one eventfd per
 * vector with VFIO_DEVICE_SET_IRQS, has the device raise each vector (a store
 * to its doorbell register, BAR0 + 0x100) and checks that exactly that
 * vector's eventfd fired, reads a table entry through an mmap of the BAR and
 * the table through pread (all ones), then disables MSI-X.
 */
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define DOORBELL 0x100

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static uint32_t cfg_read(int device, uint64_t cfg, unsigned off, unsigned n)
{
    uint32_t v = 0;
    if (pread(device, &v, n, (off_t)(cfg + off)) != (ssize_t)n)
        die("pread config");
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s GROUP BDF type1|spapr\n", argv[0]);
        return 2;
    }
    char path[64];
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[1]);
    int container = open("/dev/vfio/vfio", O_RDWR);
    int group = open(path, O_RDWR);
    if (container < 0 || group < 0)
        die("open");
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        die("VFIO_GROUP_SET_CONTAINER");
    if (ioctl(container, VFIO_SET_IOMMU, strcmp(argv[3], "type1") ? VFIO_SPAPR_TCE_v2_IOMMU : VFIO_TYPE1v2_IOMMU))
        die("VFIO_SET_IOMMU");
    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (device < 0)
        die("VFIO_GROUP_GET_DEVICE_FD");

    struct vfio_irq_info irq = {.argsz = sizeof irq, .index = VFIO_PCI_MSIX_IRQ_INDEX};
    if (ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, &irq))
        die("VFIO_DEVICE_GET_IRQ_INFO");
    printf("msix count=%u noresize=%d\n", irq.count, !!(irq.flags & VFIO_IRQ_INFO_NORESIZE));

    /* The MSI-X capability, through the config region */
    struct vfio_region_info cfgr = {.argsz = sizeof cfgr, .index = VFIO_PCI_CONFIG_REGION_INDEX};
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfgr))
        die("config region info");
    unsigned pos = cfg_read(device, cfgr.offset, 0x34, 1);
    while (pos && cfg_read(device, cfgr.offset, pos, 1) != 0x11)
        pos = cfg_read(device, cfgr.offset, pos + 1, 1);
    if (!pos) {
        fprintf(stderr, "no MSI-X capability\n");
        return 2;
    }
    uint32_t table = cfg_read(device, cfgr.offset, pos + 4, 4), pba = cfg_read(device, cfgr.offset, pos + 8, 4);
    unsigned bir = table & 7, table_off = table & ~7u;
    printf("msix cap=%#x size=%u table=bar%u+%#x pba=bar%u+%#x\n", pos,
           (cfg_read(device, cfgr.offset, pos + 2, 2) & 0x7ff) + 1, bir, table_off, pba & 7, pba & ~7u);

    /* The table's BAR: ask, then ask again with room for the capabilities */
    struct vfio_region_info *reg = calloc(1, sizeof *reg);
    reg->argsz = sizeof *reg;
    reg->index = bir;
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, reg))
        die("VFIO_DEVICE_GET_REGION_INFO");
    if (reg->argsz > sizeof *reg) {
        uint32_t need = reg->argsz;
        reg = realloc(reg, need);
        memset(reg, 0, need);
        reg->argsz = need;
        reg->index = bir;
        if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, reg))
            die("VFIO_DEVICE_GET_REGION_INFO with caps");
    }
    int mappable = 0;
    if (reg->flags & VFIO_REGION_INFO_FLAG_CAPS) {
        for (uint32_t off = reg->cap_offset; off; ) {
            struct vfio_info_cap_header *hdr = (void *)((char *)reg + off);
            if (hdr->id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE)
                mappable = 1;
            off = hdr->next;
        }
    }
    printf("bar%u size=%#llx mmap=%d msix_mappable=%d\n", bir, (unsigned long long)reg->size,
           !!(reg->flags & VFIO_REGION_INFO_FLAG_MMAP), mappable);

    /* Memory decoding and bus mastering: an MSI-X message is a DMA write */
    uint16_t cmd = (uint16_t)cfg_read(device, cfgr.offset, 4, 2) | 0x6;
    if (pwrite(device, &cmd, 2, (off_t)cfgr.offset + 4) != 2)
        die("write PCI_COMMAND");

    /* One eventfd per vector */
    unsigned n = irq.count;
    int efd[2048];
    size_t setsz = sizeof(struct vfio_irq_set) + n * sizeof(int32_t);
    struct vfio_irq_set *set = calloc(1, setsz);
    for (unsigned i = 0; i < n; i++)
        if ((efd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
            die("eventfd");
    set->argsz = setsz;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_MSIX_IRQ_INDEX;
    set->start = 0;
    set->count = n;
    memcpy(set->data, efd, n * sizeof(int32_t));
    if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
        die("VFIO_DEVICE_SET_IRQS");
    uint32_t ctrl = cfg_read(device, cfgr.offset, pos + 2, 2);
    printf("enabled=%u maskall=%u\n", ctrl >> 15 & 1, ctrl >> 14 & 1);

    /* Each vector reaches its eventfd, and only that one */
    int ok = 1;
    for (int v = (int)n - 1; v >= 0; v--) {
        uint32_t doorbell = (uint32_t)v;
        if (pwrite(device, &doorbell, 4, (off_t)0 /* BAR0 is region 0, at offset 0 */ + DOORBELL) != 4)
            die("pwrite doorbell");
        for (unsigned i = 0; i < n; i++) {
            uint64_t c;
            int fired = read(efd[i], &c, 8) == 8;
            if (fired != (i == (unsigned)v))
                ok = 0;
        }
    }
    printf("vectors %s\n", ok ? "verified" : "MISMATCH");

    /* The table through an mmap of its BAR: vector 1's message and control */
    volatile uint32_t *bar = mmap(NULL, reg->size, PROT_READ | PROT_WRITE, MAP_SHARED, device, (off_t)reg->offset);
    if (bar == MAP_FAILED)
        die("mmap");
    volatile uint32_t *entry = bar + (table_off + 16) / 4;
    printf("entry1 addr=%#x data=%#x ctrl=%u\n", entry[0], entry[2], entry[3]);
    munmap((void *)bar, reg->size);

    /* ... and through pread: vfio-pci hides it */
    uint8_t buf[16];
    if (pread(device, buf, sizeof buf, (off_t)reg->offset + table_off) != sizeof buf)
        die("pread table");
    int ones = 1;
    for (unsigned i = 0; i < sizeof buf; i++)
        ones &= buf[i] == 0xff;
    printf("table via pread: %s\n", ones ? "all ones" : "DATA");

    set->argsz = sizeof *set;
    set->flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->count = 0;
    if (ioctl(device, VFIO_DEVICE_SET_IRQS, set))
        die("disable MSI-X");
    ctrl = cfg_read(device, cfgr.offset, pos + 2, 2);
    printf("disabled: enabled=%u\n", ctrl >> 15 & 1);
    close(device);
    close(group);
    close(container);
    return ok ? 0 : 2;
}
