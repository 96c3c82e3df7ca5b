/*
 * bnlab CPU kernels for batch normalization on an (A, C, B) contiguous view.
 *
 * Plain C (no PyTorch headers), so a stock C compiler builds it in a few seconds (see
 * BNLAB_UNIT below); bnlab/_kernels/__init__.py compiles it once per machine, caches the
 * shared library and calls it through ctypes. Threads come from OpenMP; loaded
 * after PyTorch, the library binds to the libgomp that PyTorch already uses
 * (same soname), so both share one thread pool.
 *
 * Memory traffic (what the kernels are designed around; x, y, dy, dx of equal size):
 *   training forward : read x twice, write y once (statistics, then normalize)
 *   backward         : read (x, dy) twice, write dx once
 *   inference        : read x once, write y once
 * Statistics take one pass: per feature, sums of (x - K) and (x - K)^2 with K the
 * feature's first value (so the terms stay small), float32 within cache-sized
 * chunks, float64 across chunks and threads. This is the "shifted data" algorithm
 * (Chan, Golub & LeVeque, 1983, "Algorithms for computing the sample variance:
 * analysis and recommendations"); when K is an outlier of its feature the sums
 * cancel badly, which is detected and answered by an exact two-pass recomputation.
 * Work is split in fixed contiguous ranges and merged in thread order, so the
 * result depends only on the thread count, never on scheduling.
 *
 * The body is instantiated three times by bn_cpu_impl.h: float32, float64 and
 * bfloat16 storage (bfloat16 is computed in float32, like PyTorch does).
 *
 * Built in parts: the loader compiles this file once per storage type at the same time
 * (-DBNLAB_UNIT=1: float32 and the entry points that do not depend on the type, 2: float64,
 * 3: bfloat16) and links the three objects: on this 2-core machine 0.60-0.67 of the time of one
 * compilation (5.3-5.8 s against 8.3-8.9 s with gcc 12, on a day it ran slow; almost all of it
 * in GCC's optimizer). Without BNLAB_UNIT one compilation holds everything.
 * Less for the optimizer to do: the per-feature code is compiled without the vectorizer
 * (PER_FEATURE below), and each row loop is inlined once where it was inlined twice (for whole
 * groups of rows and for the rows left over). Build, as the loader runs it, five builds each,
 * alternating: 2.6-3.0 s against 3.9-5.5 s before (0.54-0.68), with the kernels' speed unchanged
 * (paired rounds over float32/float64/bfloat16, rows and planes, 15 shapes, both orders).
 * The fixed-width row loops (FIXED_WIDTHS) and the float32 vector-register rows (VEC_F32) added
 * about a second: 3.3-3.9 s against 2.5-2.9 s without them (the loader's build, five builds each,
 * two alternating runs); the float32 unit is now the longest (2.7 s alone, against 1.4 s for
 * float64 and 2.1 s for bfloat16), and parsing immintrin.h takes about a second of each unit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BNLAB_STREAM 1
#endif
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

typedef int64_t i64;

#ifndef BNLAB_UNIT
#define BNLAB_UNIT 0
#endif
#define IN_UNIT(n) (BNLAB_UNIT == 0 || BNLAB_UNIT == (n))

/* NOJAM: a function GCC compiles without its unroll-and-jam pass (-floop-unroll-and-jam, on at
 * -O3), which, in a loop over rows around a loop over features, takes two rows per inner
 * iteration. For the backward's sums over rows of 128 or more features, kept in per-feature
 * arrays in L1, that interleaving of two rows was the slow part: measured (AMD EPYC, gcc 12,
 * float32, sums of dy and dy*(x - mean) over (60000, 128) in memory order, one thread) 4.0-4.5 ms
 * with it, 1.9 ms without. Narrower rows keep it (their inner loop is short, and without it the
 * backward of (32768, 64) and (43264, 64) took 1.00-1.14x as long); so does the forward's
 * register-blocked sums (1.10-1.17x as long without it). Other compilers do not have the pass. */
/* PER_FEATURE: code that runs once per feature per call (merging the threads' sums, the
 * factors of the second pass, the moving statistics), compiled without the loop vectorizer,
 * which is most of the compiler's time (the float64 part took 2.4 s with it, 0.9 s without)
 * and gains little on loops of C values next to passes over A*C*B. Not inlined, so the hot
 * loops around it keep their own options. */
#if defined(__GNUC__) && !defined(__clang__)
#define NOJAM __attribute__((optimize("no-loop-unroll-and-jam")))
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define PER_FEATURE __attribute__((optimize("no-tree-vectorize"), noinline))
#else
#define NOJAM
#define ALWAYS_INLINE inline
#define PER_FEATURE
#endif

/* Activations fused into the kernels: piecewise linear ones, which cost nothing extra per value.
 * (SiLU, GELU, sigmoid and tanh would need scalar libm calls here, slower than PyTorch's
 * vectorized versions; bnlab applies those with PyTorch after the kernel.) */
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_LEAKY = 2 };

#if IN_UNIT(1)
/* ABI version checked by the loader: bump when a signature changes. */
int bnlab_abi_version(void) { return 6; }

int bnlab_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
#endif

/* Thread t of nt gets items [*lo, *hi) of n: contiguous, sizes differ by at most one. */
static inline void split(i64 n, int t, int nt, i64 *lo, i64 *hi) {
    i64 q = n / nt, r = n % nt;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r ? 1 : 0);
}

/* Inside a parallel region: thread t's share [*lo, *hi) of items, and its two float64 sum
 * arrays of W values (laid out per thread in ws), zeroed; returns the first, the second follows. */
static inline double *thread_sums(double *ws, i64 W, i64 items, int t, int nt, i64 *lo, i64 *hi) {
    double *S = ws + 2 * W * t;
    for (i64 j = 0; j < 2 * W; j++) S[j] = 0;
    split(items, t, nt, lo, hi);
    return S;
}

/* ---- output written with non-temporal ("streaming") stores ----
 * An output at least as large as about half the last-level cache cannot stay in it next to its
 * input, so writing it through the cache only evicts data still to be read and costs a read
 * of each destination line first (write-allocate). Such outputs (y, dx) are computed into a
 * small staging buffer that stays in L1 and copied out with non-temporal stores, which go
 * to memory without that read. Measured (AMD EPYC, 32 MB L3, 2 threads, float32, y = x*s + t
 * on preallocated memory): 0.69x the time at (60000, 128) (31 MB), 0.80-0.83x at 16 MB, 0.92x
 * at (169000, 32) (22 MB), but 1.5x at 8 MB, where the output would have stayed in cache. The
 * threshold is set by the loader from the machine's cache size (bnlab_set_stream_min_bytes);
 * 0 turns streaming off. x86-64 only (SSE2 at least); elsewhere outputs are written as usual.
 * STREAM_PLANES: in the layers' kernels (paired rounds, streaming on/off, three runs of 21),
 * the rows layouts gained on the largest rows (training forward of (60000, 128) 0.88-1.06x the
 * time, (4096, 1024) 0.75-0.86x; inference 0.80-0.96x) and were neutral on (169000, 32), while
 * NCHW planes ((250, 32, 676), 21 MB) lost in the forward (1.06-1.12x) and inference
 * (1.03-1.29x) and gained only in the backward (0.92-0.95x): planes stream in the backward only.
 * STREAM_INFER_MIN_ROW_BYTES: inference of 20.6 MB as rows of 32, 64 and 128 float32 features,
 * on/off over three runs of 21 rounds (benchmarks/bench_stream.py): 0.91-1.11 (in other runs
 * as bad as 1.35-1.38) with 32 features, 0.83-0.96 with 64, 0.83-0.98 with 128; so inference
 * streams rows of at least 256 bytes. (Staging narrow rows in 4 KB super-rows instead made
 * every width slower.)
 * STREAM_DX: the backward has three tensors of dx's size in play (x and dy, each read twice,
 * and dx), so dx streams from a quarter of the threshold, an eighth of the cache (4 MB here).
 * From 4 MB against from 8 MB (dx stored straight from the registers; layer forward+backward,
 * paired, 15-21 rounds, both orders, 4-6 MB rows of 32 and 64 features and NCHW): 0.84-0.98x the
 * time, and 0.90-1.06x (median 0.99) when a later op reads dx, as the layer below does in a
 * network. Not streaming dx at 8 MB took 1.11-1.25x the time (1.02-1.20x with dx read after).
 * Earlier, staged: dx streaming from 8 MB against from 16 MB, paired, 21-31 rounds, two runs:
 * 0.82-1.00x the time on the 8 MB rows ((32768, 64), (16384, 128), (128, 64, 16, 16) NCHW
 * and channels-last), 0.94-0.98x when a later op reads dx; 0.86-1.08x at 10-12 MB, where
 * runs disagree; 1.00-1.04x on 5-6 MB rows, where nothing changes (controls). Streaming the
 * forward's y from 8 MB as well made that step faster still (0.80-0.86x), but the forward
 * 1.36-1.46x slower once something reads y (as the next layer does), so y keeps the threshold. */
#define STREAM_INFER_MIN_ROW_BYTES 256
/* One threshold for the whole library (all units), set through its entry points in unit 1. */
#if defined(__GNUC__)
__attribute__((visibility("hidden")))
#endif
extern i64 bnlab_stream_min_bytes_;
#if IN_UNIT(1)
i64 bnlab_stream_min_bytes_ = 0;
void bnlab_set_stream_min_bytes(i64 n) { bnlab_stream_min_bytes_ = n > 0 ? n : 0; }
i64 bnlab_get_stream_min_bytes(void) { return bnlab_stream_min_bytes_; }
#endif

static inline int use_stream(i64 out_bytes) {
#ifdef BNLAB_STREAM
    return bnlab_stream_min_bytes_ > 0 && out_bytes >= bnlab_stream_min_bytes_;
#else
    (void)out_bytes;
    return 0;
#endif
}

/* Bytes of the per-thread staging buffer: well inside L1, many cache lines per flush. */
#define STAGE_BYTES 4096

/* Copy n bytes from a cache-resident buffer to dst, whole aligned 64-byte lines with
 * non-temporal stores, the partial lines at either end with ordinary ones. */
static inline void stream_copy(void *dst, const void *src, size_t n) {
#ifdef BNLAB_STREAM
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head; s += head; n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((void *)d, _mm512_loadu_si512((const void *)s));
#elif defined(__AVX__)
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        _mm256_stream_si256((__m256i *)(d + 32), _mm256_loadu_si256((const __m256i *)(s + 32)));
#else
        for (int q = 0; q < 64; q += 16) _mm_stream_si128((__m128i *)(d + q), _mm_loadu_si128((const __m128i *)(s + q)));
#endif
    }
    memcpy(d, s, n);
#else
    memcpy(dst, src, n);
#endif
}

/* Values to stage next at pos (of [pos, v1)), with `filled` of the stage's `cap` values in use:
 * the rest of a super-row (rows: per-feature arrays of Wd values, period C) or of a plane (B
 * values), so the inner loops keep their length; cut at cap; 0 when the stage must be flushed
 * first. */
static inline i64 stage_piece(i64 pos, i64 v1, i64 filled, i64 cap, i64 C, i64 B, i64 Wd) {
    i64 n = B == 1 ? Wd - pos % C : B - pos % B;
    if (n > v1 - pos) n = v1 - pos;
    if (filled > 0 && n > cap - filled) return 0;
    return n > cap ? cap : n;
}

/* After a thread's last streaming store: make them visible before the threads join. */
static inline void stream_fence(void) {
#ifdef BNLAB_STREAM
    _mm_sfence();
#endif
}

/* ---- float32 rows written from vector registers ----
 * The streaming passes stage their output in L1 and copy it out (stream_copy); for float32 rows
 * whose width is a whole number of vectors, vec_affine_* and vec_dx_* compute each vector with
 * intrinsics and store it straight from the register, with non-temporal stores (nt = 1, destination aligned to a
 * vector) or ordinary ones (nt = 0: the non-streamed passes and the staged ones use the same
 * arithmetic, so every path gives the same bits). Measured in a stand-alone test (2 threads,
 * float32, dx = k*dy + al*x + c0 over rows of 64): 8 MB 0.40-0.49 ms stored from registers with
 * streaming stores, 0.93-1.04 ms staged and copied out, 0.66-0.87 ms with ordinary stores; 30 MB
 * 2.06-2.70, 3.43-3.92 and 3.22-4.32 ms. The callers (bn_cpu_impl.h, VEC_ROWS) take this path for
 * float32 rows of whole vectors in the two-parameter form without leaky ReLU. */
#if defined(BNLAB_STREAM) && defined(__AVX512F__)
#define VEC_F32 1
#define VW 16
typedef __m512 vecf;
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_RELU(v) _mm512_max_ps(_mm512_setzero_ps(), v) /* NaN stays NaN, -0 stays -0, as z < 0 ? 0 : z */
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_STREAM(p, v) _mm512_stream_ps(p, v)
#define V_SET1(a) _mm512_set1_ps(a)
#define V_SUB(a, b) _mm512_sub_ps(a, b)
#elif defined(BNLAB_STREAM) && defined(__AVX2__) && defined(__FMA__)
#define VEC_F32 1
#define VW 8
typedef __m256 vecf;
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_RELU(v) _mm256_max_ps(_mm256_setzero_ps(), v)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_STREAM(p, v) _mm256_stream_ps(p, v)
#define V_SET1(a) _mm256_set1_ps(a)
#define V_SUB(a, b) _mm256_sub_ps(a, b)
#else
#define VEC_F32 0
#endif

#if VEC_F32 && IN_UNIT(1)
/* y = act(x * s + t) over a run of n values (a multiple of VW), act none or ReLU; s and t hold the
 * run's per-feature values. nt: streaming stores (y aligned to a vector). */
static inline void vec_affine_run(const float *x, float *y, i64 n, const float *s, const float *t, int relu, int nt) {
    for (i64 i = 0; i < n; i += VW) {
        vecf z = V_FMA(V_LOAD(x + i), V_LOAD(s + i), V_LOAD(t + i));
        if (relu) z = V_RELU(z);
        if (nt) V_STREAM(y + i, z);
        else V_STORE(y + i, z);
    }
}

/* dx = k * dy + (al * x + c0) over a run of n values (a multiple of VW). */
static inline void vec_dx_run(const float *x, const float *dy, float *dx, i64 n, const float *k, const float *al,
                              const float *c0, int nt) {
    for (i64 i = 0; i < n; i += VW) {
        const vecf v = V_FMA(V_LOAD(k + i), V_LOAD(dy + i), V_FMA(V_LOAD(al + i), V_LOAD(x + i), V_LOAD(c0 + i)));
        if (nt) V_STREAM(dx + i, v);
        else V_STORE(dx + i, v);
    }
}

static inline int vec_aligned(const float *p) { return ((uintptr_t)p & (VW * sizeof(float) - 1)) == 0; }

/* dx = k * dy + (al * (x - m) + c0) over one NCHW plane of n values (any n), the plane's feature
 * values as scalars: what dx_plane computes without an activation, in fused operations, the
 * values outside whole vectors one at a time with the same ones (so every path gives the same
 * bits). nt: streaming stores, the vectors from the first aligned value on (planes of, say,
 * 26 x 26 values start anywhere). */
static inline void vec_dx_plane(const float *x, const float *dy, float *dx, i64 n, float m, float k, float al,
                                float c0, int nt) {
    const vecf vm = V_SET1(m), vk = V_SET1(k), va = V_SET1(al), vc = V_SET1(c0);
    i64 i = 0;
    if (nt)
        for (; i < n && !vec_aligned(dx + i); i++) dx[i] = fmaf(k, dy[i], fmaf(al, x[i] - m, c0));
    for (; i + VW <= n; i += VW) {
        const vecf v = V_FMA(vk, V_LOAD(dy + i), V_FMA(va, V_SUB(V_LOAD(x + i), vm), vc));
        if (nt) V_STREAM(dx + i, v);
        else V_STORE(dx + i, v);
    }
    for (; i < n; i++) dx[i] = fmaf(k, dy[i], fmaf(al, x[i] - m, c0));
}
#endif

/* Rows layout (B == 1): the sums take k consecutive rows as one "super-row" of W = k*C
 * values (at least 1024, or all A rows when fewer), so that rows with few features still give
 * long register-blocked inner loops; the A - A2*k rows left over are summed one by one. */
typedef struct { i64 k, W, A2; } rows_plan;

static inline rows_plan plan_rows(i64 A, i64 C) {
    rows_plan p;
    p.k = C >= 1024 ? 1 : (1024 + C - 1) / C;
    if (p.k > A) p.k = A > 0 ? A : 1; /* a small batch: no wider than the data (scratch and setup scale with W) */
    p.W = p.k * C;
    p.A2 = A / p.k;
    return p;
}

/* Rows per inner loop in the streaming passes (normalize and inference: at least 32 values,
 * dx: at least 64): one row when it is that long, else enough rows to make it so. Measured on
 * AMD EPYC (2 threads, float32): wide super-rows slow these passes down (inference of
 * (169000, 32) takes 1.6-2.3 copy-times in 1024-value super-rows, 1.1-1.3 row by row), while
 * rows of 3 or 8 values one at a time cost 1.5-2x in loop overhead. The per-feature arrays
 * must hold that many rows' worth of values: plan_rows' k is min(ceil(1024 / C), A), at least
 * as large as any group that fits in the batch (a group is only used when A holds it). */
#define NORM_MIN_VALUES 32
#define DX_MIN_VALUES 64
/* The backward's sums go through the rows in memory order, a super-row of at least
 * SUMS_MIN_VALUES values at a time (grad_sums_rows; 64 measured better than 256: 0.71-0.76x the
 * time on (169000, 32) and (43264, 64)). From SUMS_NOJAM_MIN_C features on, with GCC's
 * unroll-and-jam turned off (see NOJAM). */
#define SUMS_MIN_VALUES 64
#define SUMS_NOJAM_MIN_C 128
static inline i64 stream_rows(i64 C, i64 min_values) { return C >= min_values ? 1 : (min_values + C - 1) / C; }

/* Bytes of x per chunk in the rows sums, between flushes of the float32 accumulators into
 * float64. Every value is read once, so the chunk need not stay in cache; it only spaces out
 * the flushes. Measured (2 threads, float32): 512 KB instead of 32 KB made the backward of
 * (43264, 64) 6.60 -> 5.77 copy-times and of (250000, 8) 7.72 -> 6.91, the forward
 * 2.56 -> 2.08 and 3.22 -> 2.31; neutral on the memory-bound (169000, 32) and (60000, 128). */
#define SUMS_CHUNK_BYTES 524288

static inline float bf16_load(const uint16_t *p) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)(*p) << 16;
    return v.f;
}

static inline uint16_t bf16_from_float(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    const uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16; /* round to nearest even */
    const uint32_t quiet = (v.u >> 16) | 0x40u;                          /* NaN stays a (quiet) NaN */
    return (uint16_t)((v.u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded); /* a select, no branch */
}

/* FIXED_WIDTHS: row widths (features per row, in the rows layout) that get loops of their own, with
 * the per-feature values and the sums' accumulators in registers (FIXED_ROWS: float32 and bfloat16
 * storage). A row of 64 or fewer float32 values is otherwise a short inner loop whose setup costs
 * about what its work does. Measured (2 threads, float32, inference on 4-22 MB of rows,
 * preallocated buffers, time / a copy into a preallocated buffer, 30 rounds): 32 features
 * 1.23-1.36 -> 1.02-1.11, 64: 1.10-1.33 -> 0.99-1.25, 8: 1.53 -> 1.24, 16: 1.53 -> 1.22; NCHW
 * planes of the same data 1.03-1.35. In the layer (paired rounds, 2 threads): forward+backward
 * 0.72-0.87x the time on 4-8 MB rows of 32 and 64 features.
 * 128 features only with AVX-512, whose 32 registers of 16 floats hold three rows' worth of
 * per-feature values (prefer-vector-width=512 for those loops alone: GCC keeps 256-bit vectors by
 * default): layer forward 0.78-0.88x the time on (60000, 128) and (16384, 128), inference
 * 0.80-1.06x (15 paired rounds, both orders); the backward kernel alone, on (16384, 128) 0.88x,
 * on (60000, 128) 0.99x (FIXED_WIDTHS_GS). */
#define FIXED_ATTR_16
#define FIXED_ATTR_32
#define FIXED_ATTR_64
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define FIXED_WIDTHS(X) X(16) X(32) X(64) X(128)
#define FIXED_ATTR_128 __attribute__((target("prefer-vector-width=512")))
#else
#define FIXED_WIDTHS(X) X(16) X(32) X(64)
#endif
/* The backward's sums (FIXED_WIDTHS_GS) stop at 64 features: at 128, the sums alone took 1.22-1.45
 * copy-times on (60000, 128) against 1.00-1.12 for the generic memory-order loop (kernel alone,
 * 2 threads, 20 rounds, two runs), while dx (FIXED_WIDTHS_DX) gained at 8 MB and held at 30 MB. */
#define FIXED_WIDTHS_GS(X) X(16) X(32) X(64)
#define FIXED_WIDTHS_DX FIXED_WIDTHS

#if VEC_F32 && IN_UNIT(1)
/* vec_affine_run / vec_dx_run over n whole rows of a width in FIXED_WIDTHS, the per-feature vectors
 * loaded once (same arithmetic, so the same bits): in cache, per-feature loads on every row cost
 * 1.05-1.07x the time at (32768, 32). */
#define VEC_ROWS_FIXED(CC)                                                                                       \
    static FIXED_ATTR_##CC void vec_affine_rows_##CC(const float *x, float *y, i64 n, const float *s,            \
                                                     const float *t, int relu, int nt) {                         \
        vecf sv[CC / VW], tv[CC / VW];                                                                           \
        for (int v = 0; v < CC / VW; v++) { sv[v] = V_LOAD(s + v * VW); tv[v] = V_LOAD(t + v * VW); }           \
        for (i64 r = 0; r < n; r++, x += CC, y += CC)                                                            \
            for (int v = 0; v < CC / VW; v++) {                                                                  \
                vecf z = V_FMA(V_LOAD(x + v * VW), sv[v], tv[v]);                                                \
                if (relu) z = V_RELU(z);                                                                         \
                if (nt) V_STREAM(y + v * VW, z);                                                                 \
                else V_STORE(y + v * VW, z);                                                                     \
            }                                                                                                    \
    }                                                                                                            \
    static FIXED_ATTR_##CC void vec_dx_rows_##CC(const float *x, const float *dy, float *dx, i64 n,              \
                                                 const float *k, const float *al, const float *c0, int nt) {     \
        vecf kv[CC / VW], av[CC / VW], cv[CC / VW];                                                              \
        for (int v = 0; v < CC / VW; v++) {                                                                      \
            kv[v] = V_LOAD(k + v * VW); av[v] = V_LOAD(al + v * VW); cv[v] = V_LOAD(c0 + v * VW);               \
        }                                                                                                        \
        for (i64 r = 0; r < n; r++, x += CC, dy += CC, dx += CC)                                                 \
            for (int v = 0; v < CC / VW; v++) {                                                                  \
                const vecf o = V_FMA(kv[v], V_LOAD(dy + v * VW), V_FMA(av[v], V_LOAD(x + v * VW), cv[v]));       \
                if (nt) V_STREAM(dx + v * VW, o);                                                                \
                else V_STORE(dx + v * VW, o);                                                                    \
            }                                                                                                    \
    }
FIXED_WIDTHS(VEC_ROWS_FIXED)
#undef VEC_ROWS_FIXED

/* n whole rows of C features from x to y (vec_affine_run's arithmetic), fixed widths first. */
static void vec_affine_rows(const float *x, float *y, i64 C, i64 n, const float *s, const float *t, int relu, int nt) {
#define CASE_VA(CC) case CC: vec_affine_rows_##CC(x, y, n, s, t, relu, nt); return;
    switch (C) { FIXED_WIDTHS(CASE_VA) default: break; }
#undef CASE_VA
    for (i64 r = 0; r < n; r++) vec_affine_run(x + r * C, y + r * C, C, s, t, relu, nt);
}

static void vec_dx_rows(const float *x, const float *dy, float *dx, i64 C, i64 n, const float *k, const float *al,
                        const float *c0, int nt) {
#define CASE_VD(CC) case CC: vec_dx_rows_##CC(x, dy, dx, n, k, al, c0, nt); return;
    switch (C) { FIXED_WIDTHS_DX(CASE_VD) default: break; }
#undef CASE_VD
    for (i64 r = 0; r < n; r++) vec_dx_run(x + r * C, dy + r * C, dx + r * C, C, k, al, c0, nt);
}
#endif

#if IN_UNIT(1)
/* ---- float32 storage, float32 compute ---- */
#define FIXED_ROWS 1
#define VEC_ROWS VEC_F32
#define SFX f32
#define T float
#define F float
#define LD(p) (*(p))
#define ST(p, v) (*(p) = (v))
#include "bn_cpu_impl.h"
#endif

#if IN_UNIT(2)
/* ---- float64 storage, float64 compute ---- */
#define FIXED_ROWS 0
#define VEC_ROWS 0
#define SFX f64
#define T double
#define F double
#define LD(p) (*(p))
#define ST(p, v) (*(p) = (v))
#include "bn_cpu_impl.h"
#endif

#if IN_UNIT(3)
/* ---- bfloat16 storage, float32 compute ---- */
#define FIXED_ROWS 1
#define VEC_ROWS 0
#define SFX bf16
#define T uint16_t
#define F float
#define LD(p) bf16_load(p)
#define ST(p, v) (*(p) = bf16_from_float(v))
#include "bn_cpu_impl.h"
#endif
