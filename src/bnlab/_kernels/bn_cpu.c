/*
 * bnlab CPU kernels for batch normalization on an (A, C, B) contiguous view.
 *
 * Plain C (no PyTorch headers), so a stock C compiler builds it quickly (see
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
 * 3: bfloat16) and links the three objects: with more than one core free this takes less time
 * than one compilation of everything (almost all of which is spent in GCC's optimizer). Without
 * BNLAB_UNIT one compilation holds everything.
 * Less for the optimizer to do: the per-feature code is compiled without the vectorizer
 * (PER_FEATURE below), and each row loop is inlined once where it was inlined twice (for whole
 * groups of rows and for the rows left over). Together they shorten the build and leave the
 * kernels' speed unchanged (measured; figures in CHANGELOG.md).
 * The fixed-width row loops (FIXED_WIDTHS) and the float32 vector-register rows (VEC_F32) lengthen
 * the build: they make the float32 unit the longest of the three, and parsing immintrin.h is a
 * noticeable part of each unit.
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
 * arrays in L1, that interleaving of two rows was the slow part: the sums run markedly faster
 * without it (measured; figures in CHANGELOG.md). Narrower rows keep it (their inner loop is
 * short, and there the backward is as fast or faster with the pass); so does the forward's
 * register-blocked sums, which are faster with it. Other compilers do not have the pass. */
/* PER_FEATURE: code that runs once per feature per call (merging the threads' sums, the
 * factors of the second pass, the moving statistics), compiled without the loop vectorizer,
 * which takes most of the compiler's time on this code and gains little on loops of C values
 * next to passes over A*C*B. Not inlined, so the hot loops around it keep their own options. */
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

/* Threads for a pass over n items: at least one, and no more than there are items. */
static inline int team_size(int nthreads, i64 n) {
    if (nthreads < 1) nthreads = 1;
    return n >= nthreads ? nthreads : n > 0 ? (int)n : 1;
}

/* The float64 scratch of the training passes' sums (the forward's statistics, the backward's
 * gradient sums): for each of nt threads two arrays of W values (thread_sums), then two of C
 * values for the rows left over after the super-rows, summed by the thread that merges the
 * threads' sums (merged_sums). NULL when it cannot be allocated. */
static inline double *sums_scratch(i64 W, int nt, i64 C) {
    return (double *)malloc(sizeof(double) * (2 * (size_t)W * (size_t)nt + 2 * (size_t)C));
}

/* Inside a parallel region: thread t's share [*lo, *hi) of items, and its two float64 sum
 * arrays of W values (laid out per thread in ws), zeroed; returns the first, the second follows. */
static inline double *thread_sums(double *ws, i64 W, i64 items, int t, int nt, i64 *lo, i64 *hi) {
    double *S = ws + 2 * W * t;
    for (i64 j = 0; j < 2 * W; j++) S[j] = 0;
    split(items, t, nt, lo, hi);
    return S;
}

/* The first of the two arrays of C values after the threads' sums in ws (see sums_scratch); the
 * second follows. */
static inline double *merged_sums(double *ws, i64 W, int nt) { return ws + 2 * W * nt; }

/* ---- output written with non-temporal ("streaming") stores ----
 * An output at least as large as about half the last-level cache cannot stay in it next to its
 * input, so writing it through the cache only evicts data still to be read and costs a read
 * of each destination line first (write-allocate). Such outputs (y, dx) are computed into a
 * small staging buffer that stays in L1 and copied out with non-temporal stores, which go
 * to memory without that read. Outputs from about half the cache up gain; smaller ones, which
 * would have stayed in cache, lose (measured; figures in CHANGELOG.md).
 * The threshold is set by the loader from the machine's cache size (bnlab_set_stream_min_bytes);
 * 0 turns streaming off. x86-64 only (SSE2 at least); elsewhere outputs are written as usual.
 * STREAM_PLANES: in the layers' kernels, the rows layouts gained from streaming on the largest
 * rows and were neutral on narrow ones, while NCHW planes lost in the forward and inference and
 * gained only in the backward: planes stream in the backward only.
 * STREAM_INFER_MIN_ROW_BYTES: inference of rows of 64 and 128 float32 features gained from
 * streaming, while rows of 32 features gained nothing reliable and at times lost much
 * (benchmarks/bench_stream.py); so inference streams rows of at least 256 bytes. (Staging narrow
 * rows in 4 KB super-rows instead made every width slower.)
 * STREAM_DX: the backward has three tensors of dx's size in play (x and dy, each read twice,
 * and dx), so dx streams from a quarter of the threshold, an eighth of the cache. Measured
 * against higher thresholds, both with dx stored straight from the registers and staged, the
 * lower one makes the backward faster, and no slower when a later op reads dx (as the layer
 * below does in a network); not streaming dx at those sizes is slower. Streaming the forward's
 * y from the lower threshold as well made that step faster still, but the forward much slower
 * once something reads y (as the next layer does, and a streamed y is no longer in cache for
 * it), so y keeps the threshold. */
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

/* After a thread's last streaming store: make them visible before the threads join. */
static inline void stream_fence(void) {
#ifdef BNLAB_STREAM
    _mm_sfence();
#endif
}

/* Staging: how a streamed output is produced when it cannot be stored straight from the vector
 * registers (the vec_* functions below); why, see the head of this section. The output values
 * [v0, v1) are computed piece by piece into a stage of STAGE_BYTES, which stays in L1; whenever
 * the next piece does not fit, the stage is copied out with stream_copy, and after the last piece
 * the stores are fenced. A piece is the rest of a super-row (rows: per-feature arrays of Wd values
 * repeating with period C) or of a plane (B values), so the caller's inner loops keep their
 * length; cut at the stage's size.
 * Both streaming passes (normalize_stream, dx_stream in bn_cpu_impl.h) walk their output this
 * way and keep only what they compute per piece:
 *
 *     T stage[STAGE_BYTES / sizeof(T)];
 *     for (stager sg = stage_begin(y, stage, sizeof(T), v0, v1, C, B, Wd); stage_next(&sg);)
 *         compute y[sg.pos .. sg.pos + sg.n) into stage + sg.filled;
 *
 * stage_next is inlined into each caller, where the struct's fields become plain local variables
 * (the generated loops are no larger than those of the two hand-written copies this replaced). */
typedef struct {
    char *out, *stage;   /* the output (y or dx) and the stage */
    size_t size;         /* bytes per value */
    i64 pos, n, filled;  /* the current piece: values [pos, pos + n), staged from stage value `filled` on */
    i64 v1, cap;         /* the end of the output; values the stage holds */
    i64 C, B, Wd;        /* the layout: features, plane length (1: rows), per-feature array length */
} stager;

static inline stager stage_begin(void *out, void *stage, size_t size, i64 v0, i64 v1, i64 C, i64 B, i64 Wd) {
    const stager s = {(char *)out, (char *)stage, size, v0, 0, 0, v1, STAGE_BYTES / (i64)size, C, B, Wd};
    return s;
}

/* Move past the piece just computed to the next one (sg->pos, sg->n, sg->filled), copying the
 * stage out first if that piece does not fit in what is left of it; 0 when the output is done
 * (all copied out and fenced). */
static ALWAYS_INLINE int stage_next(stager *sg) {
    sg->pos += sg->n;
    sg->filled += sg->n;
    /* computed even at the end (n = 0 there; C, B > 0: an output that streams is not empty), so
       that the caller's own pos % C reuses this one */
    i64 n = sg->B == 1 ? sg->Wd - sg->pos % sg->C : sg->B - sg->pos % sg->B;
    if (n > sg->v1 - sg->pos) n = sg->v1 - sg->pos;
    if (n > sg->cap) n = sg->cap;
    if (n == 0 || n > sg->cap - sg->filled) { /* done, or the stage is full: copy it out */
        stream_copy(sg->out + (size_t)(sg->pos - sg->filled) * sg->size, sg->stage, (size_t)sg->filled * sg->size);
        sg->filled = 0;
    }
    sg->n = n;
    if (n == 0) stream_fence();
    return n > 0;
}

/* ---- float32 rows written from vector registers ----
 * The streaming passes stage their output in L1 and copy it out (stream_copy); for float32 rows
 * whose width is a whole number of vectors, vec_affine_* and vec_dx_* compute each vector with
 * intrinsics and store it straight from the register, with non-temporal stores (nt = 1, destination aligned to a
 * vector) or ordinary ones (nt = 0: the non-streamed passes and the staged ones use the same
 * arithmetic, so every path gives the same bits). Stored from the registers with streaming stores,
 * dx over rows of 64 float32 features was the fastest of the three ways (against staging and
 * copying out, and against ordinary stores), on outputs both near and well above the cache's
 * size (measured in a stand-alone test; figures in CHANGELOG.md). The callers (bn_cpu_impl.h,
 * VEC_ROWS) take this path for float32 rows of whole vectors in the two-parameter form without
 * leaky ReLU. */
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
 * dx: at least 64): one row when it is that long, else enough rows to make it so. Wide
 * super-rows (of 1024 values) slow these passes down, while rows of a few values taken one at a
 * time lose much to loop overhead (measured; figures in CHANGELOG.md). The per-feature arrays
 * must hold that many rows' worth of values: plan_rows' k is min(ceil(1024 / C), A), at least
 * as large as any group that fits in the batch (a group is only used when A holds it). */
#define NORM_MIN_VALUES 32
#define DX_MIN_VALUES 64
/* The backward's sums go through the rows in memory order, a super-row of at least
 * SUMS_MIN_VALUES values at a time (grad_sums_rows; 64 measured faster than 256 on rows of 32
 * and 64 features). From SUMS_NOJAM_MIN_C features on, with GCC's unroll-and-jam turned off
 * (see NOJAM). */
#define SUMS_MIN_VALUES 64
#define SUMS_NOJAM_MIN_C 128
static inline i64 stream_rows(i64 C, i64 min_values) { return C >= min_values ? 1 : (min_values + C - 1) / C; }

/* Bytes of x per chunk in the rows sums, between flushes of the float32 accumulators into
 * float64. Every value is read once, so the chunk need not stay in cache; it only spaces out
 * the flushes. 512 KB instead of 32 KB made the backward and the forward faster on narrow rows,
 * and was neutral on the memory-bound shapes (measured; figures in CHANGELOG.md). */
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
 * about what its work does. With loops of their own, inference on such rows comes markedly
 * closer to the time of a plain copy, and the layer's forward+backward on rows of 32 and 64
 * features is markedly faster (measured; figures in CHANGELOG.md).
 * 128 features only with AVX-512, whose 32 registers of 16 floats hold three rows' worth of
 * per-feature values (prefer-vector-width=512 for those loops alone: GCC keeps 256-bit vectors by
 * default): there the layer's forward and inference gain, and the backward kernel gains on
 * mid-sized data and holds even on large (FIXED_WIDTHS_GS). */
#define FIXED_ATTR_16
#define FIXED_ATTR_32
#define FIXED_ATTR_64
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define FIXED_WIDTHS(X) X(16) X(32) X(64) X(128)
#define FIXED_ATTR_128 __attribute__((target("prefer-vector-width=512")))
#else
#define FIXED_WIDTHS(X) X(16) X(32) X(64)
#endif
/* The backward's sums (FIXED_WIDTHS_GS) stop at 64 features: at 128, the fixed-width sums were
 * slower than the generic memory-order loop, while dx (FIXED_WIDTHS_DX) gained on mid-sized
 * outputs and held even on large ones (measured; figures in CHANGELOG.md). */
#define FIXED_WIDTHS_GS(X) X(16) X(32) X(64)
#define FIXED_WIDTHS_DX FIXED_WIDTHS

#if VEC_F32 && IN_UNIT(1)
/* vec_affine_run / vec_dx_run over n whole rows of a width in FIXED_WIDTHS, the per-feature vectors
 * loaded once (same arithmetic, so the same bits): on data in cache, loading them again on every
 * row is measurably slower. */
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
