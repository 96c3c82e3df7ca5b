/*
 * Kernel bodies, instantiated once per storage type by bn_cpu.c, which defines
 * SFX (name suffix), T (storage), F (compute: float or double), LD(p), ST(p, v),
 * F_EXP, F_ERF, F_TANH. Per-feature parameters and statistics are F arrays.
 *
 * Layout: x is a contiguous (A, C, B) array. B == 1 ("rows": (N, C) matrices and
 * channels-last tensors) is processed row by row, vectorized across channels;
 * B > 1 ("planes": NCHW) runs over the A*C contiguous planes of length B.
 */
#define CAT2_(a, b) a##_##b
#define CAT2(a, b) CAT2_(a, b)
#define FN(name) CAT2(name, SFX)

/* ------------------------------------------------------------------ activations */

static inline F FN(act_fwd)(F z, int act, F slope) {
    switch (act) {
    case ACT_RELU: return z < 0 ? (F)0 : z; /* NaN passes through, as in torch.relu */
    case ACT_LEAKY: return z < 0 ? z * slope : z;
    case ACT_SILU: return z / ((F)1 + F_EXP(-z));
    case ACT_GELU: return (F)0.5 * z * ((F)1 + F_ERF(z * (F)0.70710678118654752440));
    case ACT_SIGMOID: return (F)1 / ((F)1 + F_EXP(-z));
    case ACT_TANH: return F_TANH(z);
    default: return z;
    }
}

/* d act(z) / dz, with PyTorch's choices at the kinks (relu'(0) = 0, leaky'(0) = slope). */
static inline F FN(act_grad)(F z, int act, F slope) {
    switch (act) {
    case ACT_RELU: return z > 0 ? (F)1 : (F)0;
    case ACT_LEAKY: return z > 0 ? (F)1 : slope;
    case ACT_SILU: {
        F s = (F)1 / ((F)1 + F_EXP(-z));
        return s * ((F)1 + z * ((F)1 - s));
    }
    case ACT_GELU:
        return (F)0.5 * ((F)1 + F_ERF(z * (F)0.70710678118654752440))
             + z * F_EXP((F)-0.5 * z * z) * (F)0.39894228040143267794;
    case ACT_SIGMOID: {
        F s = (F)1 / ((F)1 + F_EXP(-z));
        return s * ((F)1 - s);
    }
    case ACT_TANH: {
        F t = F_TANH(z);
        return (F)1 - t * t;
    }
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
    } else {
        for (i64 c = 0; c < C; c++) ST(y + c, FN(act_fwd)((LD(x + c) - mu[c]) * s[c] + h[c], act, slope));
    }
}

/* Two rows at once, no activation: each parameter is loaded once for both. */
static inline void FN(norm_row2)(const T *restrict x0, const T *restrict x1, T *restrict y0, T *restrict y1, i64 C,
                                 const F *restrict mu, const F *restrict s, const F *restrict h) {
    for (i64 c = 0; c < C; c++) {
        const F m = mu[c], sc = s[c], sh = h[c];
        ST(y0 + c, (LD(x0 + c) - m) * sc + sh);
        ST(y1 + c, (LD(x1 + c) - m) * sc + sh);
    }
}

/* y[i] = act((x[i] - mu) * s + h) for one plane of n values of one feature. */
static inline void FN(norm_plane)(const T *restrict x, T *restrict y, i64 n, F mu, F s, F h, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 i = 0; i < n; i++) ST(y + i, (LD(x + i) - mu) * s + h);
    } else if (act == ACT_RELU) {
        for (i64 i = 0; i < n; i++) { F z = (LD(x + i) - mu) * s + h; ST(y + i, z < 0 ? (F)0 : z); }
    } else if (act == ACT_LEAKY) {
        for (i64 i = 0; i < n; i++) { F z = (LD(x + i) - mu) * s + h; ST(y + i, z < 0 ? z * slope : z); }
    } else {
        for (i64 i = 0; i < n; i++) ST(y + i, FN(act_fwd)((LD(x + i) - mu) * s + h, act, slope));
    }
}

/* Normalize items [lo, hi) (rows when B == 1, planes otherwise). */
static void FN(normalize_range)(const T *x, T *y, i64 C, i64 B, i64 lo, i64 hi, const F *mu,
                                const F *s, const F *h, int act, F slope) {
    if (B == 1) {
        i64 r = lo;
        if (act == ACT_NONE) /* two rows per step: the parameters are loaded once for both */
            for (; r + 1 < hi; r += 2) FN(norm_row2)(x + r * C, x + (r + 1) * C, y + r * C, y + (r + 1) * C, C, mu, s, h);
        for (; r < hi; r++) FN(norm_row)(x + r * C, y + r * C, C, mu, s, h, act, slope);
    } else {
        for (i64 p = lo; p < hi; p++) {
            i64 c = p % C;
            FN(norm_plane)(x + p * B, y + p * B, B, mu[c], s[c], h[c], act, slope);
        }
    }
}

/* ------------------------------------------------------------------ statistics */

/* Statistics in one pass over x: sums of (x - K) and (x - K)^2 per feature, with K a
 * sample of that feature (its first value), so the terms are small and the float32
 * partial sums (cache-sized chunks, then flushed into float64) keep their precision.
 * The variance M2/M with M2 = S2 - S1^2/M is exact enough unless K lies far out in its
 * feature's distribution; finish_stats detects that case and recomputes that feature
 * with the classic two-pass formula (exact_moments). */

/* Rows [r0, r1) of an (N, C) matrix, vectorized across features, two rows per step. */
static void FN(sums_rows)(const T *x, i64 C, i64 r0, i64 r1, const F *K, double *S1, double *S2,
                          F *restrict f1, F *restrict f2) {
    i64 R = 16384 / (C > 0 ? C : 1);
    if (R < 16) R = 16;
    if (R > 1024) R = 1024;
    for (i64 r = r0; r < r1; r += R) {
        const i64 n = r1 - r < R ? r1 - r : R;
        const T *xb = x + r * C;
        for (i64 c = 0; c < C; c++) f1[c] = f2[c] = 0;
        i64 i = 0;
        for (; i + 1 < n; i += 2) {
            const T *x0 = xb + i * C, *x1 = x0 + C;
            for (i64 c = 0; c < C; c++) {
                F a = LD(x0 + c) - K[c], b = LD(x1 + c) - K[c];
                f1[c] += a + b;
                f2[c] += a * a + b * b;
            }
        }
        if (i < n) {
            const T *x0 = xb + i * C;
            for (i64 c = 0; c < C; c++) { F a = LD(x0 + c) - K[c]; f1[c] += a; f2[c] += a * a; }
        }
        for (i64 c = 0; c < C; c++) { S1[c] += f1[c]; S2[c] += f2[c]; }
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

/* Batch statistics, optional moving-statistics update, then y = act((x - mean) * invstd * gamma + beta).
 * Outputs (any may be NULL): mean_out, var_out (biased), invstd_out. Moving statistics, when
 * given, become momentum * old + (1 - momentum) * new (new variance = var * var_factor) for
 * each feature whose two new values are both finite; others keep their values.
 * Returns 0, or -1 when scratch memory could not be allocated (nothing written then). */
int FN(bnlab_train_fwd)(const T *x, T *y, i64 A, i64 C, i64 B, const F *gamma, const F *beta, double eps,
                        F *mean_out, F *var_out, F *invstd_out, F *mm, F *mv, double momentum,
                        double var_factor, int act, double slope, int nthreads) {
    const i64 items = B == 1 ? A : A * C;
    if (nthreads < 1) nthreads = 1;
    if (items < nthreads) nthreads = items > 0 ? (int)items : 1;
    double *ws = (double *)malloc(sizeof(double) * 2 * (size_t)C * (size_t)nthreads);
    F *fs = (F *)malloc(sizeof(F) * (size_t)C * (2 * (size_t)nthreads + 4));
    if (!ws || !fs) { free(ws); free(fs); return -1; }
    F *K = fs + 2 * C * nthreads, *mu = K + C, *scale = mu + C, *shift = scale + C;
    for (i64 c = 0; c < C; c++) K[c] = LD(x + c * B); /* first sample of each feature */
    const F fslope = (F)slope;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double *S1 = ws + 2 * C * t, *S2 = S1 + C;
        for (i64 c = 0; c < C; c++) S1[c] = S2[c] = 0;
        i64 lo, hi;
        split(items, t, nt, &lo, &hi);
        if (B == 1) FN(sums_rows)(x, C, lo, hi, K, S1, S2, fs + 2 * C * t, fs + 2 * C * t + C);
        else FN(sums_planes)(x, C, B, lo, hi, K, S1, S2);
#pragma omp barrier
#pragma omp single
        {
            for (i64 c = 0; c < C; c++) {
                double s1 = 0, s2 = 0, m, var;
                for (int u = 0; u < nt; u++) { s1 += ws[2 * C * u + c]; s2 += ws[2 * C * u + C + c]; }
                FN(finish_stats)(x, A, C, B, c, (double)K[c], s1, s2, &m, &var);
                const double inv = 1.0 / sqrt(var + eps);
                mu[c] = (F)m;
                scale[c] = (F)(gamma ? inv * (double)gamma[c] : inv);
                shift[c] = beta ? beta[c] : (F)0;
                if (mean_out) mean_out[c] = (F)m;
                if (var_out) var_out[c] = (F)var;
                if (invstd_out) invstd_out[c] = (F)inv;
                if (mm && mv) {
                    const double nm = momentum * (double)mm[c] + (1.0 - momentum) * m;
                    const double nv = momentum * (double)mv[c] + (1.0 - momentum) * (var * var_factor);
                    if (isfinite(nm) && isfinite(nv)) { mm[c] = (F)nm; mv[c] = (F)nv; }
                }
            }
        }
        FN(normalize_range)(x, y, C, B, lo, hi, mu, scale, shift, act, fslope);
    }
    free(ws);
    free(fs);
    return 0;
}

/* ------------------------------------------------------------------ inference */

/* y = act((x - moving_mean) / sqrt(moving_var + eps) * gamma + beta). Returns 0 or -1. */
int FN(bnlab_infer)(const T *x, T *y, i64 A, i64 C, i64 B, const F *gamma, const F *beta, const F *mm,
                    const F *mv, double eps, int act, double slope, int nthreads) {
    const i64 items = B == 1 ? A : A * C;
    if (nthreads < 1) nthreads = 1;
    if (items < nthreads) nthreads = items > 0 ? (int)items : 1;
    F *fs = (F *)malloc(sizeof(F) * 3 * (size_t)C);
    if (!fs) return -1;
    F *mu = fs, *scale = fs + C, *shift = scale + C;
    for (i64 c = 0; c < C; c++) {
        const double inv = 1.0 / sqrt((double)mv[c] + eps);
        mu[c] = mm[c];
        scale[c] = (F)(gamma ? inv * (double)gamma[c] : inv);
        shift[c] = beta ? beta[c] : (F)0;
    }
    const F fslope = (F)slope;
#pragma omp parallel num_threads(nthreads)
    {
        i64 lo, hi;
        split(items, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        FN(normalize_range)(x, y, C, B, lo, hi, mu, scale, shift, act, fslope);
    }
    free(fs);
    return 0;
}

/* ------------------------------------------------------------------ training backward */

/* Sums over rows [r0, r1) of g = dy * act'(z) and g * (x - mean), chunked in F, into float64. */
static void FN(grad_sums_rows)(const T *x, const T *dy, i64 C, i64 r0, i64 r1, const F *mu, const F *s,
                               const F *h, int act, F slope, double *sg, double *sgx, F *restrict fg,
                               F *restrict fgx) {
    i64 R = 16384 / (C > 0 ? C : 1);
    if (R < 16) R = 16;
    if (R > 1024) R = 1024;
    for (i64 r = r0; r < r1; r += R) {
        const i64 n = r1 - r < R ? r1 - r : R;
        for (i64 c = 0; c < C; c++) fg[c] = fgx[c] = 0;
        i64 i = 0;
        if (act == ACT_NONE) { /* two rows per step: half the scratch traffic */
            for (; i + 1 < n; i += 2) {
                const T *x0 = x + (r + i) * C, *g0 = dy + (r + i) * C, *x1 = x0 + C, *g1 = g0 + C;
                for (i64 c = 0; c < C; c++) {
                    F a = LD(g0 + c), b = LD(g1 + c);
                    fg[c] += a + b;
                    fgx[c] += a * (LD(x0 + c) - mu[c]) + b * (LD(x1 + c) - mu[c]);
                }
            }
        }
        for (; i < n; i++) {
            const T *xr = x + (r + i) * C, *gr = dy + (r + i) * C;
            if (act == ACT_NONE) {
                for (i64 c = 0; c < C; c++) { F g = LD(gr + c); fg[c] += g; fgx[c] += g * (LD(xr + c) - mu[c]); }
            } else if (act == ACT_RELU) {
                for (i64 c = 0; c < C; c++) {
                    F d = LD(xr + c) - mu[c];
                    F g = d * s[c] + h[c] > 0 ? LD(gr + c) : (F)0;
                    fg[c] += g; fgx[c] += g * d;
                }
            } else if (act == ACT_LEAKY) {
                for (i64 c = 0; c < C; c++) {
                    F d = LD(xr + c) - mu[c];
                    F g = LD(gr + c) * (d * s[c] + h[c] > 0 ? (F)1 : slope);
                    fg[c] += g; fgx[c] += g * d;
                }
            } else {
                for (i64 c = 0; c < C; c++) {
                    F d = LD(xr + c) - mu[c];
                    F g = LD(gr + c) * FN(act_grad)(d * s[c] + h[c], act, slope);
                    fg[c] += g; fgx[c] += g * d;
                }
            }
        }
        for (i64 c = 0; c < C; c++) { sg[c] += fg[c]; sgx[c] += fgx[c]; }
    }
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
                    F g = d * sc + sh > 0 ? LD(gc + i) : (F)0;
                    a += g; b += g * d;
                }
            } else if (act == ACT_LEAKY) {
#pragma omp simd reduction(+ : a, b)
                for (i64 i = 0; i < n; i++) {
                    F d = LD(xc + i) - m;
                    F g = LD(gc + i) * (d * sc + sh > 0 ? (F)1 : slope);
                    a += g; b += g * d;
                }
            } else {
                for (i64 i = 0; i < n; i++) {
                    F d = LD(xc + i) - m;
                    F g = LD(gc + i) * FN(act_grad)(d * sc + sh, act, slope);
                    a += g; b += g * d;
                }
            }
            sg[c] += a;
            sgx[c] += b;
        }
    }
}

/* dx = k * g + alpha * (x - mean) + c0 for one row / one plane, g = dy * act'(z). */
static inline void FN(dx_row)(const T *restrict x, const T *restrict dy, T *restrict dx, i64 C, const F *mu,
                              const F *s, const F *h, const F *k, const F *al, const F *c0, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 c = 0; c < C; c++) ST(dx + c, k[c] * LD(dy + c) + al[c] * (LD(x + c) - mu[c]) + c0[c]);
    } else {
        for (i64 c = 0; c < C; c++) {
            F d = LD(x + c) - mu[c], z = d * s[c] + h[c], g;
            if (act == ACT_RELU) g = z > 0 ? LD(dy + c) : (F)0;
            else if (act == ACT_LEAKY) g = LD(dy + c) * (z > 0 ? (F)1 : slope);
            else g = LD(dy + c) * FN(act_grad)(z, act, slope);
            ST(dx + c, k[c] * g + al[c] * d + c0[c]);
        }
    }
}

static inline void FN(dx_row2)(const T *restrict x0, const T *restrict x1, const T *restrict g0,
                               const T *restrict g1, T *restrict d0, T *restrict d1, i64 C, const F *restrict mu,
                               const F *restrict k, const F *restrict al, const F *restrict c0) {
    for (i64 c = 0; c < C; c++) {
        const F m = mu[c], kk = k[c], a = al[c], cc = c0[c];
        ST(d0 + c, kk * LD(g0 + c) + a * (LD(x0 + c) - m) + cc);
        ST(d1 + c, kk * LD(g1 + c) + a * (LD(x1 + c) - m) + cc);
    }
}

static inline void FN(dx_plane)(const T *restrict x, const T *restrict dy, T *restrict dx, i64 n, F m, F sc,
                                F sh, F k, F al, F c0, int act, F slope) {
    if (act == ACT_NONE) {
        for (i64 i = 0; i < n; i++) ST(dx + i, k * LD(dy + i) + al * (LD(x + i) - m) + c0);
    } else if (act == ACT_RELU) {
        for (i64 i = 0; i < n; i++) {
            F d = LD(x + i) - m;
            F g = d * sc + sh > 0 ? LD(dy + i) : (F)0;
            ST(dx + i, k * g + al * d + c0);
        }
    } else {
        for (i64 i = 0; i < n; i++) {
            F d = LD(x + i) - m, z = d * sc + sh;
            F g = act == ACT_LEAKY ? LD(dy + i) * (z > 0 ? (F)1 : slope) : LD(dy + i) * FN(act_grad)(z, act, slope);
            ST(dx + i, k * g + al * d + c0);
        }
    }
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
    const i64 items = B == 1 ? A : A * C;
    const double M = (double)A * (double)B;
    if (nthreads < 1) nthreads = 1;
    if (items < nthreads) nthreads = items > 0 ? (int)items : 1;
    double *ws = (double *)malloc(sizeof(double) * 2 * (size_t)C * (size_t)nthreads);
    F *fs = (F *)malloc(sizeof(F) * (size_t)C * (2 * (size_t)nthreads + 5));
    if (!ws || !fs) { free(ws); free(fs); return -1; }
    F *s = fs + 2 * C * nthreads, *h = s + C, *k = h + C, *al = k + C, *c0 = al + C;
    for (i64 c = 0; c < C; c++) {
        s[c] = gamma ? invstd[c] * gamma[c] : invstd[c];
        h[c] = beta ? beta[c] : (F)0;
    }
    const F fslope = (F)slope;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double *sg = ws + 2 * C * t, *sgx = sg + C;
        for (i64 c = 0; c < C; c++) sg[c] = sgx[c] = 0;
        i64 lo, hi;
        split(items, t, nt, &lo, &hi);
        if (B == 1) FN(grad_sums_rows)(x, dy, C, lo, hi, mean, s, h, act, fslope, sg, sgx, fs + 2 * C * t, fs + 2 * C * t + C);
        else FN(grad_sums_planes)(x, dy, C, B, lo, hi, mean, s, h, act, fslope, sg, sgx);
#pragma omp barrier
#pragma omp single
        {
            for (i64 c = 0; c < C; c++) {
                double S1 = 0, S2 = 0;
                for (int u = 0; u < nt; u++) { S1 += ws[2 * C * u + c]; S2 += ws[2 * C * u + C + c]; }
                const double inv = invstd[c], kk = gamma ? inv * (double)gamma[c] : inv;
                if (dbeta) dbeta[c] = (F)S1;
                if (dgamma) dgamma[c] = (F)(S2 * inv);
                k[c] = (F)kk;
                al[c] = (F)(-kk * inv * inv * S2 / M);
                c0[c] = (F)(-kk * S1 / M);
            }
        }
        if (dx) {
            if (B == 1) {
                i64 r = lo;
                if (act == ACT_NONE)
                    for (; r + 1 < hi; r += 2)
                        FN(dx_row2)(x + r * C, x + (r + 1) * C, dy + r * C, dy + (r + 1) * C, dx + r * C,
                                    dx + (r + 1) * C, C, mean, k, al, c0);
                for (; r < hi; r++)
                    FN(dx_row)(x + r * C, dy + r * C, dx + r * C, C, mean, s, h, k, al, c0, act, fslope);
            } else {
                for (i64 p = lo; p < hi; p++) {
                    const i64 c = p % C;
                    FN(dx_plane)(x + p * B, dy + p * B, dx + p * B, B, mean[c], s[c], h[c], k[c], al[c], c0[c], act, fslope);
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
#undef F_EXP
#undef F_ERF
#undef F_TANH
