/*
 * vfiosim_ndarray.h -- the head of NumPy's array object, for the optional C
 * extensions that read a known array's data pointer on every call
 * (kernel/iommu/_tce.c, transport/_pin.c): it begins as NumPy's public C API
 * declares it (PyArrayObject_fields in ndarraytypes.h, the same since NumPy
 * 1.7), so reading the pointer there costs nothing, where the buffer protocol
 * costs 100 ns a call.  Each user checks the array's type and flags (below)
 * before it trusts the pointer.  Needs <Python.h> first.
 */
#ifndef VFIOSIM_NDARRAY_H
#define VFIOSIM_NDARRAY_H

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

/* numpy.ndarray, the type an object must have before its head is read (a new
 * reference, kept for good by the caller; NULL with an exception set). */
static inline PyTypeObject *vfiosim_ndarray_type(void)
{
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np)
        return NULL;
    PyTypeObject *t = (PyTypeObject *)PyObject_GetAttrString(np, "ndarray");
    Py_DECREF(np);
    return t;
}

#endif
