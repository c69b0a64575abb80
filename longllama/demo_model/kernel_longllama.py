"""A small C kernel for LongLLaMA's exact top-k search on the CPU, compiled on first use.

The exact backend (`knn_longllama.ExactIndex`) keeps a running top-k per query while it scans memory. In torch that
selection costs many calls per tile and, for single queries, a matrix-vector product slower than a SIMD loop; faiss
does it inside its own C++ loop. This module compiles the C source below with the system's C compiler (`$CC`, else
`cc`) into a shared library cached under `~/.cache/longllama/kernels` (`$LONGLLAMA_CACHE` overrides the directory), and
calls it through `ctypes`: no torch headers, no build step at install, about a second to compile once per machine.
Built with `-fopenmp` on Linux it runs on torch's own OpenMP threads (see the source); a compiler without OpenMP gives a
one-thread build.

- `KernelTopK.push`: a tile of scores `[rows, n]` (computed by torch's matmul) offered to each row's running top-k.
- `KernelTopK.scan`: inner products and selection fused, for a few queries per key set (decoding): one pass over the
  keys, split among threads.

Each row keeps up to `2k + 16` candidates and a floor they must beat; when the buffer fills, a quickselect keeps the
best k and the floor becomes the k-th best score. The results are exact; ties with the k-th score keep the earliest
ids. Without a working compiler (or with `LONGLLAMA_TOPK_KERNEL=0`) `topk_kernel()` returns None, and the exact backend
uses its torch path, which returns the same results (up to float rounding of the scores), more slowly.
"""

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

ENV_SWITCH = "LONGLLAMA_TOPK_KERNEL"  # "0": never compile or use the kernel
ENV_CACHE = "LONGLLAMA_CACHE"
MAX_K = 4096  # larger k use the torch path: a row's candidates are copied onto the C stack (32 KiB) when selecting
COMPILE_TIMEOUT = 120

SOURCE = r"""
/* Running top-k by inner product for LongLLaMA's exact kNN search (compiled by kernel_longllama.py).

Each result row keeps a buffer of up to `cap` (score, id) candidates (cap >= 2k + 16), the number it holds and a
threshold: candidates must beat it to enter. When the buffer fills, a selection moves its k best to the front, the
rest are dropped and the threshold becomes the k-th best score. Appending is branch-free and the selection runs once
per about k appends, which costs less than the mispredicted branches of a heap insertion per candidate. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_THREADS 64
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
   becomes the k-th best. The scratch copy lives on the stack: cap is kept small (MAX_K in kernel_longllama.py). */
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

#ifdef __AVX2__
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
#else
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
#endif

static inline float dot(const float *q, const float *key, int64_t D) {
    float s = 0;
    for (int64_t d = 0; d < D; d++) s += q[d] * key[d];
    return s;
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

/* ---------------------------------------------------------------- a tile of scores, rows split among threads */

/* Offer the tile scores [rows, n] (row stride ld; column c has id first_id + c) to the running top-k of every row;
   valid [rows / rows_per_valid, n] (row stride valid_ld) marks the columns a group of rows may return, NULL: all. */
int longllama_topk_push(topk_state *s, int64_t rows, const float *scores, int64_t n, int64_t ld, int64_t first_id,
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
                       const float *all_keys, int64_t key_b, int64_t key_h, int64_t lo, int64_t hi, int64_t first_id,
                       const uint8_t *all_valid, int64_t valid_ld) {
    float x[16];
    for (int64_t set = 0; set < sets; set++) {
        const float *keys = all_keys + (set / H) * key_b + (set % H) * key_h;
        const uint8_t *valid = all_valid ? all_valid + (set / H) * valid_ld : NULL;
        for (int64_t c = lo; c < hi; c += 16) {
            int64_t m = hi - c < 16 ? hi - c : 16;
            if (c + PREFETCH + 16 <= hi) /* about 15% faster at 1M keys than leaving it to the hardware */
                for (int64_t i = 0; i < 16 * D; i += 16) __builtin_prefetch(keys + (c + PREFETCH) * D + i);
            for (int64_t r = 0; r < R; r++) {
                const float *qr = q + (set * R + r) * D;
                float floor = own->floor[set * R + r];
                unsigned mask = 0;
                if (m == 16 && D % 8 == 0) {
                    dot8(qr, keys + c * D, D, x);
                    dot8(qr, keys + (c + 8) * D, D, x + 8);
                    mask = above(x, floor);
                } else {
                    for (int64_t t = 0; t < m; t++) {
                        x[t] = dot(qr, keys + (c + t) * D, D);
                        mask |= (unsigned)(x[t] > floor) << t;
                    }
                }
                if (mask) offer(own, set * R + r, x, mask, first_id + c, valid ? valid + c : NULL);
            }
        }
    }
}

/* Offer the inner products of the queries q [sets, R, D] with their keys to the running top-k of their rows
   (row = set * R + r). Set (b, h) = (set / H, set % H) has its n keys, each D contiguous floats, at
   keys + b * key_b + h * key_h; key c has id first_id + c and is valid where valid[b * valid_ld + c] (all when NULL).
   With several threads each takes a range of keys into a private top-k, merged at the end: `scratch` has room for
   (threads - 1) states of the same rows (v, ids: (threads - 1) * rows * cap; count, floor: (threads - 1) * rows). */
int longllama_topk_scan(topk_state *s, const float *q, int64_t H, int64_t sets, int64_t R, int64_t D,
                        const float *keys, int64_t key_b, int64_t key_h, int64_t n, int64_t first_id,
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
        scan_range(&own, q, H, sets, R, D, keys, key_b, key_h, lo, hi, first_id, valid, valid_ld);
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
int longllama_topk_finish(topk_state *s, int64_t rows) {
    for (int64_t r = 0; r < rows; r++) {
        compact(s, r);
        for (int64_t c = s->count[r]; c < s->k; c++) s->v[r * s->cap + c] = -INFINITY, s->ids[r * s->cap + c] = -1;
    }
    return 0;
}
"""

_UNLOADED = object()
_kernel = _UNLOADED  # the bound library, None when unavailable; see `topk_kernel`
_load_lock = threading.Lock()
_buffers = threading.local()  # per thread: reusable buffers, see `reusable_buffer`


class _State(ctypes.Structure):
    _fields_ = [
        ("v", ctypes.c_void_p),
        ("ids", ctypes.c_void_p),
        ("count", ctypes.c_void_p),
        ("floor", ctypes.c_void_p),
        ("cap", ctypes.c_int64),
        ("k", ctypes.c_int64),
    ]


def topk_kernel():
    """The compiled kernel (a `ctypes` library), or None when it is switched off or cannot be built.

    The first call compiles it (or finds it in the cache); a failure warns once, naming the cause, and the exact search
    uses torch instead."""
    global _kernel
    if _kernel is _UNLOADED:
        with _load_lock:
            if _kernel is _UNLOADED:
                _kernel = _load()
    return _kernel


def _load():
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return None
    try:
        try:
            path = compile_kernel()
        except RuntimeError:  # a compiler without OpenMP (Apple clang): one thread
            path = compile_kernel(flags=arch_flags())
        return _bind(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"LongLLaMA's exact top-k kernel is not available ({error}). Exact kNN search (mem_index='exact') falls "
            f"back to its torch path (also exact, slower). Install a C compiler (gcc or clang, found as $CC or "
            f"cc) to enable it, or set {ENV_SWITCH}=0 to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _bind(lib):
    I64, P, state = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(_State)
    lib.longllama_topk_push.argtypes = [state, I64, P, I64, I64, I64, P, I64, I64, ctypes.c_int]
    lib.longllama_topk_scan.argtypes = [state, P, I64, I64, I64, I64, P, I64, I64, I64, I64, P, I64, state, ctypes.c_int]
    lib.longllama_topk_finish.argtypes = [state, I64]
    return lib


def arch_flags() -> list[str]:
    """Compiler flags for this CPU's vector units: AVX2 and FMA where torch detects AVX2 (x86-64), else none."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["-mavx2", "-mfma"] if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []


def find_compiler() -> str | None:
    """The C compiler the kernel is built with: `$CC`, else the first of `cc`, `gcc`, `clang` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def candidates(k: int) -> int:
    """Candidates a query keeps in the kernel for a top-k of `k` (`cap` in the C source): 2k + 16."""
    return 2 * k + 16


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$LONGLLAMA_CACHE/kernels`, else `$XDG_CACHE_HOME/longllama/kernels` or
    `~/.cache/longllama/kernels`."""
    root = os.environ.get(ENV_CACHE) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longllama"
    return Path(root) / "kernels"


def compile_kernel(directory: Path | None = None, flags: list[str] | None = None) -> Path:
    """The path of the shared library built from `SOURCE` with `flags` (default `arch_flags()` and `-fopenmp`),
    compiled into `directory` (default `cache_dir()`, or a temporary directory if that is not writable) unless already
    there. Raises RuntimeError when there is no compiler or it fails.

    The name holds a hash of the source, compiler and flags. A new library is written under a temporary name and renamed
    into place, so concurrent processes never load a half-written file."""
    if sys.platform == "win32":
        raise RuntimeError("the kernel is built on Linux and macOS only")
    compiler = find_compiler()
    if not compiler:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    flags = [*arch_flags(), "-fopenmp"] if flags is None else flags
    command = [compiler, "-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread", *flags]
    digest = hashlib.sha256("\0".join([SOURCE, *command, platform.machine()]).encode()).hexdigest()[:16]
    for candidate in [directory or cache_dir(), Path(tempfile.gettempdir()) / f"longllama-kernels-{os.getuid()}"]:
        library = Path(candidate) / f"topk-{digest}.so"
        if library.exists():
            return library
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=library.parent, prefix=".topk-", suffix=".so")
        except OSError:
            continue  # not writable: try the next directory
        os.close(handle)
        source = Path(partial).with_suffix(".c")
        try:
            source.write_text(SOURCE)
            result = subprocess.run(
                [*command, "-o", partial, str(source)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT
            )
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
            os.replace(partial, library)
            return library
        finally:
            source.unlink(missing_ok=True)
            Path(partial).unlink(missing_ok=True)
    raise RuntimeError(f"no writable directory to compile into (tried {cache_dir()} and the temporary directory)")


def reusable_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer of `numel` elements kept between searches, one per thread, name, dtype and device (grown when too
    small): on the CPU a fresh one costs page faults on every search. The caller uses it before asking again."""
    buffers = _buffers.__dict__.setdefault("by_key", {})
    key = (name, dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class KernelTopK:
    """The running top-k (score, id) of `rows` result rows, kept by the C kernel `lib` (see `topk_kernel`).

    Offer scores with `push` (a tile of scores) or `scan` (queries and keys: the products are computed here), in any
    order of ids; `result` returns the best k per row. Uses `torch.get_num_threads()` threads. CPU float32 only."""

    def __init__(self, lib, rows: int, k: int):
        if not 1 <= k <= MAX_K:
            raise ValueError(f"the top-k kernel takes 1 <= k <= {MAX_K}, got {k}")
        self.lib, self.rows, self.k, self.cap = lib, rows, k, candidates(k)
        self.threads = torch.get_num_threads()
        self.v = reusable_buffer("v", rows * self.cap, torch.float32).view(rows, self.cap)
        self.ids = reusable_buffer("ids", rows * self.cap, torch.int64).view(rows, self.cap)
        self.count = reusable_buffer("count", rows, torch.int64).zero_()
        self.floor = reusable_buffer("floor", rows, torch.float32).fill_(-math.inf)
        self.state = self._state(self.v, self.ids, self.count, self.floor)
        self.scratch = None  # per-thread states of `scan`, made on first use

    def _state(self, v, ids, count, floor) -> _State:
        return _State(v.data_ptr(), ids.data_ptr(), count.data_ptr(), floor.data_ptr(), self.cap, self.k)

    def push(self, scores: torch.Tensor, first_id: int, valid: torch.Tensor | None = None, rows_per_valid: int = 1):
        """Offer `scores` `[rows, n]` (column c has id `first_id + c`); `valid` `[rows // rows_per_valid, n]` bool
        marks the columns each group of `rows_per_valid` rows may return (None: all)."""
        rows, n = scores.shape
        if rows != self.rows or scores.dtype != torch.float32 or scores.stride(1) != 1:
            raise ValueError(f"expected float32 scores [{self.rows}, n] with unit column stride, got {scores.dtype} "
                             f"{list(scores.shape)}")
        valid = self._valid(valid, rows // rows_per_valid, n)
        self.lib.longllama_topk_push(
            ctypes.byref(self.state), rows, scores.data_ptr(), n, scores.stride(0), first_id,
            None if valid is None else valid.data_ptr(), 0 if valid is None else valid.stride(0), rows_per_valid,
            self.threads,
        )

    def scan(self, queries: torch.Tensor, keys: torch.Tensor, first_id: int, valid: torch.Tensor | None = None):
        """Offer the inner products of `queries` `[B, H, R, D]` with `keys` `[B, H, n, D]` (key c has id
        `first_id + c`; rows are `(b, h, r)` flattened); `valid` `[B, n]` bool, None for all."""
        B, H, R, D = queries.shape
        n = keys.shape[2]
        if B * H * R != self.rows or keys.shape[:2] != queries.shape[:2] or keys.shape[3] != D:
            raise ValueError(f"queries {list(queries.shape)} and keys {list(keys.shape)} do not match {self.rows} rows")
        queries = queries.contiguous()
        if keys.stride(3) != 1 or keys.stride(2) != D:
            keys = keys.contiguous()
        if queries.dtype != torch.float32 or keys.dtype != torch.float32:
            raise ValueError(f"expected float32 queries and keys, got {queries.dtype} and {keys.dtype}")
        if self.scratch is None and self.threads > 1:
            copies = self.threads - 1
            self.scratch_tensors = [
                reusable_buffer("scratch_v", copies * self.rows * self.cap, torch.float32),
                reusable_buffer("scratch_ids", copies * self.rows * self.cap, torch.int64),
                reusable_buffer("scratch_count", copies * self.rows, torch.int64),
                reusable_buffer("scratch_floor", copies * self.rows, torch.float32),
            ]
            self.scratch = self._state(*self.scratch_tensors)
        valid = self._valid(valid, B, n)
        self.lib.longllama_topk_scan(
            ctypes.byref(self.state), queries.data_ptr(), H, B * H, R, D, keys.data_ptr(), keys.stride(0),
            keys.stride(1), n, first_id, None if valid is None else valid.data_ptr(),
            0 if valid is None else valid.stride(0), None if self.scratch is None else ctypes.byref(self.scratch),
            self.threads,
        )

    @staticmethod
    def _valid(valid: torch.Tensor | None, rows: int, n: int) -> torch.Tensor | None:
        """`valid` checked, with unit column stride (the caller keeps the returned tensor alive during the call)."""
        if valid is None:
            return None
        if valid.shape != (rows, n) or valid.dtype != torch.bool:
            raise ValueError(f"expected valid bool [{rows}, {n}], got {valid.dtype} {list(valid.shape)}")
        return valid if valid.stride(1) == 1 else valid.contiguous()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `[rows, k]` float32 sorted descending (ties: earliest id first) and ids int64, padded with
        (-inf, -1) where fewer than k were offered."""
        self.lib.longllama_topk_finish(ctypes.byref(self.state), self.rows)
        scores, order = self.v[:, : self.k].sort(dim=1, descending=True, stable=True)
        return scores, self.ids[:, : self.k].gather(1, order)


__all__ = ["KernelTopK", "MAX_K", "candidates", "compile_kernel", "find_compiler", "reusable_buffer", "topk_kernel"]
