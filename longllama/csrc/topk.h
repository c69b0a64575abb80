/* Running top-k by inner product for LongLLaMA's exact kNN search (built with the package: setup.py, longllama/search.py).

Each result row keeps a buffer of up to `cap` (score, id) candidates (cap >= 2k + 16), the number it holds and a
threshold: candidates must beat it to enter. When the buffer fills, a selection moves its k best to the front, the
rest are dropped and the threshold becomes the k-th best score. Appending is branch-free and the selection runs once
per about k appends, which costs less than the mispredicted branches of a heap insertion per candidate. */

#ifndef LONGLLAMA_TOPK_H
#define LONGLLAMA_TOPK_H

#include "common.h"

#define PREFETCH 64 /* keys ahead that the fused scan asks the caches for */

typedef struct {
    float *v;       /* [rows, cap] candidate scores */
    int64_t *ids;   /* [rows, cap] candidate ids */
    int64_t *count; /* [rows] candidates held */
    float *floor;   /* [rows] a candidate must score above this */
    int64_t cap, k;
} topk_state;

/* The k-th largest of a[0..m), 1 <= k <= m; reorders a. A quickselect with branch-free partitions. */
static float kth_largest(float *a, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m, target = k - 1;
    while (hi - lo > 16) {
        float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
        float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y)); /* median of three */
        int64_t above = lo;
        for (int64_t i = lo; i < hi; i++) { /* [lo, above) > pivot */
            float t = a[i];
            int gt = t > pivot;
            a[i] = a[above];
            a[above] = t;
            above += gt;
        }
        if (target < above) {
            hi = above;
            continue;
        }
        int64_t equal = above;
        for (int64_t i = above; i < hi; i++) { /* [above, equal) == pivot */
            float t = a[i];
            int eq = t == pivot;
            a[i] = a[equal];
            a[equal] = t;
            equal += eq;
        }
        if (target < equal) return pivot;
        lo = equal;
    }
    for (int64_t i = lo + 1; i < hi; i++) { /* insertion sort, descending */
        float t = a[i];
        int64_t j = i;
        for (; j > lo && a[j - 1] < t; j--) a[j] = a[j - 1];
        a[j] = t;
    }
    return a[target];
}

/* Keep the k best candidates of row r (those above the k-th best score, then the first ties with it); the floor
   becomes the k-th best. The scratch copy lives on the stack: cap is kept small (MAX_K in longllama/search.py). */
static void compact(topk_state *s, int64_t r) {
    float *v = s->v + r * s->cap, scratch[s->cap];
    int64_t *ids = s->ids + r * s->cap, n = s->count[r], above = 0, kept = 0;
    if (n <= s->k) return;
    for (int64_t i = 0; i < n; i++) scratch[i] = v[i];
    float kth = kth_largest(scratch, n, s->k);
    for (int64_t i = 0; i < n; i++) above += v[i] > kth;
    int64_t ties = s->k - above;        /* how many candidates equal to kth to keep */
    for (int64_t i = 0; i < n; i++) { /* branch-free and in place: kept <= i */
        float t = v[i];
        int64_t id = ids[i];
        int tie = (t == kth) & (ties > 0);
        ties -= tie;
        v[kept] = t, ids[kept] = id;
        kept += (t > kth) | tie;
    }
    s->count[r] = s->k;
    s->floor[r] = kth;
}

/* Add the scores x[t] for the bits t of mask (ids first_id + t), valid[t] or all valid, to the candidates of row r. */
static inline void offer(topk_state *s, int64_t r, const float *x, unsigned mask, int64_t first_id,
                         const uint8_t *valid) {
    float *v = s->v + r * s->cap;
    int64_t *ids = s->ids + r * s->cap;
    int64_t n = s->count[r];
    for (; mask; mask &= mask - 1) {
        int t = __builtin_ctz(mask);
        v[n] = x[t];
        ids[n] = first_id + t;
        n += valid ? valid[t] != 0 : 1;
    }
    s->count[r] = n;
    if (n > s->cap - 16) compact(s, r);
}

/* ---------------------------------------------------------------- a tile of scores, rows split among threads */

/* Offer the tile scores [rows, n] (row stride ld; column c has id first_id + c) to the running top-k of every row;
   valid [rows / rows_per_valid, n] (row stride valid_ld) marks the columns a group of rows may return, NULL: all. */
static int topk_push(topk_state *s, int64_t rows, const float *scores, int64_t n, int64_t ld, int64_t first_id,
                     const uint8_t *valid, int64_t valid_ld, int64_t rows_per_valid, int threads) {
    threads = clamp_threads(threads, rows * n, 1 << 15);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *x = scores + r * ld;
        const uint8_t *ok = valid ? valid + (r / rows_per_valid) * valid_ld : NULL;
        int64_t c = 0;
        for (; c + 16 <= n; c += 16) {
            unsigned mask = above(x + c, s->floor[r]);
            if (mask) offer(s, r, x + c, mask, first_id + c, ok ? ok + c : NULL);
        }
        for (; c < n; c++)
            if (x[c] > s->floor[r]) offer(s, r, x + c, 1, first_id + c, ok ? ok + c : NULL);
    }
    return 0;
}

/* ---------------------------------------------------------------- inner products and top-k fused, keys split among threads */

/* Offer the inner products of queries q [sets * R, D] with keys [lo, hi) of every set to state `own`. */
static void scan_range(topk_state *own, const float *q, int64_t H, int64_t sets, int64_t R, int64_t D,
                       const void *all_keys, int dtype, int64_t key_b, int64_t key_h, int64_t lo, int64_t hi,
                       int64_t first_id, const uint8_t *all_valid, int64_t valid_ld) {
    float x[16], widened[16 * D];
    for (int64_t set = 0; set < sets; set++) {
        const int64_t base = (set / H) * key_b + (set % H) * key_h;
        const uint8_t *valid = all_valid ? all_valid + (set / H) * valid_ld : NULL;
        for (int64_t c = lo; c < hi; c += 16) {
            int64_t m = hi - c < 16 ? hi - c : 16;
            if (c + PREFETCH + 16 <= hi) /* about 15% faster at 1M keys than leaving it to the hardware */
                prefetch(all_keys, dtype, base + (c + PREFETCH) * D, 16 * D);
            const float *keys = as_floats(all_keys, dtype, base + c * D, m * D, widened); /* keys c .. c + m */
            for (int64_t r = 0; r < R; r++) {
                const float *qr = q + (set * R + r) * D;
                float floor = own->floor[set * R + r];
                unsigned mask = 0;
                if (m == 16 && D % 8 == 0) {
                    dot8(qr, keys, D, x);
                    dot8(qr, keys + 8 * D, D, x + 8);
                    mask = above(x, floor);
                } else {
                    for (int64_t t = 0; t < m; t++) {
                        x[t] = dot(qr, keys + t * D, D);
                        mask |= (unsigned)(x[t] > floor) << t;
                    }
                }
                if (mask) offer(own, set * R + r, x, mask, first_id + c, valid ? valid + c : NULL);
            }
        }
    }
}

/* Offer the inner products of the queries q [sets, R, D] with their keys to the running top-k of their rows
   (row = set * R + r). Set (b, h) = (set / H, set % H) has its n keys, each D contiguous elements of `dtype`, at
   element keys + b * key_b + h * key_h; key c has id first_id + c and is valid where valid[b * valid_ld + c] (all when NULL).
   With several threads each takes a range of keys into a private top-k, merged at the end: `scratch` has room for
   (threads - 1) states of the same rows (v, ids: (threads - 1) * rows * cap; count, floor: (threads - 1) * rows). */
static int topk_scan(topk_state *s, const float *q, int64_t H, int64_t sets, int64_t R, int64_t D,
                     const void *keys, int dtype, int64_t key_b, int64_t key_h, int64_t n, int64_t first_id,
                     const uint8_t *valid, int64_t valid_ld, topk_state *scratch, int threads) {
    const int64_t rows = sets * R;
    int team = 1;
    threads = scratch ? clamp_threads(threads, n * rows * D, 1 << 17) : 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), size = omp_get_num_threads();
        topk_state own = *s;
        if (t > 0) {
            own.v = scratch->v + (t - 1) * rows * s->cap;
            own.ids = scratch->ids + (t - 1) * rows * s->cap;
            own.count = scratch->count + (t - 1) * rows;
            own.floor = scratch->floor + (t - 1) * rows;
            for (int64_t r = 0; r < rows; r++) own.count[r] = 0, own.floor[r] = s->floor[r];
        } else {
            team = size;
        }
        int64_t lo = n * t / size / 16 * 16, hi = t == size - 1 ? n : n * (t + 1) / size / 16 * 16;
        scan_range(&own, q, H, sets, R, D, keys, dtype, key_b, key_h, lo, hi, first_id, valid, valid_ld);
    }
    for (int t = 1; t < team; t++) /* merge the private candidates, one at a time: their ids are not consecutive */
        for (int64_t r = 0; r < rows; r++) {
            const int64_t at = ((t - 1) * rows + r) * s->cap;
            for (int64_t c = 0; c < scratch->count[(t - 1) * rows + r]; c++)
                if (scratch->v[at + c] > s->floor[r]) offer(s, r, scratch->v + at + c, 1, scratch->ids[at + c], NULL);
        }
    return 0;
}

/* Leave the k best candidates of every row in slots [0, k) (unsorted), (-inf, -1) in unused slots. */
static int topk_finish(topk_state *s, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) {
        compact(s, r);
        for (int64_t c = s->count[r]; c < s->k; c++) s->v[r * s->cap + c] = -INFINITY, s->ids[r * s->cap + c] = -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- Python bindings (module.h)

Every function takes tensors as their `data_ptr()` (0 for NULL) and a state as the tuple (v, ids, count, floor, cap, k)
of pointers and sizes; longllama/search.py (`KernelTopK`) keeps the tensors alive and checks shapes, dtypes and
strides. The GIL is released while the kernel runs. */

#define STATE_FORMAT "(KKKKLL)"
#define STATE_ARGS(s) &s##_p[0], &s##_p[1], &s##_p[2], &s##_p[3], &s.cap, &s.k
#define STATE_FROM(s)                                                                                                  \
    s.v = (float *)(uintptr_t)s##_p[0], s.ids = (int64_t *)(uintptr_t)s##_p[1],                                        \
    s.count = (int64_t *)(uintptr_t)s##_p[2], s.floor = (float *)(uintptr_t)s##_p[3]

static PyObject *py_push(PyObject *self, PyObject *args) {
    topk_state s;
    unsigned long long s_p[4], scores, valid;
    long long rows, n, ld, first_id, valid_ld, rows_per_valid;
    int threads;
    if (!PyArg_ParseTuple(args, STATE_FORMAT "LKLLLKLLi", STATE_ARGS(s), &rows, &scores, &n, &ld, &first_id, &valid,
                          &valid_ld, &rows_per_valid, &threads))
        return NULL;
    STATE_FROM(s);
    Py_BEGIN_ALLOW_THREADS;
    topk_push(&s, rows, (const float *)(uintptr_t)scores, n, ld, first_id, (const uint8_t *)(uintptr_t)valid, valid_ld,
              rows_per_valid, threads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_scan(PyObject *self, PyObject *args) {
    topk_state s, scratch;
    unsigned long long s_p[4], scratch_p[4], q, keys, valid;
    long long H, sets, R, D, key_b, key_h, n, first_id, valid_ld;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, STATE_FORMAT "KLLLLKiLLLLKL" STATE_FORMAT "i", STATE_ARGS(s), &q, &H, &sets, &R, &D,
                          &keys, &dtype, &key_b, &key_h, &n, &first_id, &valid, &valid_ld, STATE_ARGS(scratch),
                          &threads))
        return NULL;
    if (D < 1 || D > MAX_D || (dtype != DTYPE_F32 && dtype != DTYPE_BF16)) {
        PyErr_SetString(PyExc_ValueError, "scan: bad head_dim or dtype");
        return NULL;
    }
    STATE_FROM(s);
    STATE_FROM(scratch);
    Py_BEGIN_ALLOW_THREADS;
    topk_scan(&s, (const float *)(uintptr_t)q, H, sets, R, D, (const void *)(uintptr_t)keys, dtype, key_b, key_h, n,
              first_id, (const uint8_t *)(uintptr_t)valid, valid_ld, scratch.v ? &scratch : NULL, threads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_finish(PyObject *self, PyObject *args) {
    topk_state s;
    unsigned long long s_p[4];
    long long rows;
    if (!PyArg_ParseTuple(args, STATE_FORMAT "L", STATE_ARGS(s), &rows)) return NULL;
    STATE_FROM(s);
    Py_BEGIN_ALLOW_THREADS;
    topk_finish(&s, rows);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

#endif /* LONGLLAMA_TOPK_H */
