/*
 * nnp_point.c - the Jacobian of a single point, float32: reverse mode with kernels for one row, the bias,
 * activation and derivative applied to the sums while they are in registers. nnp.c takes this path for a call
 * of one point with few outputs (NNP_SP_MAX_OUT); its sums run in another order than the batch kernels', so its
 * results may differ from the same point's in a batch by float32 rounding (nnp.h). sp_jac is dispatched on the
 * model's level (NNP_DISPATCHED_M, nnp_simd.h): the kernels below and those of nnp_kernels.h are inlined into both
 * of its builds.
 */
#include "nnp_kernels.h"

/* Single-point backward products of layers with at least this many columns read W by rows (dot products with
 * the adjoint); narrower ones read Wt like the forward products. */
#ifndef NNP_SP_ROWDOTS
#define NNP_SP_ROWDOTS 8u
#endif
/* Row dot products: at most this many rows left are done one at a time (shorter dependency chains) */
#ifndef NNP_SP_FEW
#define NNP_SP_FEW 4u
#endif

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian of one point, reverse mode                                                                    */
/*
 * A call for one point runs its own path: one forward pass keeping each layer's derivative, then one adjoint
 * row per output back through the layers. The backward products read W itself (dot products of its rows with
 * the adjoint, eight rows at a time) rather than Wt, so that both passes share one copy of the weights in the
 * L1 cache. Bias, activation and the scaling by the derivative are applied to the sums while they are still in
 * registers.
 */

/* What the kernels do with finished sums v of columns j.. (vectors of 8, or single sums in the tails) */
enum { SP_STORE, SP_SCALE, SP_RELU, SP_LEAKY };
typedef struct {
    int kind;       /* SP_* */
    float p0;       /* SP_LEAKY: alpha */
    float *out;     /* values: v (SP_STORE), v * D (SP_SCALE), f(v) (activations) */
    float *d;       /* activations: f'(v) */
    const float *D; /* SP_SCALE */
} sp_epi_t;

#if NNP_VECTOR_EXT
/* Epilogue of the NV vectors of sums V[0..NV) of columns j..: a macro rather than a function, so that the sums
 * stay in registers (an array whose address is taken is kept in memory). The selects match act_d_f32 (NaN
 * takes the non-positive branch). */
#define NNP_SP_EPI(E, J, V, NV)                                                                                \
    do {                                                                                                       \
        const nnp_v8 z_ = {0, 0, 0, 0, 0, 0, 0, 0}, o_ = {1, 1, 1, 1, 1, 1, 1, 1};                             \
        const float a_ = (E)->p0;                                                                              \
        const nnp_v8 av_ = {a_, a_, a_, a_, a_, a_, a_, a_};                                                   \
        float *out_ = (E)->out + (J), *d_;                                                                     \
        int q_;                                                                                                \
        switch ((E)->kind) { /* d and D are only offset where they are used (they may be NULL) */            \
        case SP_STORE:                                                                                         \
            for (q_ = 0; q_ < NV; q_++) NNP_ST(out_ + 8 * q_, V[q_]);                                          \
            break;                                                                                             \
        case SP_SCALE:                                                                                         \
            for (q_ = 0; q_ < NV; q_++) NNP_ST(out_ + 8 * q_, V[q_] * NNP_LD((E)->D + (J) + 8 * q_));          \
            break;                                                                                             \
        case SP_RELU:                                                                                          \
            d_ = (E)->d + (J);                                                                                 \
            for (q_ = 0; q_ < NV; q_++) {                                                                      \
                const nnp_v8i neg_ = V[q_] < z_, pos_ = V[q_] > z_;                                            \
                NNP_ST(out_ + 8 * q_, (nnp_v8)(~neg_ & (nnp_v8i)V[q_]));                                       \
                NNP_ST(d_ + 8 * q_, (nnp_v8)(pos_ & (nnp_v8i)o_));                                             \
            }                                                                                                  \
            break;                                                                                             \
        default: /* SP_LEAKY */                                                                                \
            d_ = (E)->d + (J);                                                                                 \
            for (q_ = 0; q_ < NV; q_++) {                                                                      \
                const nnp_v8i pos_ = V[q_] > z_;                                                               \
                NNP_ST(out_ + 8 * q_, (nnp_v8)((pos_ & (nnp_v8i)V[q_]) | (~pos_ & (nnp_v8i)(av_ * V[q_]))));   \
                NNP_ST(d_ + 8 * q_, (nnp_v8)((pos_ & (nnp_v8i)o_) | (~pos_ & (nnp_v8i)av_)));                  \
            }                                                                                                  \
            break;                                                                                             \
        }                                                                                                      \
    } while (0)

/* one vector of 8 sums (no function: Clang warns about vector arguments in the baseline build) */
#define NNP_SP_EPI1(E, J, X)                                                                                   \
    do {                                                                                                       \
        const nnp_v8 v1_[1] = {X};                                                                             \
        NNP_SP_EPI(E, J, v1_, 1);                                                                              \
    } while (0)

/* Columns j..j+8*NV of init + x M for one row x[k] (M row stride ldm; init may be NULL), then the epilogue. The
 * sum over k is split into S interleaved partial sums (S * NV = 8 accumulators cover the latency of the FMAs).
 * x is read 8 values at a time and broadcast by shuffles: a broadcast from memory would cost a load, and loads
 * (two per cycle, one per FMA already) bound these products. Lane l of x goes to partial sum l % S. With KV > 0
 * the kernel is for k = 8 * KV exactly: a loop of known length, so that the accumulators stay in registers. */
#define NNP_SPR_LANE(XH, L)                                                                                    \
    do {                                                                                                       \
        const nnp_v8 a_ = NNP_SHUF(XH, XH, L, L, L, L, L + 4, L + 4, L + 4, L + 4);                            \
        for (c_ = 0; c_ < NV_; c_++) acc[(L + 4 * h_) % S_][c_] += a_ * NNP_LD(m_ + 8 * c_);                  \
        m_ += ldm;                                                                                             \
    } while (0)
#define NNP_SPR(NV, S, KV)                                                                                     \
    NNP_INLINE void spr##NV##x##S##_##KV(size_t k, const float *x, const float *M, size_t ldm,                 \
                                         const float *init, const sp_epi_t *e, size_t j)                       \
    {                                                                                                          \
        enum { NV_ = NV, S_ = S };                                                                             \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[S][NV];                                                                                     \
        const size_t kb_ = KV ? 8 * KV : k - k % 8; /* whole blocks of 8; with KV, k is 8 * KV */            \
        size_t p_ = 0;                                                                                         \
        int s_, c_, w_, h_;                                                                                    \
        for (s_ = 0; s_ < S; s_++)                                                                             \
            for (c_ = 0; c_ < NV; c_++) acc[s_][c_] = zero_;                                                   \
        if (init)                                                                                              \
            for (c_ = 0; c_ < NV; c_++) acc[0][c_] = NNP_LD(init + j + 8 * c_);                                \
        M += j;                                                                                                \
        for (; p_ < kb_; ) {                                                                                   \
            const nnp_v8 xv_ = NNP_LD(x + p_);                                                                 \
            const nnp_v8 x2_[2] = {NNP_SHUF(xv_, xv_, 0, 1, 2, 3, 0, 1, 2, 3),                                 \
                                   NNP_SHUF(xv_, xv_, 4, 5, 6, 7, 4, 5, 6, 7)};                                \
            const float *m_ = M + p_ * ldm;                                                                    \
            for (h_ = 0; h_ < 2; h_++) {                                                                       \
                NNP_SPR_LANE(x2_[h_], 0);                                                                      \
                NNP_SPR_LANE(x2_[h_], 1);                                                                      \
                NNP_SPR_LANE(x2_[h_], 2);                                                                      \
                NNP_SPR_LANE(x2_[h_], 3);                                                                      \
            }                                                                                                  \
            p_ += 8;                                                                                           \
        }                                                                                                      \
        for (; !KV && p_ < k; p_++) {                                                                          \
            const float *m_ = M + p_ * ldm, x_ = x[p_];                                                        \
            const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                                \
            for (c_ = 0; c_ < NV; c_++) acc[0][c_] += a_ * NNP_LD(m_ + 8 * c_);                                \
        }                                                                                                      \
        for (w_ = S / 2; w_ > 0; w_ /= 2)                                                                      \
            for (s_ = 0; s_ < w_; s_++)                                                                        \
                for (c_ = 0; c_ < NV; c_++) acc[s_][c_] += acc[s_ + w_][c_];                                   \
        NNP_SP_EPI(e, j, acc[0], NV);                                                                          \
    }
#define NNP_SPR_ALL(KV) NNP_SPR(8, 1, KV) NNP_SPR(4, 2, KV) NNP_SPR(2, 4, KV) NNP_SPR(1, 8, KV)
NNP_SPR_ALL(0)
NNP_SPR_ALL(1)
NNP_SPR_ALL(2)
NNP_SPR_ALL(4)
NNP_SPR_ALL(8)

/* k < 8 (such as the first layer of a network with few inputs): one partial sum per column vector */
#define NNP_SPK(NV)                                                                                            \
    NNP_INLINE void spk##NV(size_t k, const float *x, const float *M, size_t ldm, const float *init,           \
                            const sp_epi_t *e, size_t j)                                                       \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[NV];                                                                                        \
        size_t p_;                                                                                             \
        int c_;                                                                                                \
        for (c_ = 0; c_ < NV; c_++) acc[c_] = init ? (nnp_v8)NNP_LD(init + j + 8 * c_) : zero_;              \
        M += j;                                                                                                \
        for (p_ = 0; p_ < k; p_++) {                                                                           \
            const float *m_ = M + p_ * ldm, x_ = x[p_];                                                        \
            const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                                \
            for (c_ = 0; c_ < NV; c_++) acc[c_] += a_ * NNP_LD(m_ + 8 * c_);                                   \
        }                                                                                                      \
        NNP_SP_EPI(e, j, acc, NV);                                                                             \
    }
NNP_SPK(8)
NNP_SPK(1)

/* Rows p.. of out[p] = M[p][0..k) . h, one row at a time with its sum split four ways (for a few rows, such as
 * the Jacobian's row when n_in is small: shorter dependency chains than a group of 8) */
NNP_INLINE void sp_rowdots_few(size_t p, size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    const nnp_v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const size_t kv = k - k % 8;
    size_t v, j;
    for (; p < rows; p++) {
        const float *w = M + p * k;
        nnp_v8 a[4];
        float s;
        int r;
        for (r = 0; r < 4; r++) a[r] = zero;
        for (v = 0; v + 32 <= kv; v += 32)
            for (r = 0; r < 4; r++) a[r] += NNP_LD(w + v + 8 * r) * NNP_LD(h + v + 8 * r);
        for (; v < kv; v += 8) a[0] += NNP_LD(w + v) * NNP_LD(h + v);
        a[0] = (a[0] + a[1]) + (a[2] + a[3]);
        a[0] += NNP_SHUF(a[0], a[0], 4, 5, 6, 7, 0, 1, 2, 3);
        a[0] += NNP_SHUF(a[0], a[0], 2, 3, 0, 1, 6, 7, 4, 5);
        a[0] += NNP_SHUF(a[0], a[0], 1, 0, 3, 2, 5, 4, 7, 6);
        s = a[0][0];
        for (j = kv; j < k; j++) s += w[j] * h[j];
        e->out[p] = e->kind == SP_SCALE ? s * e->D[p] : s;
    }
}

/* Rows p.. of out[p] = M[p][0..k) . h, eight rows at a time with their sums reduced together; epilogue
 * SP_STORE or SP_SCALE. */
NNP_INLINE void sp_rowdots_gen(size_t p, size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    const nnp_v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const size_t kv = k - k % 8;
    size_t v, j;
    int r;
    if (rows - p <= NNP_SP_FEW) {
        sp_rowdots_few(p, rows, k, M, h, e);
        return;
    }
    for (; p < rows; p += 8) {
        nnp_v8 acc[8], res;
        const float *wr[8];
        for (r = 0; r < 8; r++) {
            wr[r] = M + (p + (size_t)r < rows ? p + (size_t)r : p) * k; /* past the end: repeat row p */
            acc[r] = zero;
        }
        for (v = 0; v < kv; v += 8) {
            const nnp_v8 hv = NNP_LD(h + v);
            for (r = 0; r < 8; r++) acc[r] += NNP_LD(wr[r] + v) * hv;
        }
        hsum8x8(acc, &res);
        if (kv < k) {
            float t[8];
            for (r = 0; r < 8; r++) {
                float s = 0.0f;
                for (j = kv; j < k; j++) s += wr[r][j] * h[j];
                t[r] = s;
            }
            res += NNP_LD(t);
        }
        if (p + 8 <= rows) {
            NNP_SP_EPI1(e, p, res);
        } else {
            float t[8];
            NNP_ST(t, res);
            for (j = p; j < rows; j++) e->out[j] = e->kind == SP_SCALE ? t[j - p] * e->D[j] : t[j - p];
        }
    }
}

/* The same for k = 8 * KV, h kept in registers: the rows of a group in two halves of four (the sums of a half
 * reduced to one vector before the next starts, to leave registers for h), then combined as in hsum8x8.
 * Returns the rows done (whole groups of 8). */
#define NNP_RD(KV)                                                                                             \
    NNP_INLINE size_t sp_rd##KV(size_t rows, const float *M, const float *h, const sp_epi_t *e)                \
    {                                                                                                          \
        nnp_v8 hv[KV], q[2];                                                                                   \
        size_t p;                                                                                              \
        int r, v, half;                                                                                        \
        for (v = 0; v < KV; v++) hv[v] = NNP_LD(h + 8 * v);                                                    \
        for (p = 0; p + 8 <= rows; p += 8) {                                                                   \
            for (half = 0; half < 2; half++) {                                                                 \
                const float *m_ = M + (p + 4 * (size_t)half) * (8 * KV);                                       \
                nnp_v8 a[4];                                                                                   \
                for (r = 0; r < 4; r++) {                                                                      \
                    a[r] = NNP_LD(m_ + r * 8 * KV) * hv[0];                                                    \
                    for (v = 1; v < KV; v++) a[r] += NNP_LD(m_ + r * 8 * KV + 8 * v) * hv[v];                  \
                }                                                                                              \
                q[half] = NNP_HADD(NNP_HADD(a[0], a[1]), NNP_HADD(a[2], a[3]));                                \
            }                                                                                                  \
            q[0] = NNP_SHUF(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +                                            \
                   NNP_SHUF(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);                                           \
            NNP_SP_EPI1(e, p, q[0]);                                                                           \
        }                                                                                                      \
        return p;                                                                                              \
    }
NNP_RD(1)
NNP_RD(2)
NNP_RD(4)
NNP_RD(8)

/* out[p] = M[p][0..k) . h for p < rows (see sp_rowdots_gen) */
NNP_INLINE void sp_rowdots(size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    size_t p;
    switch (k) {
    case 8: p = sp_rd1(rows, M, h, e); break;
    case 16: p = sp_rd2(rows, M, h, e); break;
    case 32: p = sp_rd4(rows, M, h, e); break;
    case 64: p = sp_rd8(rows, M, h, e); break;
    default: p = 0; break;
    }
    if (p < rows) sp_rowdots_gen(p, rows, k, M, h, e);
}

/* init + x M for one row x[k] and M [k][n] (Mt: M transposed): vector columns through the kernels, the last
 * n % 8 by dot products over Mt. Those tail columns get plain sums (without init), finished here for SP_STORE
 * and SP_SCALE; for activations the caller finishes them. */
NNP_INLINE size_t sp_matvec(size_t k, size_t n, const float *x, const float *M, const float *Mt, const float *init,
                            const sp_epi_t *e)
{
    size_t j = 0, t;
#define NNP_SP_COLS(KV)                                                                                        \
    do {                                                                                                       \
        for (; j + 64 <= n; j += 64) spr8x1_##KV(k, x, M, n, init, e, j);                                      \
        for (; j + 32 <= n; j += 32) spr4x2_##KV(k, x, M, n, init, e, j);                                      \
        for (; j + 16 <= n; j += 16) spr2x4_##KV(k, x, M, n, init, e, j);                                      \
        for (; j + 8 <= n; j += 8) spr1x8_##KV(k, x, M, n, init, e, j);                                        \
    } while (0)
    switch (k) {
    case 8: NNP_SP_COLS(1); break;
    case 16: NNP_SP_COLS(2); break;
    case 32: NNP_SP_COLS(4); break;
    case 64: NNP_SP_COLS(8); break;
    default:
        if (k < 8) {
            for (; j + 64 <= n; j += 64) spk8(k, x, M, n, init, e, j);
            for (; j + 8 <= n; j += 8) spk1(k, x, M, n, init, e, j);
        } else {
            NNP_SP_COLS(0);
        }
        break;
    }
#undef NNP_SP_COLS
    for (t = j; t < n; t++) {
        const float s = dot8(k, x, Mt + t * k);
        e->out[t] = e->kind == SP_SCALE ? s * e->D[t] : s;
    }
    return j;
}
#else
/* Plain C versions */
NNP_INLINE void sp_epi1(const sp_epi_t *e, size_t j, float v)
{
    switch (e->kind) {
    case SP_STORE: e->out[j] = v; break;
    case SP_SCALE: e->out[j] = v * e->D[j]; break;
    case SP_RELU:
        e->out[j] = v < 0.0f ? 0.0f : v;
        e->d[j] = v > 0.0f ? 1.0f : 0.0f;
        break;
    default:
        e->out[j] = v > 0.0f ? v : e->p0 * v;
        e->d[j] = v > 0.0f ? 1.0f : e->p0;
        break;
    }
}

NNP_INLINE void sp_rowdots(size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    size_t p;
    for (p = 0; p < rows; p++) sp_epi1(e, p, dot8(k, M + p * k, h));
}

NNP_INLINE size_t sp_matvec(size_t k, size_t n, const float *x, const float *M, const float *Mt, const float *init,
                            const sp_epi_t *e)
{
    size_t j, p;
    (void)Mt;
    for (j = 0; j < n; j++) {
        float s = init ? init[j] : 0.0f;
        for (p = 0; p < k; p++) s += x[p] * M[p * n + j];
        sp_epi1(e, j, s);
    }
    return n;
}
#endif

/* y (may be NULL) and J [n_out][n_in] of the point x. Workspace (NNP_SP_WORK floats): v0, v1 [max_cols] for
 * the values, then the adjoints (g0, g1: the same buffers), D [sum_cols]. */
NNP_INLINE void sp_jac_body(const nnp_model *m, const float *x, float *y, float *J, float *work)
{
    const size_t n_out = m->n_out, n_in = m->n_in, nl = m->n_layers, mc = m->max_cols;
    float *v0 = work, *v1 = work + mc, *D = work + 2 * mc, *g0 = v0, *g1 = v1;
    const float *in = x;
    size_t k, i, j, doff = 0;
    for (k = 0; k < nl; k++) {
        const nnp_layer *L = &m->layers[k];
        sp_epi_t e;
        size_t done;
        e.out = (k + 1 == nl && y != NULL) ? y : ((k & 1) ? v1 : v0);
        e.d = D + doff;
        e.D = NULL;
        e.p0 = L->p0;
        switch (L->act) {
        case NNP_ACT_LINEAR: /* leaky_relu with alpha 1: the same value and derivative, bit for bit */
            e.kind = SP_LEAKY;
            e.p0 = 1.0f;
            break;
        case NNP_ACT_RELU: e.kind = SP_RELU; break;
        case NNP_ACT_LEAKY_RELU: e.kind = SP_LEAKY; break;
        default: e.kind = SP_STORE; break;
        }
        done = sp_matvec(L->rows, L->cols, in, L->W, L->Wt, e.kind == SP_STORE ? NULL : L->b, &e);
        if (e.kind == SP_STORE)
            act_d_f32(L, e.out, e.d, L->cols);
        else if (done < L->cols)
            act_d_f32_at(L, L->b + done, e.out + done, e.d + done, L->cols - done);
        doff += L->cols;
        in = e.out;
    }
    for (i = 0; i < n_out; i++) {
        const nnp_layer *L = &m->layers[nl - 1];
        const float s = D[m->sum_cols - n_out + i], *wt = L->Wt + i * L->rows;
        const float *h;
        if (nl == 1) {
            for (j = 0; j < n_in; j++) J[i * n_in + j] = s * wt[j];
            continue;
        }
        /* adjoint of the pre-activations of layer nl - 2 */
        doff = m->sum_cols - n_out - L->rows;
        for (j = 0; j < L->rows; j++) g0[j] = s * wt[j] * D[doff + j];
        h = g0;
        for (k = nl - 1; k-- > 0;) {
            const nnp_layer *Lk = &m->layers[k];
            sp_epi_t e;
            e.p0 = 0.0f;
            e.d = NULL;
            if (k == 0) {
                e.kind = SP_STORE;
                e.out = J + i * n_in;
                e.D = NULL;
            } else {
                doff -= Lk->rows;
                e.kind = SP_SCALE;
                e.out = (h == g0) ? g1 : g0;
                e.D = D + doff;
            }
            if (Lk->cols >= NNP_SP_ROWDOTS)
                sp_rowdots(Lk->rows, Lk->cols, Lk->W, h, &e);
            else
                sp_matvec(Lk->cols, Lk->rows, h, Lk->Wt, Lk->W, NULL, &e);
            h = e.out;
        }
    }
}

NNP_DISPATCHED_M(sp_jac, (const nnp_model *m, const float *x, float *y, float *J, float *work), (m, x, y, J, work))

void nnpi_point_jacobian(const nnp_model *m, const float *x, float *y, float *J, float *work)
{
    sp_jac(m, x, y, J, work);
}
