/*
 * Locked-memory accounting as an unprivileged user: started as root, it gives UID
 * the nodes it needs (chown, as an administrator would), sets RLIMIT_MEMLOCK to
 * LIMIT bytes, drops to UID (no capabilities left), then maps until the limit
 * refuses, and unmaps everything.
 *
 *     iommufd_user UID LIMIT iommufd CDEV          through /dev/iommu and the cdev
 *     iommufd_user UID LIMIT container GROUP BDF   through /dev/vfio/vfio (Type1, or
 *                                                  iommufd's compat container)
 *
 * iommufd charges user->locked_vm by default (no VmLck, VmPin counts the pins) and
 * refuses IOMMU_OPTION_RLIMIT_MODE without CAP_SYS_RESOURCE; a container charges
 * mm->locked_vm (VmLck).  Either way, a map past LIMIT fails with ENOMEM.  UID 0
 * stays root but gives up CAP_IPC_LOCK (capset), so it is charged too and may
 * switch iommufd to the per-mm mode (VmLck and VmPin) before it has objects.  The
 * recording shim writes VmLck and VmPin after each call.
 *
 * Built against the 6.12 uAPI headers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#define PAGE 4096UL
#define IOVA 0x100000UL

static int failed;

/* A call whose outcome the kernel's source predicts: 0, or -1 with errno `want`. */
static void expect(const char *what, int ret, int want)
{
    int got = ret < 0 ? errno : 0;
    printf("%s: %s\n", what, got ? strerror(got) : "ok");
    if (got != want) {
        printf("  unexpected: wanted %s\n", want ? strerror(want) : "success");
        failed = 1;
    }
}

/* glibc's syscall wrappers, declared by libcap's <sys/capability.h> only. */
extern int capget(cap_user_header_t header, cap_user_data_t data);
extern int capset(cap_user_header_t header, const cap_user_data_t data);

static void drop(uid_t uid, rlim_t limit)
{
    struct rlimit rl = {limit, limit};
    if (setrlimit(RLIMIT_MEMLOCK, &rl))
        perror("setrlimit"), exit(1);
    if (uid == 0) {
        struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3};
        struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
        if (capget(&hdr, data))
            perror("capget"), exit(1);
        data[0].effective &= ~(1U << CAP_IPC_LOCK);
        if (capset(&hdr, data))
            perror("capset"), exit(1);
    } else if (setgroups(0, NULL) || setgid(uid) || setuid(uid)) {
        perror("dropping privileges");
        exit(1);
    }
}

/* Three maps of distinct memory: a few pages, the rest of the limit, one more. */
static void lengths(unsigned long limit_pages, unsigned long len[3])
{
    len[0] = 4 * PAGE;
    len[1] = (limit_pages - 4) * PAGE;
    len[2] = PAGE;
}

static int with_iommufd(uid_t uid, rlim_t limit, const char *cdev)
{
    if (uid && (chown("/dev/iommu", uid, uid) || chown(cdev, uid, uid)))
        return perror("chown"), 1;
    drop(uid, limit);
    int ictx = open("/dev/iommu", O_RDWR), dev = open(cdev, O_RDWR);
    if (ictx < 0 || dev < 0)
        return perror("open"), 1;
    /* Before any object exists, so only the capability can refuse it (root: per-mm). */
    struct iommu_option opt = {.size = sizeof opt, .option_id = IOMMU_OPTION_RLIMIT_MODE,
                               .op = IOMMU_OPTION_OP_GET};
    expect("IOMMU_OPTION get RLIMIT_MODE", ioctl(ictx, IOMMU_OPTION, &opt), 0);
    printf("  rlimit mode %llu\n", (unsigned long long)opt.val64);
    opt.op = IOMMU_OPTION_OP_SET;
    opt.val64 = 1;
    expect("IOMMU_OPTION set RLIMIT_MODE per-mm", ioctl(ictx, IOMMU_OPTION, &opt), uid ? EPERM : 0);
    opt.op = IOMMU_OPTION_OP_GET;
    expect("IOMMU_OPTION get RLIMIT_MODE", ioctl(ictx, IOMMU_OPTION, &opt), 0);
    printf("  rlimit mode %llu\n", (unsigned long long)opt.val64);

    struct vfio_device_bind_iommufd bind = {.argsz = sizeof bind, .iommufd = ictx};
    struct iommu_ioas_alloc alloc = {.size = sizeof alloc};
    if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) || ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc))
        return perror("setup"), 1;
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof attach, .pt_id = alloc.out_ioas_id};
    if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
        return perror("attach"), 1;
    /* With objects: the capability is checked first, then that there are none. */
    opt.op = IOMMU_OPTION_OP_SET;
    opt.val64 = 0;
    expect("IOMMU_OPTION set RLIMIT_MODE with objects", ioctl(ictx, IOMMU_OPTION, &opt), uid ? EPERM : EBUSY);

    unsigned long len[3], iova = IOVA;
    lengths(limit / PAGE, len);
    for (int i = 0; i < 3; i++) {
        uint8_t *mem = mmap(NULL, len[i], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        struct iommu_ioas_map map = {.size = sizeof map, .ioas_id = alloc.out_ioas_id,
                                     .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                              IOMMU_IOAS_MAP_WRITEABLE,
                                     .user_va = (uintptr_t)mem, .length = len[i], .iova = iova};
        expect("IOMMU_IOAS_MAP", ioctl(ictx, IOMMU_IOAS_MAP, &map), i == 2 ? ENOMEM : 0);
        iova += len[i];
    }
    for (unsigned long i = 0, at = IOVA; i < 2; at += len[i], i++) {
        struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .ioas_id = alloc.out_ioas_id,
                                         .iova = at, .length = len[i]};
        expect("IOMMU_IOAS_UNMAP", ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap), 0);
    }
    close(dev);
    close(ictx);
    return failed;
}

static int with_container(uid_t uid, rlim_t limit, const char *group_path, const char *bdf)
{
    if (chown(group_path, uid, uid))
        return perror("chown"), 1;
    drop(uid, limit);
    int container = open("/dev/vfio/vfio", O_RDWR), group = open(group_path, O_RDWR);
    if (container < 0 || group < 0)
        return perror("open"), 1;
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) || ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        return perror("container"), 1;
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (dev < 0)
        return perror("VFIO_GROUP_GET_DEVICE_FD"), 1;

    unsigned long len[3], iova = IOVA;
    lengths(limit / PAGE, len);
    for (int i = 0; i < 3; i++) {
        uint8_t *mem = mmap(NULL, len[i], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map,
                                               .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                               .vaddr = (uintptr_t)mem, .iova = iova, .size = len[i]};
        expect("VFIO_IOMMU_MAP_DMA", ioctl(container, VFIO_IOMMU_MAP_DMA, &map), i == 2 ? ENOMEM : 0);
        iova += len[i];
    }
    for (unsigned long i = 0, at = IOVA; i < 2; at += len[i], i++) {
        struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = at, .size = len[i]};
        expect("VFIO_IOMMU_UNMAP_DMA", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap), 0);
    }
    close(dev);
    close(group);
    close(container);
    return failed;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return fprintf(stderr, "usage: %s UID LIMIT iommufd CDEV | UID LIMIT container GROUP BDF\n", argv[0]), 2;
    uid_t uid = (uid_t)atoi(argv[1]);
    rlim_t limit = strtoull(argv[2], NULL, 0);
    if (limit < 8 * PAGE)
        return fprintf(stderr, "LIMIT: at least 8 pages\n"), 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(argv[3], "iommufd"))
        return with_iommufd(uid, limit, argv[4]);
    if (!strcmp(argv[3], "container") && argc >= 6)
        return with_container(uid, limit, argv[4], argv[5]);
    return fprintf(stderr, "%s: neither iommufd CDEV nor container GROUP BDF\n", argv[3]), 2;
}
