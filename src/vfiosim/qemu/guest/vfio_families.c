/*
 * vfio_families: a VFIO program that walks each ioctl family of a device fd and its
 * error paths, for `vfiosim qemu-record` (docs/conformance.md).  It runs under
 * `vfiosim record` in a QEMU guest whose edu devices are bound to vfio-pci, so that
 * the trace holds what a real kernel answered; vfiosim replays the trace.
 *
 * It checks nothing itself: every call is made whatever the previous one answered,
 * and each prints "name ret errno" on the console.  The container family and the
 * IOMMU's own edge cases are the reference walker's (reference_walker.c); here the
 * IOMMU is only set up (Type1v2, or sPAPR v2 with preregistered memory, whichever the
 * kernel offers) so that the device can be used.
 *
 *     vfio_families BDF
 *
 * Families: device info (GET_INFO, GET_REGION_INFO, GET_IRQ_INFO), region access
 * (config space and BAR0 through pread/pwrite, mmap of regions), interrupts
 * (SET_IRQS), reset (RESET, GET_PCI_HOT_RESET_INFO, PCI_HOT_RESET), DEVICE_FEATURE,
 * IOEVENTFD, and the group's GET_DEVICE_FD.
 */
#define _GNU_SOURCE
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

#define REGION(i) ((off_t)(i) << 40)          /* VFIO_PCI_OFFSET_SHIFT */
#define CFG REGION(VFIO_PCI_CONFIG_REGION_INDEX)
#define BAR0 REGION(VFIO_PCI_BAR0_REGION_INDEX)

static void report(const char *name, long ret)
{
    printf("%s %ld %d\n", name, ret, ret < 0 ? errno : 0);
    fflush(stdout);
}
#define CALL(name, expr) report(name, (long)(expr))

static uint8_t argbuf[8192] __attribute__((aligned(64)));

static long irqs(int dev, uint32_t flags, uint32_t index, uint32_t start, uint32_t count, const int32_t *fds,
                 uint32_t argsz)
{
    struct vfio_irq_set *s = (void *)argbuf;
    memset(argbuf, 0, 256);
    s->argsz = argsz ? argsz : sizeof(*s) + (fds ? 4 * count : 0);
    s->flags = flags;
    s->index = index;
    s->start = start;
    s->count = count;
    if (fds)
        memcpy(s->data, fds, 4 * count);
    return ioctl(dev, VFIO_DEVICE_SET_IRQS, s);
}

static int wait_event(int efd, int ms)
{
    struct pollfd p = {.fd = efd, .events = POLLIN};
    if (poll(&p, 1, ms) != 1)
        return 0;
    uint64_t n;
    return read(efd, &n, sizeof n) == sizeof n;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: vfio_families BDF\n");
        return 2;
    }
    const char *bdf = argv[1];
    char path[256], link[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t l = readlink(path, link, sizeof link - 1);
    if (l < 0) {
        perror(path);
        return 1;
    }
    link[l] = 0;
    int gid = atoi(basename(link));

    /* -- setup: container, group, IOMMU, 1 MiB of DMA memory ----------------------------------- */
    int container = open("/dev/vfio/vfio", O_RDWR);
    CALL("open_container", container);
    snprintf(path, sizeof path, "/dev/vfio/%d", gid);
    int group = open(path, O_RDWR);
    CALL("open_group", group);
    struct vfio_group_status st = {.argsz = sizeof st};
    CALL("group_status", ioctl(group, VFIO_GROUP_GET_STATUS, &st));
    CALL("set_container", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
    int type1 = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1;
    CALL("set_iommu", ioctl(container, VFIO_SET_IOMMU, type1 ? VFIO_TYPE1v2_IOMMU : VFIO_SPAPR_TCE_v2_IOMMU));
    uint8_t *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 0x11, 1 << 20);
    uint64_t iova = 0;
    if (!type1) {
        struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf,
                                                       .size = 1 << 20};
        CALL("register_memory", ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
        struct vfio_iommu_spapr_tce_info info = {.argsz = sizeof info};
        CALL("spapr_get_info", ioctl(container, VFIO_IOMMU_SPAPR_TCE_GET_INFO, &info));
        iova = info.dma32_window_start;
    }
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf,
                                           .iova = iova, .size = 1 << 20};
    CALL("map_dma", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));

    /* -- the group's device fds ---------------------------------------------------------------------- */
    CALL("get_device_fd_nosuch", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:7f:1f.7"));
    CALL("get_device_fd_garbage", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "not a device"));
    CALL("get_device_fd_empty", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, ""));
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    CALL("get_device_fd", dev);
    int dev2 = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    CALL("get_device_fd_again", dev2);
    CALL("close_second", close(dev2));

    /* -- device info ------------------------------------------------------------------------------ */
    struct vfio_device_info *di = (void *)argbuf;
    memset(argbuf, 0, 512);
    di->argsz = 8;
    CALL("device_info_argsz8", ioctl(dev, VFIO_DEVICE_GET_INFO, di));
    memset(argbuf, 0, 512);
    di->argsz = 16;
    CALL("device_info_argsz16", ioctl(dev, VFIO_DEVICE_GET_INFO, di));
    memset(argbuf, 0, 512);
    di->argsz = sizeof *di;
    CALL("device_info", ioctl(dev, VFIO_DEVICE_GET_INFO, di));
    memset(argbuf, 0, 512);
    di->argsz = 512;
    CALL("device_info_room_for_caps", ioctl(dev, VFIO_DEVICE_GET_INFO, di));
    unsigned nregions = di->num_regions, nirqs = di->num_irqs;
    for (unsigned i = 0; i <= nregions + 1; i++) {
        struct vfio_region_info *ri = (void *)argbuf;
        memset(argbuf, 0, 512);
        ri->argsz = 512;
        ri->index = i;
        char name[64];
        snprintf(name, sizeof name, "region_info_%u", i);
        CALL(name, ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, ri));
    }
    struct vfio_region_info *ri = (void *)argbuf;
    memset(argbuf, 0, 512);
    ri->argsz = 12;
    CALL("region_info_argsz12", ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, ri));
    memset(argbuf, 0, 512);
    ri->argsz = sizeof *ri;
    ri->index = 0xffffffffu;
    CALL("region_info_index_max", ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, ri));
    for (unsigned i = 0; i <= nirqs; i++) {
        struct vfio_irq_info ii = {.argsz = sizeof ii, .index = i};
        char name[64];
        snprintf(name, sizeof name, "irq_info_%u", i);
        CALL(name, ioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, &ii));
    }
    struct vfio_irq_info ii = {.argsz = 8, .index = 0};
    CALL("irq_info_argsz8", ioctl(dev, VFIO_DEVICE_GET_IRQ_INFO, &ii));

    /* -- config space -------------------------------------------------------------------------------- */
    uint8_t cfg[4096];
    CALL("cfg_read_ids", pread(dev, cfg, 4, CFG + 0));
    CALL("cfg_read_command", pread(dev, cfg, 2, CFG + 4));
    CALL("cfg_read_status", pread(dev, cfg, 2, CFG + 6));
    CALL("cfg_read_class", pread(dev, cfg, 4, CFG + 8));
    CALL("cfg_read_header", pread(dev, cfg, 64, CFG + 0));
    CALL("cfg_read_pin", pread(dev, cfg, 1, CFG + 0x3d));
    CALL("cfg_read_all", pread(dev, cfg, 256, CFG + 0));
    CALL("cfg_read_unaligned", pread(dev, cfg, 4, CFG + 2));
    CALL("cfg_read_across_end", pread(dev, cfg, 8, CFG + 252));
    CALL("cfg_read_extended", pread(dev, cfg, 4, CFG + 256));
    CALL("cfg_read_past_4k", pread(dev, cfg, 4, CFG + 4096));
    uint16_t cmd = 0;
    CALL("cfg_read_cmd", pread(dev, &cmd, 2, CFG + 4));
    cmd |= 0x6;                                    /* memory + bus master */
    CALL("cfg_write_cmd", pwrite(dev, &cmd, 2, CFG + 4));
    CALL("cfg_read_cmd_again", pread(dev, &cmd, 2, CFG + 4));
    uint32_t ones = 0xffffffff, bar0 = 0;
    CALL("cfg_read_bar0", pread(dev, &bar0, 4, CFG + 0x10));
    CALL("cfg_size_bar0", pwrite(dev, &ones, 4, CFG + 0x10));
    uint32_t sized = 0;
    CALL("cfg_read_bar0_size", pread(dev, &sized, 4, CFG + 0x10));
    CALL("cfg_restore_bar0", pwrite(dev, &bar0, 4, CFG + 0x10));
    CALL("cfg_size_bar1", pwrite(dev, &ones, 4, CFG + 0x14));
    CALL("cfg_read_bar1", pread(dev, &sized, 4, CFG + 0x14));
    CALL("cfg_write_vendor", pwrite(dev, &ones, 2, CFG + 0));
    CALL("cfg_read_vendor", pread(dev, cfg, 2, CFG + 0));

    /* -- BAR0 through the device fd ---------------------------------------------------------------- */
    uint64_t v = 0;
    CALL("bar0_read_id", pread(dev, &v, 4, BAR0 + 0));
    uint32_t live = 0x12345678;
    CALL("bar0_write_liveness", pwrite(dev, &live, 4, BAR0 + 4));
    CALL("bar0_read_liveness", pread(dev, &v, 4, BAR0 + 4));
    CALL("bar0_read_1", pread(dev, &v, 1, BAR0 + 0));
    CALL("bar0_read_2", pread(dev, &v, 2, BAR0 + 0));
    CALL("bar0_read_8", pread(dev, &v, 8, BAR0 + 0x80));
    CALL("bar0_read_unaligned", pread(dev, &v, 4, BAR0 + 1));
    CALL("bar0_read_last", pread(dev, &v, 4, BAR0 + 0xffffc));
    CALL("bar0_read_past_end", pread(dev, &v, 4, BAR0 + 0x100000));
    CALL("bar0_read_across_end", pread(dev, &v, 8, BAR0 + 0xffffc));
    CALL("bar1_read", pread(dev, &v, 4, REGION(1)));
    CALL("rom_read", pread(dev, &v, 4, REGION(VFIO_PCI_ROM_REGION_INDEX)));
    CALL("vga_read", pread(dev, &v, 4, REGION(VFIO_PCI_VGA_REGION_INDEX)));
    CALL("region_9_read", pread(dev, &v, 4, REGION(9)));

    /* -- mmap ------------------------------------------------------------------------------------------ */
    void *m = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, dev, BAR0);
    CALL("mmap_bar0", m == MAP_FAILED ? -1 : 0);
    if (m != MAP_FAILED)
        CALL("munmap_bar0", munmap(m, 1 << 20));
    m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, BAR0 + 4096);
    CALL("mmap_bar0_page", m == MAP_FAILED ? -1 : 0);
    if (m != MAP_FAILED)
        CALL("munmap_bar0_page", munmap(m, 4096));
    m = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE, dev, BAR0);
    CALL("mmap_bar0_private", m == MAP_FAILED ? -1 : 0);
    m = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, dev, BAR0);
    CALL("mmap_bar0_too_long", m == MAP_FAILED ? -1 : 0);
    m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, CFG);
    CALL("mmap_config", m == MAP_FAILED ? -1 : 0);
    m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, dev, REGION(1));
    CALL("mmap_bar1", m == MAP_FAILED ? -1 : 0);

    /* -- interrupts ------------------------------------------------------------------------------- */
    int e1 = eventfd(0, EFD_CLOEXEC), e2 = eventfd(0, EFD_CLOEXEC);
    int32_t one[1] = {e1}, none[1] = {-1};
    CALL("irqs_argsz_small", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 0, NULL, 8));
    CALL("irqs_bad_index", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 9, 0, 0, NULL, 0));
    CALL("irqs_two_data_types", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL |
                                          VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 1, NULL, 0));
    CALL("irqs_two_actions", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK |
                                       VFIO_IRQ_SET_ACTION_UNMASK, 0, 0, 1, NULL, 0));
    CALL("irqs_count_too_big", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 2,
                                    (int32_t[]){e1, e2}, 0));
    CALL("irqs_start_past_end", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 1, 1, one, 0));
    CALL("irqs_not_an_eventfd", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 1,
                                     (int32_t[]){container}, 0));
    CALL("irqs_closed_fd", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, 1,
                                (int32_t[]){999}, 0));
    CALL("intx_trigger", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                              VFIO_PCI_INTX_IRQ_INDEX, 0, 1, one, 0));
    CALL("intx_mask", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK, VFIO_PCI_INTX_IRQ_INDEX, 0, 1,
                           NULL, 0));
    CALL("intx_unmask", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX, 0,
                             1, NULL, 0));
    CALL("intx_mask_bool", irqs(dev, VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_MASK, VFIO_PCI_INTX_IRQ_INDEX,
                                0, 1, (int32_t[]){1}, sizeof(struct vfio_irq_set) + 1));
    CALL("intx_unmask_eventfd", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                                     VFIO_PCI_INTX_IRQ_INDEX, 0, 1, (int32_t[]){e2}, 0));
    CALL("intx_unmask_eventfd_off", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                                         VFIO_PCI_INTX_IRQ_INDEX, 0, 1, none, 0));
    CALL("intx_unmask_all", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_INTX_IRQ_INDEX,
                                 0, 1, NULL, 0));
    uint32_t raise = 1;
    CALL("intx_raise", pwrite(dev, &raise, 4, BAR0 + 0x60));
    CALL("intx_fired", wait_event(e1, 2000));
    uint32_t status = 0;
    CALL("intx_status", pread(dev, &status, 4, BAR0 + 0x24));
    CALL("intx_ack", pwrite(dev, &status, 4, BAR0 + 0x64));
    CALL("intx_unmask_after", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                                   VFIO_PCI_INTX_IRQ_INDEX, 0, 1, NULL, 0));
    CALL("msi_while_intx", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                VFIO_PCI_MSI_IRQ_INDEX, 0, 1, (int32_t[]){e2}, 0));
    CALL("intx_off", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_INTX_IRQ_INDEX, 0, 0,
                          NULL, 0));
    CALL("msi_on", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 1,
                        (int32_t[]){e2}, 0));
    CALL("msi_mask", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK, VFIO_PCI_MSI_IRQ_INDEX, 0, 1,
                          NULL, 0));
    CALL("msi_trigger_none", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX,
                                  0, 1, NULL, 0));
    CALL("msi_fired_by_loopback", wait_event(e2, 1000));
    CALL("msi_raise", pwrite(dev, &raise, 4, BAR0 + 0x60));
    CALL("msi_fired", wait_event(e2, 2000));
    CALL("msi_ack", pwrite(dev, &raise, 4, BAR0 + 0x64));
    CALL("msix_on", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 1,
                         one, 0));
    CALL("msi_off", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSI_IRQ_INDEX, 0, 0,
                         NULL, 0));
    CALL("err_trigger", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_ERR_IRQ_INDEX,
                             0, 1, one, 0));
    CALL("req_trigger", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_REQ_IRQ_INDEX,
                             0, 1, one, 0));
    CALL("req_off", irqs(dev, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_REQ_IRQ_INDEX, 0, 1,
                         none, 0));

    /* -- ioeventfd ------------------------------------------------------------------------------------- */
    struct vfio_device_ioeventfd ioe = {.argsz = sizeof ioe, .flags = VFIO_DEVICE_IOEVENTFD_32, .offset = BAR0 + 4,
                                        .data = 0x5a5a5a5a, .fd = e1};
    CALL("ioeventfd_add", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    CALL("ioeventfd_add_again", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    ioe.fd = -1;
    CALL("ioeventfd_remove", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    CALL("ioeventfd_remove_again", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    ioe.fd = e1;
    ioe.flags = 3;
    CALL("ioeventfd_two_sizes", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    ioe.flags = VFIO_DEVICE_IOEVENTFD_32;
    ioe.offset = BAR0 + 0x100000;
    CALL("ioeventfd_past_end", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    ioe.offset = CFG + 4;
    CALL("ioeventfd_config", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    ioe.offset = BAR0 + 2;
    CALL("ioeventfd_unaligned", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));
    ioe.argsz = 16;
    CALL("ioeventfd_argsz16", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &ioe));

    /* -- feature ------------------------------------------------------------------------------------- */
    struct vfio_device_feature *f = (void *)argbuf;
    memset(argbuf, 0, 64);
    f->argsz = 4;
    CALL("feature_argsz4", ioctl(dev, VFIO_DEVICE_FEATURE, f));
    memset(argbuf, 0, 64);
    f->argsz = sizeof *f;
    f->flags = VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | 0;
    CALL("feature_probe_0", ioctl(dev, VFIO_DEVICE_FEATURE, f));
    for (unsigned feat = 1; feat <= 12; feat++) {
        memset(argbuf, 0, 64);
        f->argsz = sizeof *f;
        f->flags = VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_GET | feat;
        char name[64];
        snprintf(name, sizeof name, "feature_probe_%u", feat);
        CALL(name, ioctl(dev, VFIO_DEVICE_FEATURE, f));
    }
    memset(argbuf, 0, 64);
    f->argsz = sizeof *f;
    f->flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | 1;
    CALL("feature_get_and_set", ioctl(dev, VFIO_DEVICE_FEATURE, f));
    memset(argbuf, 0, 64);
    f->argsz = sizeof *f;
    f->flags = 0x10000000 | 1;
    CALL("feature_unknown_flag", ioctl(dev, VFIO_DEVICE_FEATURE, f));

    /* -- reset ---------------------------------------------------------------------------------------- */
    CALL("reset", ioctl(dev, VFIO_DEVICE_RESET));
    struct vfio_pci_hot_reset_info *hi = (void *)argbuf;
    memset(argbuf, 0, 512);
    hi->argsz = 8;
    CALL("hot_reset_info_argsz8", ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hi));
    memset(argbuf, 0, 512);
    hi->argsz = sizeof *hi;
    CALL("hot_reset_info_bare", ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hi));
    memset(argbuf, 0, 512);
    hi->argsz = 512;
    CALL("hot_reset_info", ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hi));
    struct vfio_pci_hot_reset *hr = (void *)argbuf;
    memset(argbuf, 0, 512);
    hr->argsz = sizeof *hr;
    CALL("hot_reset_no_groups", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, hr));
    memset(argbuf, 0, 512);
    hr->argsz = sizeof *hr + 4;
    hr->count = 1;
    hr->group_fds[0] = group;
    CALL("hot_reset_own_group", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, hr));
    hr->group_fds[0] = container;
    CALL("hot_reset_not_a_group", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, hr));
    hr->flags = 1;
    CALL("hot_reset_flags", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, hr));

    /* -- teardown ------------------------------------------------------------------------------------- */
    CALL("irqs_all_off", irqs(dev, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 0,
                              NULL, 0));
    CALL("close_device", close(dev));
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = iova, .size = 1 << 20};
    CALL("unmap_dma", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap));
    if (!type1) {
        struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf,
                                                       .size = 1 << 20};
        CALL("unregister_memory", ioctl(container, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, &reg));
    }
    CALL("unset_container", ioctl(group, VFIO_GROUP_UNSET_CONTAINER));
    CALL("close_group", close(group));
    CALL("close_container", close(container));
    close(e1);
    close(e2);
    return 0;
}
