/*
 * edu_vfio_guest.c -- runs inside the pseries guest of `vfiosim qemu-demo`.
 *
 * Statically cross-compiled for powerpc64le.  It makes the guest's edu device
 * (1234:11e8, which the guest sees on its PCI bus because QEMU passes the
 * vfiosim device through with -device vfio-pci) DMA through the *guest's*
 * VFIO: the guest kernel's vfio_iommu_spapr_tce driver puts every mapped page
 * into the guest's TCE table with H_PUT_TCE; QEMU turns each into a
 * VFIO_IOMMU_MAP_DMA on the host container (vfiosim); vfiosim's edu model
 * then reads and writes QEMU's guest RAM through the host TCE table.
 *
 * Steps: bind the device to vfio-pci, open container/group/device, set the
 * sPAPR IOMMU (v2 if the guest kernel supports it there, else v1), map a
 * source and a destination buffer, copy the source to the destination through
 * the edu's DMA buffer 2 KiB at a time (each 4 KiB page is a different TCE),
 * compare, unmap; then check an INTx and an MSI interrupt from the edu
 * arrive on eventfds.  Every line it prints starts with "vfiosim-guest:";
 * the last one is "vfiosim-guest: PASS ..." or "vfiosim-guest: FAIL ...".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#define EDU_ID 0x00
#define EDU_LIVENESS 0x04
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_RAISE 0x60
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_DMA_BUF 0x40000ull
#define EDU_DMA_RUN 0x1
#define EDU_DMA_TO_RAM 0x2

#define BUF_SIZE (64u << 10)        /* one guest page (64 KiB), sixteen 4 KiB TCEs */
/* Half of edu's 4 KiB DMA buffer per transfer: QEMU 7.2's own edu refuses (hw_error)
 * a transfer that ends exactly at the end of its buffer. */
#define CHUNK 2048u

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("vfiosim-guest: ");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}

static void die(const char *fmt, ...)
{
    int e = errno;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("vfiosim-guest: FAIL %s (errno %d: %s)\n", msg, e, strerror(e));
    fflush(stdout);
    exit(1);
}

static int read_file(const char *path, char *out, size_t n)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, out, n - 1);
    close(fd);
    if (r < 0)
        return -1;
    out[r] = 0;
    while (r > 0 && (out[r - 1] == '\n' || out[r - 1] == ' '))
        out[--r] = 0;
    return 0;
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t r = write(fd, text, strlen(text));
    int e = errno;
    close(fd);
    errno = e;
    return r == (ssize_t)strlen(text) ? 0 : -1;
}

static int find_edu(char *bdf, size_t n)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char p[512], v[32], dv[32];
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/vendor", e->d_name);
        if (read_file(p, v, sizeof v))
            continue;
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/device", e->d_name);
        if (read_file(p, dv, sizeof dv))
            continue;
        if (strcmp(v, "0x1234") == 0 && strcmp(dv, "0x11e8") == 0) {
            snprintf(bdf, n, "%s", e->d_name);
            found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

static const char *driver_of(const char *bdf, char *out, size_t n)
{
    char p[512], link[512];
    snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/driver", bdf);
    ssize_t r = readlink(p, link, sizeof link - 1);
    if (r < 0)
        return NULL;
    link[r] = 0;
    const char *base = strrchr(link, '/');
    snprintf(out, n, "%s", base ? base + 1 : link);
    return out;
}

static void bind_vfio_pci(const char *bdf)
{
    char drv[128], p[512];
    if (driver_of(bdf, drv, sizeof drv) && strcmp(drv, "vfio-pci") != 0) {
        say("unbinding %s from %s", bdf, drv);
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/driver/unbind", bdf);
        if (write_file(p, bdf))
            die("unbind %s from %s", bdf, drv);
    }
    if (!driver_of(bdf, drv, sizeof drv)) {
        if (write_file("/sys/bus/pci/drivers/vfio-pci/new_id", "1234 11e8") && errno != EEXIST)
            die("echo 1234 11e8 > /sys/bus/pci/drivers/vfio-pci/new_id");
    }
    for (int i = 0; i < 100 && !driver_of(bdf, drv, sizeof drv); i++)
        usleep(10000);
    if (!driver_of(bdf, drv, sizeof drv) || strcmp(drv, "vfio-pci") != 0) {
        errno = ENODEV;
        die("%s is not bound to vfio-pci", bdf);
    }
    say("%s bound to vfio-pci", bdf);
}

static int iommu_group_of(const char *bdf)
{
    char p[512], link[512];
    snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t r = readlink(p, link, sizeof link - 1);
    if (r < 0)
        die("readlink %s", p);
    link[r] = 0;
    return atoi(strrchr(link, '/') + 1);
}

/* ---- BAR access ---- */

static volatile uint8_t *bar0;
/* A PCI device is little-endian, and so is vfiosim's edu.  QEMU's own emulated edu
 * (-device edu, handy to compare with) is DEVICE_NATIVE_ENDIAN, big-endian on a ppc64
 * target: the id register tells, and every access is then swapped. */
static int swapped;

static inline void mb(void)
{
    __asm__ __volatile__("sync" ::: "memory");
}

static uint32_t rd32(unsigned off)
{
    mb();
    uint32_t v = *(volatile uint32_t *)(bar0 + off);
    mb();
    return swapped ? __builtin_bswap32(v) : v;
}

static void wr32(unsigned off, uint32_t v)
{
    mb();
    *(volatile uint32_t *)(bar0 + off) = swapped ? __builtin_bswap32(v) : v;
    mb();
}

static uint64_t rd64(unsigned off)
{
    mb();
    uint64_t v = *(volatile uint64_t *)(bar0 + off);
    mb();
    return swapped ? __builtin_bswap64(v) : v;
}

static void wr64(unsigned off, uint64_t v)
{
    mb();
    *(volatile uint64_t *)(bar0 + off) = swapped ? __builtin_bswap64(v) : v;
    mb();
}

static void edu_dma(uint64_t src, uint64_t dst, uint32_t count, uint32_t cmd)
{
    wr64(EDU_DMA_SRC, src);
    wr64(EDU_DMA_DST, dst);
    wr64(EDU_DMA_CNT, count);
    wr64(EDU_DMA_CMD, cmd | EDU_DMA_RUN);
    for (int i = 0; i < 100000; i++) {
        if (!(rd64(EDU_DMA_CMD) & EDU_DMA_RUN))
            return;
        usleep(100);
    }
    errno = ETIMEDOUT;
    die("edu DMA %#llx -> %#llx did not complete", (unsigned long long)src, (unsigned long long)dst);
}

/* ---- interrupts ---- */

static int set_irq_eventfd(int device, unsigned index, int efd)
{
    char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
    struct vfio_irq_set *s = (struct vfio_irq_set *)buf;
    s->argsz = sizeof buf;
    s->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    s->index = index;
    s->start = 0;
    s->count = 1;
    memcpy(s->data, &efd, sizeof efd);
    return ioctl(device, VFIO_DEVICE_SET_IRQS, s);
}

static int irq_none(int device, unsigned index, unsigned action, unsigned count)
{
    struct vfio_irq_set s = {.argsz = sizeof s, .flags = VFIO_IRQ_SET_DATA_NONE | action,
                             .index = index, .start = 0, .count = count};
    return ioctl(device, VFIO_DEVICE_SET_IRQS, &s);
}

static uint64_t wait_eventfd(int efd, int ms)
{
    struct pollfd p = {.fd = efd, .events = POLLIN};
    int r = poll(&p, 1, ms);
    if (r <= 0)
        return 0;
    uint64_t n = 0;
    if (read(efd, &n, sizeof n) != sizeof n)
        return 0;
    return n;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    /* "v1" or "v2" forces the guest's sPAPR IOMMU type; without it, v2 when offered. */
    const char *want = argc > 1 ? argv[1] : "auto";
    setvbuf(stdout, NULL, _IOLBF, 0);
    char bdf[64];
    if (find_edu(bdf, sizeof bdf)) {
        errno = ENODEV;
        die("no edu device (1234:11e8) on the guest's PCI bus");
    }
    say("found edu at %s", bdf);
    bind_vfio_pci(bdf);
    int groupno = iommu_group_of(bdf);

    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        die("open /dev/vfio/vfio");
    if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
        die("VFIO_GET_API_VERSION");
    char gpath[64];
    snprintf(gpath, sizeof gpath, "/dev/vfio/%d", groupno);
    int group = open(gpath, O_RDWR);
    if (group < 0)
        die("open %s", gpath);
    struct vfio_group_status gs = {.argsz = sizeof gs};
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &gs) || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
        die("group %d is not viable", groupno);
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        die("VFIO_GROUP_SET_CONTAINER");

    /* As QEMU does: v2 where the platform supports it, v1 otherwise. */
    int v2 = strcmp(want, "v1") != 0 &&
             ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_v2_IOMMU) == 1 &&
             ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_v2_IOMMU) == 0;
    if (!v2 && strcmp(want, "v2") == 0)
        die("VFIO_SET_IOMMU(VFIO_SPAPR_TCE_v2_IOMMU)");
    if (!v2 && ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU))
        die("VFIO_SET_IOMMU(VFIO_SPAPR_TCE_IOMMU)");
    struct vfio_iommu_spapr_tce_info info = {.argsz = sizeof info};
    if (ioctl(container, VFIO_IOMMU_SPAPR_TCE_GET_INFO, &info))
        die("VFIO_IOMMU_SPAPR_TCE_GET_INFO");
    say("guest IOMMU %s, DMA window %#x+%#x", v2 ? "VFIO_SPAPR_TCE_v2_IOMMU" : "VFIO_SPAPR_TCE_IOMMU",
        info.dma32_window_start, info.dma32_window_size);

    uint8_t *src = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *dst = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED)
        die("mmap buffers");
    uint32_t seed = 0x9e3779b9u ^ (uint32_t)getpid();
    for (unsigned i = 0; i < BUF_SIZE; i++) {
        seed = seed * 1103515245u + 12345u;
        src[i] = (uint8_t)(seed >> 16);
    }
    memset(dst, 0, BUF_SIZE);
    if (v2) {
        struct vfio_iommu_spapr_register_memory reg = {.argsz = sizeof reg, .vaddr = (uintptr_t)src,
                                                       .size = BUF_SIZE};
        if (ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg))
            die("VFIO_IOMMU_SPAPR_REGISTER_MEMORY src");
        reg.vaddr = (uintptr_t)dst;
        if (ioctl(container, VFIO_IOMMU_SPAPR_REGISTER_MEMORY, &reg))
            die("VFIO_IOMMU_SPAPR_REGISTER_MEMORY dst");
    } else if (ioctl(container, VFIO_IOMMU_ENABLE)) {
        die("VFIO_IOMMU_ENABLE");
    }

    /* Two bus addresses in the default window, below edu's 28-bit DMA mask. */
    uint64_t iova_src = info.dma32_window_start + 0x100000, iova_dst = info.dma32_window_start + 0x200000;
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map,
                                           .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                           .vaddr = (uintptr_t)src, .iova = iova_src, .size = BUF_SIZE};
    double t0 = now();
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
        die("VFIO_IOMMU_MAP_DMA src");
    map.vaddr = (uintptr_t)dst;
    map.iova = iova_dst;
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
        die("VFIO_IOMMU_MAP_DMA dst");
    double t_map = now() - t0;
    say("mapped 2 x %u KiB at iova %#llx and %#llx (%u guest TCEs of 4 KiB) in %.3f s", BUF_SIZE >> 10,
        (unsigned long long)iova_src, (unsigned long long)iova_dst, 2 * BUF_SIZE / 4096, t_map);

    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (device < 0)
        die("VFIO_GROUP_GET_DEVICE_FD %s", bdf);
    struct vfio_region_info ri = {.argsz = sizeof ri, .index = VFIO_PCI_BAR0_REGION_INDEX};
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &ri))
        die("VFIO_DEVICE_GET_REGION_INFO BAR0");
    if (!(ri.flags & VFIO_REGION_INFO_FLAG_MMAP)) {
        errno = ENOTSUP;
        die("BAR0 cannot be mmapped");
    }
    bar0 = mmap(NULL, ri.size, PROT_READ | PROT_WRITE, MAP_SHARED, device, ri.offset);
    if (bar0 == MAP_FAILED)
        die("mmap BAR0");
    /* The id register through the device fd (pread), the rest through the mapping. */
    uint32_t id = 0;
    if (pread(device, &id, 4, ri.offset + EDU_ID) != 4)
        die("pread BAR0 id");
    if (id == __builtin_bswap32(0x010000edu)) {
        swapped = 1;
        id = 0x010000ed;
        say("edu registers are big-endian: QEMU's emulated edu, not a PCI device's byte order");
    }
    if (id != 0x010000ed || rd32(EDU_ID) != id) {
        errno = EIO;
        die("edu id register reads %#x", id);
    }
    wr32(EDU_LIVENESS, 0x12345678);
    if (rd32(EDU_LIVENESS) != 0xedcba987u) {
        errno = EIO;
        die("edu liveness register reads %#x", rd32(EDU_LIVENESS));
    }
    say("edu id %#x, liveness ok", id);

    /* Bus mastering on, as a driver would. */
    uint16_t cmd;
    off_t cfg = (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40;
    if (pread(device, &cmd, 2, cfg + 4) != 2)
        die("pread COMMAND");
    cmd |= 0x6;
    if (pwrite(device, &cmd, 2, cfg + 4) != 2)
        die("pwrite COMMAND");

    t0 = now();
    unsigned transfers = 0;
    for (unsigned off = 0; off < BUF_SIZE; off += CHUNK) {
        edu_dma(iova_src + off, EDU_DMA_BUF, CHUNK, 0);                    /* RAM -> edu */
        edu_dma(EDU_DMA_BUF, iova_dst + off, CHUNK, EDU_DMA_TO_RAM);       /* edu -> RAM */
        transfers += 2;
    }
    double t_dma = now() - t0;
    if (memcmp(src, dst, BUF_SIZE) != 0) {
        unsigned i = 0;
        while (i < BUF_SIZE && src[i] == dst[i])
            i++;
        errno = EIO;
        die("DMA copy differs at byte %u: %#x != %#x", i, dst[i], src[i]);
    }
    say("DMA ok: %u KiB copied by %u edu transfers through the TCE tables in %.3f s", BUF_SIZE >> 10,
        transfers, t_dma);

    /* INTx: edu raises its pin, the guest's vfio-pci signals our eventfd. */
    int intx_ok = 0, msi_ok = 0;
    int efd = eventfd(0, EFD_CLOEXEC);
    if (efd < 0)
        die("eventfd");
    if (set_irq_eventfd(device, VFIO_PCI_INTX_IRQ_INDEX, efd))
        die("VFIO_DEVICE_SET_IRQS INTx");
    wr32(EDU_IRQ_RAISE, 0x1);
    uint64_t n = wait_eventfd(efd, 10000);
    /* Acknowledge the device before unmasking, without reading its status first.
     * Under TCG, QEMU takes any BAR access while INTx is pending as the guest's EOI
     * and unmasks at the host, and the host's vfio-pci re-sends an interrupt that is
     * still asserted then: a status read before the ack would leave QEMU asserting
     * INTx for an interrupt the device no longer has (docs/qemu.md). */
    wr32(EDU_IRQ_ACK, 0x1);
    if (rd32(EDU_IRQ_STATUS) != 0) {
        errno = EIO;
        die("edu interrupt status %#x after the acknowledgement", rd32(EDU_IRQ_STATUS));
    }
    if (n) {
        intx_ok = 1;
        if (irq_none(device, VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK, 1))
            die("VFIO_DEVICE_SET_IRQS unmask INTx");
    }
    irq_none(device, VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0);
    say("INTx %s", intx_ok ? "ok" : "did not arrive");

    /* MSI: the guest kernel enables MSI; QEMU enables it on the host device. */
    if (set_irq_eventfd(device, VFIO_PCI_MSI_IRQ_INDEX, efd))
        die("VFIO_DEVICE_SET_IRQS MSI");
    wr32(EDU_IRQ_RAISE, 0x2);
    n = wait_eventfd(efd, 10000);
    wr32(EDU_IRQ_ACK, 0x2);
    msi_ok = n != 0;
    irq_none(device, VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0);
    say("MSI %s", msi_ok ? "ok" : "did not arrive");

    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof unmap, .iova = iova_src, .size = BUF_SIZE};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap))
        die("VFIO_IOMMU_UNMAP_DMA src");
    unmap.iova = iova_dst;
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap))
        die("VFIO_IOMMU_UNMAP_DMA dst");
    munmap((void *)bar0, ri.size);
    close(device);
    close(group);
    close(container);
    if (!intx_ok || !msi_ok) {
        errno = EIO;
        die("interrupts: INTx %s, MSI %s", intx_ok ? "ok" : "missing", msi_ok ? "ok" : "missing");
    }
    say("PASS iommu=%s window=%#x+%#x pages=%u transfers=%u bytes=%u intx=ok msi=ok map_s=%.3f dma_s=%.3f",
        v2 ? "v2" : "v1", info.dma32_window_start, info.dma32_window_size, 2 * BUF_SIZE / 4096, transfers,
        BUF_SIZE, t_map, t_dma);
    return 0;
}
