/* What LongLLaMA's compiled kernels share (topk.h, attend.h): SIMD helpers, memory dtypes, threads.

Built twice by setup.py: with -mavx2 -mfma (`__AVX2__`, SIMD 1) and portable (SIMD 0). */

#ifndef LONGLLAMA_COMMON_H
#define LONGLLAMA_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define MAX_D 512 /* head_dim bound: blocks of 16 keys are widened into stack buffers of 16 * D floats */

/* How memory stores keys and values (longllama/kernels.py, DTYPES). */
enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

static inline size_t dtype_size(int dtype) { return dtype == DTYPE_BF16 ? 2 : 4; }

#ifdef __AVX2__
#define SIMD 1
#include <immintrin.h>
/* Bit t set where x[t] > floor, t < 16. */
static inline unsigned above(const float *x, float floor) {
    __m256 f = _mm256_set1_ps(floor);
    return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), f, _CMP_GT_OQ)) |
           (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8), f, _CMP_GT_OQ)) << 8;
}
/* The inner products of q with the 8 keys key + i * D, i < 8, for D a multiple of 8, stored to out[8]. */
static inline void dot8(const float *q, const float *key, int64_t D, float *out) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m256 x = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(x, _mm256_loadu_ps(key + i * D + d), a[i]);
    }
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
/* 8 stored elements from element i of `data` as floats (bf16 -> float32 is exact: the high half of the float). */
static inline __m256 load8(const void *data, int dtype, int64_t i) {
    if (dtype == DTYPE_F32) return _mm256_loadu_ps((const float *)data + i);
    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)data + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
/* dot8 on stored keys: the 8 keys from element `at` of `keys` (dtype), read without a float copy. */
static inline void dot8_stored(const float *q, const void *keys, int dtype, int64_t at, int64_t D, float *out) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m256 x = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(x, load8(keys, dtype, at + i * D + d), a[i]);
    }
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
/* acc[d0 + 8j ..] += sum over t < n of p[t] * (value t from element `at`)[d0 + 8j ..], j < W: the W * 8 sums in
   registers, each p[t] broadcast once. */
static inline void weighted_sum_group(float *acc, const float *p, int n, const void *values, int dtype, int64_t at,
                                      int64_t D, int64_t d0, const int W) {
    __m256 a[8];
    for (int j = 0; j < W; j++) a[j] = _mm256_setzero_ps();
    for (int t = 0; t < n; t++) {
        __m256 pt = _mm256_set1_ps(p[t]);
        for (int j = 0; j < W; j++) a[j] = _mm256_fmadd_ps(pt, load8(values, dtype, at + t * D + d0 + 8 * j), a[j]);
    }
    for (int j = 0; j < W; j++)
        _mm256_storeu_ps(acc + d0 + 8 * j, _mm256_add_ps(_mm256_loadu_ps(acc + d0 + 8 * j), a[j]));
}
/* acc[0..D) += sum over t < n of p[t] * (value t from element `at` of `values`), D a multiple of 8; the block's sum is
   formed on its own, then added (as the block's softmax terms are). */
static inline void weighted_sum_stored(float *acc, const float *p, int n, const void *values, int dtype, int64_t at,
                                       int64_t D) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) weighted_sum_group(acc, p, n, values, dtype, at, D, d0, 8);
    if (d0 < D) weighted_sum_group(acc, p, n, values, dtype, at, D, d0, (int)((D - d0) / 8));
}
/* bf16 -> float32 is exact: the 16 bits are the high half of the float. */
static inline void widen_bf16(const uint16_t *src, int64_t count, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    }
    for (; i < count; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, 4);
    }
}
/* exp(x[t] - shift) for t < 16, to about 1 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
   polynomial for exp(r), times 2^n), and exactly 0 where x[t] is -inf. */
static inline void exp16(const float *x, float shift, float *out) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), c1 = _mm256_set1_ps(0.693359375f),
                 c2 = _mm256_set1_ps(-2.12194440e-4f), lowest = _mm256_set1_ps(-87.3f), s = _mm256_set1_ps(shift),
                 minus_inf = _mm256_set1_ps(-INFINITY), one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < 16; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), keep = _mm256_cmp_ps(v, minus_inf, _CMP_NEQ_OQ);
        __m256 a = _mm256_max_ps(_mm256_sub_ps(v, s), lowest); /* below: the result is 0 in float32 anyway */
        __m256 n = _mm256_round_ps(_mm256_mul_ps(a, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fnmadd_ps(n, c2, _mm256_fnmadd_ps(n, c1, a));
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), one);
        __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), keep));
    }
}
#else
#define SIMD 0
static inline void exp16(const float *x, float shift, float *out) {
    for (int t = 0; t < 16; t++) out[t] = expf(x[t] - shift);
}
static inline unsigned above(const float *x, float floor) {
    unsigned mask = 0;
    for (int t = 0; t < 16; t++) mask |= (unsigned)(x[t] > floor) << t;
    return mask;
}
static inline void dot8(const float *q, const float *key, int64_t D, float *out) {
    for (int i = 0; i < 8; i++) {
        float s = 0;
        for (int64_t d = 0; d < D; d++) s += q[d] * key[i * D + d];
        out[i] = s;
    }
}
static inline void widen_bf16(const uint16_t *src, int64_t count, float *dst) {
    for (int64_t i = 0; i < count; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(dst + i, &u, 4);
    }
}
#endif

static inline float dot(const float *q, const float *key, int64_t D) {
    float s = 0;
    for (int64_t d = 0; d < D; d++) s += q[d] * key[d];
    return s;
}

/* Elements [offset, offset + count) of stored keys or values as floats: the stored floats themselves, or bf16 widened
   into buf (room for count floats). */
static inline const float *as_floats(const void *data, int dtype, int64_t offset, int64_t count, float *buf) {
    if (dtype == DTYPE_F32) return (const float *)data + offset;
    widen_bf16((const uint16_t *)data + offset, count, buf);
    return buf;
}

/* Ask the caches for the `count` elements at data + offset (dtype), ahead of use. */
static inline void prefetch(const void *data, int dtype, int64_t offset, int64_t count) {
    const char *p = (const char *)data + offset * (int64_t)dtype_size(dtype);
    for (int64_t i = 0; i < count * (int64_t)dtype_size(dtype); i += 64) __builtin_prefetch(p + i);
}

/* Threads: OpenMP. Built with -fopenmp on Linux, the library shares torch's libgomp (already loaded, same soname), so
   its parallel regions run on torch's own worker threads instead of competing with them; built without OpenMP, it
   runs on one thread. */
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

static int clamp_threads(int threads, int64_t work, int64_t grain) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > work / grain) threads = (int)(work / grain);
    return threads < 1 ? 1 : threads;
}

#endif /* LONGLLAMA_COMMON_H */
