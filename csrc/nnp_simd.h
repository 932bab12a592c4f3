/*
 * nnp_simd.h - private to the C core: what is specific to SIMD and to x86. Included by nnp_internal.h.
 *
 * Run-time dispatch (x86-64, GCC >= 6 or Clang >= 6). The library is built for the baseline of its target
 * (SSE2 on x86-64), so that one binary (the Python extension, a distribution's package) runs on every CPU; yet
 * its time goes into matrix products that run much faster with AVX2 and FMA (twice the vector width, a fused
 * multiply-add per step). So every compute kernel is compiled twice from one source. A unit writes the kernel
 * once, as an always-inline function NAME_body, and NNP_DISPATCHED(NAME, PARAMS, ARGS) defines three static
 * functions in that unit:
 *   NAME_base   NAME_body compiled for the baseline (the flags the unit is built with);
 *   NAME_avx2   NAME_body compiled with __attribute__((target("avx2,fma"))): the body and every always-inline
 *               helper it calls are inlined into it and so compiled for that target as well;
 *   NAME        calls NAME_avx2 when the CPU has AVX2 and FMA (__builtin_cpu_supports), NAME_base otherwise.
 * The check is made at every call of a block function (a block is many products), never inside a kernel;
 * nnp_load() runs __builtin_cpu_init() (nnp_cpu_init), so it is valid even before constructors have run.
 * Because the helpers must be inlined into both variants, they are always-inline functions (NNP_INLINE) in the
 * unit that uses them or in a private header (this one, nnp_kernels.h): a helper in another unit would be a
 * call to code built for the baseline only. Each unit dispatches its own block functions, which stay static;
 * other units reach them through the unit's nnpi_* functions (nnp_internal.h), once per API call.
 *
 * Elsewhere (another architecture or compiler), or with -DNNP_NO_DISPATCH, each kernel is built once, for the
 * target the compiler is told (-march=native, for example).
 *
 * Vector code. With GCC or Clang the kernels are written with vector extensions: nnp_v8 is 8 floats, one AVX
 * register in the AVX2 build and two SSE registers in the baseline one, so one source serves both builds.
 * Other compilers, and -DNNP_PLAIN_C (to test them), get plain C99 versions of the same kernels
 * (NNP_VECTOR_EXT == 0; see nnp_internal.h for their rounding).
 *
 * The only code written for AVX2 itself is nnp_layer_bytes_avx2 below (intrinsics; the pattern cache's bits).
 */
#ifndef NNP_SIMD_H
#define NNP_SIMD_H

#if !defined(NNP_NO_DISPATCH) && defined(__x86_64__) &&                                                       \
    ((defined(__clang__) && __clang_major__ >= 6) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define NNP_X86_DISPATCH 1
#else
#define NNP_X86_DISPATCH 0
#endif

#if NNP_X86_DISPATCH
#include <immintrin.h>

static inline int have_avx2_fma(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* idempotent; makes the feature checks valid even before constructors ran */
static inline void nnp_cpu_init(void) { __builtin_cpu_init(); }

static inline int have_avx512f(void) { return have_avx2_fma() && __builtin_cpu_supports("avx512f"); }

/* The best kernel level this CPU runs: 2 AVX-512F (with AVX2 and FMA), 1 AVX2 and FMA, 0 the baseline */
static inline int nnp_cpu_isa(void)
{
    nnp_cpu_init();
    return have_avx512f() ? 2 : (have_avx2_fma() ? 1 : 0);
}

/* The two builds of NAME_body and NAME, which calls the AVX2 one where USE_AVX2 (an expression of PARAMS) holds */
#define NNP_DISPATCHED_IF(NAME, PARAMS, ARGS, USE_AVX2)                                                        \
    static void NAME##_base PARAMS { NAME##_body ARGS; }                                                       \
    __attribute__((target("avx2,fma"))) static void NAME##_avx2 PARAMS { NAME##_body ARGS; }                  \
    static void NAME PARAMS                                                                                    \
    {                                                                                                          \
        if (USE_AVX2)                                                                                          \
            NAME##_avx2 ARGS;                                                                                  \
        else                                                                                                   \
            NAME##_base ARGS;                                                                                  \
    }
#define NNP_DISPATCHED(NAME, PARAMS, ARGS) NNP_DISPATCHED_IF(NAME, PARAMS, ARGS, have_avx2_fma())

/* Activation-pattern bits (nnp_batch.c) of the units u < cols - cols % 8 of one layer: byte b[u / 8] gets, in bit
 * u % 8, whether d[u] != low (eight units per comparison and movemask). Returns the units done. */
__attribute__((target("avx2,fma"))) static inline size_t nnp_layer_bytes_avx2(const float *d, size_t cols,
                                                                               float low, unsigned char *b)
{
    const __m256 lv = _mm256_set1_ps(low);
    size_t u;
    for (u = 0; u + 8 <= cols; u += 8)
        b[u / 8] = (unsigned char)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(d + u), lv, _CMP_NEQ_UQ));
    return u;
}
/* As NNP_DISPATCHED, but the AVX2 build is taken only where the model's level allows it (m->isa, chosen at load:
 * the CPU's, capped by NNP_MAX_ISA), so that a capped model runs the baseline build (PARAMS must name the model m).
 * The single-point path (nnp_point.c), whose kernels are all inlined into its two builds. */
#define NNP_DISPATCHED_M(NAME, PARAMS, ARGS) NNP_DISPATCHED_IF(NAME, PARAMS, ARGS, m->isa >= 1)

/* The batch kernels (nnp_batch.c) have a third build, for AVX-512: NNP_DISPATCHED_ISA(NAME, PARAMS, ARGS) is as
 * NNP_DISPATCHED, but NAME_body takes the level as its first argument (a constant in each build, so each keeps only
 * its own kernels) and the level comes from the model (m->isa, chosen at load; PARAMS must name the model m). */
#define NNP_DISPATCHED_ISA(NAME, PARAMS, ARGS)                                                                 \
    static void NAME##_base PARAMS { NAME##_body(0, NNP_UNPAREN ARGS); }                                      \
    __attribute__((target("avx2,fma"))) static void NAME##_avx2 PARAMS { NAME##_body(1, NNP_UNPAREN ARGS); } \
    __attribute__((target("avx512f,avx2,fma"))) static void NAME##_avx512 PARAMS      \
    {                                                                                                          \
        NAME##_body(2, NNP_UNPAREN ARGS);                                                                      \
    }                                                                                                          \
    static void NAME PARAMS                                                                                    \
    {                                                                                                          \
        if (m->isa >= 2)                                                                                       \
            NAME##_avx512 ARGS;                                                                                \
        else if (m->isa == 1)                                                                                  \
            NAME##_avx2 ARGS;                                                                                  \
        else                                                                                                   \
            NAME##_base ARGS;                                                                                  \
    }
#else
static inline void nnp_cpu_init(void) {}
static inline int nnp_cpu_isa(void) { return 0; }

#define NNP_DISPATCHED(NAME, PARAMS, ARGS)                                                                     \
    static void NAME PARAMS { NAME##_body ARGS; }
#define NNP_DISPATCHED_M(NAME, PARAMS, ARGS) NNP_DISPATCHED(NAME, PARAMS, ARGS)
/* built once, for the target the compiler is told: the AVX-512 kernels where it may use them */
#if defined(__AVX512F__) && defined(__FMA__)
#define NNP_NATIVE_ISA 2
#else
#define NNP_NATIVE_ISA 0
#endif
#define NNP_DISPATCHED_ISA(NAME, PARAMS, ARGS)                                                                 \
    static void NAME PARAMS { NAME##_body(NNP_NATIVE_ISA, NNP_UNPAREN ARGS); }
#endif
#define NNP_UNPAREN(...) __VA_ARGS__

#if NNP_VECTOR_EXT
/* 8 floats; the kernels sum over k in order, except the split-sum single-row ones (used only when a call has one
 * point), so a point evaluated alone may differ from the same point evaluated in a batch by float32 rounding. */
typedef float nnp_v8 __attribute__((vector_size(32)));
/* the same vector at any float-aligned address, allowed to alias float */
typedef float nnp_v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef int nnp_v8i __attribute__((vector_size(32)));
#define NNP_LD(p) (*(const nnp_v8u *)(const void *)(p))
#define NNP_ST(p, v) (*(nnp_v8u *)(void *)(p) = (v))
#if defined(__clang__) || __GNUC__ >= 12
#define NNP_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define NNP_SHUF(a, b, ...) __builtin_shuffle(a, b, (nnp_v8i){__VA_ARGS__})
#endif
/* the next loop unrolled 4 times, where the compiler takes the request (GCC 8 on, Clang): the AVX-512 products'
 * k loop, where it measured 4-6 % faster in a 1,200 x 256 x 256 product alone and 1-2 % within the networks' passes
 * (the loop's own counter, compare and branch were a tenth of its 41 instructions besides 24 multiply-adds) */
#if defined(__clang__) || __GNUC__ >= 8
#define NNP_UNROLL4 _Pragma("GCC unroll 4")
#else
#define NNP_UNROLL4
#endif
/* 16 floats: one AVX-512 register (in the AVX-512 build only) */
typedef float nnp_v16 __attribute__((vector_size(64)));
typedef float nnp_v16u __attribute__((vector_size(64), aligned(4), may_alias));
/* within each half: a's pairwise sums, then b's (the pattern of x86 hadd) */
#define NNP_HADD(a, b) (NNP_SHUF(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + NNP_SHUF(a, b, 1, 3, 9, 11, 5, 7, 13, 15))

/* *r = the sums of the lanes of a[0], ..., a[7] */
NNP_INLINE void hsum8x8(const nnp_v8 *a, nnp_v8 *r)
{
    const nnp_v8 h01 = NNP_HADD(a[0], a[1]), h23 = NNP_HADD(a[2], a[3]);
    const nnp_v8 h45 = NNP_HADD(a[4], a[5]), h67 = NNP_HADD(a[6], a[7]);
    const nnp_v8 q0 = NNP_HADD(h01, h23), q1 = NNP_HADD(h45, h67);
    *r = NNP_SHUF(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) + NNP_SHUF(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif /* NNP_VECTOR_EXT */

#endif /* NNP_SIMD_H */
