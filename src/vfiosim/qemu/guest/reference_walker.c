/*
 * Walks the steps of a real-kernel reference trace (tests/data/reference_traces)
 * as the recording program did, and prints what the kernel answered.
 *
 * A plain VFIO program against <linux/vfio.h>: run it on Linux or under
 * `vfiosim run`.  tests/test_run_reference.py feeds it the steps and compares
 * every answer (return value, errno, struct fields, VmLck, VmPin from
 * /proc/self/status) with the trace.
 *
 * Input, one step a line:   SEQ OP key=value ...
 *   values are integers (strtoull base 0); vaddr=@buf+4096 names memory
 *   symbolically (buf, robuf, unmapped), bdf=... is a string.
 *   The first line is "0 meta buf_size=N memlock_cur=N memlock_max=N bdf=B".
 * Output, one line a step:  SEQ RET ERRNO VMLCK_KB VMPIN_KB key=value ...
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
#include <unistd.h>

#define MAXKV 32
struct kv {
    char key[48];
    char val[96];
};
static struct kv kvs[MAXKV];
static int nkv;

static uint8_t *sym_buf, *sym_robuf, *sym_unmapped;
static char bdf[64];
static int container = -1;
static int groups[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
static int devices[16];
static int ndevices;

static const char *get(const char *key)
{
    for (int i = 0; i < nkv; i++)
        if (!strcmp(kvs[i].key, key))
            return kvs[i].val;
    return NULL;
}

static uint64_t num(const char *key, uint64_t dflt)
{
    const char *v = get(key);
    if (!v)
        return dflt;
    if (v[0] == '@') {
        const char *p = v + 1;
        uint8_t *base = NULL;
        size_t n = strcspn(p, "+-");
        if (!strncmp(p, "buf", n) && n == 3)
            base = sym_buf;
        else if (!strncmp(p, "robuf", n) && n == 5)
            base = sym_robuf;
        else if (!strncmp(p, "unmapped", n) && n == 8)
            base = sym_unmapped;
        long long off = p[n] ? strtoll(p + n, NULL, 0) : 0;
        return (uint64_t)(uintptr_t)(base + off);
    }
    return strtoull(v, NULL, 0);
}

static void status(long *lck, long *pin)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    *lck = *pin = -1;
    while (f && fgets(line, sizeof line, f)) {
        if (!strncmp(line, "VmLck:", 6))
            *lck = strtol(line + 6, NULL, 10);
        if (!strncmp(line, "VmPin:", 6))
            *pin = strtol(line + 6, NULL, 10);
    }
    if (f)
        fclose(f);
}

static char out[20000];
static size_t outn;

static void emit(const char *key, unsigned long long v)
{
    outn += (size_t)snprintf(out + outn, sizeof out - outn, " %s=%llu", key, v);
}

static void emit_hex(const char *key, const uint8_t *p, size_t n)
{
    static char hex[8192 * 2 + 1];
    for (size_t i = 0; i < n; i++)
        sprintf(hex + 2 * i, "%02x", p[i]);
    hex[2 * n] = 0;
    size_t need = strlen(key) + 2 * n + 3;
    if (outn + need < sizeof out)
        outn += (size_t)snprintf(out + outn, sizeof out - outn, " %s=%s", key, hex);
}

static uint64_t *bitmap;

/* struct vfio_iommu_type1_dirty_bitmap(_get) and vfio_iommu_type1_dma_unmap with a bitmap:
 * argsz, flags, iova, size, bitmap.pgsize, bitmap.size, bitmap.data. */
static void pack_bitmap_call(uint8_t *b)
{
    uint32_t argsz = (uint32_t)num("argsz", 0), flags = (uint32_t)num("flags", 0);
    uint64_t q[5] = {num("iova", 0), num("size", 0), num("pgsize", 0), num("bitmap_size", 0), 0};
    if (!bitmap)
        bitmap = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(bitmap, 0, 4096);
    q[4] = num("data_null", 0) ? 0 : (uint64_t)(uintptr_t)bitmap;
    memcpy(b, &argsz, 4);
    memcpy(b + 4, &flags, 4);
    memcpy(b + 8, q, sizeof q);
}

static void emit_bitmap(void)
{
    size_t words = (num("bitmap_size", 0) + 7) / 8;
    if (words > 512)
        words = 512;
    emit_hex("bitmap", (const uint8_t *)bitmap, 8 * words);
}

static long step_ioctl(int fd, unsigned long cmd, void *arg)
{
    return ioctl(fd, cmd, arg);
}

int main(void)
{
    char line[4096];
    static uint8_t argbuf[8192] __attribute__((aligned(4096)));
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char op[128];
        int seq, consumed = 0;
        if (sscanf(line, "%d %127s%n", &seq, op, &consumed) < 2)
            continue;
        nkv = 0;
        char *p = line + consumed;
        char *save = NULL;
        for (char *tok = strtok_r(p, " \n", &save); tok && nkv < MAXKV; tok = strtok_r(NULL, " \n", &save)) {
            char *eq = strchr(tok, '=');
            if (!eq)
                continue;
            *eq = 0;
            snprintf(kvs[nkv].key, sizeof kvs[nkv].key, "%s", tok);
            snprintf(kvs[nkv].val, sizeof kvs[nkv].val, "%s", eq + 1);
            nkv++;
        }
        long ret = 0;
        int err = 0;
        outn = 0;
        out[0] = 0;
        memset(argbuf, 0, sizeof argbuf);
        errno = 0;
        if (!strcmp(op, "meta")) {
            size_t size = num("buf_size", 64 << 20);
            struct rlimit rl = {num("memlock_cur", 8 << 20), num("memlock_max", 8 << 20)};
            setrlimit(RLIMIT_MEMLOCK, &rl);
            snprintf(bdf, sizeof bdf, "%s", get("bdf") ? get("bdf") : "");
            /* A PROT_NONE page after buf: the steps that run past its end
             * (map_partly_unmapped_vaddr) must find no memory there, whatever
             * the program maps later (under vfiosim run, the shim's channel could
             * otherwise land right after it).  The mapping stays a multiple of
             * 2 MiB, so that Linux aligns it as it aligns buf alone (the THP
             * alignment of large anonymous mappings), which the steps on
             * preregistered memory depend on. */
            size_t page = (size_t)sysconf(_SC_PAGESIZE), slack = 2 << 20;
            sym_buf = mmap(NULL, size + slack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            mprotect(sym_buf + size, page, PROT_NONE);
            munmap(sym_buf + size + page, slack - page);
            memset(sym_buf, 0x5a, size);
            sym_robuf = mmap(NULL, 1 << 20, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            sym_unmapped = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            munmap(sym_unmapped, 1 << 20);
        } else if (!strcmp(op, "skip") || !strcmp(op, "note")) {
            /* nothing to do */
        } else if (!strcmp(op, "open(/dev/vfio/vfio)")) {
            container = open("/dev/vfio/vfio", O_RDWR);
            ret = container < 0 ? -1 : 0;
        } else if (!strcmp(op, "open(/dev/vfio/N)")) {
            char path[64];
            snprintf(path, sizeof path, "/dev/vfio/%llu", (unsigned long long)num("group", 0));
            int fd = open(path, O_RDWR);
            groups[num("slot", 0) & 7] = fd;
            ret = fd < 0 ? -1 : 0;
        } else if (!strcmp(op, "close(device)")) {
            for (int i = 0; i < ndevices; i++)
                close(devices[i]);
            ndevices = 0;
        } else if (!strcmp(op, "close(group)")) {
            ret = close(groups[num("slot", 0) & 7]);
        } else if (!strcmp(op, "close(container)")) {
            ret = close(container);
        } else if (!strcmp(op, "VFIO_GET_API_VERSION")) {
            ret = ioctl(container, VFIO_GET_API_VERSION);
        } else if (!strcmp(op, "VFIO_CHECK_EXTENSION")) {
            ret = ioctl(container, VFIO_CHECK_EXTENSION, (unsigned long)num("extension", 0));
        } else if (!strcmp(op, "VFIO_SET_IOMMU")) {
            ret = ioctl(container, VFIO_SET_IOMMU, (unsigned long)num("type", 0));
        } else if (!strcmp(op, "container_ioctl(raw)")) {
            ret = ioctl(container, _IO(VFIO_TYPE, VFIO_BASE + num("vfio_base_plus", 0)));
        } else if (!strcmp(op, "VFIO_IOMMU_ENABLE")) {
            ret = ioctl(container, VFIO_IOMMU_ENABLE);
        } else if (!strcmp(op, "VFIO_IOMMU_DISABLE")) {
            ret = ioctl(container, VFIO_IOMMU_DISABLE);
        } else if (!strcmp(op, "VFIO_IOMMU_SPAPR_TCE_GET_INFO")) {
            struct vfio_iommu_spapr_tce_info *s = (void *)argbuf;
            memset(argbuf, 0xa5, 4096);
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            ret = step_ioctl(container, VFIO_IOMMU_SPAPR_TCE_GET_INFO, s);
            err = errno;
            emit("argsz", s->argsz);
            emit("flags", s->flags);
            emit("dma32_window_start", s->dma32_window_start);
            emit("dma32_window_size", s->dma32_window_size);
            emit("ddw_pgsizes", s->ddw.pgsizes);
            emit("ddw_max_dynamic_windows_supported", s->ddw.max_dynamic_windows_supported);
            emit("ddw_levels", s->ddw.levels);
        } else if (!strcmp(op, "VFIO_GROUP_GET_STATUS")) {
            struct vfio_group_status *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            ret = step_ioctl(groups[num("slot", 0) & 7], VFIO_GROUP_GET_STATUS, s);
            err = errno;
            emit("flags", s->flags);
            emit("viable", !!(s->flags & VFIO_GROUP_FLAGS_VIABLE));
            emit("container_set", !!(s->flags & VFIO_GROUP_FLAGS_CONTAINER_SET));
        } else if (!strcmp(op, "VFIO_GROUP_SET_CONTAINER")) {
            ret = ioctl(groups[num("slot", 0) & 7], VFIO_GROUP_SET_CONTAINER, &container);
        } else if (!strcmp(op, "VFIO_GROUP_UNSET_CONTAINER")) {
            ret = ioctl(groups[num("slot", 0) & 7], VFIO_GROUP_UNSET_CONTAINER);
        } else if (!strcmp(op, "VFIO_GROUP_GET_DEVICE_FD")) {
            const char *name = get("name");
            if (!name || !strcmp(name, "bdf"))
                name = bdf;
            int fd = ioctl(groups[num("slot", 0) & 7], VFIO_GROUP_GET_DEVICE_FD, name);
            if (fd >= 0 && ndevices < 16)
                devices[ndevices++] = fd;
            ret = fd < 0 ? -1 : 0;
        } else if (!strcmp(op, "VFIO_IOMMU_MAP_DMA")) {
            struct vfio_iommu_type1_dma_map *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            s->vaddr = num("vaddr", 0);
            s->iova = num("iova", 0);
            s->size = num("size", 0);
            ret = ioctl(container, VFIO_IOMMU_MAP_DMA, s);
        } else if (!strcmp(op, "VFIO_IOMMU_GET_INFO")) {
            memset(argbuf, 0xa5, 4096);
            uint32_t hdr[2] = {(uint32_t)num("argsz", 0), (uint32_t)num("flags", 0)};
            memcpy(argbuf, hdr, sizeof hdr);
            ret = step_ioctl(container, VFIO_IOMMU_GET_INFO, argbuf);
            err = errno;
            emit_hex("info", argbuf, 4096);
        } else if (!strcmp(op, "VFIO_IOMMU_DIRTY_PAGES")) {
            pack_bitmap_call(argbuf);
            ret = step_ioctl(container, VFIO_IOMMU_DIRTY_PAGES, argbuf);
            err = errno;
            if (get("bitmap_size"))
                emit_bitmap();
        } else if (!strcmp(op, "VFIO_IOMMU_UNMAP_DMA") && get("bitmap_size")) {
            pack_bitmap_call(argbuf);
            ret = step_ioctl(container, VFIO_IOMMU_UNMAP_DMA, argbuf);
            err = errno;
            struct vfio_iommu_type1_dma_unmap *s = (void *)argbuf;
            emit("argsz", s->argsz);
            emit("flags", s->flags);
            emit("iova", s->iova);
            emit("size", s->size);
            emit_bitmap();
        } else if (!strcmp(op, "VFIO_IOMMU_UNMAP_DMA")) {
            struct vfio_iommu_type1_dma_unmap *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            s->iova = num("iova", 0);
            s->size = num("size", 0);
            ret = step_ioctl(container, VFIO_IOMMU_UNMAP_DMA, s);
            err = errno;
            emit("argsz", s->argsz);
            emit("flags", s->flags);
            emit("iova", s->iova);
            emit("size", s->size);
        } else if (!strcmp(op, "VFIO_IOMMU_SPAPR_REGISTER_MEMORY") ||
                   !strcmp(op, "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY")) {
            struct vfio_iommu_spapr_register_memory *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            s->vaddr = num("vaddr", 0);
            s->size = num("size", 0);
            ret = ioctl(container, !strcmp(op, "VFIO_IOMMU_SPAPR_REGISTER_MEMORY") ? VFIO_IOMMU_SPAPR_REGISTER_MEMORY
                                                 : VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, s);
        } else if (!strcmp(op, "VFIO_IOMMU_SPAPR_TCE_CREATE")) {
            struct vfio_iommu_spapr_tce_create *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            s->page_shift = (uint32_t)num("page_shift", 0);
            s->window_size = num("window_size", 0);
            s->levels = (uint32_t)num("levels", 0);
            s->start_addr = 0xdeadbeef;
            ret = step_ioctl(container, VFIO_IOMMU_SPAPR_TCE_CREATE, s);
            err = errno;
            emit("start_addr", s->start_addr);
        } else if (!strcmp(op, "VFIO_IOMMU_SPAPR_TCE_REMOVE")) {
            struct vfio_iommu_spapr_tce_remove *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            s->start_addr = num("start_addr", 0);
            ret = ioctl(container, VFIO_IOMMU_SPAPR_TCE_REMOVE, s);
        } else if (!strcmp(op, "VFIO_EEH_PE_OP")) {
            struct vfio_eeh_pe_op *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->flags = (uint32_t)num("flags", 0);
            s->op = (uint32_t)num("op", 0);
            ret = ioctl(container, VFIO_EEH_PE_OP, s);
        } else if (!strcmp(op, "VFIO_DEVICE_GET_INFO")) {
            struct vfio_device_info *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            ret = step_ioctl(devices[0], VFIO_DEVICE_GET_INFO, s);
            err = errno;
            emit("argsz", s->argsz);
            emit("flags", s->flags);
            emit("num_regions", s->num_regions);
            emit("num_irqs", s->num_irqs);
            emit("cap_offset", s->cap_offset);
        } else if (!strcmp(op, "VFIO_DEVICE_GET_REGION_INFO")) {
            struct vfio_region_info *s = (void *)argbuf;
            s->argsz = (uint32_t)num("argsz", 0);
            s->index = (uint32_t)num("index", 0);
            ret = step_ioctl(devices[0], VFIO_DEVICE_GET_REGION_INFO, s);
            err = errno;
            emit("argsz", s->argsz);
            emit("flags", s->flags);
            emit("cap_offset", s->cap_offset);
            emit("size", s->size);
            emit("offset", s->offset);
        } else if (!strcmp(op, "VFIO_DEVICE_GET_IRQ_INFO")) {
            struct vfio_irq_info *s = (void *)argbuf;
            s->argsz = sizeof *s;
            s->index = (uint32_t)num("index", 0);
            ret = step_ioctl(devices[0], VFIO_DEVICE_GET_IRQ_INFO, s);
            err = errno;
            emit("flags", s->flags);
            emit("count", s->count);
        } else if (!strcmp(op, "VFIO_DEVICE_RESET")) {
            ret = ioctl(devices[0], VFIO_DEVICE_RESET);
        } else {
            printf("%d UNKNOWN %s\n", seq, op);
            continue;
        }
        if (ret < 0 && !err)
            err = errno;
        if (ret >= 0)
            err = 0;
        long lck, pin;
        status(&lck, &pin);
        printf("%d %ld %d %ld %ld%s\n", seq, ret < 0 ? -1L : ret, err, lck, pin, out);
    }
    return 0;
}
