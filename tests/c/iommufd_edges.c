/*
 * The edges of the iommufd ioctls that iommufd_families.c leaves out: the generic
 * size and number checks of /dev/iommu, the VFIO container ioctls on /dev/iommu,
 * IOMMU_DESTROY of idle and busy objects, IOAS_MAP/UNMAP at their limits (overflow,
 * unknown flags, a range that stops partway, unmap-all of nothing), ALLOW_IOVAS
 * against a device's reserved regions in either order, IOMMU_OPTION's values,
 * GET_HW_INFO's buffer lengths, HWPT_ALLOC's flags and ids, a replace.  Written to
 * be run on a real kernel with iommufd (the x86-iommufd guest of `vfiosim
 * qemu-record`) and replayed on the simulator.  One line a call: "name ret errno".
 *
 *     iommufd_edges CDEV_BDF
 *
 * Built against the 6.12 uAPI headers.
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
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static long step(const char *name, long ret)
{
    printf("%s %ld %d\n", name, ret, ret < 0 ? errno : 0);
    fflush(stdout);
    return ret;
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

static uint32_t new_ioas(int ictx)
{
    struct iommu_ioas_alloc a = {.size = sizeof a};
    CALL("ioas_alloc", ioctl(ictx, IOMMU_IOAS_ALLOC, &a));
    return a.out_ioas_id;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: iommufd_edges CDEV_BDF\n");
        return 2;
    }
    char cdev[512];
    cdev_of(argv[1], cdev, sizeof cdev);
    const uint64_t MiB = 1 << 20;
    /* 8 MiB, 2 MiB aligned: where the kernel puts an automatic IOVA follows the
     * user address's alignment. */
    uint8_t *raw = mmap(NULL, 10 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *buf = (uint8_t *)(((uintptr_t)raw + 2 * MiB - 1) & ~(uintptr_t)(2 * MiB - 1));
    memset(buf, 0x3c, 8 * MiB);

    int ictx = CALL("open_iommu", open("/dev/iommu", O_RDWR));

    /* -- what every /dev/iommu ioctl checks first ----------------------------------------------------- */
    struct iommu_ioas_alloc a0 = {.size = 0};
    CALL("size_zero", ioctl(ictx, IOMMU_IOAS_ALLOC, &a0));
    CALL("size_fault", ioctl(ictx, IOMMU_IOAS_ALLOC, (void *)8));
    CALL("cmd_past_the_last", ioctl(ictx, _IO(IOMMUFD_TYPE, 0xa0), &a0));
    CALL("cmd_other_type", ioctl(ictx, _IO('x', 0x80), &a0));
    /* Below 0x80: the VFIO container ioctls, answered by iommufd's compat code. */
    CALL("vfio_get_api_version", ioctl(ictx, VFIO_GET_API_VERSION));
    CALL("vfio_check_type1v2", ioctl(ictx, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU));
    CALL("vfio_check_spapr", ioctl(ictx, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_v2_IOMMU));
    CALL("vfio_check_unmap_all", ioctl(ictx, VFIO_CHECK_EXTENSION, VFIO_UNMAP_ALL));
    CALL("vfio_check_update_vaddr", ioctl(ictx, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR));
    CALL("vfio_set_iommu_no_group", ioctl(ictx, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));
    struct vfio_iommu_type1_info tinfo = {.argsz = sizeof tinfo};
    CALL("vfio_get_info_no_ioas", ioctl(ictx, VFIO_IOMMU_GET_INFO, &tinfo));

    /* -- IOMMU_DESTROY ---------------------------------------------------------------------------------- */
    uint32_t a = new_ioas(ictx);
    uint32_t b = new_ioas(ictx);
    struct iommu_destroy destroy = {.size = sizeof destroy, .id = b};
    CALL("destroy_idle_ioas", ioctl(ictx, IOMMU_DESTROY, &destroy));
    CALL("destroy_again", ioctl(ictx, IOMMU_DESTROY, &destroy));
    destroy.id = 0;
    CALL("destroy_id_zero", ioctl(ictx, IOMMU_DESTROY, &destroy));
    uint32_t b2 = new_ioas(ictx);                     /* the lowest free id again */
    printf("reused id %u for %u\n", b2, b);

    /* -- IOMMU_IOAS_MAP at its limits --------------------------------------------------------------------- */
    struct iommu_ioas_map map = {.size = sizeof map, .ioas_id = a, .user_va = (uintptr_t)buf, .length = MiB,
                                 .iova = 0x100000,
                                 .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                          IOMMU_IOAS_MAP_WRITEABLE};
    map.flags |= 1 << 5;
    CALL("map_unknown_flag", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.flags &= ~(1u << 5);
    map.__reserved = 1;
    CALL("map_reserved", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.__reserved = 0;
    map.iova = UINT64_MAX & ~0xfffULL;
    CALL("map_iova_wraps", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.iova = 0x100000;
    map.length = UINT64_MAX & ~0xfffULL;
    CALL("map_length_huge", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.length = MiB;
    map.iova = 0x100800;
    CALL("map_iova_unaligned", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.iova = 0x100000;
    map.flags = IOMMU_IOAS_MAP_FIXED_IOVA;
    CALL("map_no_access", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    map.iova = 0x300000;
    map.user_va = (uintptr_t)(buf + MiB);
    CALL("map_second", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    /* Automatic IOVAs: 2 MiB of a 2 MiB aligned address, then 64 KiB one page in. */
    map.flags = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    map.user_va = (uintptr_t)(buf + 2 * MiB);
    map.length = 2 * MiB;
    map.iova = 0;
    CALL("map_auto_2m", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    printf("auto iova 2M %#llx\n", (unsigned long long)map.iova);
    map.user_va = (uintptr_t)(buf + 4 * MiB + 4096);
    map.length = 64 * 1024;
    map.iova = 0;
    CALL("map_auto_64k", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    printf("auto iova 64K %#llx\n", (unsigned long long)map.iova);

    /* -- IOMMU_IOAS_UNMAP: ranges that stop partway, nothing there, everything --------------------------- */
    struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .ioas_id = a, .iova = 0x100000, .length = 0};
    CALL("unmap_length_zero", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap.length = 0x280000;                         /* the first area whole, half of the second */
    CALL("unmap_stops_in_second", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    printf("unmapped %#llx\n", (unsigned long long)unmap.length);
    unmap.length = MiB;
    CALL("unmap_first_again", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap.iova = 0x300000;
    unmap.length = 0x1000;
    CALL("unmap_unaligned_end", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap.iova = UINT64_MAX & ~0xfffULL;
    unmap.length = 0x2000;
    CALL("unmap_wraps", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap = (struct iommu_ioas_unmap){.size = sizeof unmap, .ioas_id = a, .iova = 0, .length = UINT64_MAX};
    CALL("unmap_all", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    printf("unmapped %#llx\n", (unsigned long long)unmap.length);
    unmap.length = UINT64_MAX;                       /* the kernel wrote the bytes unmapped there */
    CALL("unmap_all_empty", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));
    unmap.ioas_id = 999;
    CALL("unmap_no_ioas", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap));

    /* -- ALLOW_IOVAS ---------------------------------------------------------------------------------------- */
    struct iommu_iova_range two[] = {{0x100000, 0x1fffff}, {0x180000, 0x2fffff}};
    struct iommu_ioas_allow_iovas allow = {.size = sizeof allow, .ioas_id = a, .num_iovas = 2,
                                           .allowed_iovas = (uintptr_t)two};
    CALL("allow_overlapping", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    two[1].start = 0x200000;
    CALL("allow_adjacent", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    struct iommu_iova_range unaligned[] = {{0x100001, 0x1fffff}};
    allow.num_iovas = 1;
    allow.allowed_iovas = (uintptr_t)unaligned;
    CALL("allow_unaligned", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    struct iommu_iova_ranges_q {
        struct iommu_ioas_iova_ranges q;
    } rq = {{.size = sizeof rq.q, .ioas_id = a}};
    struct iommu_iova_range got[8];
    rq.q.num_iovas = 8;
    rq.q.allowed_iovas = (uintptr_t)got;
    CALL("ranges_after_allow", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq.q));
    map = (struct iommu_ioas_map){.size = sizeof map, .ioas_id = a, .user_va = (uintptr_t)buf, .length = MiB,
                                  .iova = 0x1000000,
                                  .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE};
    CALL("map_fixed_outside_allowed", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.flags = IOMMU_IOAS_MAP_READABLE;
    map.length = 4 * MiB;
    map.iova = 0;
    CALL("map_auto_bigger_than_allowed", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    map.length = 64 * 1024;
    CALL("map_auto_inside_allowed", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    printf("auto iova %#llx\n", (unsigned long long)map.iova);
    allow.num_iovas = 0;
    CALL("allow_nothing_clears", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));

    /* -- the device's reserved region (the MSI window) against allowed and mapped IOVA --------------------- */
    int dev = CALL("open_cdev", open(cdev, O_RDWR));
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof bind, .iommufd = ictx};
    CALL("bind", ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind));
    uint32_t c = new_ioas(ictx);
    struct iommu_iova_range over_msi[] = {{0xfe000000, 0xfeffffff}};
    allow = (struct iommu_ioas_allow_iovas){.size = sizeof allow, .ioas_id = c, .num_iovas = 1,
                                            .allowed_iovas = (uintptr_t)over_msi};
    CALL("allow_over_msi_unattached", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof attach, .pt_id = c};
    CALL("attach_into_allowed_msi", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    allow.num_iovas = 0;
    CALL("allow_clear", ioctl(ictx, IOMMU_IOAS_ALLOW_IOVAS, &allow));
    map = (struct iommu_ioas_map){.size = sizeof map, .ioas_id = c, .user_va = (uintptr_t)buf, .length = MiB,
                                  .iova = 0xfee00000,
                                  .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE};
    CALL("map_msi_window_unattached", ioctl(ictx, IOMMU_IOAS_MAP, &map));
    attach.pt_id = c;
    CALL("attach_over_a_mapping_in_msi", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    attach.pt_id = a;
    CALL("attach", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    uint32_t hwpt_auto = attach.pt_id;
    attach.pt_id = c;
    CALL("replace_over_a_mapping_in_msi", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    printf("pt after failed replace %u (auto %u)\n", attach.pt_id, hwpt_auto);
    rq.q = (struct iommu_ioas_iova_ranges){.size = sizeof rq.q, .ioas_id = a, .num_iovas = 8,
                                           .allowed_iovas = (uintptr_t)got};
    CALL("ranges_attached", ioctl(ictx, IOMMU_IOAS_IOVA_RANGES, &rq.q));
    printf("ranges %u alignment %#llx\n", rq.q.num_iovas, (unsigned long long)rq.q.out_iova_alignment);

    /* -- IOMMU_OPTION ------------------------------------------------------------------------------------- */
    int ictx2 = CALL("open_iommu2", open("/dev/iommu", O_RDWR));
    struct iommu_option opt = {.size = sizeof opt, .option_id = IOMMU_OPTION_RLIMIT_MODE,
                               .op = IOMMU_OPTION_OP_SET, .val64 = 1};
    CALL("rlimit_mode_set_fresh", ioctl(ictx2, IOMMU_OPTION, &opt));
    opt.op = IOMMU_OPTION_OP_GET;
    opt.val64 = 77;
    CALL("rlimit_mode_get", ioctl(ictx2, IOMMU_OPTION, &opt));
    printf("rlimit mode %llu\n", (unsigned long long)opt.val64);
    opt.op = IOMMU_OPTION_OP_SET;
    opt.val64 = 2;
    CALL("rlimit_mode_set_2", ioctl(ictx2, IOMMU_OPTION, &opt));
    opt.val64 = 0;
    opt.object_id = 1;
    CALL("rlimit_mode_object", ioctl(ictx2, IOMMU_OPTION, &opt));
    opt.object_id = 0;
    opt.op = 5;
    CALL("option_bad_op", ioctl(ictx2, IOMMU_OPTION, &opt));
    opt.op = IOMMU_OPTION_OP_GET;
    opt.__reserved = 1;
    CALL("option_reserved", ioctl(ictx2, IOMMU_OPTION, &opt));
    opt = (struct iommu_option){.size = sizeof opt, .option_id = IOMMU_OPTION_HUGE_PAGES, .op = IOMMU_OPTION_OP_SET,
                                .object_id = a, .val64 = 2};
    CALL("huge_pages_set_2", ioctl(ictx, IOMMU_OPTION, &opt));
    opt.object_id = 999;
    opt.val64 = 0;
    CALL("huge_pages_no_object", ioctl(ictx, IOMMU_OPTION, &opt));
    opt.object_id = bind.out_devid;
    CALL("huge_pages_on_a_device", ioctl(ictx, IOMMU_OPTION, &opt));
    opt.object_id = 0;
    CALL("huge_pages_no_id", ioctl(ictx, IOMMU_OPTION, &opt));

    /* -- IOMMU_GET_HW_INFO's buffer ------------------------------------------------------------------------ */
    uint8_t hw[64];
    memset(hw, 0xee, sizeof hw);
    struct iommu_hw_info hi = {.size = sizeof hi, .dev_id = bind.out_devid, .data_len = sizeof hw,
                               .data_uptr = (uintptr_t)hw};
    CALL("hw_info_long_buffer", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    printf("hw data_len %u type %u pasid %u caps %#llx\n", hi.data_len, hi.out_data_type, hi.out_max_pasid_log2,
           (unsigned long long)hi.out_capabilities);
    memset(hw, 0xee, sizeof hw);
    hi.data_len = 4;
    CALL("hw_info_short_buffer", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    hi.data_len = sizeof hw;
    hi.flags = 1;
    CALL("hw_info_flags", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    hi.flags = 0;
    hi.__reserved[1] = 1;
    CALL("hw_info_reserved", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    hi.__reserved[1] = 0;
    hi.data_uptr = 8;
    CALL("hw_info_bad_buffer", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));
    hi.data_uptr = (uintptr_t)hw;
    hi.dev_id = 999;
    CALL("hw_info_no_device", ioctl(ictx, IOMMU_GET_HW_INFO, &hi));

    /* -- IOMMU_HWPT_ALLOC --------------------------------------------------------------------------------- */
    struct iommu_hwpt_alloc ha = {.size = sizeof ha, .dev_id = bind.out_devid, .pt_id = a, .flags = 1 << 7};
    CALL("hwpt_unknown_flag", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.flags = IOMMU_HWPT_ALLOC_NEST_PARENT;
    CALL("hwpt_nest_parent", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.flags = 0;
    ha.__reserved = 1;
    CALL("hwpt_reserved", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.__reserved = 0;
    ha.pt_id = bind.out_devid;
    CALL("hwpt_over_a_device", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.pt_id = a;
    ha.dev_id = a;
    CALL("hwpt_for_an_ioas", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.dev_id = bind.out_devid;
    ha.data_type = IOMMU_HWPT_DATA_VTD_S1;
    CALL("hwpt_data_type_no_data", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.data_type = IOMMU_HWPT_DATA_NONE;
    ha.data_len = 8;
    CALL("hwpt_data_len_no_type", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.data_len = 0;
    ha.pt_id = c;
    CALL("hwpt_over_a_mapping_in_msi", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    ha.pt_id = a;
    CALL("hwpt_alloc", ioctl(ictx, IOMMU_HWPT_ALLOC, &ha));
    uint32_t hwpt = ha.out_hwpt_id;
    struct iommu_hwpt_set_dirty_tracking sd = {.size = sizeof sd, .flags = IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                                               .hwpt_id = hwpt};
    CALL("dirty_tracking_not_asked_for", ioctl(ictx, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd));
    sd.flags = 2;
    CALL("dirty_tracking_bad_flags", ioctl(ictx, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd));
    sd.flags = 0;
    sd.hwpt_id = a;
    CALL("dirty_tracking_on_an_ioas", ioctl(ictx, IOMMU_HWPT_SET_DIRTY_TRACKING, &sd));
    attach.pt_id = hwpt;
    CALL("replace_with_hwpt", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    destroy.id = hwpt_auto;
    CALL("destroy_replaced_auto_hwpt", ioctl(ictx, IOMMU_DESTROY, &destroy));
    destroy.id = hwpt;
    CALL("destroy_attached_hwpt", ioctl(ictx, IOMMU_DESTROY, &destroy));
    destroy.id = a;
    CALL("destroy_ioas_under_hwpt", ioctl(ictx, IOMMU_DESTROY, &destroy));
    attach.pt_id = a;
    CALL("replace_back_to_ioas", ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach));
    printf("pt %u (manual hwpt %u)\n", attach.pt_id, hwpt);
    destroy.id = hwpt;
    CALL("destroy_detached_hwpt", ioctl(ictx, IOMMU_DESTROY, &destroy));

    /* -- taking it apart --------------------------------------------------------------------------------------- */
    struct vfio_device_detach_iommufd_pt detach = {.argsz = sizeof detach};
    CALL("detach", ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach));
    destroy.id = a;
    CALL("destroy_ioas", ioctl(ictx, IOMMU_DESTROY, &destroy));
    CALL("close_cdev", close(dev));
    CALL("close_iommu2", close(ictx2));
    CALL("close_iommu", close(ictx));
    return 0;
}
