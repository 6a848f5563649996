/*
 * The ordering rules of posted stores, seen by a plain VFIO program under
 * `vfiosim run` (tests/test_run_posted.py).  Stores to edu's registers are
 * posted, those with side effects (the DMA command) too: the program goes on
 * before the device has them.  Yet, as for PCIe posted writes:
 *   - a load after stores sees them;
 *   - a side-effecting store (the DMA command) runs after the stores before
 *     it, and two commands run in the order they were stored;
 *   - an interrupt from a DMA command arrives after the data is in memory,
 *     without any later access to push the command out.
 *
 *   posted_probe GROUP BDF     (Type1v2 on the x86 machine)
 * Prints key=value lines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile uint8_t *bar;
static uint8_t *ram;                 /* 2 x 4 KiB at IOVA 0: source, destination */
static int efd;
static volatile int irq_saw_data = -1;

static volatile uint32_t *r32(unsigned off) { return (volatile uint32_t *)(bar + off); }
static volatile uint64_t *r64(unsigned off) { return (volatile uint64_t *)(bar + off); }

static void die(const char *what)
{
    printf("error=%s:%d\n", what, errno);
    exit(1);
}

/* Waits for the interrupt, then looks at the destination at once. */
static void *irq_thread(void *arg)
{
    (void)arg;
    struct pollfd p = {efd, POLLIN, 0};
    if (poll(&p, 1, 5000) != 1)        /* (the daemon's idle wake-up is made longer than this) */
        return NULL;
    int same = 1;
    for (int i = 0; i < 4096; i++)
        same &= ram[4096 + i] == (uint8_t)(i * 13 + 7);
    irq_saw_data = same;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    char path[64];
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[1]);
    int c = open("/dev/vfio/vfio", O_RDWR), g = open(path, O_RDWR);
    if (c < 0 || g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        die("setup");
    ram = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 4096; i++)
        ram[i] = (uint8_t)(i * 13 + 7);
    memset(ram + 4096, 0, 4096);
    struct vfio_iommu_type1_dma_map map = {.argsz = sizeof map, .flags = 3, .vaddr = (uintptr_t)ram, .iova = 0,
                                           .size = 8192};
    if (ioctl(c, VFIO_IOMMU_MAP_DMA, &map))
        die("map");
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (d < 0)
        die("device");
    uint16_t cmd = 0x6;
    pwrite(d, &cmd, 2, ((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4);
    bar = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    if (bar == MAP_FAILED)
        die("mmap");

    /* 1. a load after stores sees them (each store posted; the load is an ordering point) */
    *r32(0x04) = 0x12345678;
    printf("liveness=%#x\n", *r32(0x04));
    *r64(0x80) = 0x1111;
    *r64(0x88) = 0x2222;
    *r64(0x90) = 0x3333;
    *r64(0x80) = 0x4444;                /* the later store to a register wins */
    printf("dma_regs=%#lx,%#lx,%#lx\n", (unsigned long)*r64(0x80), (unsigned long)*r64(0x88),
           (unsigned long)*r64(0x90));

    /* 2. a side-effecting store runs after the posted stores before it, and
     * commands in order: RAM -> device, then device -> RAM, no wait between */
    *r64(0x80) = 0;
    *r64(0x88) = 0x40000;
    *r64(0x90) = 4096;
    *r64(0x98) = 1;
    *r64(0x80) = 0x40000;
    *r64(0x88) = 4096;
    *r64(0x90) = 4096;
    *r64(0x98) = 1 | 2;
    printf("command_done_at_next_load=%d\n", !(*r64(0x98) & 1));
    printf("back_to_back=%d\n", memcmp(ram, ram + 4096, 4096) == 0);
    memset(ram + 4096, 0, 4096);

    /* 3. the interrupt of a DMA command arrives after its data is in memory */
    efd = eventfd(0, EFD_CLOEXEC);
    char irqbuf[sizeof(struct vfio_irq_set) + 4];
    struct vfio_irq_set *set = (void *)irqbuf;
    set->argsz = sizeof irqbuf;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_INTX_IRQ_INDEX;
    set->start = 0;
    set->count = 1;
    memcpy(set->data, &efd, 4);
    if (ioctl(d, VFIO_DEVICE_SET_IRQS, set))
        die("set_irqs");
    pthread_t th;
    pthread_create(&th, NULL, irq_thread, NULL);
    usleep(100000);                     /* the thread waits in poll() */
    *r64(0x80) = 0x40000;
    *r64(0x88) = 4096;
    *r64(0x90) = 4096;
    *r64(0x98) = 1 | 2 | 4;             /* device -> RAM, interrupt when done */
    pthread_join(th, NULL);             /* no access of ours pushes the command out */
    printf("irq_saw_data=%d\n", irq_saw_data);
    printf("round_trip=%d\n", memcmp(ram, ram + 4096, 4096) == 0);
    return 0;
}
