/* Memory attention for decoding (longllama/attention.py): the few queries of a decode step against every entry of a
memory layer, in one pass that reads the memory once, in place, in its stored dtype (float32, or bf16 widened 16
entries at a time on the stack), with float32 accumulation: scores, a running softmax and the weighted sum of values.

The softmax state of every result row (set s = b * H + h of batch row b and KV head h, query r: row s * R + r) is
carried across calls (one per memory layer and step, over all of its chunks):
    m[row]       the largest score so far (-inf: nothing seen yet)
    l[row]       the sum of exp(score - m) over the entries seen
    acc[row, D]  the sum of exp(score - m) * value
The attention output over memory is then acc / l and its log-sum-exp m + log(l), which longllama/attention.py merges
with the local context exactly as the blockwise kernel merges its blocks. Entries that are not valid (padding) are
skipped. */

#ifndef LONGLLAMA_ATTEND_H
#define LONGLLAMA_ATTEND_H

#include "common.h"

#define AHEAD 32 /* entries ahead that the scan asks the caches for */

/* One row's softmax step over a block of 16 scores x (-inf: skipped; entries n.. are -inf): rescale the state if
   the maximum grew, set p[t] = exp(x[t] - m) and add their sum to l. Returns 0 when nothing in x is valid. */
static inline int softmax_step(float *m, float *l, float *acc, const float *x, int n, int64_t D, float *p) {
    float best = -INFINITY, sum = 0;
    for (int t = 0; t < n; t++) best = x[t] > best ? x[t] : best;
    if (best == -INFINITY) return 0;
    if (best > *m) { /* a new maximum: rescale what was summed so far (by 0 the first time, m = -inf) */
        float scale = expf(*m - best);
        *l *= scale;
        for (int64_t d = 0; d < D; d++) acc[d] *= scale;
        *m = best;
    }
    exp16(x, *m, p);
    for (int t = 0; t < n; t++) sum += p[t];
    *l += sum; /* a block's terms are summed on their own, then added: rounding grows with blocks, not entries */
    return 1;
}

/* Fold two states of one row: (m, l, acc) += (m2, l2, acc2). */
static inline void merge(float *m, float *l, float *acc, float m2, float l2, const float *acc2, int64_t D) {
    if (m2 == -INFINITY) return;
    float top = m2 > *m ? m2 : *m, a = expf(*m - top), b = expf(m2 - top);
    *l = *l * a + l2 * b;
    for (int64_t d = 0; d < D; d++) acc[d] = acc[d] * a + acc2[d] * b;
    *m = top;
}

static inline int any_valid(const uint8_t *valid, int n) {
    for (int t = 0; t < n; t++)
        if (valid[t]) return 1;
    return 0;
}

/* Entries [lo, hi) of one set for its R queries q [R, D]: keys and values start at element key_at / value_at. Full
   blocks of 16 entries with D a multiple of 8 are read as stored by the SIMD build; other blocks are widened first. */
static void attend_range(float *m, float *l, float *acc, const float *q, int64_t R, int64_t D, const void *keys,
                         const void *values, int dtype, int64_t key_at, int64_t value_at, int64_t lo, int64_t hi,
                         const uint8_t *valid) {
    float kbuf[16 * D], vbuf[16 * D], x[R * 16], p[16], part[D];
    for (int64_t c = lo; c < hi; c += 16) {
        int n = hi - c < 16 ? (int)(hi - c) : 16;
        if (valid && !any_valid(valid + c, n)) continue;
        if (c + AHEAD + 16 <= hi) {
            prefetch(keys, dtype, key_at + (c + AHEAD) * D, 16 * D);
            prefetch(values, dtype, value_at + (c + AHEAD) * D, 16 * D);
        }
        const int full = n == 16 && D % 8 == 0, in_place = SIMD && full;
        const float *k = in_place ? NULL : as_floats(keys, dtype, key_at + c * D, n * D, kbuf), *v = NULL;
        for (int64_t r = 0; r < R; r++) { /* scores x[r, t] */
            float *xr = x + r * 16;
#if SIMD
            if (in_place) {
                dot8_stored(q + r * D, keys, dtype, key_at + c * D, D, xr);
                dot8_stored(q + r * D, keys, dtype, key_at + (c + 8) * D, D, xr + 8);
            } else
#endif
            if (full) {
                dot8(q + r * D, k, D, xr);
                dot8(q + r * D, k + 8 * D, D, xr + 8);
            } else {
                for (int t = 0; t < 16; t++) xr[t] = t < n ? dot(q + r * D, k + t * D, D) : -INFINITY;
            }
            if (valid)
                for (int t = 0; t < n; t++) xr[t] = valid[c + t] ? xr[t] : -INFINITY;
        }
        for (int64_t r = 0; r < R; r++) { /* the running softmax and the weighted sum of values */
            float *accr = acc + r * D;
            if (!softmax_step(m + r, l + r, accr, x + r * 16, n, D, p)) continue;
#if SIMD
            if (in_place) {
                weighted_sum_stored(accr, p, n, values, dtype, value_at + c * D, D);
                continue;
            }
#endif
            memset(part, 0, sizeof(float) * D);
            if (!v) v = as_floats(values, dtype, value_at + c * D, n * D, vbuf);
            for (int t = 0; t < n; t++)
                for (int64_t d = 0; d < D; d++) part[d] += p[t] * v[t * D + d];
            for (int64_t d = 0; d < D; d++) accr[d] += part[d];
        }
    }
}

/* One memory chunk as the caller describes it: a row of CHUNK_FIELDS int64 (longllama/attention.py, `_chunk_table`).
   Pointers are addresses; strides count elements. Session row b reads memory row rows[b] (b when rows is 0). */
enum { C_KEYS, C_VALUES, C_VALID, C_ROWS, C_N, C_KEY_B, C_KEY_H, C_VALUE_B, C_VALUE_H, C_VALID_LD, CHUNK_FIELDS };

/* Fold the entries of `chunks` (C rows of CHUNK_FIELDS) into the state (m [sets * R], l [sets * R],
   acc [sets * R, D]) of the queries q [sets * R, D] (already multiplied by the softmax scale), set s = b * H + h.
   Entry c of a chunk: its key at element keys + mb * key_b + h * key_h + c * D (D contiguous elements of `dtype`),
   its value likewise, valid where valid[mb * valid_ld + c] (all when 0). The entries of all chunks, in order, are
   cut into `splits` ranges per set; with more than one, range p of set s folds into its own state in `scratch`
   (sets * splits blocks of R * (D + 2) floats), merged into the state in order at the end. */
static int attend(float *m, float *l, float *acc, const float *q, int64_t B, int64_t H, int64_t R, int64_t D,
                  int dtype, const int64_t *chunks, int64_t C, float *scratch, int64_t splits, int threads) {
    const int64_t sets = B * H, tasks = B * H * splits, own_floats = R * (D + 2);
    int64_t total = 0;
    for (int64_t c = 0; c < C; c++) total += chunks[c * CHUNK_FIELDS + C_N];
    threads = clamp_threads(threads, total * sets * R * D, 1 << 16);
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t set = task / splits, part = task % splits, b = set / H, h = set % H;
        int64_t lo = total * part / splits, hi = total * (part + 1) / splits, first = 0;
        float *tm = m + set * R, *tl = l + set * R, *tacc = acc + set * R * D;
        if (splits > 1) {
            tm = scratch + task * own_floats, tl = tm + R, tacc = tl + R;
            for (int64_t r = 0; r < R; r++) tm[r] = -INFINITY, tl[r] = 0;
            memset(tacc, 0, sizeof(float) * R * D);
        }
        for (int64_t c = 0; c < C && first < hi; c++) { /* entries [first, first + n) of the whole memory */
            const int64_t *chunk = chunks + c * CHUNK_FIELDS, n = chunk[C_N];
            int64_t from = lo > first ? lo - first : 0, to = hi - first < n ? hi - first : n;
            if (from < to) {
                const int64_t *rows = (const int64_t *)(uintptr_t)chunk[C_ROWS];
                const uint8_t *valid = (const uint8_t *)(uintptr_t)chunk[C_VALID];
                int64_t mb = rows ? rows[b] : b;
                attend_range(tm, tl, tacc, q + set * R * D, R, D, (const void *)(uintptr_t)chunk[C_KEYS],
                             (const void *)(uintptr_t)chunk[C_VALUES], dtype, mb * chunk[C_KEY_B] + h * chunk[C_KEY_H],
                             mb * chunk[C_VALUE_B] + h * chunk[C_VALUE_H], from, to,
                             valid ? valid + mb * chunk[C_VALID_LD] : NULL);
            }
            first += n;
        }
    }
    if (splits > 1)
        for (int64_t task = 0; task < tasks; task++) {
            const float *own = scratch + task * own_floats;
            int64_t set = task / splits;
            for (int64_t r = 0; r < R; r++)
                merge(m + set * R + r, l + set * R + r, acc + (set * R + r) * D, own[r], own[R + r],
                      own + 2 * R + r * D, D);
        }
    return 0;
}

/* ---------------------------------------------------------------- Python binding (module.h)

attend(m, l, acc, q, B, H, R, D, dtype, chunks, C, scratch, splits, threads): tensors as their `data_ptr()` (0 for
NULL), `chunks` an int64 [C, CHUNK_FIELDS] table; longllama/attention.py keeps every tensor alive and checks shapes,
dtypes, strides and rows. The GIL is released while the kernel runs. */

static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long m, l, acc, q, chunks, scratch;
    long long B, H, R, D, C, splits;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLLiKLKLi", &m, &l, &acc, &q, &B, &H, &R, &D, &dtype, &chunks, &C, &scratch,
                          &splits, &threads))
        return NULL;
    if (D < 1 || D > MAX_D || R < 1 || splits < 1 || (dtype != DTYPE_F32 && dtype != DTYPE_BF16)) {
        PyErr_SetString(PyExc_ValueError, "attend: bad head_dim, query count, splits or dtype");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    attend((float *)(uintptr_t)m, (float *)(uintptr_t)l, (float *)(uintptr_t)acc, (const float *)(uintptr_t)q, B, H,
           R, D, dtype, (const int64_t *)(uintptr_t)chunks, C, (float *)(uintptr_t)scratch, splits, threads);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

#endif /* LONGLLAMA_ATTEND_H */
