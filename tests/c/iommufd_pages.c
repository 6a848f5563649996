/*
 * IOMMU_IOAS_MAP and UNMAP page by page, as a VMM mapping guest memory on demand
 * does: what `vfiosim trace summary` condenses into runs.
 *
 *     iommufd_pages CDEV PAGES
 *
 * Built against the 6.12 uAPI headers.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int pages = atoi(argv[2]);
    int dev = open(argv[1], O_RDWR), ictx = open("/dev/iommu", O_RDWR);
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof bind, .iommufd = ictx};
    struct iommu_ioas_alloc alloc = {.size = sizeof alloc};
    if (dev < 0 || ictx < 0 || ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) || ioctl(ictx, IOMMU_IOAS_ALLOC, &alloc))
        return perror("setup"), 1;
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof attach, .pt_id = alloc.out_ioas_id};
    if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
        return perror("attach"), 1;
    uint8_t *mem = mmap(NULL, (size_t)pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < pages; i++) {
        struct iommu_ioas_map map = {.size = sizeof map, .ioas_id = alloc.out_ioas_id,
                                     .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                              IOMMU_IOAS_MAP_WRITEABLE,
                                     .user_va = (uintptr_t)(mem + 4096 * i), .length = 4096,
                                     .iova = 0x100000 + 4096 * (uint64_t)i};
        if (ioctl(ictx, IOMMU_IOAS_MAP, &map))
            return perror("IOMMU_IOAS_MAP"), 1;
    }
    for (int i = 0; i < pages; i++) {
        struct iommu_ioas_unmap unmap = {.size = sizeof unmap, .ioas_id = alloc.out_ioas_id,
                                         .iova = 0x100000 + 4096 * (uint64_t)i, .length = 4096};
        if (ioctl(ictx, IOMMU_IOAS_UNMAP, &unmap))
            return perror("IOMMU_IOAS_UNMAP"), 1;
    }
    printf("mapped and unmapped %d pages one at a time\n", pages);
    return 0;
}
