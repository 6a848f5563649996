/*
 * The usual pin of a real process's memory (transport/host.py's
 * HostMM.pin_fast() of one page), in C: every small MAP_DMA under
 * `vfiosim run` pins one page, and in Python the look-up's checks and the
 * page's bookkeeping cost about a microsecond, more than the PROCMAP_QUERY
 * system call they follow.
 *
 * pin_page() is exactly host.py's _pin_page_py(), the Python of the same
 * steps (for a build without this module; tests/test_pin_native.py compares
 * the two): one PROCMAP_QUERY for the mapping holding the page, its checks in
 * HostMM.pin_fast()'s order, then the page's RAM charge and its pin in the
 * window's HostMemoryObject.  What is not that usual case -- the query
 * failing, a shared mapping (whose pages are bound to the daemon's file
 * mappings), arrays that are not the window's own -- it declines (False)
 * having changed nothing, and HostMM.pin_fast() takes its Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

struct procmap_query {               /* <linux/fs.h>, Linux 6.11 */
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define VMA_READABLE 0x01
#define VMA_WRITABLE 0x02
#define VMA_SHARED 0x08

#define WINDOW_SHIFT 30 /* host.py's WINDOW_SHIFT */

/* NumPy's array object begins as its public C API declares it
 * (PyArrayObject_fields, the same since NumPy 1.7): reading the data pointer
 * there costs nothing, where the buffer protocol costs 100 ns a call. */
struct ndarray_head {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    PyObject *descr;
    int flags;
};
#define NPY_ARRAY_C_CONTIGUOUS 0x0001
#define NPY_ARRAY_WRITEABLE 0x0400

static PyTypeObject *ndarray_type; /* numpy.ndarray */
static PyObject *s_unmapped, *s_pincount, *s_pins, *s_vaddr, *s_page_shift, *s_phys_base, *s_ram_pages,
    *s_used_pages, *s_slots, *s_ram;

/* The entries of a window's one-dimensional, contiguous, writable array of
 * `itemsize`-byte items, when `index` is one of them; else NULL. */
static char *entries(PyObject *arr, Py_ssize_t itemsize, Py_ssize_t index)
{
    const struct ndarray_head *a = (const struct ndarray_head *)arr;
    if (Py_TYPE(arr) != ndarray_type || a->nd != 1 || index < 0 || index >= a->dimensions[0] ||
        a->strides[0] != itemsize ||
        (a->flags & (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE)) != (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE))
        return NULL;
    return a->data;
}

/* An int attribute; -1 with an exception set on failure (none of these is negative). */
static long long int_attr(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v)
        return -1;
    long long r = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return r;
}

static int set_int_attr(PyObject *obj, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (!v)
        return -1;
    int r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

/* pin_page(maps_fd, addr, write, longterm, obj, ram) -> (hpa, repinned, 0) |
 * None | False: HostMM.pin_fast(addr, 1, write, longterm) where ``obj`` is
 * the registered window holding ``addr`` and ``ram`` the machine's memory.
 * None: not pinnable this way (pin_fast() answers None); False: declined,
 * nothing changed. */
static PyObject *pin_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "pin_page(maps_fd, addr, write, longterm, obj, ram)");
        return NULL;
    }
    long maps_fd = PyLong_AsLong(args[0]);
    if (maps_fd == -1 && PyErr_Occurred())
        return NULL;
    uint64_t addr = PyLong_AsUnsignedLongLong(args[1]);
    if (addr == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    int write = PyObject_IsTrue(args[2]), longterm = PyObject_IsTrue(args[3]);
    if (write < 0 || longterm < 0)
        return NULL;
    PyObject *obj = args[4], *ram = args[5];

    struct procmap_query q;
    memset(&q, 0, sizeof q);
    q.size = sizeof q;
    q.query_addr = addr;
    if (ioctl((int)maps_fd, PROCMAP_QUERY, &q) < 0) {
        if (errno == ENOENT)
            Py_RETURN_NONE;
        Py_RETURN_FALSE;                    /* vma_at() answers (ENOTTY: no PROCMAP_QUERY; the image gone) */
    }
    uint64_t flags = q.vma_flags;
    if (!(write ? flags & VMA_WRITABLE : flags & (VMA_READABLE | VMA_WRITABLE)))
        Py_RETURN_NONE;
    long long shift = int_attr(obj, s_page_shift);
    if (shift < 0)
        return NULL;
    uint64_t end = addr + ((uint64_t)1 << shift);
    if (end < addr || end > q.vma_end || (end - 1) >> WINDOW_SHIFT != addr >> WINDOW_SHIFT)
        Py_RETURN_NONE;
    if (!write && !longterm && !(flags & VMA_WRITABLE))
        Py_RETURN_NONE;
    if (flags & VMA_SHARED)
        Py_RETURN_FALSE;                    /* its page is bound to a file mapping: Python's */
    long long vaddr = int_attr(obj, s_vaddr);
    if (vaddr < 0)
        return NULL;
    Py_ssize_t p0 = (Py_ssize_t)((addr - (uint64_t)vaddr) >> shift);

    PyObject *charged_arr = PyObject_GetAttr(obj, s_unmapped), *count_arr = NULL;
    if (!charged_arr)
        return NULL;
    count_arr = PyObject_GetAttr(obj, s_pincount);
    if (!count_arr) {
        Py_DECREF(charged_arr);
        return NULL;
    }
    PyObject *result = NULL;
    char *charged = entries(charged_arr, 1, p0);
    int32_t *counts = (int32_t *)entries(count_arr, 4, p0);
    if (!charged || !counts) {
        result = Py_NewRef(Py_False);
        goto out;
    }
    if (!charged[p0]) {                     /* take_ram(): the page's first pin charges the machine's RAM */
        PyObject *limit = PyObject_GetAttr(ram, s_ram_pages);
        if (!limit)
            goto out;
        long long used = int_attr(ram, s_used_pages);
        if (used == -1 && PyErr_Occurred()) {
            Py_DECREF(limit);
            goto out;
        }
        if (limit != Py_None) {
            long long total = PyLong_AsLongLong(limit);
            if (total == -1 && PyErr_Occurred()) {
                Py_DECREF(limit);
                goto out;
            }
            if (used >= total) {
                Py_DECREF(limit);
                result = Py_NewRef(Py_None);
                goto out;
            }
        }
        Py_DECREF(limit);
        if (set_int_attr(ram, s_used_pages, used + 1) < 0)
            goto out;
        charged[p0] = 1;
    }
    int32_t count = counts[p0];              /* add_pins() */
    long long pins = int_attr(obj, s_pins);
    if (pins == -1 && PyErr_Occurred())
        goto out;
    if (set_int_attr(obj, s_pins, pins + 1) < 0)
        goto out;
    counts[p0] = count + 1;
    long long base = int_attr(obj, s_phys_base);
    if (base == -1 && PyErr_Occurred())
        goto out;
    result = Py_BuildValue("(Kii)", (unsigned long long)base + ((unsigned long long)p0 << shift), count > 0, 0);
out:
    Py_DECREF(charged_arr);
    Py_DECREF(count_arr);
    return result;
}

/* unpin_page(obj, p0) -> bool: mm.py's unpin_page_of(obj, p0) for a window
 * (HostMemoryObject.unpin_one): one pin less on page p0 and, the page's last
 * pin gone, its RAM charge with it (HostMemoryObject.unpinned(p0, 1), which
 * runs itself where pages are bound to file mappings); False, nothing
 * changed, when no pin held it. */
static PyObject *unpin_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "unpin_page(obj, p0)");
        return NULL;
    }
    PyObject *obj = args[0];
    Py_ssize_t p0 = PyLong_AsSsize_t(args[1]);
    if (p0 == -1 && PyErr_Occurred())
        return NULL;
    PyObject *count_arr = PyObject_GetAttr(obj, s_pincount), *charged_arr = NULL, *slots = NULL, *ram = NULL;
    PyObject *result = NULL;
    if (!count_arr)
        return NULL;
    int32_t *counts = (int32_t *)entries(count_arr, 4, p0);
    if (!counts) {
        PyErr_SetString(PyExc_IndexError, "unpin_page: page outside the window's pin counts");
        goto out;
    }
    int32_t count = counts[p0];
    if (count <= 0) {
        result = Py_NewRef(Py_False);
        goto out;
    }
    long long pins = int_attr(obj, s_pins);
    if (pins == -1 && PyErr_Occurred())
        goto out;
    if (!(charged_arr = PyObject_GetAttr(obj, s_unmapped)) || !(slots = PyObject_GetAttr(obj, s_slots)))
        goto out;
    char *charged = charged_arr == Py_None ? NULL : entries(charged_arr, 1, p0);
    if (charged_arr != Py_None && !charged) {
        PyErr_SetString(PyExc_IndexError, "unpin_page: page outside the window's charges");
        goto out;
    }
    if (set_int_attr(obj, s_pins, pins - 1) < 0)
        goto out;
    counts[p0] = count - 1;
    if (!charged) {                                 /* no unpinned() hook to run */
        result = Py_NewRef(Py_True);
        goto out;
    }
    if (slots != Py_None) {                         /* pages bound to file mappings: the Python's */
        PyObject *res = PyObject_CallMethod(obj, "unpinned", "nn", p0, (Py_ssize_t)1);
        if (!res)
            goto out;
        Py_DECREF(res);
        result = Py_NewRef(Py_True);
        goto out;
    }
    if (!(ram = PyObject_GetAttr(obj, s_ram)))
        goto out;
    if (ram != Py_None && charged[p0] && count == 1) {     /* the last pin: the page's RAM goes back */
        long long used = int_attr(ram, s_used_pages);
        if (used == -1 && PyErr_Occurred())
            goto out;
        if (set_int_attr(ram, s_used_pages, used - 1) < 0)
            goto out;
        charged[p0] = 0;
    }
    result = Py_NewRef(Py_True);
out:
    Py_DECREF(count_arr);
    Py_XDECREF(charged_arr);
    Py_XDECREF(slots);
    Py_XDECREF(ram);
    return result;
}

static PyMethodDef methods[] = {
    {"pin_page", (PyCFunction)(void (*)(void))pin_page, METH_FASTCALL,
     "pin_page(maps_fd, addr, write, longterm, obj, ram) -> (hpa, repinned, 0) | None | False"},
    {"unpin_page", (PyCFunction)(void (*)(void))unpin_page, METH_FASTCALL,
     "unpin_page(obj, p0) -> bool: one pin less on a window's page (False: it had none)"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pin", "HostMM.pin_fast() of one page, and its unpin (transport/host.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__pin(void)
{
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np)
        return NULL;
    ndarray_type = (PyTypeObject *)PyObject_GetAttrString(np, "ndarray");     /* kept for good */
    Py_DECREF(np);
    if (!ndarray_type)
        return NULL;
    if (!(s_unmapped = PyUnicode_InternFromString("unmapped")) ||
        !(s_pincount = PyUnicode_InternFromString("pincount")) || !(s_pins = PyUnicode_InternFromString("pins")) ||
        !(s_vaddr = PyUnicode_InternFromString("vaddr")) ||
        !(s_page_shift = PyUnicode_InternFromString("page_shift")) ||
        !(s_phys_base = PyUnicode_InternFromString("phys_base")) ||
        !(s_ram_pages = PyUnicode_InternFromString("ram_pages")) ||
        !(s_used_pages = PyUnicode_InternFromString("used_pages")) ||
        !(s_slots = PyUnicode_InternFromString("slots")) || !(s_ram = PyUnicode_InternFromString("ram")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "WINDOW_SHIFT", WINDOW_SHIFT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
