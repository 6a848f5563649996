/*
 * For tests/test_ioeventfd.py: VFIO_DEVICE_IOEVENTFD and an INTx unmask
 * eventfd on the edu device, as a VMM uses them.  Plain <linux/vfio.h> code.
 *   ioeventfd_probe GROUP BDF
 * prints key=value lines.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define BAR0 ((uint64_t)VFIO_PCI_BAR0_REGION_INDEX << 40)

static void die(const char *what)
{
    printf("failed=%s errno=%d\n", what, errno);
    exit(1);
}

static uint32_t reg_read(int dev, uint64_t off)
{
    uint32_t v;
    if (pread(dev, &v, 4, BAR0 + off) != 4)
        die("pread");
    return v;
}

static void reg_write(int dev, uint64_t off, uint32_t v)
{
    if (pwrite(dev, &v, 4, BAR0 + off) != 4)
        die("pwrite");
}

static void set_irq(int dev, uint32_t action, int fd)
{
    char buf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
    struct vfio_irq_set *s = (struct vfio_irq_set *)buf;
    s->argsz = sizeof buf;
    s->flags = VFIO_IRQ_SET_DATA_EVENTFD | action;
    s->index = VFIO_PCI_INTX_IRQ_INDEX;
    s->start = 0;
    s->count = 1;
    memcpy(s->data, &fd, sizeof fd);
    if (ioctl(dev, VFIO_DEVICE_SET_IRQS, s))
        die("set_irqs");
}

static uint64_t drain(int efd)
{
    uint64_t n = 0;
    if (read(efd, &n, 8) != 8)
        return 0;
    return n;
}

int main(int argc, char **argv)
{
    char path[64];
    if (argc < 3)
        return 2;
    int container = open("/dev/vfio/vfio", O_RDWR);
    snprintf(path, sizeof path, "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (container < 0 || group < 0)
        die("open");
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        die("set_container");
    int spapr = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU) == 1;
    if (ioctl(container, VFIO_SET_IOMMU, spapr ? VFIO_SPAPR_TCE_IOMMU : VFIO_TYPE1v2_IOMMU))
        die("set_iommu");
    int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (dev < 0)
        die("get_device_fd");

    /* An ioeventfd: writing the eventfd writes 0x0f0f0f0f to edu's liveness register. */
    int kick = eventfd(0, EFD_NONBLOCK);
    struct vfio_device_ioeventfd io = {.argsz = sizeof io, .flags = VFIO_DEVICE_IOEVENTFD_32,
                                       .offset = BAR0 + 4, .data = 0x0f0f0f0f, .fd = kick};
    printf("ioeventfd=%d\n", ioctl(dev, VFIO_DEVICE_IOEVENTFD, &io));
    uint64_t one = 1;
    if (write(kick, &one, 8) != 8)
        die("write kick");
    printf("liveness=%#x\n", reg_read(dev, 4));   /* the write happened before this call */

    /* INTx with an unmask eventfd: the interrupt fires again while still asserted. */
    int trigger = eventfd(0, EFD_NONBLOCK), unmask = eventfd(0, EFD_NONBLOCK);
    set_irq(dev, VFIO_IRQ_SET_ACTION_TRIGGER, trigger);
    set_irq(dev, VFIO_IRQ_SET_ACTION_UNMASK, unmask);
    reg_write(dev, 0x60, 1);                        /* edu raises its interrupt */
    printf("intx_first=%llu\n", (unsigned long long)drain(trigger));
    if (write(unmask, &one, 8) != 8)
        die("write unmask");
    reg_read(dev, 0);                               /* any call: the unmask has happened */
    printf("intx_refired=%llu\n", (unsigned long long)drain(trigger));
    reg_write(dev, 0x64, 1);                        /* acknowledge: deasserted */
    if (write(unmask, &one, 8) != 8)
        die("write unmask");
    reg_read(dev, 0);
    printf("intx_quiet=%llu\n", (unsigned long long)drain(trigger));
    return 0;
}
