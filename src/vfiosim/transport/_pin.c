/*
 * The usual pin and unpin of a real process's memory (transport/host.py's
 * HostMM.pin_fast() and its windows' unpin), in C: every small MAP_DMA under
 * `vfiosim run` pins a few pages, and in Python the look-up's checks and the
 * pages' bookkeeping cost about a microsecond for one page (more than the
 * PROCMAP_QUERY system call they follow) and ten for two or more (NumPy's
 * slices).
 *
 * pin_run() is exactly host.py's _pin_fast_run_py() and unpin_run() mm.py's
 * unpin_run_of() for a window (the Python of the same steps, for a build
 * without this module; tests/test_pin_native.py compares them): one
 * PROCMAP_QUERY for the mapping holding the pages, its checks in
 * HostMM.pin_fast()'s order, then the pages' RAM charge (all of them or
 * none) and their pins in the window's HostMemoryObject; one pin less on
 * each page and, the last pin gone, its RAM charge with it.  Pages of a
 * shared mapping are then bound to the daemon's mapping of their file, as
 * pin_fast() binds them (SharedFiles.bind(): Python), and unbound as their
 * last pin goes (HostMemoryObject.unpinned(): Python).  What is not that
 * usual case -- the query failing, arrays that are not the window's own --
 * pin_run() declines (False) having changed nothing, and HostMM.pin_fast()
 * takes its Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include "vfiosim_ndarray.h"
#include "vfiosim_procmap.h"


#define WINDOW_SHIFT 30 /* host.py's WINDOW_SHIFT */

static PyTypeObject *ndarray_type; /* numpy.ndarray */
static PyObject *s_unmapped, *s_pincount, *s_pins, *s_vaddr, *s_page_shift, *s_phys_base, *s_ram_pages,
    *s_used_pages, *s_slots, *s_ram, *s_files;

/* The entries of a window's one-dimensional, contiguous, writable array of
 * `itemsize`-byte items, when [index, index+n) are some of them; else NULL.
 * (Its item type is the window's: HostMemoryObject makes its pin counts
 * int32 and its charges bool, never anything else of the same size.) */
static char *entries(PyObject *arr, Py_ssize_t itemsize, Py_ssize_t index, Py_ssize_t n)
{
    const struct ndarray_head *a = (const struct ndarray_head *)arr;
    if (Py_TYPE(arr) != ndarray_type || a->nd != 1 || index < 0 || n < 1 || index > a->dimensions[0] - n ||
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

/* pin_run(maps_fd, addr, npages, write, longterm, obj, ram) -> (hpa, repinned, 0) | None | False:
 * HostMM.pin_fast(addr, npages, write, longterm) where ``obj`` is the registered
 * window holding ``addr`` and ``ram`` the machine's memory.  None: not
 * pinnable this way (pin_fast() answers None); False: declined, nothing changed. */
static PyObject *pin_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "pin_run(maps_fd, addr, npages, write, longterm, obj, ram)");
        return NULL;
    }
    long maps_fd = PyLong_AsLong(args[0]);
    if (maps_fd == -1 && PyErr_Occurred())
        return NULL;
    uint64_t addr = PyLong_AsUnsignedLongLong(args[1]);
    if (addr == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t npages = PyLong_AsSsize_t(args[2]);
    if (npages == -1 && PyErr_Occurred())
        return NULL;
    int write = PyObject_IsTrue(args[3]), longterm = PyObject_IsTrue(args[4]);
    if (write < 0 || longterm < 0)
        return NULL;
    PyObject *obj = args[5], *ram = args[6];
    if (npages < 1 || npages > (1 << (WINDOW_SHIFT - 12)))     /* more than a window of 4 KiB pages: Python's */
        Py_RETURN_FALSE;

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
    if (!(write ? flags & PROCMAP_QUERY_VMA_WRITABLE : flags & (PROCMAP_QUERY_VMA_READABLE | PROCMAP_QUERY_VMA_WRITABLE)))
        Py_RETURN_NONE;
    long long shift = int_attr(obj, s_page_shift);
    if (shift < 0)
        return NULL;
    uint64_t end = addr + ((uint64_t)npages << shift);
    if (end < addr || end > q.vma_end || (end - 1) >> WINDOW_SHIFT != addr >> WINDOW_SHIFT)
        Py_RETURN_NONE;
    if (!write && !longterm && !(flags & PROCMAP_QUERY_VMA_WRITABLE))
        Py_RETURN_NONE;
    PyObject *files = NULL;
    if (flags & PROCMAP_QUERY_VMA_SHARED) {               /* its pages are bound to their file once pinned */
        if (!(files = PyObject_GetAttr(obj, s_files)))
            return NULL;
        if (files == Py_None) {
            Py_DECREF(files);
            Py_RETURN_FALSE;
        }
    }
    long long vaddr = int_attr(obj, s_vaddr);
    if (vaddr < 0) {
        Py_XDECREF(files);
        return NULL;
    }
    Py_ssize_t p0 = (Py_ssize_t)((addr - (uint64_t)vaddr) >> shift);

    PyObject *charged_arr = PyObject_GetAttr(obj, s_unmapped), *count_arr = NULL, *result = NULL;
    if (!charged_arr || !(count_arr = PyObject_GetAttr(obj, s_pincount)))
        goto out;
    char *charged = entries(charged_arr, 1, p0, npages);
    int32_t *counts = (int32_t *)entries(count_arr, 4, p0, npages);
    if (!charged || !counts) {
        result = Py_NewRef(Py_False);
        goto out;
    }
    Py_ssize_t missing = 0, repinned = 0;
    for (Py_ssize_t k = p0; k < p0 + npages; k++)
        missing += !charged[k];
    if (missing && ram != Py_None) {        /* take_ram(): a page's first pin charges the machine's RAM */
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
            if (missing > (total > used ? total - used : 0)) {     /* all of them or none */
                Py_DECREF(limit);
                result = Py_NewRef(Py_None);
                goto out;
            }
        }
        Py_DECREF(limit);
        if (set_int_attr(ram, s_used_pages, used + missing) < 0)
            goto out;
    }
    long long pins = int_attr(obj, s_pins);             /* add_pins() */
    if (pins == -1 && PyErr_Occurred())
        goto out;
    if (set_int_attr(obj, s_pins, pins + npages) < 0)
        goto out;
    for (Py_ssize_t k = p0; k < p0 + npages; k++) {
        charged[k] = 1;
        repinned += counts[k] != 0;
        counts[k]++;
    }
    if (files) {                            /* pin_fast()'s files.bind() */
        PyObject *res = PyObject_CallMethod(files, "bind", "Onn", obj, p0, npages);
        if (!res)
            goto out;
        Py_DECREF(res);
    }
    long long base = int_attr(obj, s_phys_base);
    if (base == -1 && PyErr_Occurred())
        goto out;
    result = Py_BuildValue("(Kni)", (unsigned long long)base + ((unsigned long long)p0 << shift), repinned, 0);
out:
    Py_XDECREF(charged_arr);
    Py_XDECREF(count_arr);
    Py_XDECREF(files);
    return result;
}

/* unpin_run(obj, p0, n) -> bool: mm.py's unpin_run_of(obj, p0, n) for a window
 * (HostMemoryObject.unpin_run): one pin less on each of pages [p0, p0+n) and,
 * a page's last pin gone, its RAM charge with it (HostMemoryObject.unpinned(),
 * which runs itself where pages are bound to file mappings); False, nothing
 * changed, when one of them had no pin. */
static PyObject *unpin_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "unpin_run(obj, p0, n)");
        return NULL;
    }
    PyObject *obj = args[0];
    Py_ssize_t p0 = PyLong_AsSsize_t(args[1]), n = PyLong_AsSsize_t(args[2]);
    if ((p0 == -1 || n == -1) && PyErr_Occurred())
        return NULL;
    PyObject *count_arr = PyObject_GetAttr(obj, s_pincount), *charged_arr = NULL, *slots = NULL, *ram = NULL;
    PyObject *result = NULL;
    if (!count_arr)
        return NULL;
    int32_t *counts = (int32_t *)entries(count_arr, 4, p0, n);
    if (!counts) {
        PyErr_SetString(PyExc_IndexError, "unpin_run: pages outside the window's pin counts");
        goto out;
    }
    for (Py_ssize_t k = p0; k < p0 + n; k++) {
        if (counts[k] <= 0) {
            result = Py_NewRef(Py_False);
            goto out;
        }
    }
    long long pins = int_attr(obj, s_pins);
    if (pins == -1 && PyErr_Occurred())
        goto out;
    if (!(charged_arr = PyObject_GetAttr(obj, s_unmapped)) || !(slots = PyObject_GetAttr(obj, s_slots)))
        goto out;
    char *charged = charged_arr == Py_None ? NULL : entries(charged_arr, 1, p0, n);
    if (charged_arr != Py_None && !charged) {
        PyErr_SetString(PyExc_IndexError, "unpin_run: pages outside the window's charges");
        goto out;
    }
    if (set_int_attr(obj, s_pins, pins - n) < 0)
        goto out;
    for (Py_ssize_t k = p0; k < p0 + n; k++)
        counts[k]--;
    if (charged && slots != Py_None) {      /* pages bound to file mappings: the Python's */
        PyObject *res = PyObject_CallMethod(obj, "unpinned", "nn", p0, n);
        if (!res)
            goto out;
        Py_DECREF(res);
    } else if (charged) {
        if (!(ram = PyObject_GetAttr(obj, s_ram)))
            goto out;
        if (ram != Py_None) {               /* a page's last pin gone: its RAM goes back */
            long long freed = 0;
            for (Py_ssize_t k = p0; k < p0 + n; k++) {
                if (charged[k] && !counts[k]) {
                    charged[k] = 0;
                    freed++;
                }
            }
            if (freed) {
                long long used = int_attr(ram, s_used_pages);
                if (used == -1 && PyErr_Occurred())
                    goto out;
                if (set_int_attr(ram, s_used_pages, used - freed) < 0)
                    goto out;
            }
        }
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
    {"pin_run", (PyCFunction)(void (*)(void))pin_run, METH_FASTCALL,
     "pin_run(maps_fd, addr, npages, write, longterm, obj, ram) -> (hpa, repinned, 0) | None | False"},
    {"unpin_run", (PyCFunction)(void (*)(void))unpin_run, METH_FASTCALL,
     "unpin_run(obj, p0, n) -> bool: one pin less on each of a window's pages (False: one had none)"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pin", "HostMM.pin_fast() and its windows' unpin (transport/host.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__pin(void)
{
    ndarray_type = vfiosim_ndarray_type();
    if (!ndarray_type)
        return NULL;
    if (!(s_unmapped = PyUnicode_InternFromString("unmapped")) ||
        !(s_pincount = PyUnicode_InternFromString("pincount")) || !(s_pins = PyUnicode_InternFromString("pins")) ||
        !(s_vaddr = PyUnicode_InternFromString("vaddr")) ||
        !(s_page_shift = PyUnicode_InternFromString("page_shift")) ||
        !(s_phys_base = PyUnicode_InternFromString("phys_base")) ||
        !(s_ram_pages = PyUnicode_InternFromString("ram_pages")) ||
        !(s_used_pages = PyUnicode_InternFromString("used_pages")) ||
        !(s_slots = PyUnicode_InternFromString("slots")) || !(s_ram = PyUnicode_InternFromString("ram")) ||
        !(s_files = PyUnicode_InternFromString("files")))
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
