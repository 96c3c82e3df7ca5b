/*
 * Kernel bodies, instantiated once per storage type by bn_cpu.c, which defines
 * SFX (name suffix), T (storage), F (compute: float or double), LD(p), ST(p, v).
 * Per-feature parameters and statistics are F arrays.
 *
 * Layout: x is a contiguous (A, C, B) array. B == 1 ("rows": (N, C) matrices and
 * channels-last tensors) is processed row by row, vectorized across channels;
 * B > 1 ("planes": NCHW) runs over the A*C contiguous planes of length B.
 */
#define CAT2_(a, b) a##_##b
#define CAT2(a, b) CAT2_(a, b)
#define FN(name) CAT2(name, SFX)

/* ------------------------------------------------------------------ activations */

/* d act(z) / dz, with PyTorch's choices at the kinks (relu'(0) = 0, leaky'(0) = slope) and at NaN
 * (ReLU lets the gradient through, as PyTorch's threshold_backward does; leaky ReLU scales it). */
static inline F FN(act_grad)(F z, int act, F slope) {
    switch (act) {
    case ACT_RELU: return z <= 0 ? (F)0 : (F)1;
    case ACT_LEAKY: return z > 0 ? (F)1 : slope;
    default: return (F)1;
    }
}

/* y[i] = act((x[i] - mu[i]) * s[i] + h[i]) for one row of C features. */
static inline void FN(norm_row)(const T *restrict x, T *restrict y, i64 C, const F *restrict mu,
                                const F *restrict s, const F *restrict h, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 c = 0; c < C; c++) ST(y + c, (LD(x + c) - mu[c]) * s[c] + h[c]);
    } else if (act == ACT_RELU) {
        for (i64 c = 0; c < C; c++) { F z = (LD(x + c) - mu[c]) * s[c] + h[c]; ST(y + c, z < 0 ? (F)0 : z); }
    } else if (act == ACT_LEAKY) {
        for (i64 c = 0; c < C; c++) { F z = (LD(x + c) - mu[c]) * s[c] + h[c]; ST(y + c, z < 0 ? z * slope : z); }
    }
}

/* y[i] = act(x[i] * s[i] + t[i]): the two-parameter form, used where |mean * s| is small
 * enough that folding the mean into t loses nothing (see affine_ok). */
static inline void FN(affine_row)(const T *restrict x, T *restrict y, i64 C, const F *restrict s,
                                  const F *restrict t, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 c = 0; c < C; c++) ST(y + c, LD(x + c) * s[c] + t[c]);
    } else if (act == ACT_RELU) {
        for (i64 c = 0; c < C; c++) { F z = LD(x + c) * s[c] + t[c]; ST(y + c, z < 0 ? (F)0 : z); }
    } else if (act == ACT_LEAKY) {
        for (i64 c = 0; c < C; c++) { F z = LD(x + c) * s[c] + t[c]; ST(y + c, z < 0 ? z * slope : z); }
    }
}

/* Whether y = x*s + (h - mean*s) matches (x - mean)*s + h to within a few units of rounding:
 * the folded shift carries an absolute error of about eps * |mean * s|, so that must stay
 * near the output's own scale. Otherwise (data far from zero) the exact form is used. */
static PER_FEATURE int FN(affine_ok)(const F *mu, const F *s, i64 C) {
    for (i64 c = 0; c < C; c++) {
        const double v = (double)mu[c] * (double)s[c];
        if (!(v <= 4.0 && v >= -4.0)) return 0;
    }
    return 1;
}

/* y[i] = act((x[i] - mu) * s + h) for one plane of n values of one feature. */
static inline void FN(norm_plane)(const T *restrict x, T *restrict y, i64 n, F mu, F s, F h, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 i = 0; i < n; i++) ST(y + i, (LD(x + i) - mu) * s + h);
    } else if (act == ACT_RELU) {
        for (i64 i = 0; i < n; i++) { F z = (LD(x + i) - mu) * s + h; ST(y + i, z < 0 ? (F)0 : z); }
    } else if (act == ACT_LEAKY) {
        for (i64 i = 0; i < n; i++) { F z = (LD(x + i) - mu) * s + h; ST(y + i, z < 0 ? z * slope : z); }
    }
}

/* Normalize planes [lo, hi) of length B. */
static void FN(normalize_planes)(const T *x, T *y, i64 C, i64 B, i64 lo, i64 hi, const F *mu,
                                 const F *s, const F *h, int act, F slope) {
    for (i64 p = lo; p < hi; p++) {
        i64 c = p % C;
        FN(norm_plane)(x + p * B, y + p * B, B, mu[c], s[c], h[c], act, slope);
    }
}

/* ---- rows of a few features (FIXED_WIDTHS in bn_cpu.c): a width known to the compiler ----
 * Each function below takes n whole rows of exactly CC features, with the per-feature values
 * (and the backward's accumulators) in registers; the *_fixed dispatchers return 0 for other
 * widths. The FW_* lists name the widths instantiated here: none where FIXED_ROWS is 0 (float64:
 * its registers hold half as many values), and for float32 with vector intrinsics (VEC_ROWS) no
 * normalize or dx loops, which bn_cpu.c's vec_affine_rows / vec_dx_rows replace. */
#if FIXED_ROWS
#define FW_SUMS FIXED_WIDTHS
#define FW_GS FIXED_WIDTHS_GS
#else
#define FW_SUMS(X)
#define FW_GS(X)
#endif
#if FIXED_ROWS && !VEC_ROWS
#define FW_AFFINE FIXED_WIDTHS
#define FW_DX FIXED_WIDTHS_DX
#else
#define FW_AFFINE(X)
#define FW_DX(X)
#endif
/* y = act(x * s + t) */
#define AFFINE_ROWS_FIXED(CC)                                                                                    \
    static FIXED_ATTR_##CC void FN(affine_rows_##CC)(const T *restrict x, T *restrict y, i64 n, const F *s,      \
                                                     const F *t, int act, F slope) {                             \
        F sr[CC], tr[CC];                                                                                        \
        for (int c = 0; c < CC; c++) { sr[c] = s[c]; tr[c] = t[c]; }                                             \
        if (act == ACT_NONE) {                                                                                   \
            for (i64 r = 0; r < n; r++, x += CC, y += CC)                                                        \
                for (int c = 0; c < CC; c++) ST(y + c, LD(x + c) * sr[c] + tr[c]);                               \
        } else if (act == ACT_RELU) {                                                                            \
            for (i64 r = 0; r < n; r++, x += CC, y += CC)                                                        \
                for (int c = 0; c < CC; c++) { F z = LD(x + c) * sr[c] + tr[c]; ST(y + c, z < 0 ? (F)0 : z); }  \
        } else {                                                                                                 \
            for (i64 r = 0; r < n; r++, x += CC, y += CC)                                                        \
                for (int c = 0; c < CC; c++) { F z = LD(x + c) * sr[c] + tr[c]; ST(y + c, z < 0 ? z * slope : z); } \
        }                                                                                                        \
    }
/* dx = k * dy + al * x + c0 (no activation) */
#define DX_ROWS_FIXED(CC)                                                                                        \
    static FIXED_ATTR_##CC void FN(dx_rows_##CC)(const T *restrict x, const T *restrict dy, T *restrict dx,     \
                                                 i64 n, const F *k, const F *al, const F *c0) {                  \
        F kr[CC], ar[CC], cr[CC];                                                                                \
        for (int c = 0; c < CC; c++) { kr[c] = k[c]; ar[c] = al[c]; cr[c] = c0[c]; }                             \
        for (i64 r = 0; r < n; r++, x += CC, dy += CC, dx += CC)                                                 \
            for (int c = 0; c < CC; c++) ST(dx + c, kr[c] * LD(dy + c) + ar[c] * LD(x + c) + cr[c]);            \
    }
/* sums of dy and dy * (x - mu) (no activation), float32 over at most 1024 rows, then into sg, sgx */
#define GRAD_SUMS_FIXED(CC)                                                                                      \
    static FIXED_ATTR_##CC void FN(grad_sums_##CC)(const T *restrict x, const T *restrict dy, i64 n,           \
                                                   const F *mu, double *sg, double *sgx) {                       \
        F mr[CC];                                                                                                \
        for (int c = 0; c < CC; c++) mr[c] = mu[c];                                                              \
        for (i64 r0 = 0; r0 < n; r0 += 1024) {                                                                   \
            const i64 m = n - r0 < 1024 ? n - r0 : 1024;                                                         \
            const T *restrict xr = x + r0 * CC, *restrict gr = dy + r0 * CC;                                     \
            F a[CC], b[CC];                                                                                      \
            for (int c = 0; c < CC; c++) a[c] = b[c] = 0;                                                        \
            for (i64 i = 0; i < m; i++, xr += CC, gr += CC)                                                      \
                for (int c = 0; c < CC; c++) { const F g = LD(gr + c); a[c] += g; b[c] += g * (LD(xr + c) - mr[c]); } \
            for (int c = 0; c < CC; c++) { sg[c] += a[c]; sgx[c] += b[c]; }                                      \
        }                                                                                                        \
    }
/* the forward's shifted sums of (x - K) and (x - K)^2, in the same pattern */
#define SUMS_FIXED(CC)                                                                                           \
    static FIXED_ATTR_##CC void FN(sums_##CC)(const T *restrict x, i64 n, const F *K, double *S1,              \
                                              double *S2) {                                                      \
        F kr[CC];                                                                                                \
        for (int c = 0; c < CC; c++) kr[c] = K[c];                                                               \
        for (i64 r0 = 0; r0 < n; r0 += 1024) {                                                                   \
            const i64 m = n - r0 < 1024 ? n - r0 : 1024;                                                         \
            const T *restrict xr = x + r0 * CC;                                                                  \
            F a[CC], b[CC];                                                                                      \
            for (int c = 0; c < CC; c++) a[c] = b[c] = 0;                                                        \
            for (i64 i = 0; i < m; i++, xr += CC)                                                                \
                for (int c = 0; c < CC; c++) { const F d = LD(xr + c) - kr[c]; a[c] += d; b[c] += d * d; }      \
            for (int c = 0; c < CC; c++) { S1[c] += a[c]; S2[c] += b[c]; }                                       \
        }                                                                                                        \
    }
FW_AFFINE(AFFINE_ROWS_FIXED)
FW_DX(DX_ROWS_FIXED)
FW_GS(GRAD_SUMS_FIXED)
FW_SUMS(SUMS_FIXED)
#define CASE_STATS(CC) case CC: FN(sums_##CC)(x, n, K, S1, S2); return 1;
#define CASE_AFFINE(CC) case CC: FN(affine_rows_##CC)(x, y, n, s, t, act, slope); return 1;
#define CASE_DX(CC) case CC: FN(dx_rows_##CC)(x, dy, dx, n, k, al, c0); return 1;
#define CASE_SUMS(CC) case CC: FN(grad_sums_##CC)(x, dy, n, mu, sg, sgx); return 1;

static inline int FN(affine_rows_fixed)(const T *x, T *y, i64 C, i64 n, const F *s, const F *t, int act, F slope) {
    switch (C) { FW_AFFINE(CASE_AFFINE) default: return 0; }
}

static inline int FN(dx_rows_fixed)(const T *x, const T *dy, T *dx, i64 C, i64 n, const F *k, const F *al, const F *c0) {
    switch (C) { FW_DX(CASE_DX) default: return 0; }
}

static inline int FN(sums_fixed)(const T *x, i64 C, i64 n, const F *K, double *S1, double *S2) {
    switch (C) { FW_SUMS(CASE_STATS) default: return 0; }
}

static inline int FN(grad_sums_fixed)(const T *x, const T *dy, i64 C, i64 n, const F *mu, double *sg, double *sgx) {
    switch (C) { FW_GS(CASE_SUMS) default: return 0; }
}
#undef AFFINE_ROWS_FIXED
#undef DX_ROWS_FIXED
#undef GRAD_SUMS_FIXED
#undef SUMS_FIXED
#undef CASE_STATS
#undef CASE_AFFINE
#undef CASE_DX
#undef CASE_SUMS
#undef FW_SUMS
#undef FW_GS
#undef FW_AFFINE
#undef FW_DX

/* Normalize rows [r0, r1) of C features, ks rows per inner loop (see stream_rows; the
 * per-feature arrays hold ks*C values); affine selects the two-parameter form. */
static void FN(normalize_rows)(const T *x, T *y, i64 C, i64 r0, i64 r1, i64 ks, int affine, const F *mu,
                               const F *s, const F *h, int act, F slope) {
#if VEC_ROWS
    if (affine && act != ACT_LEAKY && C % VW == 0) { /* float32: the arithmetic of the streamed passes (bn_cpu.c) */
        vec_affine_rows(x + r0 * C, y + r0 * C, C, r1 - r0, s, h, act == ACT_RELU, 0);
        return;
    }
#endif
    if (affine && FN(affine_rows_fixed)(x + r0 * C, y + r0 * C, C, r1 - r0, s, h, act, slope)) return;
    for (i64 r = r0, n; r < r1; r += n) { /* the last group may have fewer rows */
        n = r1 - r < ks ? r1 - r : ks;
        if (affine) FN(affine_row)(x + r * C, y + r * C, n * C, s, h, act, slope);
        else FN(norm_row)(x + r * C, y + r * C, n * C, mu, s, h, act, slope);
    }
}

/* normalize_rows for an output written with streaming stores (see stream_copy in bn_cpu.c):
 * values [v0, v1) of y (whole rows), staged STAGE_BYTES at a time; the per-feature arrays
 * repeat with period C over Wd values (Wd >= C). (Planes do not stream here: STREAM_PLANES.) */
static void FN(normalize_stream)(const T *x, T *y, i64 C, i64 v0, i64 v1, i64 Wd, int affine, const F *mu,
                                 const F *s, const F *h, int act, F slope) {
#if VEC_ROWS
    const int vec = affine && act != ACT_LEAKY && C % VW == 0; /* float32 rows of whole vectors: see bn_cpu.c */
    if (vec && vec_aligned(y + v0)) { /* straight from the registers */
        vec_affine_rows(x + v0, y + v0, C, (v1 - v0) / C, s, h, act == ACT_RELU, 1);
        stream_fence();
        return;
    }
#endif
    T stage[STAGE_BYTES / sizeof(T)]; /* staged and copied out: see stage_next in bn_cpu.c */
    for (stager sg = stage_begin(y, stage, sizeof(T), v0, v1, C, 1, Wd); stage_next(&sg);) {
        const i64 pos = sg.pos, n = sg.n, j = pos % C;
        T *out = stage + sg.filled;
#if VEC_ROWS
        if (vec) vec_affine_run(x + pos, out, n, s + j, h + j, act == ACT_RELU, 0); /* n, j: whole vectors */
        else
#endif
        if (affine && j == 0 && n % C == 0 && FN(affine_rows_fixed)(x + pos, out, C, n / C, s, h, act, slope)) {
        } else if (affine) FN(affine_row)(x + pos, out, n, s + j, h + j, act, slope);
        else FN(norm_row)(x + pos, out, n, mu + j, s + j, h + j, act, slope);
    }
}

/* dst[j*C + c] = src[c] for j < k: per-feature values laid out for a super-row of k rows.
 * dst may be src itself (then its first C values are already in place). The filled part is
 * doubled at each step: log2(k) copies, not k (k reaches 1024 when C = 1). */
static void FN(replicate)(F *dst, const F *src, i64 C, i64 k) {
    if (dst != src) memcpy(dst, src, sizeof(F) * (size_t)C);
    for (i64 have = C, total = C * k; have < total;) {
        const i64 n = have < total - have ? have : total - have;
        memcpy(dst + have, dst, sizeof(F) * (size_t)n);
        have += n;
    }
}

/* ------------------------------------------------------------------ statistics */

/* Statistics in one pass over x: sums of (x - K) and (x - K)^2 per feature, with K a
 * sample of that feature (its first value), so the terms are small and the float32
 * partial sums (cache-sized chunks, then flushed into float64) keep their precision.
 * The variance M2/M with M2 = S2 - S1^2/M is exact enough unless K lies far out in its
 * feature's distribution; finish_stats detects that case and recomputes that feature
 * with the classic two-pass formula (exact_moments). */

/* Columns per register block in the rows loops: four 64-byte vectors. */
#define RB (256 / (int)sizeof(F))

/* Rows per chunk in the rows sums: about SUMS_CHUNK_BYTES of x (see bn_cpu.c), at most 1024
 * rows (each float32 accumulator takes at most that many terms before it is flushed into float64). */
static inline i64 FN(sums_chunk_rows)(i64 C) {
    i64 R = SUMS_CHUNK_BYTES / (C * (i64)sizeof(T));
    return R < 8 ? 8 : R > 1024 ? 1024 : R;
}

/* Rows [r0, r1) of an (N, C) matrix, chunk by chunk: columns are taken RB at a time with
 * their accumulators in registers, so each value of x costs one load; columns past the
 * last full block go through f1/f2 scratch. */
static void FN(sums_rows)(const T *x, i64 C, i64 r0, i64 r1, const F *K, double *S1, double *S2,
                          F *restrict f1, F *restrict f2) {
    const i64 R = FN(sums_chunk_rows)(C);
    const i64 Cb = C - C % RB;
    for (i64 r = r0; r < r1; r += R) {
        const i64 n = r1 - r < R ? r1 - r : R;
        const T *xb = x + r * C;
        for (i64 cb = 0; cb < Cb; cb += RB) {
            F a1[RB], a2[RB], kk[RB];
            for (int j = 0; j < RB; j++) { a1[j] = 0; a2[j] = 0; kk[j] = K[cb + j]; }
            for (i64 i = 0; i < n; i++) {
                const T *xr = xb + i * C + cb;
                for (int j = 0; j < RB; j++) { F d = LD(xr + j) - kk[j]; a1[j] += d; a2[j] += d * d; }
            }
            for (int j = 0; j < RB; j++) { S1[cb + j] += a1[j]; S2[cb + j] += a2[j]; }
        }
        if (Cb < C) {
            for (i64 c = Cb; c < C; c++) f1[c] = f2[c] = 0;
            for (i64 i = 0; i < n; i++) {
                const T *xr = xb + i * C;
                for (i64 c = Cb; c < C; c++) { F d = LD(xr + c) - K[c]; f1[c] += d; f2[c] += d * d; }
            }
            for (i64 c = Cb; c < C; c++) { S1[c] += f1[c]; S2[c] += f2[c]; }
        }
    }
}

/* Planes [p0, p1) of length B, in chunks of up to 4096 values. */
static void FN(sums_planes)(const T *x, i64 C, i64 B, i64 p0, i64 p1, const F *K, double *S1, double *S2) {
    const i64 L = 4096;
    for (i64 p = p0; p < p1; p++) {
        const i64 c = p % C;
        const F k = K[c];
        for (i64 b0 = 0; b0 < B; b0 += L) {
            const i64 n = B - b0 < L ? B - b0 : L;
            const T *xc = x + p * B + b0;
            F s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
            for (i64 i = 0; i < n; i++) { F d = LD(xc + i) - k; s += d; q += d * d; }
            S1[c] += s;
            S2[c] += q;
        }
    }
}

/* Two-pass mean and biased variance of feature c in float64 (the careful fallback). */
static void FN(exact_moments)(const T *x, i64 A, i64 C, i64 B, i64 c, double *mean, double *var) {
    double s = 0, q = 0;
    for (i64 a = 0; a < A; a++)
        for (i64 b = 0; b < B; b++) s += (double)LD(x + (a * C + c) * B + b);
    const double m = s / ((double)A * (double)B);
    for (i64 a = 0; a < A; a++)
        for (i64 b = 0; b < B; b++) { double d = (double)LD(x + (a * C + c) * B + b) - m; q += d * d; }
    *mean = m;
    *var = q / ((double)A * (double)B);
}

/* Mean and biased variance of feature c from the merged shifted sums. */
static void FN(finish_stats)(const T *x, i64 A, i64 C, i64 B, i64 c, double k, double S1, double S2,
                             double *mean, double *var) {
    const double M = (double)A * (double)B;
    double m2 = S2 - S1 * (S1 / M);
    if (m2 < 0) m2 = 0;
    if (S2 > 16.0 * m2 && S2 > 0) {
        /* K sits more than ~4 standard deviations from the mean: S2 - S1^2/M cancels too much. */
        FN(exact_moments)(x, A, C, B, c, mean, var);
        return;
    }
    *mean = k + S1 / M;
    *var = m2 / M;
}

/* ------------------------------------------------------------------ training forward */

/* One feature's moving statistics: momentum * old + (1 - momentum) * new, in double, the new
 * variance being var * var_factor. The rule bnlab.functional writes down for every path: a feature
 * moves only when its batch mean and (corrected) variance are both finite. */
static inline void FN(update_one)(F *mm, F *mv, double mean, double var, double momentum, double var_factor) {
    const double v = var * var_factor;
    if (!(isfinite(mean) && isfinite(v))) return;
    *mm = (F)(momentum * (double)*mm + (1.0 - momentum) * mean);
    *mv = (F)(momentum * (double)*mv + (1.0 - momentum) * v);
}

/* The moving-statistics update alone, from batch statistics computed elsewhere (PyTorch's
 * kernel, on the small-batch path). The batch statistics are consumed: reset to zero once
 * read, so their buffers can take the next batch (PyTorch's op with momentum 1 writes
 * 0 * buffer + new, which needs a finite buffer). count, when not NULL, is the layer's batch
 * counter (num_batches_tracked), incremented here: on small layers a separate PyTorch op for it
 * costs more than the whole update. Returns 0. */
PER_FEATURE int FN(bnlab_update_moving)(F *mm, F *mv, F *mean, F *var, i64 C, double momentum, double var_factor,
                                        i64 *count) {
    if (count) *count += 1;
    for (i64 c = 0; c < C; c++) {
        FN(update_one)(mm + c, mv + c, (double)mean[c], (double)var[c], momentum, var_factor);
        mean[c] = (F)0.0;
        var[c] = (F)0.0;
    }
    return 0;
}

/* K: the first sample of each feature (the shift of the one-pass sums). */
static PER_FEATURE void FN(first_samples)(const T *x, i64 C, i64 B, F *K) {
    for (i64 c = 0; c < C; c++) K[c] = LD(x + c * B);
}

/* The forward's statistics from the threads' sums (nt blocks of 2*W in ws, R1/R2 after them), the
 * moving-statistics update, and the factors of the normalization: mu, scale, shift (and, for
 * rows, muw, sw, hw replicated to super-rows). Returns whether the two-parameter form holds. */
static PER_FEATURE int FN(fwd_finish)(const T *x, i64 A, i64 C, i64 B, rows_plan rp, int nt, double *ws, const F *Kw,
                                      const F *gamma, const F *beta, double eps, F *mu, F *scale, F *shift, F *muw,
                                      F *sw, F *hw, F *mean_out, F *var_out, F *invstd_out, F *mm, F *mv,
                                      double momentum, double var_factor) {
    const int rows = B == 1;
    const i64 W = rows ? rp.W : C;
    double *R1 = merged_sums(ws, W, nt), *R2 = R1 + C;
    for (i64 c = 0; c < C; c++) R1[c] = R2[c] = 0;
    for (i64 r = rp.A2 * rp.k; rows && r < A; r++) /* rows left over after the super-rows */
        for (i64 c = 0; c < C; c++) { double d = (double)LD(x + r * C + c) - (double)Kw[c]; R1[c] += d; R2[c] += d * d; }
    for (i64 c = 0; c < C; c++) {
        double s1 = R1[c], s2 = R2[c], m, var;
        for (int u = 0; u < nt; u++)
            for (i64 j = c; j < W; j += C) { s1 += ws[2 * W * u + j]; s2 += ws[2 * W * u + W + j]; }
        FN(finish_stats)(x, A, C, B, c, (double)Kw[c], s1, s2, &m, &var);
        /* 0 for a constant feature with eps = 0: PyTorch's training op gives y = beta there (functional._train_invstd) */
        const double inv = (var == 0.0 && eps == 0.0) ? 0.0 : 1.0 / sqrt(var + eps);
        mu[c] = (F)m;
        scale[c] = (F)(gamma ? inv * (double)gamma[c] : inv);
        shift[c] = beta ? beta[c] : (F)0;
        if (mean_out) mean_out[c] = (F)m;
        if (var_out) var_out[c] = (F)var;
        if (invstd_out) invstd_out[c] = (F)inv;
        if (mm && mv) FN(update_one)(mm + c, mv + c, m, var, momentum, var_factor);
    }
    int affine = 0;
    if (rows) {
        affine = FN(affine_ok)(mu, scale, C);
        if (affine) /* shift becomes beta - mean * scale: one parameter fewer per value */
            for (i64 c = 0; c < C; c++) shift[c] = (F)((double)shift[c] - (double)mu[c] * (double)scale[c]);
        FN(replicate)(muw, mu, C, rp.k);
        FN(replicate)(sw, scale, C, rp.k);
        FN(replicate)(hw, shift, C, rp.k);
    }
    return affine;
}

/* Batch statistics, optional moving-statistics update, then y = act((x - mean) * invstd * gamma + beta).
 * Outputs (any may be NULL): mean_out, var_out (biased), invstd_out. Moving statistics, when
 * given, become momentum * old + (1 - momentum) * new (new variance = var * var_factor) for
 * each feature whose two new values are both finite; others keep their values. count, when not
 * NULL, is the layer's batch counter, incremented once (see bnlab_update_moving).
 * Returns 0, or -1 when scratch memory could not be allocated (nothing written then). */
int FN(bnlab_train_fwd)(const T *x, T *y, i64 A, i64 C, i64 B, const F *gamma, const F *beta, double eps,
                        F *mean_out, F *var_out, F *invstd_out, F *mm, F *mv, double momentum,
                        double var_factor, int act, double slope, int nthreads, i64 *count) {
    const int rows = B == 1;
    const rows_plan rp = plan_rows(rows ? A : 0, C);
    const i64 W = rows ? rp.W : C, items = rows ? rp.A2 : A * C;
    nthreads = team_size(nthreads, items);
    double *ws = sums_scratch(W, nthreads, C);
    F *fs = (F *)malloc(sizeof(F) * ((2 * (size_t)nthreads + 4) * (size_t)W + 3 * (size_t)C));
    if (!ws || !fs) { free(ws); free(fs); return -1; }
    if (count) *count += 1;
    F *Kw = fs + 2 * W * nthreads, *muw = Kw + W, *sw = muw + W, *hw = sw + W;
    F *mu = hw + W, *scale = mu + C, *shift = scale + C;
    FN(first_samples)(x, C, B, Kw);
    if (rows) FN(replicate)(Kw, Kw, C, rp.k);
    const F fslope = (F)slope;
    const int stream = rows && use_stream(A * C * B * (i64)sizeof(T)); /* rows only: see STREAM_PLANES */
    int affine = 0; /* set by the single thread that finishes the statistics */
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        i64 lo, hi;
        double *S1 = thread_sums(ws, W, items, t, nt, &lo, &hi), *S2 = S1 + W;
        if (rows && FN(sums_fixed)(x + lo * rp.k * C, C, (hi - lo) * rp.k, Kw, S1, S2)) {
        } else if (rows) FN(sums_rows)(x, W, lo, hi, Kw, S1, S2, fs + 2 * W * t, fs + 2 * W * t + W);
        else FN(sums_planes)(x, C, B, lo, hi, Kw, S1, S2);
#pragma omp barrier
#pragma omp single
        affine = FN(fwd_finish)(x, A, C, B, rp, nt, ws, Kw, gamma, beta, eps, mu, scale, shift, muw, sw, hw, mean_out,
                                var_out, invstd_out, mm, mv, momentum, var_factor);
        if (stream) /* this thread's rows, plus the leftover ones for the last thread */
            FN(normalize_stream)(x, y, C, lo * rp.k * C, (t == nt - 1 ? A : hi * rp.k) * C, rp.W, affine, muw, sw, hw, act,
                                 fslope);
        else if (rows) /* this thread's rows, plus the leftover ones for the last thread */
            FN(normalize_rows)(x, y, C, lo * rp.k, t == nt - 1 ? A : hi * rp.k, stream_rows(C, NORM_MIN_VALUES),
                               affine, muw, sw, hw, act, fslope);
        else
            FN(normalize_planes)(x, y, C, B, lo, hi, mu, scale, shift, act, fslope);
    }
    free(ws);
    free(fs);
    return 0;
}

/* ------------------------------------------------------------------ inference */

/* The inference factors mu, scale, shift (each replicated to ks rows); returns whether the
 * two-parameter form holds (rows only). Vectorized, unlike the other per-feature code: on
 * small batches its square roots are a visible part of the call, and computed one at a time
 * they made small-batch inference measurably slower. */
static int FN(infer_factors)(int rows, i64 C, i64 ks, const F *gamma, const F *beta, const F *mm,
                             const F *mv, double eps, F *mu, F *scale, F *shift) {
    for (i64 c = 0; c < C; c++) {
        const double inv = 1.0 / sqrt((double)mv[c] + eps);
        mu[c] = mm[c];
        scale[c] = (F)(gamma ? inv * (double)gamma[c] : inv);
        shift[c] = beta ? beta[c] : (F)0;
    }
    const int affine = rows && FN(affine_ok)(mu, scale, C);
    if (affine)
        for (i64 c = 0; c < C; c++) shift[c] = (F)((double)shift[c] - (double)mu[c] * (double)scale[c]);
    if (ks > 1) { FN(replicate)(mu, mu, C, ks); FN(replicate)(scale, scale, C, ks); FN(replicate)(shift, shift, C, ks); }
    return affine;
}

/* y = act((x - moving_mean) / sqrt(moving_var + eps) * gamma + beta). Returns 0 or -1. */
int FN(bnlab_infer)(const T *x, T *y, i64 A, i64 C, i64 B, const F *gamma, const F *beta, const F *mm,
                    const F *mv, double eps, int act, double slope, int nthreads) {
    const int rows = B == 1;
    const i64 ks = rows ? stream_rows(C, NORM_MIN_VALUES) : 1, W = ks * C, items = rows ? A : A * C;
    nthreads = team_size(nthreads, items);
    F *fs = (F *)malloc(sizeof(F) * 3 * (size_t)W);
    if (!fs) return -1;
    F *mu = fs, *scale = fs + W, *shift = scale + W;
    const int affine = FN(infer_factors)(rows, C, ks, gamma, beta, mm, mv, eps, mu, scale, shift);
    const F fslope = (F)slope;
    /* rows of at least STREAM_INFER_MIN_ROW_BYTES only (and no planes): see STREAM_PLANES */
    const int stream = rows && C * (i64)sizeof(T) >= STREAM_INFER_MIN_ROW_BYTES && use_stream(A * C * B * (i64)sizeof(T));
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        i64 lo, hi;
        split(items, t, nt, &lo, &hi);
        if (stream)
            FN(normalize_stream)(x, y, C, lo * C, hi * C, W, affine, mu, scale, shift, act, fslope);
        else if (rows) FN(normalize_rows)(x, y, C, lo, hi, ks, affine, mu, scale, shift, act, fslope);
        else FN(normalize_planes)(x, y, C, B, lo, hi, mu, scale, shift, act, fslope);
    }
    free(fs);
    return 0;
}

/* ------------------------------------------------------------------ training backward */

/* Sums of g = dy * act'(z) and g * (x - mean) over count consecutive blocks of w values (x and dy
 * contiguous), into float32 accumulators fg, fgx of w values (zeroed here). mu, s, h: w values. */
static ALWAYS_INLINE void FN(grad_sums_run)(const T *x, const T *dy, i64 w, i64 count, const F *restrict mu,
                                            const F *restrict s, const F *restrict h, int act, F slope, F *restrict fg,
                                            F *restrict fgx) {
    for (i64 j = 0; j < w; j++) fg[j] = fgx[j] = 0;
    if (act == ACT_NONE) {
        for (i64 i = 0; i < count; i++) {
            const T *restrict xr = x + i * w, *restrict gr = dy + i * w;
            for (i64 j = 0; j < w; j++) { const F g = LD(gr + j); fg[j] += g; fgx[j] += g * (LD(xr + j) - mu[j]); }
        }
    } else if (act == ACT_RELU) {
        for (i64 i = 0; i < count; i++) {
            const T *restrict xr = x + i * w, *restrict gr = dy + i * w;
            for (i64 j = 0; j < w; j++) {
                const F d = LD(xr + j) - mu[j];
                const F g = d * s[j] + h[j] <= 0 ? (F)0 : LD(gr + j);
                fg[j] += g; fgx[j] += g * d;
            }
        }
    } else {
        for (i64 i = 0; i < count; i++) {
            const T *restrict xr = x + i * w, *restrict gr = dy + i * w;
            for (i64 j = 0; j < w; j++) {
                const F d = LD(xr + j) - mu[j];
                const F g = LD(gr + j) * (d * s[j] + h[j] > 0 ? (F)1 : slope); /* leaky ReLU */
                fg[j] += g; fgx[j] += g * d;
            }
        }
    }
}

/* The same sums over rows [r0, r1) of C features, in memory order: ks rows (a super-row of
 * Ws = ks*C values) at a time into float32 accumulators one super-row wide, so each
 * accumulator takes one term per super-row; they are flushed into float64 (sg, sgx: Ws
 * values) every 1024 super-rows. Rows short of a whole super-row at the end are one shorter
 * super-row. mu, s, h hold at least Ws values (replicated per feature).
 * This order is faster than walking column blocks of 64 values down 1,024-value super-rows with
 * their accumulators in registers (measured; figures in CHANGELOG.md): the block walk jumps a
 * whole super-row (4 KB) between consecutive loads of a block, where the hardware prefetchers,
 * which follow addresses within a 4 KB page, do not help. Rows of 128 and more features once
 * kept the blocks, since in memory order they gained nothing; GCC's unroll-and-jam was what held
 * them back (NOJAM). Without it, memory order is faster than the blocks on those rows too, in
 * the backward kernel and, by less, in the layer's forward+backward. */
static ALWAYS_INLINE void FN(grad_sums_rows)(const T *x, const T *dy, i64 C, i64 ks, i64 r0, i64 r1, const F *mu,
                                             const F *s, const F *h, int act, F slope, double *sg, double *sgx,
                                             F *restrict fg, F *restrict fgx) {
    for (i64 r = r0; r < r1;) {
        i64 n = (r1 - r) / ks, w = ks * C;
        if (n == 0) { n = 1; w = (r1 - r) * C; } /* the last rows, fewer than ks: one shorter super-row */
        else if (n > 1024) n = 1024;
        FN(grad_sums_run)(x + r * C, dy + r * C, w, n, mu, s, h, act, slope, fg, fgx);
        for (i64 j = 0; j < w; j++) { sg[j] += fg[j]; sgx[j] += fgx[j]; }
        r += n * (w / C);
    }
}

/* grad_sums_rows for rows of at least SUMS_NOJAM_MIN_C features: see NOJAM in bn_cpu.c. */
NOJAM static void FN(grad_sums_rows_wide)(const T *x, const T *dy, i64 C, i64 ks, i64 r0, i64 r1, const F *mu,
                                          const F *s, const F *h, int act, F slope, double *sg, double *sgx,
                                          F *restrict fg, F *restrict fgx) {
    FN(grad_sums_rows)(x, dy, C, ks, r0, r1, mu, s, h, act, slope, sg, sgx, fg, fgx);
}

static void FN(grad_sums_planes)(const T *x, const T *dy, i64 C, i64 B, i64 p0, i64 p1, const F *mu,
                                 const F *s, const F *h, int act, F slope, double *sg, double *sgx) {
    const i64 L = 4096;
    for (i64 p = p0; p < p1; p++) {
        const i64 c = p % C;
        const F m = mu[c], sc = s[c], sh = h[c];
        for (i64 b0 = 0; b0 < B; b0 += L) {
            const i64 n = B - b0 < L ? B - b0 : L;
            const T *xc = x + p * B + b0, *gc = dy + p * B + b0;
            F a = 0, b = 0;
            if (act == ACT_NONE) {
#pragma omp simd reduction(+ : a, b)
                for (i64 i = 0; i < n; i++) { F g = LD(gc + i); a += g; b += g * (LD(xc + i) - m); }
            } else if (act == ACT_RELU) {
#pragma omp simd reduction(+ : a, b)
                for (i64 i = 0; i < n; i++) {
                    F d = LD(xc + i) - m;
                    F g = d * sc + sh <= 0 ? (F)0 : LD(gc + i);
                    a += g; b += g * d;
                }
            } else if (act == ACT_LEAKY) {
#pragma omp simd reduction(+ : a, b)
                for (i64 i = 0; i < n; i++) {
                    F d = LD(xc + i) - m;
                    F g = LD(gc + i) * (d * sc + sh > 0 ? (F)1 : slope);
                    a += g; b += g * d;
                }
            }
            sg[c] += a;
            sgx[c] += b;
        }
    }
}

/* dx = k * g + alpha * (x - mean) + c0 for one row / one plane, g = dy * act'(z). */
static inline void FN(dx_row)(const T *restrict x, const T *restrict dy, T *restrict dx, i64 C, const F *restrict mu,
                              const F *restrict s, const F *restrict h, const F *restrict k, const F *restrict al,
                              const F *restrict c0, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 c = 0; c < C; c++) ST(dx + c, k[c] * LD(dy + c) + al[c] * (LD(x + c) - mu[c]) + c0[c]);
    } else if (act == ACT_RELU) {
        for (i64 c = 0; c < C; c++) {
            F d = LD(x + c) - mu[c];
            F g = d * s[c] + h[c] <= 0 ? (F)0 : LD(dy + c);
            ST(dx + c, k[c] * g + al[c] * d + c0[c]);
        }
    } else if (act == ACT_LEAKY) {
        for (i64 c = 0; c < C; c++) {
            F d = LD(x + c) - mu[c];
            F g = LD(dy + c) * (d * s[c] + h[c] > 0 ? (F)1 : slope);
            ST(dx + c, k[c] * g + al[c] * d + c0[c]);
        }
    }
}

/* dx = k*g + al*x + c0 with g = dy * act'(x*s + t): the two-parameter form of dx_row. */
static inline void FN(dx_row_affine)(const T *restrict x, const T *restrict dy, T *restrict dx, i64 C,
                                     const F *restrict s, const F *restrict t, const F *restrict k,
                                     const F *restrict al, const F *restrict c0, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 c = 0; c < C; c++) ST(dx + c, k[c] * LD(dy + c) + al[c] * LD(x + c) + c0[c]);
    } else if (act == ACT_RELU) {
        for (i64 c = 0; c < C; c++) {
            const F xv = LD(x + c);
            const F g = xv * s[c] + t[c] <= 0 ? (F)0 : LD(dy + c);
            ST(dx + c, k[c] * g + al[c] * xv + c0[c]);
        }
    } else if (act == ACT_LEAKY) {
        for (i64 c = 0; c < C; c++) {
            const F xv = LD(x + c);
            const F g = LD(dy + c) * (xv * s[c] + t[c] > 0 ? (F)1 : slope);
            ST(dx + c, k[c] * g + al[c] * xv + c0[c]);
        }
    }
}

/* dx for rows [r0, r1), ks rows per inner loop (as normalize_rows). */
static void FN(dx_rows)(const T *x, const T *dy, T *dx, i64 C, i64 r0, i64 r1, i64 ks, int affine, const F *mu,
                        const F *s, const F *h, const F *k, const F *al, const F *c0, int act, F slope) {
#if VEC_ROWS
    if (affine && act == ACT_NONE && C % VW == 0) { /* float32: the arithmetic of the streamed passes (bn_cpu.c) */
        vec_dx_rows(x + r0 * C, dy + r0 * C, dx + r0 * C, C, r1 - r0, k, al, c0, 0);
        return;
    }
#endif
    if (affine && act == ACT_NONE && FN(dx_rows_fixed)(x + r0 * C, dy + r0 * C, dx + r0 * C, C, r1 - r0, k, al, c0)) return;
    for (i64 r = r0, n; r < r1; r += n) { /* the last group may have fewer rows */
        n = r1 - r < ks ? r1 - r : ks;
        if (affine) FN(dx_row_affine)(x + r * C, dy + r * C, dx + r * C, n * C, s, h, k, al, c0, act, slope);
        else FN(dx_row)(x + r * C, dy + r * C, dx + r * C, n * C, mu, s, h, k, al, c0, act, slope);
    }
}

static inline void FN(dx_plane)(const T *restrict x, const T *restrict dy, T *restrict dx, i64 n, F m, F sc,
                                F sh, F k, F al, F c0, int act, F slope) {
#if VEC_ROWS
    if (act == ACT_NONE) { /* float32: the arithmetic of the streamed planes (dx_stream, bn_cpu.c) */
        vec_dx_plane(x, dy, dx, n, m, k, al, c0, 0);
        return;
    }
#endif
    if (act == ACT_NONE) {
        for (i64 i = 0; i < n; i++) ST(dx + i, k * LD(dy + i) + al * (LD(x + i) - m) + c0);
    } else if (act == ACT_RELU) {
        for (i64 i = 0; i < n; i++) {
            F d = LD(x + i) - m;
            F g = d * sc + sh <= 0 ? (F)0 : LD(dy + i);
            ST(dx + i, k * g + al * d + c0);
        }
    } else {
        for (i64 i = 0; i < n; i++) {
            F d = LD(x + i) - m, z = d * sc + sh;
            F g = LD(dy + i) * (z > 0 ? (F)1 : slope); /* leaky ReLU */
            ST(dx + i, k * g + al * d + c0);
        }
    }
}

/* dx_rows / dx_plane for a dx written with streaming stores: values [v0, v1) of dx, staged as in
 * normalize_stream. Rows: the per-feature arrays repeat with period C over Wd values; planes of
 * B values: plane p holds feature p % C. */
static void FN(dx_stream)(const T *x, const T *dy, T *dx, i64 C, i64 B, i64 v0, i64 v1, i64 Wd, int affine,
                          const F *mu, const F *s, const F *h, const F *k, const F *al, const F *c0, int act, F slope) {
#if VEC_ROWS
    const int vec = B == 1 && affine && act == ACT_NONE && C % VW == 0; /* float32 rows of whole vectors: see bn_cpu.c */
    if (vec && vec_aligned(dx + v0)) { /* straight from the registers */
        vec_dx_rows(x + v0, dy + v0, dx + v0, C, (v1 - v0) / C, k, al, c0, 1);
        stream_fence();
        return;
    }
    if (B > 1 && act == ACT_NONE) { /* float32 planes (whole ones: v0, v1 are plane boundaries), the same way */
        for (i64 p = v0 / B; p < v1 / B; p++) {
            const i64 c = p % C;
            vec_dx_plane(x + p * B, dy + p * B, dx + p * B, B, mu[c], k[c], al[c], c0[c], 1);
        }
        stream_fence();
        return;
    }
#endif
    T stage[STAGE_BYTES / sizeof(T)]; /* staged and copied out: see stage_next in bn_cpu.c */
    for (stager sg = stage_begin(dx, stage, sizeof(T), v0, v1, C, B, Wd); stage_next(&sg);) {
        const i64 pos = sg.pos, n = sg.n;
        T *out = stage + sg.filled;
        if (B == 1) {
            const i64 j = pos % C;
#if VEC_ROWS
            if (vec) vec_dx_run(x + pos, dy + pos, out, n, k + j, al + j, c0 + j, 0); /* whole vectors */
            else
#endif
            if (affine && act == ACT_NONE && j == 0 && n % C == 0 &&
                FN(dx_rows_fixed)(x + pos, dy + pos, out, C, n / C, k, al, c0)) {
            } else if (affine)
                FN(dx_row_affine)(x + pos, dy + pos, out, n, s + j, h + j, k + j, al + j, c0 + j, act, slope);
            else
                FN(dx_row)(x + pos, dy + pos, out, n, mu + j, s + j, h + j, k + j, al + j, c0 + j, act, slope);
        } else {
            const i64 c = (pos / B) % C;
            FN(dx_plane)(x + pos, dy + pos, out, n, mu[c], s[c], h[c], k[c], al[c], c0[c], act, slope);
        }
    }
}

/* The backward's per-feature arrays before the sums: muw = mean, s = invstd * gamma, h = beta
 * (each replicated to super-rows of k rows). */
static PER_FEATURE void FN(bwd_setup)(i64 C, i64 k, const F *gamma, const F *beta, const F *mean, const F *invstd,
                                      F *muw, F *s, F *h) {
    for (i64 c = 0; c < C; c++) {
        muw[c] = mean[c];
        s[c] = gamma ? invstd[c] * gamma[c] : invstd[c];
        h[c] = beta ? beta[c] : (F)0;
    }
    if (k > 1) { FN(replicate)(muw, muw, C, k); FN(replicate)(s, s, C, k); FN(replicate)(h, h, C, k); }
}

/* The backward's sums merged from the threads' (nt blocks of 2*W in ws, R1/R2 after them): dgamma,
 * dbeta and the factors of dx, k, al, c0 (for rows: h, k, al, c0 replicated to super-rows).
 * Returns whether the two-parameter forms hold. */
static PER_FEATURE int FN(bwd_finish)(const T *x, const T *dy, i64 A, i64 C, i64 B, rows_plan rp, int nt, double *ws,
                                      const F *gamma, const F *invstd, const F *muw, const F *s, F *h, F *k, F *al,
                                      F *c0, F *dgamma, F *dbeta, int act, F fslope) {
    const int rows = B == 1;
    const i64 W = rows ? rp.W : C;
    const double M = (double)A * (double)B;
    double *R1 = merged_sums(ws, W, nt), *R2 = R1 + C;
    for (i64 c = 0; c < C; c++) R1[c] = R2[c] = 0;
    for (i64 r = rp.A2 * rp.k; rows && r < A; r++) /* rows left over after the super-rows */
        for (i64 c = 0; c < C; c++) {
            const F d = LD(x + r * C + c) - muw[c];
            const F g = LD(dy + r * C + c) * (act == ACT_NONE ? (F)1 : FN(act_grad)(d * s[c] + h[c], act, fslope));
            R1[c] += g;
            R2[c] += (double)g * d;
        }
    for (i64 c = 0; c < C; c++) {
        double S1 = R1[c], S2 = R2[c];
        for (int u = 0; u < nt; u++)
            for (i64 j = c; j < W; j += C) { S1 += ws[2 * W * u + j]; S2 += ws[2 * W * u + W + j]; }
        const double inv = invstd[c], kk = gamma ? inv * (double)gamma[c] : inv;
        if (dbeta) dbeta[c] = (F)S1;
        if (dgamma) dgamma[c] = (F)(S2 * inv);
        k[c] = (F)kk;
        al[c] = (F)(-kk * inv * inv * S2 / M);
        c0[c] = (F)(-kk * S1 / M);
    }
    int affine = 0;
    if (rows) {
        /* the two-parameter forms where they lose nothing (see affine_ok): z = x*s + t and
           dx = k*g + al*x + (c0 - al*mean) */
        affine = FN(affine_ok)(muw, invstd, C) && (act == ACT_NONE || FN(affine_ok)(muw, s, C));
        if (affine)
            for (i64 c = 0; c < C; c++) {
                h[c] = (F)((double)h[c] - (double)muw[c] * (double)s[c]);
                c0[c] = (F)((double)c0[c] - (double)al[c] * (double)muw[c]);
            }
        FN(replicate)(h, h, C, rp.k);
        FN(replicate)(k, k, C, rp.k);
        FN(replicate)(al, al, C, rp.k);
        FN(replicate)(c0, c0, C, rp.k);
    }
    return affine;
}

/* Gradients of the training transform (statistics depend on x):
 *   g = dy * act'(z),  S1 = sum(g),  S2 = sum(g * (x - mean))
 *   dbeta = S1,  dgamma = S2 * invstd
 *   dx = gamma*invstd * g - gamma*invstd^3 * S2/M * (x - mean) - gamma*invstd * S1/M
 * dx, dgamma, dbeta may each be NULL (not needed). beta is used only to rebuild z
 * for the activation. Returns 0 or -1. */
int FN(bnlab_train_bwd)(const T *x, const T *dy, T *dx, i64 A, i64 C, i64 B, const F *gamma, const F *beta,
                        const F *mean, const F *invstd, F *dgamma, F *dbeta, int act, double slope,
                        int nthreads) {
    const int rows = B == 1;
    const rows_plan rp = plan_rows(rows ? A : 0, C);
    const i64 W = rows ? rp.W : C, items = rows ? rp.A2 : A * C;
    nthreads = team_size(nthreads, items);
    double *ws = sums_scratch(W, nthreads, C);
    F *fs = (F *)malloc(sizeof(F) * ((2 * (size_t)nthreads + 6) * (size_t)W));
    if (!ws || !fs) { free(ws); free(fs); return -1; }
    F *muw = fs + 2 * W * nthreads, *s = muw + W, *h = s + W, *k = h + W, *al = k + W, *c0 = al + W;
    FN(bwd_setup)(C, rows ? rp.k : 1, gamma, beta, mean, invstd, muw, s, h);
    const F fslope = (F)slope;
    const i64 ks0 = stream_rows(C, SUMS_MIN_VALUES);
    const i64 ks = ks0 < rp.k ? ks0 : rp.k; /* sums' super-rows: no wider than the replicated arrays */
    const int stream = dx && use_stream(4 * A * C * B * (i64)sizeof(T)); /* at a quarter of the size: see STREAM_DX */
    int affine = 0; /* set by the single thread that finishes the sums */
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        i64 lo, hi;
        double *sg = thread_sums(ws, W, items, t, nt, &lo, &hi), *sgx = sg + W;
        if (rows && act == ACT_NONE &&
            FN(grad_sums_fixed)(x + lo * rp.k * C, dy + lo * rp.k * C, C, (hi - lo) * rp.k, muw, sg, sgx)) {
        } else if (rows && C >= SUMS_NOJAM_MIN_C)
            FN(grad_sums_rows_wide)(x, dy, C, ks, lo * rp.k, hi * rp.k, muw, s, h, act, fslope, sg, sgx, fs + 2 * W * t,
                                    fs + 2 * W * t + W);
        else if (rows)
            FN(grad_sums_rows)(x, dy, C, ks, lo * rp.k, hi * rp.k, muw, s, h, act, fslope, sg, sgx, fs + 2 * W * t,
                               fs + 2 * W * t + W);
        else FN(grad_sums_planes)(x, dy, C, B, lo, hi, muw, s, h, act, fslope, sg, sgx);
#pragma omp barrier
#pragma omp single
        affine = FN(bwd_finish)(x, dy, A, C, B, rp, nt, ws, gamma, invstd, muw, s, h, k, al, c0, dgamma, dbeta, act,
                                fslope);
        if (stream) { /* stream implies dx */
            FN(dx_stream)(x, dy, dx, C, B, rows ? lo * rp.k * C : lo * B, rows ? (t == nt - 1 ? A : hi * rp.k) * C : hi * B,
                          rp.W, affine, muw, s, h, k, al, c0, act, fslope);
        } else if (dx) {
            if (rows) {
                FN(dx_rows)(x, dy, dx, C, lo * rp.k, t == nt - 1 ? A : hi * rp.k, stream_rows(C, DX_MIN_VALUES),
                            affine, muw, s, h, k, al, c0, act, fslope);
            } else {
                for (i64 p = lo; p < hi; p++) {
                    const i64 c = p % C;
                    FN(dx_plane)(x + p * B, dy + p * B, dx + p * B, B, muw[c], s[c], h[c], k[c], al[c], c0[c], act, fslope);
                }
            }
        }
    }
    free(ws);
    free(fs);
    return 0;
}

#undef SFX
#undef T
#undef F
#undef LD
#undef ST
#undef FIXED_ROWS
#undef VEC_ROWS
