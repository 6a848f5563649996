/*
 * VFIO files across fork and exec: which process may map, unmap and whose memory
 * is charged.  A plain VFIO program against <linux/vfio.h>, for `vfiosim
 * qemu-record`'s guests (scenario "processes"), run under the recording shim: the
 * trace has the fork, the child's calls, the exec of a new image holding the
 * container, and the limits and credentials the parent changes.
 *
 *     vfio_processes BDF
 *
 * The IOMMU is the platform's: sPAPR TCE v2 (memory preregistered, which binds
 * the container to the mm that did it: tce_iommu_mm_set()) or Type1v2 (each
 * mapping charged to the mm of the task that made it).  Each call prints one line,
 * "name ret errno VmLck VmPin".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define MiB (1UL << 20)

static long vm(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':')
            v = strtol(line + n + 1, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

static int step(const char *who, const char *name, long ret)
{
    int err = ret < 0 ? errno : 0;
    printf("%s %s %ld %d %ld %ld\n", who, name, ret, err, vm("VmLck"), vm("VmPin"));
    fflush(stdout);
    errno = err;
    return (int)ret;
}

static int spapr;

static void *buffer(void)
{
    void *p = mmap(NULL, MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 0x5a, MiB);
    return p;
}

/* Map a fresh buffer at iova (sPAPR v2: preregistered first). */
static void map(const char *who, int container, uint64_t iova, void *buf)
{
    if (spapr) {
        struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf, .size = MiB};
        step(who, "register", ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
    }
    struct vfio_iommu_type1_dma_map m = {.argsz = sizeof m, .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                         .vaddr = (uintptr_t)buf, .iova = iova, .size = MiB};
    step(who, "map", ioctl(container, VFIO_IOMMU_MAP_DMA, &m));
}

static void unmap(const char *who, int container, uint64_t iova)
{
    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = iova, .size = MiB};
    step(who, "unmap", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u));
}

static void unregister(const char *who, int container, void *buf)
{
    if (!spapr)
        return;
    struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf, .size = MiB};
    step(who, "unregister", ioctl(container, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, &reg));
}

/* The new image of an exec: it holds the container (not the group: O_CLOEXEC). */
static int after_exec(int container, int group)
{
    const char *who = "exec";
    spapr = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_v2_IOMMU) == 1;
    step(who, "api", ioctl(container, VFIO_GET_API_VERSION));
    struct vfio_group_status st = {.argsz = sizeof st};
    step(who, "group_closed_on_exec", ioctl(group, VFIO_GROUP_GET_STATUS, &st));
    void *buf = buffer();
    map(who, container, 4 * MiB, buf);
    unmap(who, container, 4 * MiB);
    unregister(who, container, buf);
    unmap(who, container, 0);                      /* the parent's */
    step(who, "close_container", close(container));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "--after-exec"))
        return after_exec(atoi(argv[2]), atoi(argv[3]));
    if (argc < 2) {
        fprintf(stderr, "usage: vfio_processes BDF\n");
        return 2;
    }
    char path[512], link[512];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", argv[1]);
    ssize_t l = readlink(path, link, sizeof link - 1);
    if (l < 0) {
        perror(path);
        return 1;
    }
    link[l] = 0;
    snprintf(path, sizeof path, "/dev/vfio/%s", strrchr(link, '/') + 1);

    const char *who = "parent";
    int container = step(who, "open_container", open("/dev/vfio/vfio", O_RDWR));
    int group = step(who, "open_group", open(path, O_RDWR | O_CLOEXEC));
    step(who, "set_container", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
    spapr = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_v2_IOMMU) == 1;
    step(who, "set_iommu", ioctl(container, VFIO_SET_IOMMU, spapr ? VFIO_SPAPR_TCE_v2_IOMMU : VFIO_TYPE1v2_IOMMU));
    void *buf = buffer();
    map(who, container, 0, buf);

    /* A child: the same container, its own mm. */
    pid_t pid = fork();
    if (pid == 0) {
        who = "child";
        step(who, "api", ioctl(container, VFIO_GET_API_VERSION));
        struct vfio_group_status st = {.argsz = sizeof st};
        step(who, "group_status", ioctl(group, VFIO_GROUP_GET_STATUS, &st));
        void *mine = buffer();
        map(who, container, 2 * MiB, mine);
        unmap(who, container, 2 * MiB);
        unregister(who, container, mine);
        unregister(who, container, buf);           /* the parent's, at the same address here */
        int again = step(who, "dup_container", dup(container));
        step(who, "close_dup", close(again));
        fflush(stdout);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    printf("parent child_exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    struct vfio_iommu_type1_dma_unmap probe = {.argsz = sizeof probe, .iova = 2 * MiB, .size = MiB};
    step(who, "unmap_childs", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &probe));

    /* A new image in a child: it keeps the container, loses the O_CLOEXEC group. */
    pid = fork();
    if (pid == 0) {
        char cfd[16], gfd[16];
        snprintf(cfd, sizeof cfd, "%d", container);
        snprintf(gfd, sizeof gfd, "%d", group);
        fflush(stdout);
        execl("/proc/self/exe", argv[0], "--after-exec", cfd, gfd, (char *)NULL);
        _exit(99);
    }
    waitpid(pid, &status, 0);
    printf("parent exec_exit %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);

    /* A lower RLIMIT_MEMLOCK binds root only without CAP_IPC_LOCK: first as root,
     * then as nobody (setresuid drops the capabilities). */
    struct rlimit rl, small = {64 << 10, 0};
    getrlimit(RLIMIT_MEMLOCK, &rl);
    small.rlim_max = rl.rlim_max;
    step(who, "setrlimit_small", setrlimit(RLIMIT_MEMLOCK, &small));
    void *more = buffer();
    map(who, container, 8 * MiB, more);
    unmap(who, container, 8 * MiB);
    unregister(who, container, more);
    step(who, "setresuid_nobody", setresuid(65534, 65534, 65534));
    map(who, container, 8 * MiB, more);
    unmap(who, container, 8 * MiB);
    unregister(who, container, more);
    step(who, "setrlimit_back", setrlimit(RLIMIT_MEMLOCK, &rl));
    map(who, container, 8 * MiB, more);
    unmap(who, container, 8 * MiB);
    unregister(who, container, more);

    unmap(who, container, 0);
    unregister(who, container, buf);
    step(who, "unset_container", ioctl(group, VFIO_GROUP_UNSET_CONTAINER));
    step(who, "close_group", close(group));
    step(who, "close_container", close(container));
    return 0;
}
