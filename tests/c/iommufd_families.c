/*
 * Every iommufd ioctl and the VFIO device cdev's, with their error paths: the
 * iommufd counterpart of src/vfiosim/qemu/guest/vfio_families.c, for
 * `vfiosim record` (tests/test_record.py records it on a simulated machine with
 * --kernel-config iommufd and replays it).  Each call prints one line, "name ret
 * errno", so that the program's output shows what the recorder must not change.
 *
 *     iommufd_families CDEV_BDF GROUP_BDF
 *
 * CDEV_BDF is used through its cdev; GROUP_BDF (another group) through its group,
 * given an iommufd instead of a container.  Built against the 6.12 uAPI headers.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static int step(const char *name, long ret)
{
    printf("%s %ld %d\n", name, ret, ret < 0 ? errno : 0);
    fflush(stdout);
    return (int)ret;
}

#define CALL(name, expr) step(name, (long)(expr))

static void cdev_of(const char *bdf, char *out, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vfio-dev", bdf);
    DIR *d = opendir(path);
    struct dirent *e;
    out[0] = 0;
    while (d && (e = readdir(d)))
        if (!strncmp(e->d_name, "vfio", 4))
            snprintf(out, n, "/dev/vfio/devices/%s", e->d_name);
    if (d)
        closedir(d);
}

static int group_of(const char *bdf)
{
    char path[512], link[512];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t l = readlink(path, link, sizeof link - 1);
    if (l < 0)
        return -1;
    link[l] = 0;
    return atoi(strrchr(link, '/') + 1);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: iommufd_families CDEV_BDF GROUP_BDF\n");
        return 2;
    }
    char cdev[512], gpath[64];
    cdev_of(argv[1], cdev, sizeof cdev);
    snprintf(gpath, sizeof gpath, "/dev/vfio/%d", group_of(argv[2]));
    const uint64_t MiB = 1 << 20;
    uint8_t *buf = mmap(NULL, 4 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *ro = mmap(NULL, MiB, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* No access at all: every copy from or to it faults (an unmapped page could be
     * mapped again by the time it is used). */
    void *hole = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 0x5a, 4 * MiB);

    /* -- the cdev before bind: nothing but VFIO_DEVICE_BIND_IOMMUFD ------------------------------- */
    int dev = CALL("open_cdev", open(cdev, O_RDWR));
    int ictx = CALL("open_iommu", open("/dev/iommu", O_RDWR));
    int ictx2 = CALL("open_iommu2", open("/dev/iommu", O_RDWR));
    struct vfio_device_info info = {.argsz = sizeof info};
    CALL("unbound_get_info", ioctl(dev, VFIO_DEVICE_GET_INFO, &info));
    uint32_t word;
    CALL("unbound_pread", pread(dev, &word, 4, 0));
    struct vfio_device_bind_iommufd bind = {.argsz = 8, .iommufd = ictx};
    CALL("bind_short_argsz", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    bind.argsz = sizeof bind;
    bind.flags = 1;
    CALL("bind_flags", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    bind.flags = 0;
    bind.iommufd = -1;
    CALL("bind_bad_fd", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    int efd = eventfd(0, EFD_CLOEXEC);
    bind.iommufd = efd;
    CALL("bind_not_iommufd", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    CALL("bind_fault", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, hole));
    bind.iommufd = ictx;
    CALL("bind", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    printf("devid %u\n", bind.out_devid);
    CALL("bind_again", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    int dev2 = CALL("open_cdev_again", open(cdev, O_RDWR));
    CALL("bind_second_fd", ioctl(dev2, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    CALL("close_cdev_again", close(dev2));

    /* -- IOASes and their ranges --------------------------------------------------------------------- */
    struct iommu_ioas_alloc alloc = {.size = 4};
    CALL("ioas_alloc_small", ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc));
    alloc.size = sizeof alloc;
    alloc.flags = 1;
    CALL("ioas_alloc_flags", ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc));
    alloc.flags = 0;
    CALL("ioas_alloc", ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc));
    uint32_t ioas = alloc.out_ioas_id;
    CALL("ioas_alloc2", ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc));
    uint32_t ioas2 = alloc.out_ioas_id;
    struct {
        struct iommu_ioas_alloc a;
        uint64_t more;
    } big = {{.size = sizeof big}, 1};
    CALL("ioas_alloc_e2big", ioctl(ictx, IOMMU_IOAS_ALLOC, &big));
    struct iommu_iova_range ranges[8];
    struct iommu_ioas_iova_ranges rq = {.size = sizeof rq, .ioas_id = ioas, .num_iovas = 0};
    CALL("iova_ranges_count", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq));
    rq.num_iovas = 8;
    rq.allowed_iovas = (uintptr_t)ranges;
    CALL("iova_ranges_unattached", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq));
    rq.num_iovas = 8;
    rq.allowed_iovas = (uintptr_t)hole;
    CALL("iova_ranges_fault", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq));
    rq.ioas_id = 999;
    rq.allowed_iovas = (uintptr_t)ranges;
    CALL("iova_ranges_no_ioas", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq));

    /* -- attach, and what the device's reserved regions take ------------------------------------------- */
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof attach, .pt_id = 999};
    CALL("attach_no_pt", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    attach.pt_id = ioas;
    CALL("attach", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    uint32_t hwpt_auto = attach.pt_id;
    rq = (struct iommu_ioas_iova_ranges){.size = sizeof rq, .ioas_id = ioas, .num_iovas = 1,
                                         .allowed_iovas = (uintptr_t)ranges};
    CALL("iova_ranges_too_few", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq));
    rq.num_iovas = 8;
    CALL("iova_ranges_attached", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq));
    static const struct iommu_iova_range allow_low[] = {{0x100000, 0x1fffffff}};
    struct iommu_ioas_allow_iovas allow = {.size = sizeof allow, .ioas_id = ioas, .num_iovas = 1,
                                           .allowed_iovas = (uintptr_t)allow_low};
    CALL("allow_iovas", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    struct iommu_iova_range over_msi[] = {{0xfe000000, 0xfeffffff}};
    allow.allowed_iovas = (uintptr_t)over_msi;
    CALL("allow_iovas_reserved", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    struct iommu_iova_range backwards[] = {{0x200000, 0x100000}};
    allow.allowed_iovas = (uintptr_t)backwards;
    CALL("allow_iovas_backwards", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));

    /* -- map, copy, unmap --------------------------------------------------------------------------------- */
    struct iommu_ioas_map map = {.size = sizeof map, .ioas_id = ioas, .user_va = (uintptr_t)buf, .length = MiB,
                                 .iova = 0x100000,
                                 .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                          IOMMU_IOAS_MAP_WRITEABLE};
    CALL("map_fixed", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    CALL("map_fixed_again", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.iova = 0xfee00000;
    CALL("map_msi_window", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    map.user_va = (uintptr_t)(buf + MiB);
    map.iova = 0;
    CALL("map_auto", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    printf("auto iova %#llx\n", (unsigned long long)map.iova);
    map.user_va = (uintptr_t)ro;
    map.flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    CALL("map_readonly_memory_writeable", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.flags = IOMMU_IOAS_MAP_READABLE;
    CALL("map_readonly_memory", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    uint64_t ro_iova = map.iova;
    map.user_va = (uintptr_t)hole;
    map.length = 4096;
    CALL("map_unmapped_memory", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.user_va = (uintptr_t)buf + 1;
    CALL("map_unaligned", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.user_va = (uintptr_t)buf;
    map.length = 0;
    CALL("map_zero", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    struct iommu_ioas_copy copy = {.size = sizeof copy, .dst_ioas_id = ioas2, .src_ioas_id = ioas, .length = MiB,
                                   .src_iova = 0x100000, .dst_iova = 0x400000,
                                   .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE};
    CALL("copy", ioctl(ictx, IOMMU_IOAS_COPY, &copy));
    copy.src_iova = 0x180000;
    CALL("copy_part_of_an_area", ioctl(ictx, IOMMU_IOAS_COPY, &copy));
    struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .ioas_id = ioas, .iova = 0x100000, .length = 0x1000};
    CALL("unmap_cut", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap.iova = 0x30000000;
    CALL("unmap_nothing", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap.iova = ro_iova;
    unmap.length = MiB;
    CALL("unmap_readonly", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));

    /* -- options and the compat IOAS ----------------------------------------------------------------------- */
    struct iommu_option opt = {.size = sizeof opt, .option_id = IOMMU_OPTION_RLIMIT_MODE,
                               .op = IOMMU_OPTION_OP_GET};
    CALL("option_rlimit_mode_get", ioctl(ictx, IOMMU_OPTION, &opt));
    printf("rlimit mode %llu\n", (unsigned long long)opt.val64);
    opt.op = IOMMU_OPTION_OP_SET;
    opt.val64 = 1;
    CALL("option_rlimit_mode_set_busy", ioctl(ictx, IOMMU_OPTION, &opt));
    opt = (struct iommu_option){.size = sizeof opt, .option_id = IOMMU_OPTION_HUGE_PAGES,
                                .op = IOMMU_OPTION_OP_GET, .object_id = ioas2};
    CALL("option_huge_pages_get", ioctl(ictx, IOMMU_OPTION, &opt));
    opt.op = IOMMU_OPTION_OP_SET;
    opt.val64 = 0;
    CALL("option_huge_pages_set", ioctl(ictx, IOMMU_OPTION, &opt));
    opt.option_id = 77;
    CALL("option_unknown", ioctl(ictx, IOMMU_OPTION, &opt));
    struct iommu_vfio_ioas vi = {.size = sizeof vi, .op = IOMMU_VFIO_IOAS_GET};
    CALL("vfio_ioas_get_none", ioctl(ictx, IOMMU_VFIO_IOAS, &vi));
    vi.op = IOMMU_VFIO_IOAS_SET;
    vi.ioas_id = ioas2;
    CALL("vfio_ioas_set", ioctl(ictx, IOMMU_VFIO_IOAS, &vi));
    vi.op = IOMMU_VFIO_IOAS_GET;
    vi.ioas_id = 0;
    CALL("vfio_ioas_get", ioctl(ictx, IOMMU_VFIO_IOAS, &vi));

    /* -- the other device through its group, given the iommufd --------------------------------------------- */
    int group = CALL("open_group", open(gpath, O_RDWR));
    CALL("group_set_iommufd", ioctl(group, VFIO_GROUP_SET_CONTAINER, &ictx));
    int gdev = CALL("group_get_device_fd", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]));
    CALL("group_device_get_info", ioctl(gdev, VFIO_DEVICE_GET_INFO, &info));
    vi.op = IOMMU_VFIO_IOAS_CLEAR;
    CALL("vfio_ioas_clear", ioctl(ictx, IOMMU_VFIO_IOAS, &vi));
    int cdev_group = group_of(argv[1]);
    char cgpath[64];
    snprintf(cgpath, sizeof cgpath, "/dev/vfio/%d", cdev_group);
    CALL("open_bound_devices_group", open(cgpath, O_RDWR));

    /* -- hardware info, HWPTs, dirty tracking ---------------------------------------------------------------- */
    uint8_t hw[64];
    memset(hw, 0xee, sizeof hw);
    struct iommu_hw_info hi = {.size = sizeof hi, .dev_id = bind.out_devid, .data_len = sizeof hw,
                               .data_uptr = (uintptr_t)hw};
    CALL("hw_info", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    hi.data_len = 0;
    CALL("hw_info_no_data", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    hi.dev_id = ioas;
    CALL("hw_info_not_a_device", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    struct iommu_hwpt_alloc ha = {.size = sizeof ha, .dev_id = bind.out_devid, .pt_id = ioas};
    CALL("hwpt_alloc", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    uint32_t hwpt = ha.out_hwpt_id;
    ha.flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    CALL("hwpt_alloc_dirty", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    uint32_t hwpt_dirty = ha.out_hwpt_id;
    struct iommu_hwpt_vtd_s1 s1 = {.pgtbl_addr = 0x1000, .addr_width = 48};
    ha = (struct iommu_hwpt_alloc){.size = sizeof ha, .dev_id = bind.out_devid, .pt_id = hwpt,
                                   .data_type = IOMMU_HWPT_DATA_VTD_S1, .data_len = sizeof s1,
                                   .data_uptr = (uintptr_t)&s1};
    CALL("hwpt_alloc_nested", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    attach.pt_id = hwpt;
    CALL("attach_hwpt", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    struct iommu_hwpt_set_dirty_tracking sd = {.size = sizeof sd, .flags = IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                                               .hwpt_id = hwpt};
    CALL("set_dirty_tracking", ioctl(ictx, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd));
    uint64_t bits[4];
    memset(bits, 0, sizeof bits);
    struct iommu_hwpt_get_dirty_bitmap gb = {.size = sizeof gb, .hwpt_id = hwpt, .iova = 0x100000, .length = MiB,
                                             .page_size = 4096, .data = (uintptr_t)bits};
    CALL("get_dirty_bitmap", ioctl(ictx, IOMMU_HWPT_GET_DIRTY_BITMAP, &gb));
    if (hwpt_dirty && hwpt_dirty != hwpt) {
        attach.pt_id = hwpt_dirty;
        CALL("attach_dirty_hwpt", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
        sd.hwpt_id = hwpt_dirty;
        CALL("set_dirty_tracking_on", ioctl(ictx, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd));
        gb.hwpt_id = hwpt_dirty;
        CALL("get_dirty_bitmap_on", ioctl(ictx, IOMMU_HWPT_GET_DIRTY_BITMAP, &gb));
        gb.page_size = 0;
        CALL("get_dirty_bitmap_no_page_size", ioctl(ictx, IOMMU_HWPT_GET_DIRTY_BITMAP, &gb));
        attach.pt_id = hwpt;
        CALL("attach_hwpt_back", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    }
    uint8_t entries[32];
    memset(entries, 0, sizeof entries);
    struct iommu_hwpt_invalidate inv = {.size = sizeof inv, .hwpt_id = hwpt, .data_uptr = (uintptr_t)entries,
                                        .data_type = IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, .entry_len = 32,
                                        .entry_num = 1};
    CALL("hwpt_invalidate", ioctl(ictx, IOMMU_HWPT_INVALIDATE, &inv));
    struct iommu_fault_alloc fa = {.size = sizeof fa};
    CALL("fault_queue_alloc", ioctl(ictx, IOMMU_FAULT_QUEUE_ALLOC, &fa));

    /* -- hot reset by device id ------------------------------------------------------------------------------- */
    struct vfio_pci_hot_reset_info *hri = calloc(1, 256);
    hri->argsz = sizeof *hri;
    CALL("hot_reset_info_small", ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hri));
    hri->argsz = 256;
    CALL("hot_reset_info", ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hri));
    struct vfio_pci_hot_reset hr = {.argsz = sizeof hr, .count = 0};
    CALL("hot_reset_by_devid", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, &hr));
    hr.flags = 1;
    CALL("hot_reset_flags", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, &hr));

    /* -- taking it apart --------------------------------------------------------------------------------------- */
    struct iommu_destroy destroy = {.size = sizeof destroy, .id = ioas};
    CALL("destroy_busy_ioas", ioctl(ictx, IOMMU_DESTROY, &destroy));
    destroy.id = 999;
    CALL("destroy_no_object", ioctl(ictx, IOMMU_DESTROY, &destroy));
    destroy.id = bind.out_devid;
    CALL("destroy_device", ioctl(ictx, IOMMU_DESTROY, &destroy));
    destroy.id = hwpt_auto;
    CALL("destroy_auto_hwpt", ioctl(ictx, IOMMU_DESTROY, &destroy));
    struct vfio_device_detach_iommufd_pt detach = {.argsz = sizeof detach};
    CALL("detach", ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach));
    CALL("detach_again", ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach));
    detach.flags = 1;
    CALL("detach_flags", ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach));
    destroy.id = hwpt;
    CALL("destroy_hwpt", ioctl(ictx, IOMMU_DESTROY, &destroy));
    unmap = (struct iommu_ioas_unmap){.size = sizeof unmap, .ioas_id = ioas, .iova = 0, .length = UINT64_MAX};
    CALL("unmap_all", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    CALL("iommu2_foreign_ioas", ioctl(ictx2, IOMMU_IOAS_UNMAP, &unmap));
    CALL("close_group_device", close(gdev));
    CALL("close_group", close(group));
    CALL("close_cdev", close(dev));
    CALL("close_iommu2", close(ictx2));
    if (fa.out_fault_fd > 0)
        close((int)fa.out_fault_fd);
    CALL("close_iommu", close(ictx));
    return 0;
}
