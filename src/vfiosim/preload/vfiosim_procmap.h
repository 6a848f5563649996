/*
 * vfiosim_procmap.h -- PROCMAP_QUERY, the ioctl on /proc/<pid>/maps that
 * answers one address's mapping (<linux/fs.h>, Linux 6.11), declared here
 * for the daemon's C (vfiosim_daemon.c here, transport/_pin.c) so that a
 * build on older kernel headers has it too: at run time an older kernel
 * answers ENOTTY and the callers fall back to reading the maps file.
 */
#ifndef VFIOSIM_PROCMAP_H
#define VFIOSIM_PROCMAP_H

#include <stdint.h>
#include <sys/ioctl.h>

struct procmap_query {
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PROCMAP_QUERY_VMA_READABLE 0x01
#define PROCMAP_QUERY_VMA_WRITABLE 0x02
#define PROCMAP_QUERY_VMA_EXECUTABLE 0x04
#define PROCMAP_QUERY_VMA_SHARED 0x08
#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10

#endif
