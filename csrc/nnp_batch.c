/*
 * nnp_batch.c - batches of points, float32: the matrix product kernels, the forward pass, the Jacobian in forward
 * mode (tangent rows) and in reverse mode (derivatives kept, then adjoint rows), and the pattern cache that
 * reuses reverse-mode Jacobians of piecewise-linear networks. nnp.c checks the arguments, picks the mode and
 * sizes the blocks; here a batch goes through the network one block of points at a time, so that a block's
 * activations stay in cache. The block functions are dispatched (nnp_simd.h): the kernels below and those of
 * nnp_kernels.h are inlined into both of their builds.
 */
#include "nnp_kernels.h"

/* ------------------------------------------------------------------------------------------------------ */
/* Matrix product kernels (float32)                                                                       */
/*
 * C[m][n] (row stride ldc) = A[m][k] (row stride lda) * B[k][n] (row stride n); Bt is B transposed ([n][k],
 * row stride k), used for narrow column remainders where a dot product over contiguous k is faster.
 */

#if NNP_VECTOR_EXT
/* GCC/Clang vector extensions (nnp_simd.h); -DNNP_PLAIN_C builds the plain C99 versions below instead. */

/* C[MR][8*NV] = A[MR][k] * B[k][8*NV] with MR * NV accumulators kept in registers */
#define NNP_KERNEL(MR, NV)                                                                                     \
    NNP_INLINE void k##MR##x##NV(size_t k, const float *A, size_t lda, const float *B, size_t ldb, float *C,   \
                                 size_t ldc)                                                                   \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[MR][NV];                                                                                    \
        size_t p_;                                                                                             \
        int r_, c_;                                                                                            \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NV; c_++) acc[r_][c_] = zero_;                                                   \
        for (p_ = 0; p_ < k; p_++) {                                                                           \
            const nnp_v8u *b_ = (const nnp_v8u *)(const void *)(B + p_ * ldb);                                 \
            for (r_ = 0; r_ < MR; r_++) {                                                                      \
                const float s_ = A[r_ * lda + p_];                                                             \
                const nnp_v8 a_ = {s_, s_, s_, s_, s_, s_, s_, s_};                                            \
                for (c_ = 0; c_ < NV; c_++) acc[r_][c_] += a_ * b_[c_];                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NV; c_++) ((nnp_v8u *)(void *)(C + r_ * ldc))[c_] = acc[r_][c_];                 \
    }
/* One row, C[8*NV] = A[k] * B[k][8*NV], with the sum over k split into S interleaved partial sums so that
 * S * NV accumulators hide the FMA latency (a single row has no other independent work). */
#define NNP_KERNEL_SPLIT(NV, S)                                                                                \
    NNP_INLINE void k1x##NV##s(size_t k, const float *A, size_t lda, const float *B, size_t ldb, float *C,     \
                               size_t ldc)                                                                     \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[S][NV];                                                                                     \
        size_t p_ = 0;                                                                                         \
        int s_, c_, w_;                                                                                        \
        (void)lda;                                                                                             \
        (void)ldc;                                                                                             \
        for (s_ = 0; s_ < S; s_++)                                                                             \
            for (c_ = 0; c_ < NV; c_++) acc[s_][c_] = zero_;                                                   \
        for (; p_ + S <= k; p_ += S)                                                                           \
            for (s_ = 0; s_ < S; s_++) {                                                                       \
                const nnp_v8u *b_ = (const nnp_v8u *)(const void *)(B + (p_ + s_) * ldb);                      \
                const float x_ = A[p_ + s_];                                                                   \
                const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                            \
                for (c_ = 0; c_ < NV; c_++) acc[s_][c_] += a_ * b_[c_];                                        \
            }                                                                                                  \
        for (; p_ < k; p_++) {                                                                                 \
            const nnp_v8u *b_ = (const nnp_v8u *)(const void *)(B + p_ * ldb);                                 \
            const float x_ = A[p_];                                                                            \
            const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                                \
            for (c_ = 0; c_ < NV; c_++) acc[0][c_] += a_ * b_[c_];                                             \
        }                                                                                                      \
        for (w_ = S / 2; w_ > 0; w_ /= 2) /* pairwise: s <- s + (s + w) */                                   \
            for (s_ = 0; s_ < w_; s_++)                                                                        \
                for (c_ = 0; c_ < NV; c_++) acc[s_][c_] += acc[s_ + w_][c_];                                   \
        for (c_ = 0; c_ < NV; c_++) ((nnp_v8u *)(void *)C)[c_] = acc[0][c_];                                   \
    }
#else
/* Plain C99 version of the same kernels. */
#define NNP_KERNEL(MR, NV)                                                                                     \
    NNP_INLINE void k##MR##x##NV(size_t k, const float *A, size_t lda, const float *B, size_t ldb, float *C,   \
                                 size_t ldc)                                                                   \
    {                                                                                                          \
        float acc[MR][8 * NV];                                                                                 \
        size_t p_;                                                                                             \
        int r_, c_;                                                                                            \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < 8 * NV; c_++) acc[r_][c_] = 0.0f;                                                \
        for (p_ = 0; p_ < k; p_++)                                                                             \
            for (r_ = 0; r_ < MR; r_++) {                                                                      \
                const float a_ = A[r_ * lda + p_];                                                             \
                for (c_ = 0; c_ < 8 * NV; c_++) acc[r_][c_] += a_ * B[p_ * ldb + c_];                          \
            }                                                                                                  \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < 8 * NV; c_++) C[r_ * ldc + c_] = acc[r_][c_];                                    \
    }
#endif

NNP_KERNEL(6, 2)
NNP_KERNEL(5, 2)
NNP_KERNEL(4, 2)
NNP_KERNEL(3, 2)
NNP_KERNEL(2, 2)
NNP_KERNEL(1, 2)
NNP_KERNEL(8, 1)
NNP_KERNEL(7, 1)
NNP_KERNEL(6, 1)
NNP_KERNEL(5, 1)
NNP_KERNEL(4, 1)
NNP_KERNEL(3, 1)
NNP_KERNEL(2, 1)
NNP_KERNEL(1, 1)
NNP_KERNEL(3, 4)
NNP_KERNEL(2, 4)
NNP_KERNEL(1, 4)
NNP_KERNEL(1, 8)
NNP_KERNEL(4, 3)
#if NNP_VECTOR_EXT
NNP_KERNEL_SPLIT(4, 2)
NNP_KERNEL_SPLIT(2, 4)
NNP_KERNEL_SPLIT(1, 8)
#endif

/* rows in groups of GROUP (kernel KG), then the remainder (at most 7 rows) with a kernel of its size */
#define NNP_ROWS(NV, GROUP, KG)                                                                                \
    do {                                                                                                       \
        const float *Bj = B + j;                                                                               \
        for (i = 0; i + GROUP <= m; i += GROUP) KG(k, A + i * lda, lda, Bj, ldb, C + i * ldc + j, ldc);       \
        NNP_REM_##NV(m - i)                                                                                    \
    } while (0)
#define NNP_REM_CASE(R, NV)                                                                                    \
    case R: k##R##x##NV(k, A + i * lda, lda, Bj, ldb, C + i * ldc + j, ldc); break;
#define NNP_REM_4(r)                                                                                           \
    switch (r) {                                                                                               \
        NNP_REM_CASE(2, 4) NNP_REM_CASE(1, 4) default: break;                                                  \
    }
#define NNP_REM_2(r)                                                                                           \
    switch (r) {                                                                                               \
        NNP_REM_CASE(5, 2) NNP_REM_CASE(4, 2) NNP_REM_CASE(3, 2) NNP_REM_CASE(2, 2) NNP_REM_CASE(1, 2)         \
        default: break;                                                                                        \
    }
#define NNP_REM_1(r)                                                                                           \
    switch (r) {                                                                                               \
        NNP_REM_CASE(7, 1) NNP_REM_CASE(6, 1) NNP_REM_CASE(5, 1) NNP_REM_CASE(4, 1) NNP_REM_CASE(3, 1)         \
        NNP_REM_CASE(2, 1) NNP_REM_CASE(1, 1) default: break;                                                  \
    }

NNP_INLINE void gemm_body(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B,
                          const float *Bt, float *C, size_t ldc, int split)
{
    const size_t ldb = n;
    size_t i, j = 0;
    if (m == 1) { /* one row: 8 independent accumulators cover the FMA latency */
        for (; j + 64 <= n; j += 64) k1x8(k, A, lda, B + j, ldb, C + j, ldc);
#if NNP_VECTOR_EXT
        if (split) {
            for (; j + 32 <= n; j += 32) k1x4s(k, A, lda, B + j, ldb, C + j, ldc);
            for (; j + 16 <= n; j += 16) k1x2s(k, A, lda, B + j, ldb, C + j, ldc);
            for (; j + 8 <= n; j += 8) k1x1s(k, A, lda, B + j, ldb, C + j, ldc);
        }
#else
        (void)split;
#endif
    }
    if (m <= 3) /* few rows: wide tiles keep enough independent accumulators */
        for (; j + 32 <= n; j += 32) NNP_ROWS(4, 3, k3x4);
    for (; j + 16 <= n; j += 16) NNP_ROWS(2, 6, k6x2);
    for (; j + 8 <= n; j += 8) NNP_ROWS(1, 8, k8x1);
    for (; j < n; j++)
        for (i = 0; i < m; i++) C[i * ldc + j] = dot8(k, A + i * lda, Bt + j * k);
}

#define gemm_f32 gemm_body

/* ------------------------------------------------------------------------------------------------------ */
/* Packed products: B given as panels of 16 columns (nnp_internal.h, the layers' Wp and Wtp)              */
/*
 * C[m][n] (row stride ldc) = A[m][k] (row stride lda) * B[k][n], B packed: panel q is B[0..k)[16 q .. 16 q + 16)
 * as k contiguous rows of 16 floats, ps = 16 k floats apart. Rows go in groups (12 for AVX-512, 6 otherwise) and
 * each group runs through every panel while its rows of A stay in the L1 cache and the panels stream in order. Every
 * entry is the sum over k in order, one fused multiply-add per step from zero, in every tile and every build with
 * FMA: a result depends neither on the block size nor on which of these kernels made it (AVX2 and AVX-512 agree
 * bit for bit). The zero-padded columns of the last panel go to a scratch tile, never to C.
 */

/* chunk of k of the AVX-512 products (their rows of A are packed a chunk at a time, 12 x NNP_KC floats on the stack) */
#define NNP_KC 128u

#if NNP_VECTOR_EXT && (NNP_X86_DISPATCH || NNP_NATIVE_ISA == 2)
/* AVX-512: MR rows x NP panels, one 16-float register per panel and row (MR * NP accumulators). The rows of A come
 * copied into one buffer, ap[12][NNP_KC] (every broadcast then reads one pointer at a constant offset, a memory
 * operand of its multiply-add: twelve row pointers of stride lda would not fit in the integer registers; row-major
 * chunks copy in 16-float vectors, where the k-major layout this replaced was a scalar transpose, 3-5 % slower);
 * add: start from C's values instead of zero (a later chunk of k continues the same in-order sums). */
#define NNP_KERNEL16(MR, NP)                                                                                   \
    NNP_INLINE void z##MR##x##NP(size_t k, const float *ap, const float *P, size_t ps, float *C, size_t ldc,      \
                                 int add)                                                                      \
    {                                                                                                          \
        nnp_v16 acc[MR][NP];                                                                                   \
        size_t p_;                                                                                             \
        int r_, c_;                                                                                            \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NP; c_++) {                                                                      \
                acc[r_][c_] = (nnp_v16){0};                                                                    \
                if (add) acc[r_][c_] = *(const nnp_v16u *)(const void *)(C + r_ * ldc + 16 * c_);              \
            }                                                                                                  \
        NNP_UNROLL4 for (p_ = 0; p_ < k; p_++) {                                                               \
            nnp_v16 b_[NP];                                                                                    \
            for (c_ = 0; c_ < NP; c_++) b_[c_] = *(const nnp_v16u *)(const void *)(P + c_ * ps + p_ * 16);      \
            for (r_ = 0; r_ < MR; r_++) {                                                                      \
                const float s_ = ap[r_ * NNP_KC + p_];                                                         \
                const nnp_v16 a_ = {s_, s_, s_, s_, s_, s_, s_, s_, s_, s_, s_, s_, s_, s_, s_, s_};            \
                for (c_ = 0; c_ < NP; c_++) acc[r_][c_] += a_ * b_[c_];                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NP; c_++) *(nnp_v16u *)(void *)(C + r_ * ldc + 16 * c_) = acc[r_][c_];           \
    }
#define NNP_KERNEL16_BOTH(MR) NNP_KERNEL16(MR, 2) NNP_KERNEL16(MR, 1)
NNP_KERNEL16_BOTH(12)
NNP_KERNEL16_BOTH(11)
NNP_KERNEL16_BOTH(10)
NNP_KERNEL16_BOTH(9)
NNP_KERNEL16_BOTH(8)
NNP_KERNEL16_BOTH(7)
NNP_KERNEL16_BOTH(6)
NNP_KERNEL16_BOTH(5)
NNP_KERNEL16_BOTH(4)
NNP_KERNEL16_BOTH(3)
NNP_KERNEL16_BOTH(2)
NNP_KERNEL16_BOTH(1)

#define NNP_Z_CASE(R)                                                                                          \
    case R:                                                                                                    \
        if (np == 2)                                                                                           \
            z##R##x2(k, ap, P, ps, C, ldc, add);                                                               \
        else                                                                                                   \
            z##R##x1(k, ap, P, ps, C, ldc, add);                                                               \
        break;
/* r (1..12) rows x np (1, 2) panels */
NNP_INLINE void ztile(size_t r, size_t np, size_t k, const float *ap, const float *P, size_t ps, float *C, size_t ldc,
                      int add)
{
    switch (r) {
        NNP_Z_CASE(12) NNP_Z_CASE(11) NNP_Z_CASE(10) NNP_Z_CASE(9) NNP_Z_CASE(8) NNP_Z_CASE(7) NNP_Z_CASE(6)
        NNP_Z_CASE(5) NNP_Z_CASE(4) NNP_Z_CASE(3) NNP_Z_CASE(2) NNP_Z_CASE(1) default: break;
    }
}
#define NNP_HAVE_Z 1
#else
#define NNP_HAVE_Z 0
#endif

/* r (1..6) rows x one panel, 8-float vectors */
NNP_INLINE void ytile(size_t r, size_t k, const float *A, size_t lda, const float *P, float *C, size_t ldc)
{
    switch (r) {
    case 6: k6x2(k, A, lda, P, NNP_PANEL, C, ldc); break;
    case 5: k5x2(k, A, lda, P, NNP_PANEL, C, ldc); break;
    case 4: k4x2(k, A, lda, P, NNP_PANEL, C, ldc); break;
    case 3: k3x2(k, A, lda, P, NNP_PANEL, C, ldc); break;
    case 2: k2x2(k, A, lda, P, NNP_PANEL, C, ldc); break;
    case 1: k1x2(k, A, lda, P, NNP_PANEL, C, ldc); break;
    default: break;
    }
}

/* The r x w leading entries of a scratch tile (row stride ldt) into C: the valid columns of a partial last panel */
NNP_INLINE void put_cols(const float *tile, size_t ldt, float *C, size_t ldc, size_t r, size_t w)
{
    size_t t, c;
    for (t = 0; t < r; t++)
        for (c = 0; c < w; c++) C[t * ldc + c] = tile[t * ldt + c];
}

#if NNP_HAVE_Z
/* The AVX-512 products: one function (not inlined into each block function), compiled for AVX-512 where dispatched.
 * Rows in groups of 12, k in chunks of NNP_KC; each chunk of a group's rows is packed once. */
#if NNP_X86_DISPATCH
__attribute__((target("avx512f,avx2,fma")))
#endif
static void gemm_packed_z(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *P, float *C,
                          size_t ldc)
{
    const size_t ps = k * NNP_PANEL, npan = (n + NNP_PANEL - 1) / NNP_PANEL;
    const size_t last_w = n - (npan - 1) * NNP_PANEL; /* columns of the last panel */
    float tmp[12 * 2 * NNP_PANEL], ap[NNP_KC * 12];
    size_t i, q, r, t, p0, kc, p, e;
    for (i = 0; i < m; i += 12) {
        r = m - i < 12 ? m - i : 12;
        for (p0 = 0; p0 < k; p0 += kc) {
            kc = k - p0 < NNP_KC ? k - p0 : NNP_KC;
            /* the rows' chunks, 16 floats at a time, each step across the rows: a row at a time, GCC turned the
             * copy into `rep movs` (a memcpy call of 512 bytes per row, 5 % of this function's time) */
            for (p = 0; p + 16 <= kc; p += 16)
                for (t = 0; t < r; t++)
                    *(nnp_v16u *)(void *)(ap + t * NNP_KC + p) =
                        *(const nnp_v16u *)(const void *)(A + (i + t) * lda + p0 + p);
            for (t = 0; t < r; t++)
                for (e = p; e < kc; e++) ap[t * NNP_KC + e] = A[(i + t) * lda + p0 + e];
            for (q = 0; q < npan; q += 2) {
                const size_t np = npan - q >= 2 ? 2 : 1, j = q * NNP_PANEL;
                const float *Pq = P + q * ps + p0 * NNP_PANEL;
                if (q + np < npan || last_w == NNP_PANEL) {
                    ztile(r, np, kc, ap, Pq, ps, C + i * ldc + j, ldc, p0 > 0);
                } else { /* the last pair holds the partial panel: its sums live in the scratch tile */
                    ztile(r, np, kc, ap, Pq, ps, tmp, 2 * NNP_PANEL, p0 > 0);
                    if (p0 + kc == k) put_cols(tmp, 2 * NNP_PANEL, C + i * ldc + j, ldc, r, n - j);
                }
            }
        }
    }
}
#endif

/* The packed products: AVX-512 (isa 2) or 8-float vectors in rows of 6 (AVX2, the baseline) */
NNP_INLINE void gemm_packed(int isa, size_t m, size_t k, size_t n, const float *A, size_t lda, const float *P,
                            float *C, size_t ldc)
{
    const size_t ps = k * NNP_PANEL, npan = (n + NNP_PANEL - 1) / NNP_PANEL;
    float tmp[6 * NNP_PANEL];
    size_t i, q, r;
#if NNP_HAVE_Z
    if (isa >= 2) {
        gemm_packed_z(m, k, n, A, lda, P, C, ldc);
        return;
    }
#else
    (void)isa;
#endif
    for (i = 0; i < m; i += 6) {
        r = m - i < 6 ? m - i : 6;
        for (q = 0; q < npan; q++) {
            const size_t j = q * NNP_PANEL, w = n - j;
            if (w >= NNP_PANEL) {
                ytile(r, k, A + i * lda, lda, P + q * ps, C + i * ldc + j, ldc);
            } else {
                ytile(r, k, A + i * lda, lda, P + q * ps, tmp, NNP_PANEL);
                put_cols(tmp, NNP_PANEL, C + i * ldc + j, ldc, r, w);
            }
        }
    }
}

/* Layers of at most NNP_THIN_COLS columns (a network's output layer, as a rule): a 16-column panel computes 16 sums
 * per row to keep 1-4 of them. Instead each entry is a dot product of a row of A with a row of Wt (contiguous), r <= 4
 * rows at a time (4 x n independent sums, the column's 8 floats loaded once for the r rows), in dot8's order: 8 lanes
 * over k mod 8, combined ((0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7)), then the last k % 8 terms in order. The order is
 * the same in every build that has vector extensions (AVX2 and AVX-512 agree bit for bit) and for any number of rows
 * (a point's result does not depend on its batch). Wide network (256 -> 1 output layer), forward pass at 1,000
 * points on a Zen 4: 1.91 -> 1.84 ms (median of 9); the panel had done 16 times the layer's work. */
#define NNP_THIN_COLS 4
NNP_INLINE void thin_block(size_t r, size_t n, size_t k, const float *A, size_t lda, const float *Wt, float *C,
                           size_t ldc)
{
#if NNP_VECTOR_EXT
    nnp_v8 acc[4][NNP_THIN_COLS];
    size_t p, q, t, c;
    for (t = 0; t < r; t++)
        for (c = 0; c < n; c++) acc[t][c] = (nnp_v8){0, 0, 0, 0, 0, 0, 0, 0};
    for (p = 0; p + 8 <= k; p += 8) {
        nnp_v8 a[4];
        for (t = 0; t < r; t++) a[t] = NNP_LD(A + t * lda + p);
        for (c = 0; c < n; c++) {
            const nnp_v8 w = NNP_LD(Wt + c * k + p);
            for (t = 0; t < r; t++) acc[t][c] += a[t] * w;
        }
    }
    for (t = 0; t < r; t++)
        for (c = 0; c < n; c++) {
            const nnp_v8 v = acc[t][c];
            float s = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
            for (q = p; q < k; q++) s = fmaf(A[t * lda + q], Wt[c * k + q], s);
            C[t * ldc + c] = s;
        }
#else
    size_t t, c;
    for (t = 0; t < r; t++)
        for (c = 0; c < n; c++) C[t * ldc + c] = dot8(k, A + t * lda, Wt + c * k);
#endif
}

#define NNP_THIN_CASE(N)                                                                                       \
    case N:                                                                                                    \
        for (i = 0; i + 4 <= m; i += 4) thin_block(4, N, k, A + i * lda, lda, Wt, C + i * ldc, ldc);          \
        for (; i < m; i++) thin_block(1, N, k, A + i * lda, lda, Wt, C + i * ldc, ldc);                       \
        break;
/* C = A W for n <= NNP_THIN_COLS columns, from Wt ([n][k]); each case with constant n, so that the sums stay in
 * registers */
NNP_INLINE void gemm_thin(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *Wt, float *C,
                          size_t ldc)
{
    size_t i = 0;
    switch (n) {
        NNP_THIN_CASE(1) NNP_THIN_CASE(2) NNP_THIN_CASE(3) NNP_THIN_CASE(4) default: break;
    }
}

/* The batch paths' product with a layer's weights: x W (transposed: g W^T) from the packed copy, except for one row
 * with the split-sum kernels (split: the call has one point), which read W as stored. */
NNP_INLINE void gemm_layer(int isa, size_t m, const nnp_layer *L, int transposed, const float *A, size_t lda, float *C,
                           size_t ldc, int split)
{
    const size_t k = transposed ? L->cols : L->rows, n = transposed ? L->rows : L->cols;
    if (split && m == 1)
        gemm_f32(m, k, n, A, lda, transposed ? L->Wt : L->W, transposed ? L->W : L->Wt, C, ldc, split);
    else if (!transposed && n <= NNP_THIN_COLS)
        gemm_thin(m, k, n, A, lda, L->Wt, C, ldc);
    else
        gemm_packed(isa, m, k, n, A, lda, transposed ? L->Wtp : L->Wp, C, ldc);
}

/* The products of nnp_second.c (nnp_internal.h): these kernels, dispatched once per product, without the split-sum
 * single-row kernels so that a row's result does not depend on how many rows the product has. Four rows (one
 * point's value and tangents in the Hessian's forward pass, half of one point's Hessian-vector rows) go in strips of
 * 24 columns first: twelve independent sums instead of the eight of k4x2 (a quarter faster on 256 x 256 weights). */
NNP_INLINE void gemm_ext_body(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B,
                              const float *Bt, float *C, size_t ldc)
{
    size_t i, j = 0;
    if (m != 4) {
        gemm_f32(m, k, n, A, lda, B, Bt, C, ldc, 0);
        return;
    }
    for (; j + 24 <= n; j += 24) k4x3(k, A, lda, B + j, n, C + j, ldc);
    for (; j + 16 <= n; j += 16) k4x2(k, A, lda, B + j, n, C + j, ldc);
    for (; j + 8 <= n; j += 8) k4x1(k, A, lda, B + j, n, C + j, ldc);
    for (; j < n; j++)
        for (i = 0; i < 4; i++) C[i * ldc + j] = dot8(k, A + i * lda, Bt + j * k);
}

NNP_DISPATCHED(gemm_ext, (size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B, const float *Bt,
                          float *C, size_t ldc),
               (m, k, n, A, lda, B, Bt, C, ldc))

void nnpi_gemm(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B, const float *Bt, float *C,
               size_t ldc)
{
    gemm_ext(m, k, n, A, lda, B, Bt, C, ldc);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Forward (float32)                                                                                      */

NNP_INLINE void forward_block_body(int isa, const nnp_model *m, size_t np, const float *x, float *y, float *buf0,
                                   float *buf1, int split)
{
    const float *in = x;
    size_t in_stride = m->n_in, k;
    float *bufs[2];
    bufs[0] = buf0;
    bufs[1] = buf1;
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        int last = (k + 1 == m->n_layers);
        float *out = last ? y : bufs[k & 1];
        size_t i;
        gemm_layer(isa, np, L, 0, in, in_stride, out, L->cols, split);
        for (i = 0; i < np; i++) act_f32(L, out + i * L->cols, L->cols);
        in = out;
        in_stride = L->cols;
    }
}

NNP_DISPATCHED_ISA(forward_block, (const nnp_model *m, size_t np, const float *x, float *y, float *buf0, float *buf1,
                                int split),
               (m, np, x, y, buf0, buf1, split))

/* nnp_forward after its argument checks (nnp_internal.h) */
int nnpi_forward_batch(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len)
{
    size_t fixed, per_point, blk, done;
    int rc = ws_shape(m, NNP_WS_FORWARD, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    blk = block_for(fixed, per_point, batch, work_len);
    if (blk == 0) return NNP_E_WORKSPACE;
    for (done = 0; done < batch; done += blk) {
        size_t np = batch - done < blk ? batch - done : blk;
        forward_block(m, np, x + done * m->n_in, y + done * m->n_out, work, work + blk * m->max_cols, batch == 1);
    }
    return NNP_OK;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian, forward mode: every point carries 1 value row and n_in tangent rows through the network.     */

NNP_INLINE void jac_fwd_block_body(int isa, const nnp_model *m, size_t np, const float *x, float *y, float *J,
                                   float *buf0, float *buf1, float *d, int split)
{
    const size_t n_in = m->n_in, R = n_in + 1; /* rows per point */
    size_t k, p, r, j;
    float *cur = buf0, *nxt = buf1;

    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        if (k == 0) {
            /* value rows: x W; tangent rows: e_j W = W[j] */
            gemm_layer(isa, np, L, 0, x, n_in, nxt, R * c, split);
            for (p = 0; p < np; p++) {
                float *v = nxt + p * R * c;
                act_d_f32(L, v, d, c);
                for (r = 0; r < n_in; r++) {
                    const float *w = L->W + r * c;
                    float *t = v + (r + 1) * c;
                    for (j = 0; j < c; j++) t[j] = w[j] * d[j];
                }
            }
        } else {
            gemm_layer(isa, np * R, L, 0, cur, L->rows, nxt, c, split);
            for (p = 0; p < np; p++) {
                float *v = nxt + p * R * c;
                act_d_f32(L, v, d, c);
                for (r = 1; r < R; r++) {
                    float *t = v + r * c;
                    for (j = 0; j < c; j++) t[j] *= d[j];
                }
            }
        }
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
    /* cur: per point [R][n_out]; row 0 = y, row 1 + j = d y / d x_j */
    for (p = 0; p < np; p++) {
        const float *v = cur + p * R * m->n_out;
        float *Jp = J + p * m->n_out * n_in;
        if (y) memcpy(y + p * m->n_out, v, m->n_out * sizeof(float));
        for (r = 0; r < n_in; r++)
            for (j = 0; j < m->n_out; j++) Jp[j * n_in + r] = v[(r + 1) * m->n_out + j];
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian, reverse mode: forward pass keeping each layer's derivative, then n_out adjoint rows per point */

/* Reverse mode, first half: values, keeping every layer's derivatives. D holds, per layer k, a [np][cols_k]
 * block at offset np * (sum of the widths before k). */
NNP_INLINE void rev_fwd_body(int isa, const nnp_model *m, size_t np, const float *x, float *y, float *v0, float *v1,
                             float *D, int split)
{
    const float *in = x;
    size_t in_stride = m->n_in, k, p, doff = 0;
    float *cur = v0, *nxt = v1;
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        gemm_layer(isa, np, L, 0, in, in_stride, nxt, c, split);
        for (p = 0; p < np; p++) act_d_f32(L, nxt + p * c, D + doff + p * c, c);
        doff += np * c;
        in = nxt;
        in_stride = c;
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
    if (y) memcpy(y, cur, np * m->n_out * sizeof(float));
}

/* Reverse mode, second half: n_out adjoint rows per point, from the derivatives D alone, laid out as above for
 * blocks of ldp >= np points. Writes J [np][n_out][n_in]. */
NNP_INLINE void rev_bwd_body(int isa, const nnp_model *m, size_t np, size_t ldp, float *J, const float *D, float *g0,
                             float *g1, int split)
{
    const size_t n_out = m->n_out, L_n = m->n_layers;
    size_t k, p, i, j, doff = ldp * m->sum_cols;
    float *cur, *nxt;

    /* Adjoint rows are indexed (p * n_out + i). Start: row (p, i) = D_L[p][i] * W_L[:, i] */
    {
        const nnp_layer *L = &m->layers[L_n - 1];
        const size_t rws = L->rows;
        float *out;
        doff -= ldp * L->cols;
        out = (L_n == 1) ? J : g0;
        for (p = 0; p < np; p++)
            for (i = 0; i < n_out; i++) {
                const float sc = D[doff + p * n_out + i];
                const float *wt = L->Wt + i * rws;
                float *g = out + (p * n_out + i) * rws;
                for (j = 0; j < rws; j++) g[j] = sc * wt[j];
            }
    }
    cur = g0;
    nxt = g1;
    for (k = L_n - 1; k-- > 0;) {
        /* cur holds adjoints w.r.t. the output of layer k ([np * n_out][cols_k]); scale by D_k, then
         * multiply by W_k^T to get adjoints w.r.t. its input */
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        float *out = (k == 0) ? J : nxt;
        doff -= ldp * c;
        for (p = 0; p < np; p++) {
            const float *dp = D + doff + p * c;
            for (i = 0; i < n_out; i++) {
                float *g = cur + (p * n_out + i) * c;
                for (j = 0; j < c; j++) g[j] *= dp[j];
            }
        }
        gemm_layer(isa, np * n_out, L, 1, cur, c, out, L->rows, split);
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
}

NNP_DISPATCHED_ISA(jac_fwd_block, (const nnp_model *m, size_t np, const float *x, float *y, float *J, float *buf0,
                                float *buf1, float *d, int split),
               (m, np, x, y, J, buf0, buf1, d, split))
NNP_DISPATCHED_ISA(rev_fwd, (const nnp_model *m, size_t np, const float *x, float *y, float *v0, float *v1, float *D,
                          int split),
               (m, np, x, y, v0, v1, D, split))
NNP_DISPATCHED_ISA(rev_bwd, (const nnp_model *m, size_t np, size_t ldp, float *J, const float *D, float *g0, float *g1,
                          int split),
               (m, np, ldp, J, D, g0, g1, split))

/* ------------------------------------------------------------------------------------------------------ */
/* Pattern cache (reverse mode, piecewise-linear networks)                                                */
/*
 * When every activation is piecewise linear, a point's derivatives D take one of two values per unit, and
 * the reverse pass depends on D alone. Points with the same activation pattern therefore have bit-for-bit the
 * same Jacobian: the cache stores it once per pattern (exact match on the whole pattern, not just a hash) and
 * copies it for the other points. Large batches in a bounded region of input space share few patterns, so
 * most reverse passes are skipped. The table lives in the caller's workspace and is cleared at every call.
 *
 * Entry (4-byte slots): tag (hash | 1, 0 = empty), pattern words, then the Jacobian (n_out * n_in floats).
 */
static void put_slot(float *slot, uint32_t v) { memcpy(slot, &v, sizeof v); }

static uint32_t get_slot(const float *slot)
{
    uint32_t v;
    memcpy(&v, slot, sizeof v);
    return v;
}

/* (nnp_internal.h) */
int nnpi_cache_shape(const nnp_model *m, nnpi_cache_shape_t *cs)
{
    size_t cap = 1;
    if (!m->piecewise) return 0;
    cs->pw = (m->pattern_bits + 31) / 32;
    cs->jn = m->n_in * m->n_out; /* <= NNP_MAX_DIM^2: fits */
    if (cs->pw + cs->jn + 1 > NNP_CACHE_MAX_ENTRY_SLOTS) return 0;
    cs->slots = 1 + cs->pw + cs->jn;
    while (cap * 2 * cs->slots * 4 <= NNP_CACHE_BYTES && cap < 65536) cap *= 2; /* fits in a typical L2 */
    if (cap < 64) return 0;
    cs->cap = cap;
    cs->table = cap * cs->slots;
    cs->extra = (cs->pw + 1) + (m->sum_cols + cs->pw + 1 + 2 + cs->jn);
    return 1;
}

/* Activation patterns of a block of np points: for point p, pat + p * 4 * pw bytes hold one bit per unit of
 * each non-linear layer (each layer starting on a byte; bit u % 8 of byte u / 8 is unit u), 1 when its
 * derivative is not the low value of the activation (0 for relu, relu6, hard_sigmoid; alpha for leaky_relu),
 * zero padded to 4 * pw bytes. */
/* Pattern bits of one layer's derivatives d[0..cols) into b (bit u % 8 of byte u / 8, or-ed in) */
typedef void (*nnp_layer_bits_fn)(const float *d, size_t cols, float low, unsigned char *b);

static void layer_bits_scalar(const float *d, size_t cols, float low, unsigned char *b)
{
    size_t u;
    for (u = 0; u < cols; u++) b[u / 8] |= (unsigned char)((d[u] != low) << (u % 8));
}

NNP_INLINE void patterns_body(const nnp_model *m, size_t np, const float *D, unsigned char *pat, size_t pw,
                              nnp_layer_bits_fn layer_bits)
{
    size_t p, k, doff, n;
    for (p = 0; p < np; p++) {
        unsigned char *b = pat + p * 4 * pw;
        memset(b, 0, 4 * pw);
        doff = n = 0;
        for (k = 0; k < m->n_layers; k++) {
            const nnp_layer *L = &m->layers[k];
            const float *d = D + doff + p * L->cols;
            doff += np * L->cols;
            if (L->act == NNP_ACT_LINEAR) continue;
            layer_bits(d, L->cols, (L->act == NNP_ACT_LEAKY_RELU) ? L->p0 : 0.0f, b + n);
            n += (L->cols + 7) / 8;
        }
    }
}

static void block_patterns_base(const nnp_model *m, size_t np, const float *D, unsigned char *pat, size_t pw)
{
    patterns_body(m, np, D, pat, pw, layer_bits_scalar);
}

#if NNP_X86_DISPATCH
__attribute__((target("avx2,fma"))) static void layer_bits_avx2(const float *d, size_t cols, float low,
                                                                 unsigned char *b)
{
    size_t u = nnp_layer_bytes_avx2(d, cols, low, b);
    layer_bits_scalar(d + u, cols - u, low, b + u / 8); /* u is a multiple of 8: the bits line up */
}

__attribute__((target("avx2,fma"))) static void block_patterns_avx2(const nnp_model *m, size_t np, const float *D,
                                                                     unsigned char *pat, size_t pw)
{
    patterns_body(m, np, D, pat, pw, layer_bits_avx2);
}
#endif

static void block_patterns(const nnp_model *m, size_t np, const float *D, unsigned char *pat, size_t pw)
{
#if NNP_X86_DISPATCH
    if (have_avx2_fma()) {
        block_patterns_avx2(m, np, D, pat, pw);
        return;
    }
#endif
    block_patterns_base(m, np, D, pat, pw);
}

static uint32_t pattern_hash(const unsigned char *pat, size_t pw)
{
    uint64_t h = 0x9e3779b97f4a7c15u, w;
    size_t i, n = 4 * pw;
    for (i = 0; i + 8 <= n; i += 8) {
        memcpy(&w, pat + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdu;
        h ^= h >> 32;
    }
    if (i < n) {
        w = 0;
        memcpy(&w, pat + i, n - i);
        h = (h ^ w) * 0xff51afd7ed558ccdu;
    }
    h ^= h >> 29;
    return (uint32_t)h | 1u;
}

/* The entry holding pattern pat, or the empty entry where it belongs (the table is at most 3/4 full). */
static float *cache_find(const nnpi_cache_shape_t *cs, float *table, const unsigned char *pat, uint32_t h)
{
    size_t i = h & (cs->cap - 1), n;
    for (n = 0; n < cs->cap; n++) {
        float *e = table + i * cs->slots;
        uint32_t tag = get_slot(e);
        if (tag == 0) return e;
        if (tag == h && memcmp(e + 1, pat, 4 * cs->pw) == 0) return e;
        i = (i + 1) & (cs->cap - 1);
    }
    return NULL;
}

/* Scratch of the cached reverse mode, carved from the workspace. */
typedef struct {
    float *table;           /* cs.table slots */
    float *pat, *hash;      /* current block: [blk][pw] patterns, [blk] hashes */
    float *qD;              /* queue of misses: derivatives, laid out for blocks of blk points */
    float *qpat, *qhash;    /* their patterns and hashes */
    float *qdest;           /* their point indices (size_t, two slots each) */
    float *qJ;              /* their Jacobians */
    size_t nq, count, blk;  /* queued misses, cache entries, block size */
} cache_state_t;

/* Reverse passes for the queued misses (one full block at a time), their Jacobians into place and the cache. */
static void cache_flush(const nnp_model *m, const nnpi_cache_shape_t *cs, cache_state_t *st, float *dy_dx, float *g0,
                        float *g1)
{
    size_t q;
    if (st->nq == 0) return;
    rev_bwd(m, st->nq, st->blk, st->qJ, st->qD, g0, g1, 0);
    for (q = 0; q < st->nq; q++) {
        const unsigned char *pat = (const unsigned char *)(st->qpat + q * cs->pw);
        const uint32_t h = get_slot(st->qhash + q);
        size_t dest;
        float *e;
        memcpy(&dest, st->qdest + 2 * q, sizeof dest);
        memcpy(dy_dx + dest * cs->jn, st->qJ + q * cs->jn, cs->jn * sizeof(float));
        if (st->count >= cs->cap / 4 * 3) continue; /* three quarters full: stop inserting */
        e = cache_find(cs, st->table, pat, h);
        if (e != NULL && get_slot(e) == 0) {
            put_slot(e, h);
            memcpy(e + 1, pat, 4 * cs->pw);
            memcpy(e + 1 + cs->pw, st->qJ + q * cs->jn, cs->jn * sizeof(float));
            st->count++;
        }
    }
    st->nq = 0;
}

/* One block through the cache: values and derivatives, then each point's Jacobian from the cache or queued. */
static void cache_block(const nnp_model *m, const nnpi_cache_shape_t *cs, cache_state_t *st, size_t np, size_t first,
                        const float *x, float *y, float *dy_dx, float *v0, float *v1, float *D, float *g0, float *g1)
{
    size_t p, k;
    rev_fwd(m, np, x, y, v0, v1, D, 0);
    block_patterns(m, np, D, (unsigned char *)st->pat, cs->pw);
    for (p = 0; p < np; p++) {
        unsigned char *pat = (unsigned char *)(st->pat + p * cs->pw);
        uint32_t h;
        float *e;
        h = pattern_hash(pat, cs->pw);
        e = cache_find(cs, st->table, pat, h);
        if (e != NULL && get_slot(e) != 0) {
            memcpy(dy_dx + (first + p) * cs->jn, e + 1 + cs->pw, cs->jn * sizeof(float));
            continue;
        }
        {   /* queue the miss: its derivatives (layout of a block of blk points), pattern, hash, index */
            size_t off = 0, qoff = 0, dest = first + p, q = st->nq;
            for (k = 0; k < m->n_layers; k++) {
                const size_t c = m->layers[k].cols;
                memcpy(st->qD + qoff + q * c, D + off + p * c, c * sizeof(float));
                off += np * c;
                qoff += st->blk * c;
            }
            memcpy(st->qpat + q * cs->pw, pat, 4 * cs->pw);
            put_slot(st->qhash + q, h);
            memcpy(st->qdest + 2 * q, &dest, sizeof dest);
            if (++st->nq == st->blk) cache_flush(m, cs, st, dy_dx, g0, g1);
        }
    }
}

/* The reverse-mode Jacobian of a batch through the cache, when the model has one and the workspace holds it next
 * to full blocks (per_point: reverse mode's own per-point workspace). Returns 1 when done, 0 when not taken. */
static int jacobian_cached(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *work,
                           size_t work_len, size_t per_point)
{
    nnpi_cache_shape_t cs;
    cache_state_t st;
    size_t pp, full, blk, vsz, dsz, gsz, done, e;
    float *w;
    if (!(sizeof(size_t) <= 2 * sizeof(float) && nnpi_cache_shape(m, &cs))) return 0;
    pp = per_point + cs.extra; /* no overflow: ws_shape checked per_point, extra is small */
    full = max_block(pp);
    if (full > batch) full = batch;
    if (!(work_len >= cs.table && (work_len - cs.table) / pp >= full)) return 0;
    blk = block_for(cs.table, pp, batch, work_len); /* >= full >= 1 */
    if (blk == 0) return 0; /* never taken; tells the compiler that blocks are not empty (as in the plain path) */
    vsz = blk * m->max_cols;
    dsz = blk * m->sum_cols;
    gsz = blk * m->n_out * m->max_cols;
    w = work + 2 * vsz + dsz + 2 * gsz; /* after v0, v1, D, g0, g1 */
    st.pat = w;
    st.hash = st.pat + blk * cs.pw;
    st.qD = st.hash + blk;
    st.qpat = st.qD + dsz;
    st.qhash = st.qpat + blk * cs.pw;
    st.qdest = st.qhash + blk;
    st.qJ = st.qdest + 2 * blk;
    st.table = work + blk * pp; /* = st.qJ + blk * jn */
    st.nq = st.count = 0;
    st.blk = blk;
    for (e = 0; e < cs.cap; e++) put_slot(st.table + e * cs.slots, 0);
    for (done = 0; done < batch; done += blk) {
        size_t np = batch - done < blk ? batch - done : blk;
        cache_block(m, &cs, &st, np, done, x + done * m->n_in, y ? y + done * m->n_out : NULL, dy_dx, work,
                    work + vsz, work + 2 * vsz, work + 2 * vsz + dsz, work + 2 * vsz + dsz + gsz);
    }
    cache_flush(m, &cs, &st, dy_dx, work + 2 * vsz + dsz, work + 2 * vsz + dsz + gsz);
    return 1;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian of a batch                                                                                    */

/* nnp_jacobian after its argument checks and the choice of mode (nnp_internal.h) */
int nnpi_jacobian_batch(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                        float *work, size_t work_len)
{
    const size_t jn = m->n_in * m->n_out; /* nnp_jacobian checked that it fits */
    size_t fixed, per_point, blk, done, t;
    int rc = ws_shape(m, mode == NNP_MODE_FORWARD ? NNP_WS_JACOBIAN_FORWARD : NNP_WS_JACOBIAN_REVERSE, &fixed,
                      &per_point);
    if (rc != NNP_OK) return rc;
    if (mode == NNP_MODE_REVERSE && batch >= NNP_CACHE_MIN_BATCH &&
        jacobian_cached(m, batch, x, y, dy_dx, work, work_len, per_point))
        return NNP_OK;
    blk = block_for(fixed, per_point, batch, work_len);
    if (blk == 0) return NNP_E_WORKSPACE;
    for (done = 0; done < batch; done += blk) {
        size_t np = batch - done < blk ? batch - done : blk;
        const float *xb = x + done * m->n_in;
        float *yb = y ? y + done * m->n_out : NULL;
        float *Jb = dy_dx + done * jn;
        if (mode == NNP_MODE_FORWARD) {
            t = blk * (m->n_in + 1) * m->max_cols;
            jac_fwd_block(m, np, xb, yb, Jb, work, work + t, work + 2 * t, batch == 1);
        } else {
            size_t vsz = blk * m->max_cols, dsz = blk * m->sum_cols, gsz = blk * m->n_out * m->max_cols;
            rev_fwd(m, np, xb, yb, work, work + vsz, work + 2 * vsz, batch == 1);
            rev_bwd(m, np, np, Jb, work + 2 * vsz, work + 2 * vsz + dsz, work + 2 * vsz + dsz + gsz, batch == 1);
        }
    }
    return NNP_OK;
}
