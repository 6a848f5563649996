/*
 * iommufd's per-user locked-memory charge, across processes and across a change of
 * RLIMIT_MEMLOCK.  Started as root, it forks; each process opens its own /dev/iommu
 * and device (CDEV_A in the parent, CDEV_B in the child), binds and attaches it,
 * sets RLIMIT_MEMLOCK to LIMIT bytes and drops to UID (no capabilities); then
 *
 *  1. the two processes of UID fill the limit together: the child's map of one
 *     page more fails with ENOMEM because of the parent's pins, and succeeds once
 *     the parent has unmapped;
 *  2. the parent lowers its RLIMIT_MEMLOCK below what it has pinned: a map of one
 *     page fails, and after an unmap only what fits under the new limit maps.
 *
 *     iommufd_shared UID LIMIT CDEV_A CDEV_B
 *
 * iommufd charges user->locked_vm (iommufd/pages.c, incr_user_locked_vm(): the
 * limit is that of the task that maps, the count the user's, shared with every
 * process of the user).  The recording shim writes VmLck and VmPin after each call.
 *
 * Built against the 6.12 uAPI headers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/iommufd.h>
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

#define PAGE 4096UL
#define IOVA 0x100000UL

static int failed;

/* A call whose outcome the kernel's source predicts: 0, or -1 with errno `want`. */
static void expect(const char *who, const char *what, int ret, int want)
{
    int got = ret < 0 ? errno : 0;
    printf("%s %s: %s\n", who, what, got ? strerror(got) : "ok");
    if (got != want) {
        printf("  unexpected: wanted %s\n", want ? strerror(want) : "success");
        failed = 1;
    }
}

struct ctx {
    int ictx, dev;
    uint32_t ioas;
};

static int setup(const char *cdev, struct ctx *c)
{
    c->ictx = open("/dev/iommu", O_RDWR);
    c->dev = open(cdev, O_RDWR);
    if (c->ictx < 0 || c->dev < 0)
        return perror("open"), -1;
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof bind, .iommufd = c->ictx};
    struct iommu_ioas_alloc alloc = {.size = sizeof alloc};
    if (ioctl(c->dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) || ioctl(c->ictx, IOMMU_IOAS_ALLOC, &alloc))
        return perror("setup"), -1;
    c->ioas = alloc.out_ioas_id;
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof attach, .pt_id = c->ioas};
    if (ioctl(c->dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
        return perror("attach"), -1;
    return 0;
}

/* Map `pages` pages of fresh memory at `iova`; 0 or -1 with errno. */
static int map(struct ctx *c, unsigned long iova, unsigned long pages)
{
    uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return perror("mmap"), exit(1), -1;
    struct iommu_ioas_map m = {.size = sizeof m, .ioas_id = c->ioas,
                               .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
                                        IOMMU_IOAS_MAP_WRITEABLE,
                               .user_va = (uintptr_t)mem, .length = pages * PAGE, .iova = iova};
    return ioctl(c->ictx, IOMMU_IOAS_MAP, &m);
}

static int unmap_all(struct ctx *c)
{
    struct iommu_ioas_unmap u = {.size = sizeof u, .ioas_id = c->ioas, .iova = 0, .length = UINT64_MAX};
    return ioctl(c->ictx, IOMMU_IOAS_UNMAP, &u);
}

static void set_limit(rlim_t limit)
{
    struct rlimit rl = {limit, limit};
    if (setrlimit(RLIMIT_MEMLOCK, &rl))
        perror("setrlimit"), exit(1);
}

static void drop(uid_t uid, rlim_t limit)
{
    set_limit(limit);
    if (setgroups(0, NULL) || setgid(uid) || setuid(uid))
        perror("dropping privileges"), exit(1);
}

static void say(int fd)
{
    if (write(fd, "x", 1) != 1)
        perror("write"), exit(1);
}

static void hear(int fd)
{
    char b;
    if (read(fd, &b, 1) != 1)
        fprintf(stderr, "the other process went away\n"), exit(1);
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return fprintf(stderr, "usage: %s UID LIMIT CDEV_A CDEV_B\n", argv[0]), 2;
    uid_t uid = (uid_t)atoi(argv[1]);
    unsigned long pages = strtoul(argv[2], NULL, 0) / PAGE;
    const char *cdev_a = argv[3], *cdev_b = argv[4];
    if (uid == 0 || pages < 16)
        return fprintf(stderr, "UID: not root; LIMIT: at least 16 pages\n"), 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* The processes open what they need as root, then drop: under `vfiosim run` a
     * process must first reach the daemon while it may (docs/run.md, Limits). */
    int to_child[2], to_parent[2];
    if (pipe(to_child) || pipe(to_parent))
        return perror("pipe"), 1;
    unsigned long half = pages / 2;
    pid_t pid = fork();
    if (pid < 0)
        return perror("fork"), 1;
    if (pid == 0) {
        /* 1. Two processes of one user share the charge. */
        struct ctx b;
        if (setup(cdev_b, &b))
            _exit(1);
        drop(uid, pages * PAGE);
        hear(to_child[0]);              /* the parent has mapped its half */
        expect("child", "IOMMU_IOAS_MAP the other half", map(&b, IOVA, pages - half), 0);
        expect("child", "IOMMU_IOAS_MAP one page past the user's limit", map(&b, IOVA + pages * PAGE, 1), ENOMEM);
        say(to_parent[1]);
        hear(to_child[0]);              /* the parent has unmapped its half */
        expect("child", "IOMMU_IOAS_MAP one page, the parent's pages gone", map(&b, IOVA + pages * PAGE, 1), 0);
        expect("child", "IOMMU_IOAS_UNMAP all", unmap_all(&b), 0);
        close(b.dev);
        close(b.ictx);
        _exit(failed);
    }
    close(to_parent[1]);                /* a child that fails early: end of file, not a hang */
    close(to_child[0]);
    struct ctx a;
    if (setup(cdev_a, &a))
        return 1;
    drop(uid, pages * PAGE);
    expect("parent", "IOMMU_IOAS_MAP half the limit", map(&a, IOVA, half), 0);
    say(to_child[1]);
    hear(to_parent[0]);
    expect("parent", "IOMMU_IOAS_UNMAP all", unmap_all(&a), 0);
    say(to_child[1]);
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
        failed = 1;
    printf("child exit status %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);

    /* 2. The limit lowered below what is pinned. */
    unsigned long quarter = pages / 4;
    expect("parent", "IOMMU_IOAS_MAP a quarter of the limit", map(&a, IOVA, quarter), 0);
    set_limit(quarter / 2 * PAGE);
    expect("parent", "IOMMU_IOAS_MAP one page over the lowered limit", map(&a, IOVA + pages * PAGE, 1), ENOMEM);
    expect("parent", "IOMMU_IOAS_UNMAP all", unmap_all(&a), 0);
    expect("parent", "IOMMU_IOAS_MAP the lowered limit", map(&a, IOVA, quarter / 2), 0);
    expect("parent", "IOMMU_IOAS_MAP one page more", map(&a, IOVA + pages * PAGE, 1), ENOMEM);
    expect("parent", "IOMMU_IOAS_UNMAP all", unmap_all(&a), 0);
    close(a.dev);
    close(a.ictx);
    return failed;
}
