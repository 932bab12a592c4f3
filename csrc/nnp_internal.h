/*
 * nnp_internal.h - private to the C core (not part of the API; nnp.h is): what its units share. Every unit
 * includes this header first.
 *
 * The library is every csrc/nnp*.c, compiled separately or together (cc -std=c99 -O2 ... csrc/nnp*.c -lm):
 *   nnp.c          public entry points of the float32 computation: argument checks, workspace sizes, the choice
 *                  of mode and path (single point, blocks, pattern cache); status text; input checks
 *   nnp_format.c   the weight file: decoding, validation (CRC-32), loading into caller storage; model shape
 *   nnp_batch.c    batches in blocks of points: matrix product kernels, forward pass, forward- and reverse-mode
 *                  Jacobians, the pattern cache of piecewise-linear networks
 *   nnp_point.c    the Jacobian of a single point: reverse mode with fused one-row kernels
 *   nnp_fd.c       float64 forward pass and finite-difference Jacobian
 *   nnp_second.c   second derivatives: the Hessian, the Laplacian and Hessian-vector products in float32 (their
 *                  matrix products are nnp_batch.c's, through nnpi_gemm, but for the products of the Hessian's
 *                  reverse pass with large layers: its own dot products), the float64 finite-difference Hessian
 * with three private headers:
 *   nnp_internal.h this one: floating-point code generation, limits, the loaded model's layout, size arithmetic,
 *                  and the functions one unit offers another (prefix nnpi_)
 *   nnp_simd.h     what is specific to SIMD and x86: vector types and the run-time dispatch between a baseline
 *                  and an AVX2+FMA build of the same kernel code (explained there)
 *   nnp_kernels.h  float32 activations (values, derivatives) and dot products, inlined into the kernels of
 *                  nnp_batch.c and nnp_point.c
 * The hot loops stay inside one unit each: a dispatched block function and everything it calls are compiled
 * together (always-inline helpers from these headers), so splitting the library into units costs one call per
 * API call, not per kernel.
 */
#ifndef NNP_INTERNAL_H
#define NNP_INTERNAL_H

/* Kernels: GCC/Clang vector extensions, or plain C99 (other compilers; -DNNP_PLAIN_C builds them for testing). */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(NNP_PLAIN_C)
#define NNP_VECTOR_EXT 1
#else
#define NNP_VECTOR_EXT 0
#endif

/* Floating-point code generation, whatever flags the library is built with (the builds also pass them):
 * - the library never reads floating-point exception flags, so GCC may treat floating-point operations as
 *   non-trapping (Clang's default), which lets it turn the selects of piecewise activations into vector code;
 * - with the vector kernels, a * b + c may be fused into one multiply-add (GCC's ISO modes turn that off; Clang
 *   fuses within an expression by default, which covers the kernels). Their vector statements are fused as
 *   written, the same way in every kernel, so a result does not depend on which tile or block size made it;
 * - the plain C kernels are built without fusion. Allowed to fuse, GCC (12, -O3, in the AVX2+FMA build) does so
 *   tile by tile: for some tiles (two to four rows of eight columns, for one) it vectorizes the loop over k as an
 *   in-order reduction, products of four k at once shuffled into the accumulators, and a multiply parted from
 *   its add by the shuffle is not fused; the other tiles fuse every step. Rows computed by different tiles, that
 *   is with different block sizes, then rounded differently (results changed with the workspace size, and the
 *   Jacobian's y differed from nnp_forward's). Without fusion every product and sum is rounded as written,
 *   however the compiler vectorizes. (Clang, which does not vectorize such loops in order, honours the standard
 *   pragma unless told -ffp-contract=fast.)
 * Neither permits reassociation. */
#if defined(__GNUC__) && !defined(__clang__)
#if NNP_VECTOR_EXT
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#else
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif
#elif !NNP_VECTOR_EXT
#pragma STDC FP_CONTRACT OFF
#endif

#include "nnp.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if FLT_RADIX != 2 || FLT_MANT_DIG != 24 || DBL_MANT_DIG != 53
#error "the nnpartials C core needs IEEE-754 binary32 float and binary64 double"
#endif
typedef char nnp_check_float_size[(sizeof(float) == 4 && sizeof(uint32_t) == 4) ? 1 : -1];

#define NNP_RESTRICT restrict

#if defined(__GNUC__) || defined(__clang__)
#define NNP_INLINE static inline __attribute__((always_inline))
#else
#define NNP_INLINE static inline
#endif

#include "nnp_simd.h"

#define NNP_ALIGN 64u
#define NNP_MODEL_TAG 0x4d50504eu /* "NPPM": marks an initialised model */
/* A block of points is sized so that its activation buffers hold about this many floats (256 KiB: in the L2 cache;
 * a reverse-mode block of the 4 x 256 physics network is then 24 points, two full row groups of the AVX-512
 * kernels, instead of 6 with 64 KiB: its Jacobian at 1,000 points 7.4 -> 6.7 ms) */
#define NNP_BLOCK_FLOATS 65536u
#define NNP_MAX_BLOCK 72u
/* ... and for the second derivatives (nnp_second.c), whose points carry many more rows: larger blocks, so that each
 * matrix product has enough rows to run at full speed (its weights then stream from the L2 cache once per block) */
#ifndef NNP_SO_BLOCK_FLOATS
#define NNP_SO_BLOCK_FLOATS 65536u
#endif
/* Single-point reverse path (one backward pass per output): used for one point with at most this many outputs
 * (beyond it, the batch path's products, which share each weight load among the outputs, are faster). */
#ifndef NNP_SP_MAX_OUT
#define NNP_SP_MAX_OUT 2u
#endif
/* Workspace of the single-point path (floats): v0, v1 [max_cols] for the values, then the adjoints (the same
 * buffers), D [sum_cols] */
#define NNP_SP_WORK(m) (2 * (m)->max_cols + (m)->sum_cols)
/* Finite differences (nnp_fd.c, nnp_second.c): the larger step is cbrt(DBL_EPSILON) * max(1, |x_j|); the rounding
 * part of the error estimate is NNP_FD_ROUNDING * DBL_EPSILON * (scale of the rounding errors) / (smaller step) */
#define NNP_FD_CBRT_EPS 6.0554544523933395e-06
#ifndef NNP_FD_ROUNDING
#define NNP_FD_ROUNDING 16.0
#endif
/* Pattern cache (nnp_batch.c): batches from this size, table size, largest entry */
#define NNP_CACHE_MIN_BATCH 256u
#define NNP_CACHE_BYTES ((size_t)1 << 20)
#define NNP_CACHE_MAX_ENTRY_SLOTS 1024u

/* ------------------------------------------------------------------------------------------------------ */
/* A loaded model                                                                                         */
/*
 * Layout inside the caller's storage, aligned to 64 bytes:
 *   struct nnp_model | nnp_layer[n_layers] | per layer: W[rows][cols], b[cols], Wt[cols][rows], Wp, Wtp
 * W is kept twice (as stored and transposed) so that both the forward products (x W) and the reverse ones
 * (g W^T) run over contiguous memory, and both again packed in panels for the batch kernels (nnp_batch.c): Wp holds
 * W's columns in panels of NNP_PANEL, panel q = columns [16 q, 16 q + 16) as [rows][16] contiguous floats, the last
 * panel zero-padded; Wtp the same of Wt. A kernel streams one panel (or two) from start to end, with no stride
 * between the rows of its tile of weights (the cache conflicts of reading 16 columns of a 256-wide row-major matrix).
 */
#define NNP_PANEL 16u
/* floats of a packed copy of a [rows][cols] matrix: whole panels of cols */
#define NNP_PACKED_FLOATS(rows, cols) ((((cols) + NNP_PANEL - 1) / NNP_PANEL) * NNP_PANEL * (rows))
typedef struct nnp_layer {
    size_t rows, cols;
    int act;
    float p0, p1;
    const float *W;  /* [rows][cols] */
    const float *b;  /* [cols] */
    const float *Wt; /* [cols][rows] */
    const float *Wp;  /* W packed: [ceil(cols / 16)][rows][16] */
    const float *Wtp; /* Wt packed: [ceil(rows / 16)][cols][16] */
} nnp_layer;

struct nnp_model {
    uint32_t tag;
    size_t n_in, n_out, n_layers;
    size_t max_cols; /* largest layer output width */
    size_t sum_cols; /* sum of layer output widths */
    size_t pattern_bits; /* bits of an activation pattern: one per unit of a non-linear layer, each layer
                            padded to whole bytes */
    int piecewise;       /* every activation is piecewise linear: linear, relu, leaky_relu, relu6, hard_sigmoid */
    int isa;             /* kernels of the batch paths (nnp_simd.h): 0 baseline, 1 AVX2+FMA, 2 AVX-512; chosen at
                            load from what the CPU has, at most what the environment variable NNP_MAX_ISA allows */
    const nnp_layer *layers;
};

static inline int model_ok(const nnp_model *m)
{
    return m != NULL && m->tag == NNP_MODEL_TAG;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Overflow-checked size arithmetic, workspace and block sizes                                            */

static inline int add_sz(size_t a, size_t b, size_t *r)
{
    if (a > SIZE_MAX - b) return 0;
    *r = a + b;
    return 1;
}

static inline int mul_sz(size_t a, size_t b, size_t *r)
{
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *r = a * b;
    return 1;
}

/* Points per block for a workspace of per_point elements per point, blocks of about `budget` elements */
static inline size_t max_block_of(size_t per_point, size_t budget)
{
    size_t b = per_point ? budget / per_point : NNP_MAX_BLOCK;
    if (b < 1) b = 1;
    if (b > NNP_MAX_BLOCK) b = NNP_MAX_BLOCK;
    if (b >= 24) b -= b % 24; /* whole row groups of the kernels (6 and 8 rows) */
    return b;
}

static inline size_t max_block(size_t per_point)
{
    return max_block_of(per_point, NNP_BLOCK_FLOATS);
}

/* Elements of a block of points of operation op (its workspace, nnp_workspace, stops growing there) */
static inline size_t ws_block_budget(int op)
{
    return (op == NNP_WS_HESSIAN || op == NNP_WS_LAPLACIAN || op == NNP_WS_HVP) ? NNP_SO_BLOCK_FLOATS
                                                                                 : NNP_BLOCK_FLOATS;
}

/* Block size usable with work_len elements, or 0 when not even one point fits; blocks of up to `budget` elements */
static inline size_t block_for_of(size_t fixed, size_t per_point, size_t batch, size_t work_len, size_t budget)
{
    size_t blk = max_block_of(per_point, budget);
    if (blk > batch) blk = batch;
    if (work_len < fixed) return 0;
    if (per_point == 0) return blk;
    if ((work_len - fixed) / per_point < blk) blk = (work_len - fixed) / per_point;
    return blk;
}

static inline size_t block_for(size_t fixed, size_t per_point, size_t batch, size_t work_len)
{
    return block_for_of(fixed, per_point, batch, work_len, NNP_BLOCK_FLOATS);
}

/* n (n + 1) / 2 without overflow for n <= NNP_MAX_DIM (it fits in 32 bits) */
static inline size_t tri_sz(size_t n)
{
    return (n % 2 == 0) ? (n / 2) * (n + 1) : n * ((n + 1) / 2);
}

/* Second derivatives (nnp_second.c). The Laplacian and Hessian-vector products are forward passes that carry, per
 * point, rows of the layer's width: the value, first-order rows (tangents) and second-order rows. The Hessian is
 * either such a pass too (forward over forward: the value, n_in tangent rows and one row per pair j <= k of inputs)
 * or, when the model has fewer outputs than there are such pairs, a forward pass that keeps every layer's tangent
 * rows and derivatives followed by a reverse pass of n_out adjoint rows (nnp_second.c says why that is exact). */
static inline int hess_reverse(const nnp_model *m)
{
    return m->n_out < tri_sz(m->n_in);
}

/* Rows per point of the forward passes of op (NNP_WS_HESSIAN in forward-over-forward, NNP_WS_LAPLACIAN, NNP_WS_HVP):
 * the value, the first-order rows (*m1) and the second-order rows. 0 when it does not fit. */
static inline size_t so_rows(const nnp_model *m, int op, size_t *m1)
{
    const size_t n = m->n_in;
    size_t r;
    *m1 = (op == NNP_WS_HVP) ? n + 1 : n;                 /* tangents of the inputs (and of v) */
    if (op == NNP_WS_HESSIAN) r = tri_sz(n);             /* one row per pair j <= k */
    else if (op == NNP_WS_LAPLACIAN) r = 1;              /* the sum of the diagonal */
    else r = n;                                          /* H v, one row per input */
    if (!add_sz(r, *m1 + 1, &r)) return 0;
    return r;
}

/* Row width of the float64 Jacobian of nnp_fd_hessian_f64: its rows start as wide as the input */
static inline size_t fd2_width(const nnp_model *m)
{
    return m->max_cols > m->n_in ? m->max_cols : m->n_in;
}

/* Workspace of the forward passes of second derivatives: two ping-pong buffers of the rows of a point; fixed: one
 * layer's first and second derivatives */
static inline int so_ws_shape(const nnp_model *m, int op, size_t *fixed, size_t *per_point)
{
    size_t m1, t = so_rows(m, op, &m1);
    *fixed = 2 * m->max_cols;
    if (t == 0 || !mul_sz(t, m->max_cols, &t) || !mul_sz(2, t, per_point)) return NNP_E_TOO_LARGE;
    return NNP_OK;
}

/* Workspace of an operation: fixed + per_point * block elements. */
static inline int ws_shape(const nnp_model *m, int op, size_t *fixed, size_t *per_point)
{
    size_t t, u;
    *fixed = 0;
    switch (op) {
    case NNP_WS_FORWARD:
    case NNP_WS_FORWARD_F64:
        /* two ping-pong activation buffers */
        if (!mul_sz(2, m->max_cols, per_point)) return NNP_E_TOO_LARGE;
        return NNP_OK;
    case NNP_WS_JACOBIAN_FORWARD:
        /* two ping-pong buffers of (1 + n_in) rows (value and tangents) per point, one derivative row */
        *fixed = m->max_cols;
        if (!mul_sz(m->n_in + 1, m->max_cols, &t) || !mul_sz(2, t, per_point)) return NNP_E_TOO_LARGE;
        return NNP_OK;
    case NNP_WS_JACOBIAN_REVERSE:
        /* values (2 rows), every layer's derivative, two adjoint buffers of n_out rows */
        if (!mul_sz(m->n_out, m->max_cols, &t) || !mul_sz(2, t, &t) || !mul_sz(2, m->max_cols, &u) ||
            !add_sz(t, u, &t) || !add_sz(t, m->sum_cols, per_point))
            return NNP_E_TOO_LARGE;
        return NNP_OK;
    case NNP_WS_FD_JACOBIAN_F64:
        /* 4 perturbed points, their 4 outputs and output scales, f(x), and the float64 forward workspace for
         * 4 points; per point nothing more */
        if (!mul_sz(4, m->n_in, &t) || !mul_sz(9, m->n_out, &u) || !add_sz(t, u, &t) ||
            !mul_sz(8, m->max_cols, &u) || !add_sz(t, u, fixed))
            return NNP_E_TOO_LARGE;
        *per_point = 0;
        return NNP_OK;
    case NNP_WS_HESSIAN:
        if (hess_reverse(m)) {
            /* per point: every layer's outputs (value and n_in tangent rows) and derivatives (first and second), the
             * next layer's input rows, two adjoint buffers of n_out rows; fixed: two rows of scratch */
            *fixed = 2 * m->max_cols;
            if (!mul_sz(m->n_in + 3, m->sum_cols, &t) || !mul_sz(m->n_in + 1, m->max_cols, &u) ||
                !add_sz(t, u, &t) || !mul_sz(2 * m->n_out, m->max_cols, &u) || !add_sz(t, u, per_point))
                return NNP_E_TOO_LARGE;
            return NNP_OK;
        }
        return so_ws_shape(m, op, fixed, per_point); /* forward over forward */
    case NNP_WS_LAPLACIAN:
    case NNP_WS_HVP:
        return so_ws_shape(m, op, fixed, per_point);
    case NNP_WS_FD_HESSIAN_F64:
        /* the Jacobian at the point and at 4 perturbed points with their rounding scales, f(x), the perturbed
         * point, the float64 forward-mode Jacobian's two buffers of 1 + n_in rows (as wide as the widest of the
         * layers and the input) and one derivative row */
        if (!mul_sz(m->n_in, m->n_out, &t) || !mul_sz(9, t, &t) || !add_sz(t, m->n_out + m->n_in, &t) ||
            !mul_sz(2 * (m->n_in + 1) + 1, fd2_width(m), &u) || !add_sz(t, u, fixed))
            return NNP_E_TOO_LARGE;
        *per_point = 0;
        return NNP_OK;
    default:
        return NNP_E_ARG;
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* What one unit offers another                                                                           */

/* nnp.c: the argument checks common to the compute functions (they also reject batches whose arrays could not be
 * addressed). */
int nnpi_check_call(const nnp_model *m, size_t batch, const void *x, const void *y, int need_y, const void *work,
                    size_t out_per_point);

/* nnp_batch.c: nnp_forward and nnp_jacobian (mode NNP_MODE_FORWARD or NNP_MODE_REVERSE) of a batch of at least
 * one point, after their argument checks: the batch in blocks of points that fit in the workspace, and for the
 * Jacobian in reverse mode on large batches the pattern cache where it applies. */
int nnpi_forward_batch(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len);
int nnpi_jacobian_batch(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                        float *work, size_t work_len);

/* nnp_batch.c: shape of the pattern cache of a model (0 when it has none: not piecewise linear, or entries too
 * large). All sizes in 4-byte slots. */
typedef struct {
    size_t pw;    /* slots of a pattern (one bit per unit of a non-linear layer, zero padded) */
    size_t jn;    /* floats of one Jacobian */
    size_t slots; /* slots of one entry: tag, pattern, Jacobian */
    size_t cap;   /* entries (power of two) */
    size_t table; /* slots of the table */
    size_t extra; /* slots per point of the block: current patterns and hashes, and the queue of misses
                     (derivatives, pattern, hash, destination, Jacobian) */
} nnpi_cache_shape_t;
int nnpi_cache_shape(const nnp_model *m, nnpi_cache_shape_t *cs);

/* nnp_point.c: y (may be NULL) and J [n_out][n_in] of the point x; work holds NNP_SP_WORK(m) floats. */
void nnpi_point_jacobian(const nnp_model *m, const float *x, float *y, float *J, float *work);

/* nnp_batch.c: C[m][n] (row stride ldc) = A[m][k] (row stride lda) B[k][n], Bt = B transposed, by its matrix product
 * kernels (dispatched: one check per product). For nnp_second.c, whose passes are products like the first-order
 * ones; the same row gives the same bits whatever m and its place among the rows. */
void nnpi_gemm(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B, const float *Bt, float *C,
               size_t ldc);

#endif /* NNP_INTERNAL_H */
