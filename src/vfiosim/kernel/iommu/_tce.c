/*
 * The one-entry operations of a TCE table's storage (kernel/iommu/tce.py's
 * TceStorage), in C: the usual small MAP_DMA and UNMAP_DMA change one entry
 * of the TCE table and, with sPAPR v2, one of its userspace view, and in
 * Python each such change cost half a microsecond, more than the system call
 * a program makes for it.
 *
 * SparseU64 is the base type of TceStorage: it holds the chunks (a dict of
 * chunk number -> NumPy array of CHUNK uint64 entries), their counts of
 * non-zero entries (a dict of chunk number -> int) and the generation, which
 * TceStorage's range operations (Python, NumPy) use as they always did.  What
 * is here is exactly tce.py's _ScalarOps, the Python of the same operations
 * (for a build without this module; tests/test_tce_native.py compares the
 * two): a chunk comes from the shared pool (POOL) or from _new_chunk(), an
 * emptied chunk goes back to the pool, zeroed, while it has room.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include "vfiosim_ndarray.h"

#define CHUNK_SHIFT 14 /* TceStorage.CHUNK_SHIFT */
#define CHUNK ((Py_ssize_t)1 << CHUNK_SHIFT)
#define POOL_MAX 64    /* TceStorage.POOL_MAX */

static PyObject *pool; /* emptied chunks, zeroed, shared by every table (TceStorage._pool) */

typedef struct {
    PyObject_HEAD
    PyObject *chunks;
    PyObject *used;
    unsigned long long generation;
    Py_ssize_t size;
} Sparse;

static int sparse_init(Sparse *self, PyObject *args, PyObject *kwds)
{
    Py_ssize_t size;
    static char *kwlist[] = {"size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &size))
        return -1;
    PyObject *chunks = PyDict_New(), *used = PyDict_New();
    if (!chunks || !used) {
        Py_XDECREF(chunks);
        Py_XDECREF(used);
        return -1;
    }
    Py_XSETREF(self->chunks, chunks);
    Py_XSETREF(self->used, used);
    self->generation = 0;
    self->size = size;
    return 0;
}

static void sparse_dealloc(Sparse *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_CLEAR(self->chunks);
    Py_CLEAR(self->used);
    tp->tp_free((PyObject *)self);
}

/*
 * A chunk's data without the buffer protocol, which costs 100 ns a call (as
 * much as the rest of an operation): vfiosim_ndarray.h's head of the array
 * object, where a chunk is what tce.py made, one-dimensional,
 * contiguous and writable, of CHUNK 8-byte entries.  Anything else -- another
 * NumPy, a view -- takes the buffer protocol.
 */
static PyTypeObject *ndarray_type; /* numpy.ndarray */

static uint64_t *plain_chunk(PyObject *chunk)
{
    const struct ndarray_head *a = (const struct ndarray_head *)chunk;
    if (Py_TYPE(chunk) != ndarray_type || a->nd != 1 || a->dimensions[0] != CHUNK ||
        a->strides[0] != (Py_ssize_t)sizeof(uint64_t) ||
        (a->flags & (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE)) != (NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE))
        return NULL;
    return (uint64_t *)a->data;
}

/* The entries of a chunk, writable (release `view` when view->obj is set);
 * NULL (an exception set) if it is not a chunk. */
static uint64_t *chunk_entries(PyObject *chunk, Py_buffer *view)
{
    view->obj = NULL;
    uint64_t *e = plain_chunk(chunk);
    if (e)
        return e;
    if (PyObject_GetBuffer(chunk, view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (view->len != CHUNK * (Py_ssize_t)sizeof(uint64_t)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "a TCE storage chunk is not CHUNK uint64 entries");
        return NULL;
    }
    return (uint64_t *)view->buf;
}

static int parse_index(PyObject *arg, Py_ssize_t *index)
{
    *index = PyLong_AsSsize_t(arg);
    if (*index == -1 && PyErr_Occurred())
        return -1;
    if (*index < 0) {
        PyErr_SetString(PyExc_IndexError, "negative TCE storage index");
        return -1;
    }
    return 0;
}

/* used[key] += delta; the count, or -1 with an exception set. */
static Py_ssize_t add_used(Sparse *self, PyObject *key, Py_ssize_t delta)
{
    PyObject *v = PyDict_GetItemWithError(self->used, key);
    if (!v) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "a chunk without its count");
        return -1;
    }
    Py_ssize_t n = PyLong_AsSsize_t(v);
    if (n == -1 && PyErr_Occurred())
        return -1;
    n += delta;
    PyObject *nv = PyLong_FromSsize_t(n);
    if (!nv || PyDict_SetItem(self->used, key, nv) < 0) {
        Py_XDECREF(nv);
        return -1;
    }
    Py_DECREF(nv);
    return n;
}

/* _free_chunk(c, zeroed=True): out of the table, into the pool while it has room. */
static int free_chunk(Sparse *self, PyObject *key, PyObject *chunk)
{
    Py_INCREF(chunk);
    int r = PyDict_DelItem(self->chunks, key) < 0 || PyDict_DelItem(self->used, key) < 0 ? -1 : 0;
    if (r == 0 && PyList_GET_SIZE(pool) < POOL_MAX)
        r = PyList_Append(pool, chunk);
    Py_DECREF(chunk);
    return r;
}

/* A zeroed chunk: the pool's last, or _new_chunk()'s. */
static PyObject *new_chunk(Sparse *self)
{
    Py_ssize_t n = PyList_GET_SIZE(pool);
    if (n) {
        PyObject *chunk = Py_NewRef(PyList_GET_ITEM(pool, n - 1));
        if (PyList_SetSlice(pool, n - 1, n, NULL) < 0) {
            Py_DECREF(chunk);
            return NULL;
        }
        return chunk;
    }
    return PyObject_CallMethod((PyObject *)self, "_new_chunk", NULL);
}

/* Entry `index` becomes `new`: the entry it held (a new reference), or NULL. */
static PyObject *exchange(Sparse *self, Py_ssize_t index, uint64_t new)
{
    self->generation++;
    Py_ssize_t off = index & (CHUNK - 1);
    PyObject *key = PyLong_FromSsize_t(index >> CHUNK_SHIFT);
    if (!key)
        return NULL;
    PyObject *result = NULL;
    Py_buffer view;
    PyObject *chunk = PyDict_GetItemWithError(self->chunks, key);     /* borrowed */
    if (!chunk) {
        if (PyErr_Occurred())
            goto out;
        if (new) {
            chunk = new_chunk(self);
            if (!chunk)
                goto out;
            int r = PyDict_SetItem(self->chunks, key, chunk);
            uint64_t *e = r < 0 ? NULL : chunk_entries(chunk, &view);
            Py_DECREF(chunk);
            if (!e)
                goto out;
            e[off] = new;
            if (view.obj)
                PyBuffer_Release(&view);
            PyObject *one = PyLong_FromLong(1);
            if (!one)
                goto out;
            r = PyDict_SetItem(self->used, key, one);
            Py_DECREF(one);
            if (r < 0)
                goto out;
        }
        result = PyLong_FromLong(0);
        goto out;
    }
    uint64_t *e = chunk_entries(chunk, &view);
    if (!e)
        goto out;
    uint64_t old = e[off];
    e[off] = new;
    if (view.obj)
        PyBuffer_Release(&view);
    if (!old) {
        if (new && add_used(self, key, 1) < 0)
            goto out;
    } else if (!new) {
        Py_ssize_t left = add_used(self, key, -1);
        if (left < 0 || (left == 0 && free_chunk(self, key, chunk) < 0))
            goto out;
    }
    result = PyLong_FromUnsignedLongLong(old);
out:
    Py_DECREF(key);
    return result;
}

/* xchg_one(index, new) -> old: xchg_range() of one entry. */
static PyObject *sparse_xchg_one(Sparse *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t index;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "xchg_one(index, new)");
        return NULL;
    }
    if (parse_index(args[0], &index) < 0)
        return NULL;
    uint64_t new = PyLong_AsUnsignedLongLong(args[1]);
    if (new == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    return exchange(self, index, new);
}

/* clear_one(index) -> old: clear_range() of one entry (0 when it held nothing;
 * an empty table, as clear_range() has it, is not even changed). */
static PyObject *sparse_clear_one(Sparse *self, PyObject *arg)
{
    Py_ssize_t index;
    if (parse_index(arg, &index) < 0)
        return NULL;
    if (PyDict_GET_SIZE(self->chunks) == 0)
        return PyLong_FromLong(0);
    return exchange(self, index, 0);
}

/* get(index) -> the entry. */
static PyObject *sparse_get(Sparse *self, PyObject *arg)
{
    Py_ssize_t index;
    if (parse_index(arg, &index) < 0)
        return NULL;
    PyObject *key = PyLong_FromSsize_t(index >> CHUNK_SHIFT);
    if (!key)
        return NULL;
    PyObject *chunk = PyDict_GetItemWithError(self->chunks, key);
    Py_DECREF(key);
    if (!chunk)
        return PyErr_Occurred() ? NULL : PyLong_FromLong(0);
    Py_buffer view;
    uint64_t *e = chunk_entries(chunk, &view);
    if (!e)
        return NULL;
    uint64_t v = e[index & (CHUNK - 1)];
    if (view.obj)
        PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

static PyMethodDef sparse_methods[] = {
    {"xchg_one", (PyCFunction)(void (*)(void))sparse_xchg_one, METH_FASTCALL,
     "xchg_one(index, new) -> old: xchg_range() of one entry"},
    {"clear_one", (PyCFunction)sparse_clear_one, METH_O,
     "clear_one(index) -> old: clear_range() of one entry (0 when it held nothing)"},
    {"get", (PyCFunction)sparse_get, METH_O, "get(index) -> the entry"},
    {NULL},
};

static PyMemberDef sparse_members[] = {
    {"_chunks", T_OBJECT_EX, offsetof(Sparse, chunks), 0, "chunk number -> NumPy array of CHUNK entries"},
    {"_used", T_OBJECT_EX, offsetof(Sparse, used), 0, "chunk number -> its non-zero entries"},
    {"generation", T_ULONGLONG, offsetof(Sparse, generation), 0, "bumped by every change"},
    {"size", T_PYSSIZET, offsetof(Sparse, size), 0, "entries"},
    {NULL},
};

static PyTypeObject SparseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "vfiosim.kernel.iommu._tce.SparseU64",
    .tp_doc = "A sparse array of 64-bit entries: TceStorage's chunks and its one-entry operations.",
    .tp_basicsize = sizeof(Sparse),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sparse_init,
    .tp_dealloc = (destructor)sparse_dealloc,
    .tp_methods = sparse_methods,
    .tp_members = sparse_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tce", "TceStorage's one-entry operations (kernel/iommu/tce.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__tce(void)
{
    if (PyType_Ready(&SparseType) < 0)
        return NULL;
    ndarray_type = vfiosim_ndarray_type();
    if (!ndarray_type)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    pool = PyList_New(0);
    if (!pool || PyModule_AddObjectRef(m, "POOL", pool) < 0 || PyModule_AddIntConstant(m, "POOL_MAX", POOL_MAX) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK_SHIFT", CHUNK_SHIFT) < 0 ||
        PyModule_AddObjectRef(m, "SparseU64", (PyObject *)&SparseType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
