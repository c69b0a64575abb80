/* The Python module of LongLLaMA's compiled kernels: the running top-k of exact kNN search (topk.h) and memory
attention for decoding (attend.h). kernels.c and kernels_avx2.c build it under MODULE_NAME / MODULE_INIT; the package
loads one of them (longllama/kernels.py). */

#include "topk.h"
#include "attend.h"

static PyMethodDef methods[] = {
    {"push", py_push, METH_VARARGS, "push(state, rows, scores, n, ld, first_id, valid, valid_ld, rows_per_valid, threads)"},
    {"scan", py_scan, METH_VARARGS,
     "scan(state, q, H, sets, R, D, keys, dtype, key_b, key_h, n, first_id, valid, valid_ld, scratch, threads)"},
    {"finish", py_finish, METH_VARARGS, "finish(state, rows)"},
    {"attend", py_attend, METH_VARARGS,
     "attend(m, l, acc, q, B, H, R, D, dtype, chunks, C, scratch, splits, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, MODULE_NAME, "LongLLaMA's compiled kernels", -1, methods};

PyMODINIT_FUNC MODULE_INIT(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "simd", SIMD) < 0) Py_CLEAR(m);
    return m;
}
