/*
 * Probes for tests/test_run.py: small VFIO programs, one per subcommand,
 * run under `vfiosim run` (or against a test's daemon).  Each prints
 * "key=value" lines the test checks.  Plain <linux/vfio.h> code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

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

static int container, group;
static int spapr;
static void *dma_buf;             /* what setup() mapped at IOVA 0 */

static void setup(int group_id, int enable_and_map)
{
    char path[64];
    container = open("/dev/vfio/vfio", O_RDWR);
    snprintf(path, sizeof path, "/dev/vfio/%d", group_id);
    group = open(path, O_RDWR);
    if (container < 0 || group < 0) {
        printf("setup_errno=%d\n", errno);
        exit(1);
    }
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) {
        printf("set_container_errno=%d\n", errno);
        exit(1);
    }
    spapr = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU) == 1;
    if (ioctl(container, VFIO_SET_IOMMU, spapr ? VFIO_SPAPR_TCE_IOMMU : VFIO_TYPE1v2_IOMMU)) {
        printf("set_iommu_errno=%d\n", errno);
        exit(1);
    }
    if (!enable_and_map)
        return;
    if (spapr && ioctl(container, VFIO_IOMMU_ENABLE)) {
        printf("enable_errno=%d\n", errno);
        exit(1);
    }
    void *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 1, 1 << 20);
    dma_buf = buf;
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf,
                                           .iova = 0, .size = 1 << 20};
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map)) {
        printf("map_errno=%d\n", errno);
        exit(1);
    }
}

static volatile int sigbus_seen;

static void on_sigbus(int sig)
{
    sigbus_seen = sig == SIGBUS;
}

static void result(const char *name, long ret)
{
    printf("%s=%ld,%d\n", name, ret, ret < 0 ? errno : 0);
}

static volatile uint32_t *bar0;
static int device;
static sigjmp_buf jump;
static volatile int handled;
static volatile int *volatile wild = (volatile int *)16;

static void on_segv(int sig)
{
    (void)sig;
    handled++;
    siglongjmp(jump, 1);
}

static void open_device(int gid, const char *bdf)
{
    setup(gid, 0);
    device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (device < 0) {
        printf("device_errno=%d\n", errno);
        exit(1);
    }
    uint16_t cmd = 0x6;
    pwrite(device, &cmd, 2, (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40 | 4);
    bar0 = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, device, 0);
    if (bar0 == MAP_FAILED) {
        printf("mmap_errno=%d\n", errno);
        exit(1);
    }
}

static void *hammer(void *arg)
{
    long id = (long)arg, bad = 0;
    for (int i = 0; i < 300; i++) {
        uint32_t v = (uint32_t)(id << 16 | i);
        /* the factorial register is per device: each thread checks its own computations */
        if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
            bad++;
        volatile uint8_t b = ((volatile uint8_t *)bar0)[0];   /* a 1-byte load: edu (QEMU) reads 0 */
        if (b != 0)
            bad++;
        uint64_t x = *(volatile uint64_t *)((volatile char *)bar0 + 0x80);   /* 8-byte DMA register */
        (void)x;
        (void)v;
        if (bar0[0] != 0x010000ed)
            bad++;
    }
    return (void *)bad;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        return 2;
    const char *cmd = argv[1];
    int gid = argc > 2 ? atoi(argv[2]) : 0;

    if (!strcmp(cmd, "threads")) {
        /* Several threads: ioctls and BAR loads at once. */
        open_device(gid, argv[3]);
        pthread_t t[4];
        for (long i = 0; i < 4; i++)
            pthread_create(&t[i], NULL, hammer, (void *)i);
        long bad = 0;
        for (int i = 0; i < 4; i++) {
            void *r;
            pthread_join(t[i], &r);
            bad += (long)r;
        }
        printf("thread_errors=%ld\n", bad);
        return 0;
    }
    if (!strcmp(cmd, "segv")) {
        /* The program's own SIGSEGV handler, installed before and after the BAR mmap,
         * still sees its own faults; BAR access keeps working; pread/pwrite reach BAR0. */
        signal(SIGSEGV, on_segv);
        open_device(gid, argv[3]);
        if (!sigsetjmp(jump, 1))
            *wild = 1;
        printf("handled_before=%d\n", handled);
        struct sigaction sa = {0}, old;
        sa.sa_handler = on_segv;
        sigaction(SIGSEGV, &sa, &old);
        printf("old_is_ours=%d\n", old.sa_handler == on_segv);
        if (!sigsetjmp(jump, 1))
            (void)wild[2];
        printf("handled_after=%d\n", handled);
        bar0[1] = 0x11111111;
        printf("liveness=%#x\n", bar0[1]);
        uint32_t v = 0x0f0f0f0f, r = 0;
        result("pwrite_bar", pwrite(device, &v, 4, 4));
        result("pread_bar", pread(device, &r, 4, 4));
        printf("liveness_pread=%#x\n", r);
        /* movsx / movzx / byte and word stores */
        volatile uint8_t *b = (volatile uint8_t *)bar0;
        int16_t sw = *(volatile int16_t *)(b + 4);        /* movswl: edu (QEMU) reads sub-word loads as 0 */
        int8_t sb = *(volatile int8_t *)(b + 4);          /* movsbl */
        int64_t sl = *(volatile int32_t *)(b + 4);        /* movslq of 0xf0f0f0f0: sign-extended */
        printf("signed=%d,%d,%lld\n", sw, sb, (long long)sl);
        bar0[2] = 4;                                      /* factorial: 4! */
        printf("factorial=%u\n", bar0[2]);
        munmap((void *)bar0, 1 << 20);
        if (!sigsetjmp(jump, 1))
            (void)bar0[0];                                /* unmapped now: the program's handler */
        printf("handled_unmapped=%d\n", handled);
        return 0;
    }
    if (!strcmp(cmd, "hold")) {
        /* Hold a group with pinned memory, then wait to be killed. */
        setup(gid, 1);
        printf("ready VmLck=%ld pid=%d\n", vm("VmLck"), getpid());
        char c;
        while (read(0, &c, 1) > 0)
            ;
        pause();
        return 0;
    }
    if (!strcmp(cmd, "open")) {
        char path[64];
        snprintf(path, sizeof path, "/dev/vfio/%d", gid);
        int fd = open(path, O_RDWR);
        result("open_group", fd < 0 ? -1 : 0);
        printf("VmLck=%ld\n", vm("VmLck"));
        return 0;
    }
    if (!strcmp(cmd, "badinput")) {
        {
            /* Before the group has a container: fds that are not containers. */
            char path[64];
            int c = open("/dev/vfio/vfio", O_RDWR);
            snprintf(path, sizeof path, "/dev/vfio/%d", gid);
            int g = open(path, O_RDWR);
            int foreign = open("/dev/null", O_RDONLY);
            result("set_container_foreign", ioctl(g, VFIO_GROUP_SET_CONTAINER, &foreign));
            int bad = 9999;
            result("set_container_closed", ioctl(g, VFIO_GROUP_SET_CONTAINER, &bad));
            result("set_container_group_fd", ioctl(g, VFIO_GROUP_SET_CONTAINER, &g));
            result("set_container_bad_pointer", ioctl(g, VFIO_GROUP_SET_CONTAINER, (void *)8));
            close(foreign);
            close(g);
            close(c);
        }
        setup(gid, 0);
        struct vfio_iommu_spapr_tce_info info = {.argsz = sizeof info};
        result("get_info_null", ioctl(container, VFIO_IOMMU_GET_INFO, NULL));
        result("get_info_wild", ioctl(container, VFIO_IOMMU_GET_INFO, (void *)0x10));
        info.argsz = 4;
        result("get_info_argsz4", ioctl(container, VFIO_IOMMU_GET_INFO, &info));
        int closed = open("/dev/null", O_RDONLY);
        close(closed);
        result("ioctl_closed_fd", ioctl(closed, VFIO_GET_API_VERSION));
        result("unknown_ioctl", ioctl(container, _IO(VFIO_TYPE, VFIO_BASE + 60)));
        result("get_device_fd_null", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, NULL));
        result("get_device_fd_nosuch", ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:99:00.0"));
        char buf[8];
        result("read_container", read(container, buf, sizeof buf));
        result("pread_container", pread(container, buf, sizeof buf, 0));
        struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = 0x1000,
                                               .iova = 0, .size = 1 << 20};
        if (spapr)
            ioctl(container, VFIO_IOMMU_ENABLE);
        result("map_unmapped_vaddr", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        void *ro = mmap(NULL, 1 << 20, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        map.vaddr = (uintptr_t)ro;
        result("map_readonly_for_write", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        map.argsz = 8;
        result("map_argsz8", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        result("close_twice_1", close(group));
        result("close_twice_2", close(group));
        printf("VmLck=%ld\n", vm("VmLck"));
        return 0;
    }
    if (!strcmp(cmd, "rampin") && argc >= 5) {
        /* rampin GROUP KIND MIB: pin MIB of memory, then MIB more, through one pin
         * path (KIND 1: Type1v2 MAP_DMA, 2: sPAPR v1 MAP_DMA, 3: sPAPR v2
         * REGISTER_MEMORY); then give the first back and pin the second again. */
        int kind = atoi(argv[3]);
        size_t size = (size_t)atol(argv[4]) << 20;
        char path[64];
        container = open("/dev/vfio/vfio", O_RDWR);
        snprintf(path, sizeof path, "/dev/vfio/%d", gid);
        group = open(path, O_RDWR);
        ioctl(group, VFIO_GROUP_SET_CONTAINER, &container);
        result("set_iommu", ioctl(container, VFIO_SET_IOMMU, kind == 1 ? VFIO_TYPE1v2_IOMMU :
                                  kind == 2 ? VFIO_SPAPR_TCE_IOMMU : VFIO_SPAPR_TCE_v2_IOMMU));
        if (kind == 2)
            result("enable", ioctl(container, VFIO_IOMMU_ENABLE));
        uint8_t *mem = mmap(NULL, 2 * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(mem, 1, 2 * size);
        for (int i = 0; i < 3; i++) {
            const char *name = i == 0 ? "first" : i == 1 ? "second" : "again";
            if (i == 2) {                              /* give the first back */
                if (kind == 3) {
                    struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)mem,
                                                                   .size = size};
                    result("release", ioctl(container, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, &reg));
                } else {
                    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = 0, .size = size};
                    result("release", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u));
                }
            }
            uint8_t *at = mem + (i ? size : 0);
            if (kind == 3) {
                struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)at,
                                                               .size = size};
                result(name, ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
            } else {
                struct vfio_iommu_type1_dma_map m = {.argsz = sizeof m, .flags = 3, .vaddr = (uintptr_t)at,
                                                     .iova = i ? size : 0, .size = size};
                result(name, ioctl(container, VFIO_IOMMU_MAP_DMA, &m));
            }
        }
        printf("VmLck=%ld\n", vm("VmLck"));
        return 0;
    }
    if (!strcmp(cmd, "p2p")) {
        /* x86: edu A (group 4) and edu B (group 5) in one Type1v2 container.  A's
         * BAR, mapped, is MAP_DMAed at IOVA 16 MiB (the VM_PFNMAP path: not
         * pinned, not charged); B's DMA engine then writes A's DMA source
         * register and reads A's identification through that IOVA. */
        container = open("/dev/vfio/vfio", O_RDWR);
        int ga = open("/dev/vfio/4", O_RDWR), gb = open("/dev/vfio/5", O_RDWR);
        ioctl(ga, VFIO_GROUP_SET_CONTAINER, &container);
        ioctl(gb, VFIO_GROUP_SET_CONTAINER, &container);
        result("set_iommu", ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));
        int da = ioctl(ga, VFIO_GROUP_GET_DEVICE_FD, "0000:01:00.0");
        int db = ioctl(gb, VFIO_GROUP_GET_DEVICE_FD, "0000:02:00.0");
        uint16_t on = 0x6;                               /* memory decoding, bus master */
        pwrite(da, &on, 2, (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40 | 4);
        pwrite(db, &on, 2, (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40 | 4);
        volatile uint8_t *bara = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, da, 0);
        volatile uint8_t *barb = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, db, 0);
        long before = vm("VmLck");
        struct vfio_iommu_type1_dma_map m = {.argsz = sizeof m, .flags = 3, .vaddr = (uintptr_t)bara,
                                             .iova = 1 << 24, .size = 1 << 20};
        result("map_bar", ioctl(container, VFIO_IOMMU_MAP_DMA, &m));
        printf("bar_charged_kb=%ld\n", vm("VmLck") - before);
        uint64_t *ram = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        m.vaddr = (uintptr_t)ram;
        m.iova = 2 << 24;
        m.size = 4096;
        result("map_ram", ioctl(container, VFIO_IOMMU_MAP_DMA, &m));
        ram[0] = 0x1122334455ull;
        uint64_t steps[4][3] = {{2 << 24, 0x40000, 1},             /* RAM -> B's buffer */
                                {0x40000, (1 << 24) + 0x80, 3},    /* B's buffer -> A's DMA source register */
                                {1 << 24, 0x40000, 1},             /* A's identification -> B's buffer */
                                {0x40000, (2 << 24) + 8, 3}};      /* -> RAM */
        for (int i = 0; i < 4; i++) {
            *(volatile uint64_t *)(barb + 0x80) = steps[i][0];
            *(volatile uint64_t *)(barb + 0x88) = steps[i][1];
            *(volatile uint64_t *)(barb + 0x90) = i < 2 ? 8 : 4;
            *(volatile uint64_t *)(barb + 0x98) = steps[i][2];
            while (*(volatile uint64_t *)(barb + 0x98) & 1)
                ;
        }
        printf("a_dma_src=%#llx\n", (unsigned long long)*(volatile uint64_t *)(bara + 0x80));
        printf("a_ident_via_b=%#x\n", (unsigned)(ram[1] & 0xffffffff));
        struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = 1 << 24, .size = 1 << 20};
        result("unmap_bar", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u));
        return 0;
    }
    if (!strcmp(cmd, "argwindow")) {
        /* The shim sends a copy of an ioctl's struct with the call: the kernel's
         * faults must stay where they were. */
        setup(gid, 0);
        if (spapr)
            ioctl(container, VFIO_IOMMU_ENABLE);
        long pg = sysconf(_SC_PAGESIZE);
        uint8_t *two = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        mprotect(two + pg, pg, PROT_NONE);
        uint32_t *edge = (uint32_t *)(two + pg - 8);      /* argsz and flags readable, the rest not */
        edge[0] = 64;
        edge[1] = 0;
        result("info_straddles_guard", ioctl(container, VFIO_IOMMU_GET_INFO, edge));
        uint8_t *ro = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *(uint32_t *)ro = 64;
        mprotect(ro, pg, PROT_READ);                       /* read, checked, then no room for the answer */
        result("info_readonly", ioctl(container, VFIO_IOMMU_GET_INFO, ro));
        char tmpl[] = "/tmp/vfiosim-argwindow-XXXXXX";
        int f = mkstemp(tmpl);
        unlink(tmpl);
        uint8_t *past = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);   /* past EOF: SIGBUS */
        result("info_past_eof", ioctl(container, VFIO_IOMMU_GET_INFO, past));
        uint8_t *across = mmap(NULL, 2 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        uint8_t *info = across + pg - 8;                   /* readable and writable on both pages */
        memset(info, 0xff, 64);
        *(uint32_t *)info = 64;
        result("info_across_pages", ioctl(container, VFIO_IOMMU_GET_INFO, info));
        printf("info_filled=%d\n", *(uint32_t *)(info + 12) != 0xffffffffu);
        struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)across,
                                               .iova = 0, .size = pg};
        result("map", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = 0, .size = pg};
        uint8_t *unmap_ro = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memcpy(unmap_ro, &unmap, sizeof unmap);
        mprotect(unmap_ro, pg, PROT_READ);                 /* Type1 writes the size back, sPAPR does not */
        result("unmap_readonly", ioctl(container, VFIO_IOMMU_UNMAP_DMA, unmap_ro));
        result("unmap_again", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap));
        printf("unmap_again_size=%llu\n", (unsigned long long)unmap.size);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_sigbus;
        sigaction(SIGBUS, &sa, NULL);
        raise(SIGBUS);
        printf("own_sigbus=%d\n", sigbus_seen);
        return 0;
    }
    if (!strcmp(cmd, "fork")) {
        /* The container survives fork; the O_CLOEXEC group does not survive exec. */
        char path[64];
        container = open("/dev/vfio/vfio", O_RDWR);
        snprintf(path, sizeof path, "/dev/vfio/%d", gid);
        group = open(path, O_RDWR | O_CLOEXEC);
        int keep = dup(container);
        result("parent_api", ioctl(container, VFIO_GET_API_VERSION));
        pid_t pid = fork();
        if (pid == 0) {
            result("child_api", ioctl(container, VFIO_GET_API_VERSION));
            struct vfio_group_status st = {.argsz = sizeof st};
            result("child_group_status", ioctl(group, VFIO_GROUP_GET_STATUS, &st));
            char fdarg[3][16];
            snprintf(fdarg[0], 16, "%d", container);
            snprintf(fdarg[1], 16, "%d", group);
            snprintf(fdarg[2], 16, "%d", keep);
            fflush(stdout);
            execl(argv[0], argv[0], "afterexec", fdarg[0], fdarg[1], fdarg[2], (char *)NULL);
            _exit(99);
        }
        int status;
        waitpid(pid, &status, 0);
        printf("child_exit=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        struct vfio_group_status st = {.argsz = sizeof st};
        result("parent_group_status", ioctl(group, VFIO_GROUP_GET_STATUS, &st));
        return 0;
    }
    if (!strcmp(cmd, "afterexec")) {
        int c = atoi(argv[2]), g = atoi(argv[3]), k = atoi(argv[4]);
        result("exec_container_api", ioctl(c, VFIO_GET_API_VERSION));
        result("exec_dup_api", ioctl(k, VFIO_GET_API_VERSION));
        struct vfio_group_status st = {.argsz = sizeof st};
        result("exec_group_status", ioctl(g, VFIO_GROUP_GET_STATUS, &st));
        struct stat sb;
        result("exec_fstat_container", fstat(c, &sb));
        printf("container_is_chr=%d rdev=%u:%u\n", S_ISCHR(sb.st_mode), major(sb.st_rdev), minor(sb.st_rdev));
        return 0;
    }
    if (!strcmp(cmd, "execmap")) {
        /* A container with a mapping survives exec (no O_CLOEXEC); the new
         * image has a new address space.  The old buffer is 1 MiB of 0x01 at
         * IOVA 0. */
        setup(gid, 1);
        printf("VmLck=%ld\n", vm("VmLck"));
        char fdarg[16], addr[32];
        snprintf(fdarg, 16, "%d", container);
        snprintf(addr, 32, "%lu", (unsigned long)(uintptr_t)dma_buf);
        fflush(stdout);
        execl(argv[0], argv[0], "afterexecmap", fdarg, addr, (char *)NULL);
        return 99;
    }
    if (!strcmp(cmd, "afterexecmap")) {
        int c = atoi(argv[2]);
        void *old = (void *)(uintptr_t)strtoul(argv[3], NULL, 10);
        printf("exec_VmLck=%ld\n", vm("VmLck"));
        result("exec_check_extension", ioctl(c, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU));
        /* New memory where the old image's DMA buffer was: a device writing
         * through the old mapping must not reach it. */
        char *buf = mmap(old, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                         -1, 0);
        printf("exec_same_address=%d\n", buf == old);
        memset(buf, 0x22, 1 << 20);
        struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf,
                                               .iova = 1 << 20, .size = 1 << 20};
        result("exec_map", ioctl(c, VFIO_IOMMU_MAP_DMA, &map));
        printf("exec_map_VmLck=%ld\n", vm("VmLck"));
        printf("ready=1\n");
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin))     /* the test DMAs meanwhile */
            return 98;
        int untouched = 1;
        for (int i = 0; i < 1 << 20; i++)
            untouched &= buf[i] == 0x22;
        printf("exec_buffer_untouched=%d\n", untouched);
        return 0;
    }
    if (!strcmp(cmd, "rlimit")) {
        /* Credentials and RLIMIT_MEMLOCK are the process's own, at each call:
         * sPAPR v2 charges preregistered memory to locked_vm. */
        char path0[64];
        container = open("/dev/vfio/vfio", O_RDWR);
        snprintf(path0, sizeof path0, "/dev/vfio/%d", gid);
        group = open(path0, O_RDWR);
        ioctl(group, VFIO_GROUP_SET_CONTAINER, &container);
        result("set_iommu_v2", ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU));
        void *buf = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 1, 1 << 20);
        struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)buf,
                                                       .size = 1 << 20};
        struct rlimit rl;
        getrlimit(RLIMIT_MEMLOCK, &rl);
        struct rlimit small = {512 << 10, rl.rlim_max};
        result("register_as_root", ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
        printf("VmLck=%ld\n", vm("VmLck"));
        result("unregister", ioctl(container, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, &reg));
        result("setrlimit_small", setrlimit(RLIMIT_MEMLOCK, &small));
        result("register_root_small_limit", ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
        result("unregister", ioctl(container, VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, &reg));
        result("setresuid", setresuid(65534, 65534, 65534));
        result("register_small_limit", ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
        printf("VmLck=%ld\n", vm("VmLck"));
        struct rlimit big = {rl.rlim_max, rl.rlim_max};
        result("setrlimit_raise_soft", setrlimit(RLIMIT_MEMLOCK, &big));
        result("register_big_limit", ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg));
        printf("VmLck=%ld\n", vm("VmLck"));
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/status", getpid());
        FILE *f = fopen(path, "r");
        char line[256];
        while (f && fgets(line, sizeof line, f))
            if (!strncmp(line, "VmLck:", 6))
                printf("pid_status_VmLck=%ld\n", strtol(line + 6, NULL, 10));
        if (f)
            fclose(f);
        return 0;
    }
    if (!strcmp(cmd, "rawlimit")) {
        /* Type1's MAP_DMA consults only CAP_IPC_LOCK and RLIMIT_MEMLOCK: the
         * daemon reads just those again at each call (two system calls).
         * They change here with syscall(2), which the shim never sees. */
        setup(gid, 0);
        long pg = sysconf(_SC_PAGESIZE);
        uint8_t *buf = mmap(NULL, 16 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(buf, 1, 16 * pg);
        struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf,
                                               .iova = 0, .size = 8 * pg};
        struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = 0, .size = 8 * pg};
        struct rlimit rl, small, big;
        getrlimit(RLIMIT_MEMLOCK, &rl);
        small.rlim_cur = 4 * pg;
        small.rlim_max = rl.rlim_max;
        big.rlim_cur = rl.rlim_max;
        big.rlim_max = rl.rlim_max;
        result("raw_small", syscall(SYS_prlimit64, 0, RLIMIT_MEMLOCK, &small, NULL));
        result("map_root_small", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));     /* CAP_IPC_LOCK */
        result("unmap", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap));
        result("raw_setresuid", syscall(SYS_setresuid, 65534, 65534, 65534));    /* the capabilities go */
        result("map_small", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        result("raw_big", syscall(SYS_prlimit64, 0, RLIMIT_MEMLOCK, &big, NULL));
        result("map_big", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        result("unmap", ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap));
        small.rlim_max = rl.rlim_max;
        result("raw_small_again", syscall(SYS_prlimit64, 0, RLIMIT_MEMLOCK, &small, NULL));
        result("map_small_again", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
        return 0;
    }
    if (!strcmp(cmd, "rawfork")) {
        /* A child made by the fork system call itself, which the shim's fork()
         * never sees: it must make its own connection, as its own process
         * (its memory, not its parent's, is what the daemon reads for it). */
        int c0 = open("/dev/vfio/vfio", O_RDWR);
        result("parent_api", ioctl(c0, VFIO_GET_API_VERSION));
        pid_t p = (pid_t)syscall(SYS_fork);
        if (p == 0) {
            setup(gid, 0);
            long pg = sysconf(_SC_PAGESIZE);
            /* Mapped after the fork: the parent has nothing at this address. */
            uint8_t *buf = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(buf, 1, 4 * pg);
            struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)buf,
                                                   .iova = 0, .size = 4 * pg};
            result("child_map", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));
            _exit(0);
        }
        int status = 0;
        waitpid(p, &status, 0);
        printf("child_status=%d\n", status);
        result("parent_api_after", ioctl(c0, VFIO_GET_API_VERSION));
        return 0;
    }
    if (!strcmp(cmd, "eio")) {
        /* Keep working until the daemon dies, then see EIO. */
        container = open("/dev/vfio/vfio", O_RDWR);
        result("api_before", ioctl(container, VFIO_GET_API_VERSION));
        printf("ready\n");
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
        result("api_after", ioctl(container, VFIO_GET_API_VERSION));
        result("open_after", open("/dev/vfio/vfio", O_RDWR));
        result("close_after", close(container));
        return 0;
    }
    if (!strcmp(cmd, "stat")) {
        struct stat sb;
        char path[64];
        snprintf(path, sizeof path, "/dev/vfio/%d", gid);
        result("stat_group", stat(path, &sb));
        printf("group_is_chr=%d mode=%o rdev_minor=%u\n", S_ISCHR(sb.st_mode), sb.st_mode & 0777, minor(sb.st_rdev));
        result("stat_container", stat("/dev/vfio/vfio", &sb));
        printf("container_is_chr=%d rdev=%u:%u\n", S_ISCHR(sb.st_mode), major(sb.st_rdev), minor(sb.st_rdev));
        result("access_group", access(path, R_OK | W_OK));
        result("stat_nosuch", stat("/dev/vfio/77", &sb));
        return 0;
    }
    return 2;
}
