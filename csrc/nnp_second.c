/*
 * nnp_second.c - second derivatives of the dense chain (nnp.h): the Hessian, the Laplacian and Hessian-vector
 * products in float32, analytic, and the float64 finite-difference Hessian that cross-checks them.
 *
 * Notation for one layer (row vectors, as in FORMAT.md): z = a W + b, a' = f(z), with d = f'(z) and s = f''(z)
 * per unit. A tangent row t (the derivative of a along one direction) becomes t' = d * (t W); a second-order row
 * q (a second derivative of a along two directions i, j) becomes q' = d * (q W) + s * (t_i W) * (t_j W): the
 * products are the first-order ones, and the nonlinearity only enters through the elementwise terms.
 *
 * Forward passes (the Laplacian, Hessian-vector products, and the Hessian of models with many outputs) carry per
 * point one row of values, first-order rows and second-order rows, all multiplied by W in one matrix product per
 * layer (nnpi_gemm: nnp_batch.c's kernels) and finished by an elementwise epilogue here:
 *   Hessian      tangents e_j (j < n_in); one row per pair j <= k   q_jk' = d * Q_jk + s * T_j * T_k
 *   Laplacian    tangents e_j;            one row                   l'    = d * L + s * sum_j T_j^2
 *   HVP          tangents e_j and v;      one row per input j       m_j'  = d * M_j + s * T_j * T_v
 * (capitals: the rows times W, before the epilogue). At the first layer the tangents e_j W are the rows of W
 * themselves and the second-order rows are 0.
 *
 * The Hessian of a model with fewer outputs than pairs j <= k takes a cheaper route. Only the activations are not
 * linear, so the second-order chain rule collapses to a sum over units:
 *   d2 y_i / dx dx^T = sum over layers l and units u of  lambda_iu * s_u * g_u g_u^T,
 * where g_u = dz_u / dx (the tangent rows of layer l before the scaling by d, column u) and lambda_iu = dy_i / da_u
 * (the adjoint of the unit's output). So one forward pass with n_in tangent rows keeps every layer's g and d, s,
 * then a reverse pass of n_out adjoint rows (as reverse-mode Jacobians) accumulates the sum layer by layer: 1 + n_in
 * + n_out rows per point through the products instead of 1 + n_in + n_in (n_in + 1) / 2. The adjoint rows are
 * multiplied by W transposed: by nnpi_gemm on the stored transpose for small layers, as dot products with W's own rows
 * for large ones (so_rev_dot; the choice is the layer's, by its size).
 *
 * Every row's products are the same whatever the block of points (nnpi_gemm, so_rev_dot), so results do not depend
 * on how a batch is split, not even for a single point. Piecewise-linear activations have s = 0: their layers
 * contribute exactly 0 (the reverse route skips them). The block functions are dispatched (nnp_simd.h); the float64
 * finite differences are plain loops built once (accuracy, not speed, is their purpose).
 */
#include "nnp_kernels.h"

/* ------------------------------------------------------------------------------------------------------ */
/* Activations with first and second derivatives                                                          */

/* z <- f(z + b), d <- f'(z + b), s <- f''(z + b) for n contiguous units (b: the layer's bias). Values and first
 * derivatives are written as in act_d_f32 (nnp_kernels.h). Second derivatives: 0 for the piecewise-linear
 * activations (also at their kinks); at 0, elu'' and selu'' take the z > 0 branch, 0 (TensorFlow's nested
 * GradientTape; for elu this is not the branch of elu'(0) = alpha), and softsign'' is 0 (the mean of its one-sided
 * values +-2; the gradient sign(0) = 0 of |z|). */
NNP_INLINE void act_d2_f32(const nnp_layer *L, float *NNP_RESTRICT z, float *NNP_RESTRICT d, float *NNP_RESTRICT s,
                           size_t n)
{
    const float *b = L->b;
    const float p0 = L->p0, p1 = L->p1;
    size_t j;
    switch (L->act) {
    case NNP_ACT_LINEAR:
    case NNP_ACT_RELU:
    case NNP_ACT_LEAKY_RELU:
    case NNP_ACT_RELU6:
    case NNP_ACT_HARD_SIGMOID:
        act_d_f32(L, z, d, n);
        for (j = 0; j < n; j++) s[j] = 0.0f;
        break;
    case NNP_ACT_ELU: /* alpha e^z below 0 */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j];
            if (v > 0.0f) {
                z[j] = v;
                d[j] = 1.0f;
                s[j] = 0.0f;
            } else {
                const float e = expm1f(v), dv = p0 * (e + 1.0f);
                z[j] = p0 * e;
                d[j] = dv;
                s[j] = v < 0.0f ? dv : 0.0f;
            }
        }
        break;
    case NNP_ACT_SELU: /* scale alpha e^z below 0 */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j];
            if (v < 0.0f) {
                const float e = expm1f(v), dv = p1 * p0 * (e + 1.0f);
                z[j] = p1 * p0 * e;
                d[j] = dv;
                s[j] = dv;
            } else {
                z[j] = p1 * v;
                d[j] = p1;
                s[j] = 0.0f;
            }
        }
        break;
    case NNP_ACT_TANH: /* f' = 1 - f^2, f'' = -2 f f' */
        for (j = 0; j < n; j++) {
            const float a = nnp_tanhf(z[j] + b[j]), dv = 1.0f - a * a;
            z[j] = a;
            d[j] = dv;
            s[j] = -2.0f * a * dv;
        }
        break;
    case NNP_ACT_SIGMOID: /* f' = f (1 - f), f'' = f' (1 - 2 f) */
        for (j = 0; j < n; j++) {
            const float a = 1.0f / (1.0f + nnp_expf(-(z[j] + b[j]))), dv = a * (1.0f - a);
            z[j] = a;
            d[j] = dv;
            s[j] = dv * (1.0f - 2.0f * a);
        }
        break;
    case NNP_ACT_SOFTPLUS: /* f' = sigmoid(z), f'' = sigmoid(z) sigmoid(-z) = e / (1 + e)^2 with e = e^-|z| */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j], e = nnp_expf(-fabsf(v)), q = 1.0f / (1.0f + e);
            z[j] = (v > 0.0f ? v : 0.0f) + log1pf(e);
            d[j] = (v >= 0.0f ? 1.0f : e) / (1.0f + e);
            s[j] = e * q * q;
        }
        break;
    case NNP_ACT_SOFTSIGN: /* f' = q^2, f'' = -2 sign(z) q^3 with q = 1 / (1 + |z|) */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j], q = 1.0f / (1.0f + fabsf(v)), dv = q * q;
            z[j] = v * q;
            d[j] = dv;
            s[j] = v > 0.0f ? -2.0f * dv * q : (v < 0.0f ? 2.0f * dv * q : 0.0f);
        }
        break;
    case NNP_ACT_SWISH: /* f = z g (g the sigmoid): f' = g (1 + z (1 - g)), f'' = g (1 - g) (2 + z (1 - 2 g)) */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j], g = 1.0f / (1.0f + nnp_expf(-v));
            z[j] = v * g;
            d[j] = g * (1.0f + v * (1.0f - g));
            s[j] = g * (1.0f - g) * (2.0f + v * (1.0f - 2.0f * g));
        }
        break;
    case NNP_ACT_GELU: /* f = z Phi(z): f' = Phi + z phi, f'' = phi (2 - z^2) */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j];
            float e;
            const float c = nnp_phif(v, &e), ph = INV_SQRT_2PI_F * e;
            z[j] = v * c;
            d[j] = c + v * ph;
            s[j] = ph * (2.0f - v * v);
        }
        break;
    case NNP_ACT_GELU_TANH:
        /* f = z (1 + t) / 2, t = tanh(u), u = c (z + k z^3): f'' = (1 - t^2) (u' + z (u'' - 2 t u'^2) / 2),
         * u' = c (1 + 3 k z^2), u'' = 6 c k z */
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j];
            const float t = nnp_tanhf(SQRT_2_OVER_PI_F * (v + GELU_C * v * v * v));
            const float u1 = SQRT_2_OVER_PI_F * (1.0f + 3.0f * GELU_C * v * v);
            const float u2 = 6.0f * SQRT_2_OVER_PI_F * GELU_C * v;
            z[j] = 0.5f * v * (1.0f + t);
            d[j] = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI_F * (1.0f + 3.0f * GELU_C * v * v);
            s[j] = (1.0f - t * t) * (u1 + 0.5f * v * (u2 - 2.0f * t * u1 * u1));
        }
        break;
    default: /* NNP_ACT_EXPONENTIAL */
        for (j = 0; j < n; j++) {
            const float a = expf(z[j] + b[j]);
            z[j] = a;
            d[j] = a;
            s[j] = a;
        }
        break;
    }
}

/* nnpi_gemm for m rows, avoiding remainders of one or two rows: nnp_batch.c's kernels take rows in groups of six and
 * the rest (m % 6) in one tile of that many rows, and tiles of one or two rows keep too few independent sums to hide
 * the latency of the multiply-adds (with 7 or 8 rows, as for one point's Hessian-vector products, the product took
 * half again as long). So the last 7 or 8 rows go as two tiles of 3 or 4. A row's result does not depend on the
 * tile that computes it. */
static void so_gemm(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B, const float *Bt,
                    float *C, size_t ldc)
{
    const size_t r = m % 6;
    size_t head;
    if (m <= 6 || (r != 1 && r != 2)) {
        nnpi_gemm(m, k, n, A, lda, B, Bt, C, ldc);
        return;
    }
    head = m - 6 - r;
    if (head > 0) nnpi_gemm(head, k, n, A, lda, B, Bt, C, ldc);
    nnpi_gemm(4, k, n, A + head * lda, lda, B, Bt, C + head * ldc, ldc);
    nnpi_gemm(2 + r, k, n, A + (head + 4) * lda, lda, B, Bt, C + (head + 4) * ldc, ldc);
}

/* ------------------------------------------------------------------------------------------------------ */
/* The reverse pass's products: adjoint rows times W transposed, as dot products with W's rows              */
/*
 * so_rev_dot: C[i][r] = sum_u A[i][u] W[r][u] for i < m, r < n (A: m rows of width k at stride lda; W: n rows of
 * width k at stride k, the layer's weights as stored; C at row stride ldc). Each entry is one dot product over
 * contiguous memory: eight lanes, lane l summing the u = l (mod 8) below k8 = k - k % 8 in order, the lanes added in
 * the tree of hsum8x8, then u from k8 to k in order. Every tile computes an entry so, whatever the tile, the row
 * count m or the row's place in it: a point's result does not depend on how the batch is split into blocks.
 *
 * Layers of at least NNP_REV_DOT_MIN_WEIGHTS weights take it; smaller ones, whose transpose stays in L1, nnpi_gemm
 * with Wt as before (two to three times faster there: no horizontal sums, no short dot products). The choice
 * depends on the layer only, never on the block, so it keeps the property above. For a large layer, reading W
 * itself instead of its transpose keeps the pass's working set at one copy of the weights (the forward pass reads W
 * as well: with W and its transpose, 1.6 MB for the 4 x 256 physics network, the two passes evicted each other's
 * weights from L2 and the Hessian of one point took 40 us instead of 31), and reads the rows contiguously. Tiles:
 * 3 adjoint rows x 4 weight rows, 2 x 6 and 1 x 8 (twelve or eight independent sums); weight rows in groups of
 * RD_GROUP, the outer loop, so that a group stays in L1 while all the block's adjoint rows pass over it. (Software
 * prefetching of the next tile's rows made the Hessian slower, by 2 us of 34 for one point of the physics network.)
 *
 * Built by GCC for AVX, the tiles keep each loaded weight vector in a register (RD_KEEP, an empty asm that only says
 * the value is in one): otherwise GCC (12, -O3) folds the load into every multiply-add that uses it, reading the
 * vector once per adjoint row, and the 2 x 6 tile (one point of a model with two outputs) ran at 60% of the speed it
 * has with one load per vector, 4.2 against 3.0 us per 256 x 256 product. The arithmetic is the same either way.
 */
#ifndef NNP_REV_DOT_MIN_WEIGHTS
#define NNP_REV_DOT_MIN_WEIGHTS 16384u /* 64 KB of weights, more than an L1 data cache holds */
#endif

#if NNP_VECTOR_EXT
/* the loop over u of a tile unrolled twice (0.8 us of 32 for one point of the physics network) */
#if defined(__clang__) || __GNUC__ >= 8
#define RD_UNROLL2 _Pragma("GCC unroll 2")
#else
#define RD_UNROLL2
#endif
#define RD_GROUP 24 /* weight rows per group: 6 tiles of 4, 4 of 6 or 3 of 8; 3 hsum8x8 per adjoint row */

/* out[r * RD_GROUP + c] = the eight lane sums of A_r . W_c over u < k8 (k8 a multiple of 8), r < MR, c < NR.
 * KEEP(v): see above. */
#define RD_TILE(MR, NR, SUF, KEEP)                                                                             \
    NNP_INLINE void rd##MR##x##NR##SUF(size_t k8, const float *A, size_t lda, const float *W, size_t ldw,      \
                                       nnp_v8 *out)                                                            \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[MR][NR];                                                                                    \
        size_t u_;                                                                                             \
        int r_, c_;                                                                                            \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NR; c_++) acc[r_][c_] = zero_;                                                   \
        RD_UNROLL2 for (u_ = 0; u_ < k8; u_ += 8) {                                                            \
            nnp_v8 a_[MR];                                                                                     \
            for (r_ = 0; r_ < MR; r_++) a_[r_] = NNP_LD(A + r_ * lda + u_);                                    \
            for (c_ = 0; c_ < NR; c_++) {                                                                      \
                nnp_v8 w_ = NNP_LD(W + c_ * ldw + u_);                                                         \
                KEEP(w_);                                                                                      \
                for (r_ = 0; r_ < MR; r_++) acc[r_][c_] += a_[r_] * w_;                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NR; c_++) out[r_ * RD_GROUP + c_] = acc[r_][c_];                                 \
    }

/* MR adjoint rows (Ai) against the nr <= RD_GROUP weight rows of the group at Wg (stride k) into lanes: tiles of NR
 * rows, then one row at a time */
#define RD_ROWS(MR, NR, SUF)                                                                                   \
    do {                                                                                                       \
        size_t c_;                                                                                             \
        for (c_ = 0; c_ + NR <= nr; c_ += NR) rd##MR##x##NR##SUF(k8, Ai, lda, Wg + c_ * k, k, lanes + c_);     \
        for (; c_ < nr; c_++) rd##MR##x1##SUF(k8, Ai, lda, Wg + c_ * k, k, lanes + c_);                        \
    } while (0)

/* C[r][c] for r < mr, c < nr: the lane sums lanes[r * RD_GROUP + c] added by hsum8x8 (eight at a time), then
 * u from k8 to k in order */
NNP_INLINE void rd_finish(size_t mr, size_t nr, size_t k8, size_t k, const float *A, size_t lda, const float *W,
                          const nnp_v8 *lanes, float *C, size_t ldc)
{
    size_t r, c, g, u;
    for (r = 0; r < mr; r++)
        for (g = 0; g < nr; g += 8) {
            nnp_v8 sums;
            hsum8x8(lanes + r * RD_GROUP + g, &sums);
            for (c = g; c < nr && c < g + 8; c++) {
                const float *a = A + r * lda, *w = W + c * k;
                float s = sums[c - g];
                for (u = k8; u < k; u++) s += a[u] * w[u];
                C[r * ldc + c] = s;
            }
        }
}

/* The tiles and rev_dot##SUF, the product, for one KEEP */
#define RD_DEFINE(SUF, KEEP)                                                                                   \
    RD_TILE(3, 4, SUF, KEEP)                                                                                   \
    RD_TILE(3, 1, SUF, KEEP)                                                                                   \
    RD_TILE(2, 6, SUF, KEEP)                                                                                   \
    RD_TILE(2, 1, SUF, KEEP)                                                                                   \
    RD_TILE(1, 8, SUF, KEEP)                                                                                   \
    RD_TILE(1, 1, SUF, KEEP)                                                                                   \
    NNP_INLINE void rev_dot##SUF(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W,     \
                                 float *C, size_t ldc)                                                         \
    {                                                                                                          \
        const size_t k8 = k - k % 8;                                                                           \
        const nnp_v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};                                                          \
        nnp_v8 lanes[3 * RD_GROUP];                                                                            \
        size_t r0, i;                                                                                          \
        for (i = 0; i < 3 * RD_GROUP; i++) lanes[i] = zero; /* a group of fewer rows leaves some unused */     \
        for (r0 = 0; r0 < n; r0 += RD_GROUP) {                                                                 \
            const size_t nr = n - r0 < RD_GROUP ? n - r0 : RD_GROUP;                                           \
            const float *Wg = W + r0 * k, *Ai;                                                                 \
            for (i = 0; i + 3 <= m; i += 3) {                                                                  \
                Ai = A + i * lda;                                                                              \
                RD_ROWS(3, 4, SUF);                                                                            \
                rd_finish(3, nr, k8, k, Ai, lda, Wg, lanes, C + i * ldc + r0, ldc);                            \
            }                                                                                                  \
            Ai = A + i * lda;                                                                                  \
            if (m - i == 2) {                                                                                  \
                RD_ROWS(2, 6, SUF);                                                                            \
                rd_finish(2, nr, k8, k, Ai, lda, Wg, lanes, C + i * ldc + r0, ldc);                            \
            } else if (m - i == 1) {                                                                           \
                RD_ROWS(1, 8, SUF);                                                                            \
                rd_finish(1, nr, k8, k, Ai, lda, Wg, lanes, C + i * ldc + r0, ldc);                            \
            }                                                                                                  \
        }                                                                                                      \
    }

#define RD_NOKEEP(v) (void)(v)
/* GCC on x86 with AVX (the AVX2+FMA build of a dispatching library, or one built for such a target); Clang keeps the
 * vectors in registers unasked (and checks the constraint against the unit's target, not the function's) */
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)) &&                    \
    (NNP_X86_DISPATCH || defined(__AVX__))
#define RD_KEEP(v) __asm__("" : "+x"(v))
#endif

#if defined(RD_KEEP) && NNP_X86_DISPATCH
/* dispatched as NNP_DISPATCHED does (nnp_simd.h), the AVX2+FMA build with RD_KEEP, the baseline one without */
RD_DEFINE(_base, RD_NOKEEP)
RD_DEFINE(_keep, RD_KEEP)
static void so_rev_dot_base(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W, float *C,
                            size_t ldc)
{
    rev_dot_base(m, k, n, A, lda, W, C, ldc);
}
__attribute__((target("avx2,fma"))) static void so_rev_dot_avx2(size_t m, size_t k, size_t n, const float *A,
                                                                 size_t lda, const float *W, float *C, size_t ldc)
{
    rev_dot_keep(m, k, n, A, lda, W, C, ldc);
}
static void so_rev_dot(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W, float *C,
                       size_t ldc)
{
    if (have_avx2_fma())
        so_rev_dot_avx2(m, k, n, A, lda, W, C, ldc);
    else
        so_rev_dot_base(m, k, n, A, lda, W, C, ldc);
}
#elif defined(RD_KEEP)
RD_DEFINE(_keep, RD_KEEP)
static void so_rev_dot(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W, float *C,
                       size_t ldc)
{
    rev_dot_keep(m, k, n, A, lda, W, C, ldc);
}
#else
RD_DEFINE(_base, RD_NOKEEP)
NNP_INLINE void so_rev_dot_body(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W, float *C,
                                size_t ldc)
{
    rev_dot_base(m, k, n, A, lda, W, C, ldc);
}
NNP_DISPATCHED(so_rev_dot, (size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W, float *C,
                            size_t ldc),
               (m, k, n, A, lda, W, C, ldc))
#endif
#else
/* plain C99: dot8 per entry (its lanes and order; the plain build rounds every step as written) */
static void so_rev_dot(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *W, float *C,
                       size_t ldc)
{
    size_t i, r;
    for (r = 0; r < n; r++)
        for (i = 0; i < m; i++) C[i * ldc + r] = dot8(k, A + i * lda, W + r * k);
}
#endif

static int piecewise_linear(int act)
{
    return act == NNP_ACT_LINEAR || act == NNP_ACT_RELU || act == NNP_ACT_LEAKY_RELU || act == NNP_ACT_RELU6 ||
           act == NNP_ACT_HARD_SIGMOID;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Forward passes with second-order rows                                                                  */

/* Rows of a point, each of the layer's width c: 0 the value, 1 .. m1 the first-order rows T, then the
 * second-order rows Q (none when op is 0: a network without second derivatives). On entry they hold the products
 * with W (the value without the bias); on return the layer's outputs. d and s: scratch for one row. */
NNP_INLINE void so_epilogue(const nnp_layer *L, int op, size_t n, size_t m1, float *Z, size_t c, float *d, float *s)
{
    float *T = Z + c, *Q = Z + (1 + m1) * c;
    size_t i, j, r, u;
    if (op == 0) {
        act_d_f32(L, Z, d, c);
    } else {
        act_d2_f32(L, Z, d, s, c);
    }
    switch (op) {
    case NNP_WS_HESSIAN:
        for (i = 0, r = 0; i < n; i++)
            for (j = i; j < n; j++, r++) {
                float *q = Q + r * c;
                const float *ti = T + i * c, *tj = T + j * c;
                for (u = 0; u < c; u++) q[u] = d[u] * q[u] + s[u] * ti[u] * tj[u];
            }
        break;
    case NNP_WS_LAPLACIAN:
        for (u = 0; u < c; u++) Q[u] *= d[u];
        for (i = 0; i < n; i++) {
            const float *ti = T + i * c;
            for (u = 0; u < c; u++) Q[u] += s[u] * ti[u] * ti[u];
        }
        break;
    case NNP_WS_HVP: { /* T[n] is the tangent of v */
        const float *tv = T + n * c;
        for (i = 0; i < n; i++) {
            float *q = Q + i * c;
            const float *ti = T + i * c;
            for (u = 0; u < c; u++) q[u] = d[u] * q[u] + s[u] * ti[u] * tv[u];
        }
        break;
    }
    default: /* first-order rows only */
        break;
    }
    for (i = 0; i < m1; i++) {
        float *t = T + i * c;
        for (u = 0; u < c; u++) t[u] *= d[u];
    }
}

/* One block of np points through the network; op is NNP_WS_HESSIAN, NNP_WS_LAPLACIAN or NNP_WS_HVP (v: the
 * directions, for NNP_WS_HVP). Writes y and J when not NULL, and out: the Hessian [np][n_out][n_in][n_in], the
 * Laplacian [np][n_out] or H v [np][n_out][n_in]. buf0, buf1: np * R * max_cols floats; d, s: max_cols.
 * A piecewise-linear network has no second derivatives (every f'' is 0): its pass carries the value and, for the
 * Hessian and the Laplacian, the tangents (for J) only, and out is 0. */
NNP_INLINE void so_fwd_block_body(const nnp_model *m, int op, size_t np, const float *x, const float *v, float *y,
                                  float *J, float *out, float *buf0, float *buf1, float *d, float *s)
{
    const size_t n = m->n_in, n_out = m->n_out;
    const int eop = m->piecewise ? 0 : op; /* the epilogue's operation (0: first order only) */
    size_t m1, R, k, p, i, j, r;
    float *cur = buf0, *nxt = buf1;
    R = so_rows(m, op, &m1); /* nnp_workspace checked that it fits */
    if (m->piecewise) {
        m1 = (op == NNP_WS_HVP) ? 0 : n;
        R = 1 + m1;
    }
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        if (k == 0) {
            /* values x W; tangents e_j W = W[j] (all of W), v W; second-order rows 0 */
            so_gemm(np, n, c, x, n, L->W, L->Wt, nxt, R * c);
            if (eop == NNP_WS_HVP) so_gemm(np, n, c, v, n, L->W, L->Wt, nxt + (1 + n) * c, R * c);
            for (p = 0; p < np; p++) {
                float *Z = nxt + p * R * c;
                if (m1 > 0) memcpy(Z + c, L->W, n * c * sizeof(float));
                for (r = (1 + m1) * c; r < R * c; r++) Z[r] = 0.0f;
            }
        } else {
            so_gemm(np * R, L->rows, c, cur, L->rows, L->W, L->Wt, nxt, c);
        }
        for (p = 0; p < np; p++) so_epilogue(L, eop, n, m1, nxt + p * R * c, c, d, s);
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
    /* cur: per point [R][n_out] */
    for (p = 0; p < np; p++) {
        const float *Z = cur + p * R * n_out, *Q = Z + (1 + m1) * n_out;
        if (y) memcpy(y + p * n_out, Z, n_out * sizeof(float));
        if (J)
            for (i = 0; i < n_out; i++)
                for (j = 0; j < n; j++) J[(p * n_out + i) * n + j] = Z[(1 + j) * n_out + i];
        if (eop == 0) {
            const size_t len = op == NNP_WS_HESSIAN ? n_out * n * n : (op == NNP_WS_LAPLACIAN ? n_out : n_out * n);
            for (i = 0; i < len; i++) out[p * len + i] = 0.0f;
            continue;
        }
        for (i = 0; i < n_out; i++) {
            if (op == NNP_WS_HESSIAN) {
                float *H = out + (p * n_out + i) * n * n;
                size_t a, b2;
                for (a = 0, r = 0; a < n; a++)
                    for (b2 = a; b2 < n; b2++, r++) H[a * n + b2] = H[b2 * n + a] = Q[r * n_out + i];
            } else if (op == NNP_WS_LAPLACIAN) {
                out[p * n_out + i] = Q[i];
            } else {
                for (j = 0; j < n; j++) out[(p * n_out + i) * n + j] = Q[j * n_out + i];
            }
        }
    }
}

NNP_DISPATCHED(so_fwd_block, (const nnp_model *m, int op, size_t np, const float *x, const float *v, float *y,
                               float *J, float *out, float *buf0, float *buf1, float *d, float *s),
               (m, op, np, x, v, y, J, out, buf0, buf1, d, s))

/* ------------------------------------------------------------------------------------------------------ */
/* Hessian: forward pass keeping every layer's tangents, then n_out adjoint rows                          */

/* Scratch of one block of np points, carved from the workspace (ws_shape, NNP_WS_HESSIAN):
 *   G   per layer l, [np][1 + n_in][c_l] at offset np (1 + n_in) (widths before l): the products with W (the value
 *       row, then replaced by the layer's output, and the tangent rows g before the scaling by d)
 *   D   per layer, [np][c_l] at np (widths before l): f'; S the same for f'' (at np * sum_cols after D)
 *   A   [np][1 + n_in][max_cols]: the next layer's input rows (values, scaled tangents)
 *   g0, g1  [np * n_out][max_cols]: adjoints; w, t  [max_cols]: scratch rows */
typedef struct {
    float *G, *D, *S, *A, *g0, *g1, *w, *t;
} hr_scratch_t;

/* H[a][b] += sum_u w[u] G_a[u] G_b[u] for a <= b < n, rows G_a of width c at stride c (t: a scratch row) */
NNP_INLINE void hr_accumulate(size_t n, size_t c, const float *w, const float *G, float *H, float *t)
{
    size_t a, b2, u;
    for (a = 0; a < n; a++) {
        const float *ga = G + a * c;
        for (u = 0; u < c; u++) t[u] = w[u] * ga[u];
        for (b2 = a; b2 < n; b2++) H[a * n + b2] += dot8(c, t, G + b2 * c);
    }
}

NNP_INLINE void hess_rev_block_body(const nnp_model *m, size_t np, const float *x, float *y, float *J, float *Hout,
                                    const hr_scratch_t *sc)
{
    const size_t n = m->n_in, n_out = m->n_out, nl = m->n_layers, R1 = n + 1, hn = n * n;
    size_t k, p, i, j, u, lo, off = 0;
    float *cur, *nxt;

    /* forward: values and tangent rows, keeping each layer's products G and derivatives D, S */
    for (k = 0; k < nl; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        float *G = sc->G + R1 * np * off, *D = sc->D + np * off, *S = sc->S + np * off;
        if (k == 0) {
            so_gemm(np, n, c, x, n, L->W, L->Wt, G, R1 * c);
            for (p = 0; p < np; p++) memcpy(G + p * R1 * c + c, L->W, n * c * sizeof(float));
        } else {
            so_gemm(np * R1, L->rows, c, sc->A, L->rows, L->W, L->Wt, G, c);
        }
        for (p = 0; p < np; p++) {
            float *Gp = G + p * R1 * c;
            const float *dp = D + p * c;
            act_d2_f32(L, Gp, D + p * c, S + p * c, c);
            if (k + 1 < nl) {
                float *Ap = sc->A + p * R1 * c;
                memcpy(Ap, Gp, c * sizeof(float));
                for (j = 0; j < n; j++) {
                    const float *g = Gp + (1 + j) * c;
                    float *a = Ap + (1 + j) * c;
                    for (u = 0; u < c; u++) a[u] = dp[u] * g[u];
                }
            } else {
                if (y) memcpy(y + p * n_out, Gp, n_out * sizeof(float));
                if (J)
                    for (i = 0; i < n_out; i++)
                        for (j = 0; j < n; j++) J[(p * n_out + i) * n + j] = dp[i] * Gp[(1 + j) * c + i];
            }
        }
        off += c;
    }

    /* reverse: the last layer's own term (its unit i is output i: adjoint 1), then layer by layer down to the first
     * layer that is not piecewise linear (lo; below it nothing adds up, none in a piecewise-linear network) */
    for (i = 0; i < np * n_out * hn; i++) Hout[i] = 0.0f;
    if (m->piecewise) return;
    lo = 0;
    while (piecewise_linear(m->layers[lo].act)) lo++;
    off -= n_out;
    {
        const nnp_layer *L = &m->layers[nl - 1];
        const float *G = sc->G + R1 * np * off, *D = sc->D + np * off, *S = sc->S + np * off;
        if (!piecewise_linear(L->act))
            for (p = 0; p < np; p++)
                for (i = 0; i < n_out; i++) {
                    float *H = Hout + (p * n_out + i) * hn;
                    const float w = S[p * n_out + i];
                    const float *Gp = G + p * R1 * n_out + n_out + i; /* g_j at Gp[j * n_out] */
                    size_t a, b2;
                    for (a = 0; a < n; a++)
                        for (b2 = a; b2 < n; b2++) H[a * n + b2] += w * Gp[a * n_out] * Gp[b2 * n_out];
                }
        /* adjoints of the inputs of the last layer: lambda_i = f'(z_i) W[:, i] */
        if (nl > 1 && lo < nl - 1)
            for (p = 0; p < np; p++)
                for (i = 0; i < n_out; i++) {
                    const float sc_ = D[p * n_out + i], *wt = L->Wt + i * L->rows;
                    float *g = sc->g0 + (p * n_out + i) * L->rows;
                    for (u = 0; u < L->rows; u++) g[u] = sc_ * wt[u];
                }
    }
    cur = sc->g0;
    nxt = sc->g1;
    for (k = nl - 1; k-- > lo;) {
        /* cur: adjoints of the outputs of layer k, [np * n_out][c] */
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        const float *G, *D, *S;
        off -= c;
        G = sc->G + R1 * np * off;
        D = sc->D + np * off;
        S = sc->S + np * off;
        if (!piecewise_linear(L->act))
            for (p = 0; p < np; p++)
                for (i = 0; i < n_out; i++) {
                    const float *lam = cur + (p * n_out + i) * c, *sp = S + p * c;
                    for (u = 0; u < c; u++) sc->w[u] = lam[u] * sp[u];
                    hr_accumulate(n, c, sc->w, G + p * R1 * c + c, Hout + (p * n_out + i) * hn, sc->t);
                }
        if (k > lo) { /* adjoints of the layer's inputs: (lambda * f') W^T */
            for (p = 0; p < np; p++)
                for (i = 0; i < n_out; i++) {
                    float *lam = cur + (p * n_out + i) * c;
                    const float *dp = D + p * c;
                    for (u = 0; u < c; u++) lam[u] *= dp[u];
                }
            if (L->rows * c >= NNP_REV_DOT_MIN_WEIGHTS)
                so_rev_dot(np * n_out, c, L->rows, cur, c, L->W, nxt, L->rows);
            else
                so_gemm(np * n_out, c, L->rows, cur, c, L->Wt, L->W, nxt, L->rows);
            {
                float *tmp = cur;
                cur = nxt;
                nxt = tmp;
            }
        }
    }
    /* the lower triangle from the upper one */
    for (p = 0; p < np * n_out; p++) {
        float *H = Hout + p * hn;
        size_t a, b2;
        for (a = 0; a < n; a++)
            for (b2 = a + 1; b2 < n; b2++) H[b2 * n + a] = H[a * n + b2];
    }
}

NNP_DISPATCHED(hess_rev_block, (const nnp_model *m, size_t np, const float *x, float *y, float *J, float *Hout,
                                 const hr_scratch_t *sc),
               (m, np, x, y, J, Hout, sc))

/* ------------------------------------------------------------------------------------------------------ */
/* Entry points (float32)                                                                                 */

/* Argument checks common to the three: out receives out_per_point floats per point (0 when it does not fit). */
static int so_check(const nnp_model *m, size_t batch, const float *x, const float *out, const float *work,
                    size_t out_per_point)
{
    if (m != NULL && model_ok(m) && out_per_point == 0) return NNP_E_ARG;
    return nnpi_check_call(m, batch, x, out, 1, work, out_per_point);
}

/* The batch in blocks; op: NNP_WS_HESSIAN, NNP_WS_LAPLACIAN or NNP_WS_HVP. */
static int so_run(const nnp_model *m, int op, size_t batch, const float *x, const float *v, float *y, float *dy_dx,
                  float *out, size_t out_per_point, float *work, size_t work_len)
{
    const size_t n_in = m->n_in, n_out = m->n_out, jn = n_in * n_out;
    size_t fixed, per_point, blk, done;
    int rc = ws_shape(m, op, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    blk = block_for_of(fixed, per_point, batch, work_len, ws_block_budget(op));
    if (blk == 0) return NNP_E_WORKSPACE;
    if (op == NNP_WS_HESSIAN && hess_reverse(m)) {
        hr_scratch_t sc;
        const size_t sum = m->sum_cols, mc = m->max_cols;
        sc.w = work;
        sc.t = work + mc;
        sc.G = work + fixed;
        sc.D = sc.G + blk * (n_in + 1) * sum;
        sc.S = sc.D + blk * sum;
        sc.A = sc.S + blk * sum;
        sc.g0 = sc.A + blk * (n_in + 1) * mc;
        sc.g1 = sc.g0 + blk * n_out * mc;
        for (done = 0; done < batch; done += blk) {
            const size_t np = batch - done < blk ? batch - done : blk;
            hess_rev_block(m, np, x + done * n_in, y ? y + done * n_out : NULL, dy_dx ? dy_dx + done * jn : NULL,
                           out + done * out_per_point, &sc);
        }
        return NNP_OK;
    }
    for (done = 0; done < batch; done += blk) {
        const size_t np = batch - done < blk ? batch - done : blk;
        float *buf0 = work + fixed, *buf1 = buf0 + blk * (per_point / 2);
        so_fwd_block(m, op, np, x + done * n_in, v ? v + done * n_in : NULL, y ? y + done * n_out : NULL,
                     dy_dx ? dy_dx + done * jn : NULL, out + done * out_per_point, buf0, buf1, work,
                     work + m->max_cols);
    }
    return NNP_OK;
}

/* n_out * n_in * n_in, or 0 when it does not fit */
static size_t hessian_len(const nnp_model *m)
{
    size_t t;
    if (m == NULL || !model_ok(m) || !mul_sz(m->n_in, m->n_in, &t) || !mul_sz(t, m->n_out, &t)) return 0;
    return t;
}

int nnp_hessian(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *d2y_dx2, float *work,
                size_t work_len)
{
    const size_t hn = hessian_len(m);
    int rc = so_check(m, batch, x, d2y_dx2, work, hn);
    if (rc != NNP_OK || batch == 0) return rc;
    return so_run(m, NNP_WS_HESSIAN, batch, x, NULL, y, dy_dx, d2y_dx2, hn, work, work_len);
}

int nnp_laplacian(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *lap, float *work,
                  size_t work_len)
{
    size_t jn = 0;
    int rc;
    if (m != NULL && model_ok(m) && !mul_sz(m->n_in, m->n_out, &jn)) return NNP_E_ARG;
    rc = nnpi_check_call(m, batch, x, lap, 1, work, m ? m->n_out : 0);
    if (rc == NNP_OK && dy_dx != NULL) rc = nnpi_check_call(m, batch, x, dy_dx, 1, work, jn);
    if (rc != NNP_OK || batch == 0) return rc;
    return so_run(m, NNP_WS_LAPLACIAN, batch, x, NULL, y, dy_dx, lap, m->n_out, work, work_len);
}

int nnp_hvp(const nnp_model *m, size_t batch, const float *x, const float *v, float *y, float *hvp, float *work,
            size_t work_len)
{
    size_t jn = 0;
    int rc;
    if (m != NULL && model_ok(m) && !mul_sz(m->n_in, m->n_out, &jn)) return NNP_E_ARG;
    rc = so_check(m, batch, x, hvp, work, jn);
    if (rc != NNP_OK || batch == 0) return rc;
    if (v == NULL) return NNP_E_NULL;
    return so_run(m, NNP_WS_HVP, batch, x, v, y, NULL, hvp, jn, work, work_len);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Float64: the analytic Jacobian and the finite-difference Hessian                                       */

#define SQRT1_2 0.70710678118654752440
#define SQRT_2_OVER_PI 0.79788456080286535588
#define INV_SQRT_2PI 0.39894228040143267794

/* f(v) and f'(v) in float64, with the conventions of the float32 ones at the kinks (values as nnp_fd.c's) */
static void act_d_f64(const nnp_layer *L, double v, double *a, double *d)
{
    const double p0 = L->p0, p1 = L->p1;
    double e, t;
    switch (L->act) {
    case NNP_ACT_LINEAR: *a = v; *d = 1.0; break;
    case NNP_ACT_RELU: *a = v < 0.0 ? 0.0 : v; *d = v > 0.0 ? 1.0 : 0.0; break;
    case NNP_ACT_LEAKY_RELU: *a = v > 0.0 ? v : p0 * v; *d = v > 0.0 ? 1.0 : p0; break;
    case NNP_ACT_ELU:
        *a = v > 0.0 ? v : p0 * expm1(v);
        *d = v > 0.0 ? 1.0 : p0 * exp(v);
        break;
    case NNP_ACT_SELU:
        *a = v > 0.0 ? p1 * v : p1 * p0 * expm1(v);
        *d = v < 0.0 ? p1 * p0 * exp(v) : p1;
        break;
    case NNP_ACT_TANH: *a = tanh(v); *d = 1.0 - *a * *a; break;
    case NNP_ACT_SIGMOID: *a = 1.0 / (1.0 + exp(-v)); *d = *a * (1.0 - *a); break;
    case NNP_ACT_HARD_SIGMOID:
        t = p0 * v + p1;
        *a = t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t);
        *d = (t > 0.0 && t < 1.0) ? p0 : 0.0;
        break;
    case NNP_ACT_SOFTPLUS:
        e = exp(-fabs(v));
        *a = (v > 0.0 ? v : 0.0) + log1p(e);
        *d = (v >= 0.0 ? 1.0 : e) / (1.0 + e);
        break;
    case NNP_ACT_SOFTSIGN:
        t = 1.0 / (1.0 + fabs(v));
        *a = v / (1.0 + fabs(v));
        *d = t * t;
        break;
    case NNP_ACT_SWISH:
        t = 1.0 / (1.0 + exp(-v));
        *a = v / (1.0 + exp(-v));
        *d = t * (1.0 + v * (1.0 - t));
        break;
    case NNP_ACT_GELU:
        *a = 0.5 * v * (1.0 + erf(v * SQRT1_2));
        *d = 0.5 * (1.0 + erf(v * SQRT1_2)) + v * INV_SQRT_2PI * exp(-0.5 * v * v);
        break;
    case NNP_ACT_GELU_TANH:
        t = tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v));
        *a = 0.5 * v * (1.0 + t);
        *d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v);
        break;
    case NNP_ACT_RELU6:
        *a = v < 0.0 ? 0.0 : (v > 6.0 ? 6.0 : v);
        *d = (v > 0.0 && v < 6.0) ? 1.0 : 0.0;
        break;
    default: *a = exp(v); *d = *a; break;
    }
}

/* y [n_out], J [n_out][n_in] of the point x in float64, forward mode (rows: the value, then the tangents e_j), and
 * mag [n_out][n_in]: |f'(z_i)| sum_u |T_j[u] W[u][i]| of the last layer, the scale of the rounding errors of J.
 * b0, b1: (1 + n_in) fd2_width doubles each; d: max_cols. */
static void jac_point_f64(const nnp_model *m, const double *x, double *y, double *J, double *mag, double *b0,
                          double *b1, double *d)
{
    const size_t n = m->n_in, R = n + 1, n_out = m->n_out;
    size_t k, r, p, u, w = n, i, j;
    double *cur = b0, *nxt = b1;
    memcpy(cur, x, n * sizeof(double));
    for (r = 1; r < R; r++)
        for (p = 0; p < n; p++) cur[r * n + p] = (r - 1 == p) ? 1.0 : 0.0;
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        for (r = 0; r < R; r++) {
            const double *a = cur + r * w;
            double *o = nxt + r * c;
            for (u = 0; u < c; u++) o[u] = 0.0;
            for (p = 0; p < w; p++) {
                const double ap = a[p];
                const float *wr = L->W + p * c;
                for (u = 0; u < c; u++) o[u] += ap * (double)wr[u];
            }
        }
        for (u = 0; u < c; u++) act_d_f64(L, nxt[u] + (double)L->b[u], &nxt[u], &d[u]);
        if (k + 1 == m->n_layers)
            for (i = 0; i < c; i++)
                for (j = 0; j < n; j++) {
                    double sum = 0.0;
                    for (p = 0; p < w; p++) sum += fabs(cur[(1 + j) * w + p] * (double)L->W[p * c + i]);
                    mag[i * n + j] = fabs(d[i]) * sum;
                }
        for (r = 1; r < R; r++)
            for (u = 0; u < c; u++) nxt[r * c + u] *= d[u];
        {
            double *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
        w = c;
    }
    memcpy(y, cur, n_out * sizeof(double));
    for (i = 0; i < n_out; i++)
        for (j = 0; j < n; j++) J[i * n + j] = cur[(1 + j) * n_out + i];
}

int nnp_fd_hessian_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *d2y_dx2, double *err,
                       double *work, size_t work_len)
{
    size_t fixed, per_point, n, n_out, jn, hn, b, j, i, k, q;
    double *J0, *Jq, *Mq, *y0, *pt, *fb0, *fb1, *fd;
    int rc;
    hn = hessian_len(m);
    if (m != NULL && model_ok(m) && hn == 0) return NNP_E_ARG;
    rc = nnpi_check_call(m, batch, x, d2y_dx2, 1, work, hn);
    if (rc != NNP_OK || batch == 0) return rc;
    rc = ws_shape(m, NNP_WS_FD_HESSIAN_F64, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    if (work_len < fixed) return NNP_E_WORKSPACE;
    n = m->n_in;
    n_out = m->n_out;
    jn = n * n_out;
    J0 = work;                  /* [n_out][n_in] */
    Jq = J0 + jn;               /* [4][n_out][n_in] */
    Mq = Jq + 4 * jn;           /* [4][n_out][n_in] */
    y0 = Mq + 4 * jn;           /* [n_out] */
    pt = y0 + n_out;            /* [n_in] */
    fb0 = pt + n;               /* [1 + n_in][max(max_cols, n_in)] */
    fb1 = fb0 + (n + 1) * fd2_width(m);
    fd = fb1 + (n + 1) * fd2_width(m); /* [max_cols] */

    for (b = 0; b < batch; b++) {
        const double *xb = x + b * n;
        double *H = d2y_dx2 + b * hn, *E = err ? err + b * hn : NULL;
        jac_point_f64(m, xb, y0, J0, Mq, fb0, fb1, fd);
        if (y) memcpy(y + b * n_out, y0, n_out * sizeof(double));
        for (j = 0; j < n; j++) {
            /* column j of every output's Hessian: d J[i][k] / d x_j */
            const double h = NNP_FD_CBRT_EPS * (fabs(xb[j]) > 1.0 ? fabs(xb[j]) : 1.0);
            double st[4], step1, step2;
            memcpy(pt, xb, n * sizeof(double));
            st[0] = xb[j] + h;
            st[1] = xb[j] - h;
            st[2] = xb[j] + 0.5 * h;
            st[3] = xb[j] - 0.5 * h;
            for (q = 0; q < 4; q++) {
                pt[j] = st[q];
                jac_point_f64(m, pt, y0, Jq + q * jn, Mq + q * jn, fb0, fb1, fd);
            }
            step1 = st[0] - st[1]; /* the steps actually taken (x + h is rounded) */
            step2 = st[2] - st[3];
            for (i = 0; i < n_out; i++)
                for (k = 0; k < n; k++) {
                    const size_t e = i * n + k;
                    const double jp1 = Jq[e], jm1 = Jq[jn + e], jp2 = Jq[2 * jn + e], jm2 = Jq[3 * jn + e];
                    const double d1 = (jp1 - jm1) / step1, d2 = (jp2 - jm2) / step2;
                    H[e * n + j] = (4.0 * d2 - d1) / 3.0;
                    if (E) {
                        const double a1 = (jp1 - 2.0 * J0[e] + jm1) / (0.5 * step1);
                        const double a2 = (jp2 - 2.0 * J0[e] + jm2) / (0.5 * step2);
                        double f = fmax(fmax(fabs(jp1), fabs(jm1)), fmax(fabs(jp2), fabs(jm2)));
                        for (q = 0; q < 4; q++) f = fmax(f, Mq[q * jn + e]);
                        E[e * n + j] = fabs(d1 - d2) + 2.0 * fabs(a2 - 0.5 * a1) +
                                       NNP_FD_ROUNDING * DBL_EPSILON * fmax(1.0, f) / step2;
                    }
                }
        }
        /* symmetric: the mean of the two estimates of each pair; the error the mean of theirs, at least half
         * their difference */
        for (i = 0; i < n_out; i++) {
            double *Hi = H + i * n * n, *Ei = E ? E + i * n * n : NULL;
            for (j = 0; j < n; j++)
                for (k = j + 1; k < n; k++) {
                    const double hjk = Hi[j * n + k], hkj = Hi[k * n + j], mean = 0.5 * (hjk + hkj);
                    Hi[j * n + k] = Hi[k * n + j] = mean;
                    if (Ei) {
                        const double e = fmax(0.5 * (Ei[j * n + k] + Ei[k * n + j]), 0.5 * fabs(hjk - hkj));
                        Ei[j * n + k] = Ei[k * n + j] = e;
                    }
                }
        }
    }
    return NNP_OK;
}
