/*
 * fma_peak - the single-core float32 multiply-add peak of this machine, measured, for the benchmark report's
 * "fraction of peak" next to GFLOP/s (benchmarks/cbench.py builds and runs it in the same run as the timings).
 * Not part of the library.
 *
 *     fma_peak [MIN_SAMPLE_S [SAMPLES]]
 *
 * For each instruction set this CPU runs, NACC independent accumulator chains acc = acc * a + b are advanced in
 * a loop (enough chains to cover the multiply-add latency times the number of FMA ports: 4 cycles x 2 ports = 8
 * vectors in flight on current x86 cores; NACC is 12 or 24 for margin, within the register file). Every step is
 * 2 flops per lane. One sample runs at least MIN_SAMPLE_S seconds (default 0.05); SAMPLES samples (default 7)
 * are taken after a warm-up. The median sample is the instruction set's rate ("gflops"; the fastest is reported
 * beside it as "max_gflops"): on a virtual machine a lone sample can come out far faster than the clock rate
 * allows (a clock artefact, up to 1.5x seen), and the median also passes over a sample slowed by other load.
 * Instruction sets, chosen at run time as csrc/nnp_simd.h does (x86-64, GCC or Clang >= 6):
 *   base     the flags the file is built with: GCC/Clang vector extensions, 4 floats (SSE2 on x86-64: a
 *            multiply and an add, no fused instruction; a fused one where the baseline has it, e.g. AArch64)
 *   avx2     __attribute__((target("avx2,fma"))), 8 floats, _mm256_fmadd_ps, when the CPU has AVX2 and FMA
 *   avx512   __attribute__((target("avx512f"))), 16 floats, _mm512_fmadd_ps, when the CPU has AVX-512F
 * Other compilers get a plain C99 scalar loop as "base" (1 lane). One JSON line per instruction set goes to standard
 * output, then a summary line (the last), which benchmarks/cbench.py reads:
 *
 *     {"isa": "avx2", "lanes": 8, "chains": 12, "reps": 33554432, "samples": 7, "gflops": 94.0, "max_gflops": 95.1}
 *     {"peak_gflops": 94.0, "isa": "avx2"}
 *
 * peak_gflops is the highest "gflops" (median) over the instruction sets, isa the one that reached it.
 *
 * Times are wall-clock (CLOCK_MONOTONIC).
 * Build: cc -std=c99 -O2 csrc/bench/fma_peak.c -o fma_peak
 */
#define _POSIX_C_SOURCE 199309L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if !defined(NNP_NO_DISPATCH) && defined(__x86_64__) &&                                                       \
    ((defined(__clang__) && __clang_major__ >= 6) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define FP_X86_DISPATCH 1
#include <immintrin.h>
#else
#define FP_X86_DISPATCH 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FP_VECTOR_EXT 1
#else
#define FP_VECTOR_EXT 0
#endif

#define NACC 12      /* chains for 16-register ISAs (SSE2, AVX2): 12 accumulators + 2 constants */
#define NACC512 24   /* chains for AVX-512 (32 registers) */

/* the chains' constants: acc -> acc * A + B converges to B / (1 - A) = 1, no overflow, no subnormals */
#define CA 0.9999999f
#define CB 1e-7f

/* The kernels read their start from `seed` and write their result to `sink` (both volatile): they are not pure
 * functions, so the compiler can neither merge two calls with the same reps nor move one across the clock reads. */
static volatile float seed = 0.01f;
static volatile float sink;

/* The steps of one rep, written out (constant indices: the accumulators live in registers, not in memory). */
#define FP_STEPS4(S, o) S(o) S(o + 1) S(o + 2) S(o + 3)
#define FP_STEPS12(S) FP_STEPS4(S, 0) FP_STEPS4(S, 4) FP_STEPS4(S, 8)
#define FP_STEPS24(S) FP_STEPS12(S) FP_STEPS4(S, 12) FP_STEPS4(S, 16) FP_STEPS4(S, 20)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the kernels: reps steps of every chain; return a value of the chains so that nothing is elided ---- */
#if FP_VECTOR_EXT
typedef float fp_v4 __attribute__((vector_size(16)));

static void run_base(unsigned long reps)
{
    fp_v4 acc[NACC];
    const fp_v4 a = {CA, CA, CA, CA}, b = {CB, CB, CB, CB};
    fp_v4 s;
    const float v0 = seed;
    unsigned long r;
    int i;
    for (i = 0; i < NACC; i++) {
        const float v = v0 * (float)i;
        const fp_v4 init = {v, v + 0.001f, v + 0.002f, v + 0.003f};
        acc[i] = init;
    }
#define FP_STEP(k) acc[k] = acc[k] * a + b;
    for (r = 0; r < reps; r++) {
        FP_STEPS12(FP_STEP)
    }
#undef FP_STEP
    s = acc[0];
    for (i = 1; i < NACC; i++) s += acc[i];
    sink = s[0] + s[1] + s[2] + s[3];
}
#define BASE_LANES 4
#else
static void run_base(unsigned long reps)
{
    float acc[NACC], s = 0.0f;
    const float v0 = seed;
    unsigned long r;
    int i;
    for (i = 0; i < NACC; i++) acc[i] = v0 * (float)i;
#define FP_STEP(k) acc[k] = acc[k] * CA + CB;
    for (r = 0; r < reps; r++) {
        FP_STEPS12(FP_STEP)
    }
#undef FP_STEP
    for (i = 0; i < NACC; i++) s += acc[i];
    sink = s;
}
#define BASE_LANES 1
#endif

#if FP_X86_DISPATCH
__attribute__((target("avx2,fma"))) static void run_avx2(unsigned long reps)
{
    __m256 acc[NACC], s;
    const __m256 a = _mm256_set1_ps(CA), b = _mm256_set1_ps(CB);
    const float v0 = seed;
    float out[8];
    unsigned long r;
    int i;
    for (i = 0; i < NACC; i++) acc[i] = _mm256_set1_ps(v0 * (float)i);
#define FP_STEP(k) acc[k] = _mm256_fmadd_ps(acc[k], a, b);
    for (r = 0; r < reps; r++) {
        FP_STEPS12(FP_STEP)
    }
#undef FP_STEP
    s = acc[0];
    for (i = 1; i < NACC; i++) s = _mm256_add_ps(s, acc[i]);
    _mm256_storeu_ps(out, s);
    sink = out[0] + out[7];
}

__attribute__((target("avx512f"))) static void run_avx512(unsigned long reps)
{
    __m512 acc[NACC512], s;
    const __m512 a = _mm512_set1_ps(CA), b = _mm512_set1_ps(CB);
    const float v0 = seed;
    float out[16];
    unsigned long r;
    int i;
    for (i = 0; i < NACC512; i++) acc[i] = _mm512_set1_ps(v0 * (float)i);
#define FP_STEP(k) acc[k] = _mm512_fmadd_ps(acc[k], a, b);
    for (r = 0; r < reps; r++) {
        FP_STEPS24(FP_STEP)
    }
#undef FP_STEP
    s = acc[0];
    for (i = 1; i < NACC512; i++) s = _mm512_add_ps(s, acc[i]);
    _mm512_storeu_ps(out, s);
    sink = out[0] + out[15];
}
#endif

static int cmp_double(const void *x, const void *y)
{
    double p = *(const double *)x, q = *(const double *)y;
    return (p > q) - (p < q);
}

/* Time one kernel; prints its line; returns its median GFLOP/s. */
static double measure(const char *isa, void (*run)(unsigned long), int lanes, int chains, double min_sample,
                      long samples)
{
    unsigned long reps = 1024;
    double t0, t, median, *g = (double *)malloc((size_t)samples * sizeof(double));
    const double flops_per_rep = 2.0 * lanes * chains;
    long s;
    if (!g) return 0.0;
    run(reps); /* warm-up (and the clock ramp) */
    for (;;) {         /* calibrate: double reps until one sample lasts min_sample */
        t0 = now_s();
        run(reps);
        t = now_s() - t0;
        if (t >= min_sample || reps >= (~0UL) / 4) break;
        reps *= 2;
    }
    for (s = 0; s < samples; s++) {
        t0 = now_s();
        run(reps);
        t = now_s() - t0;
        g[s] = t > 0 ? 1e-9 * flops_per_rep * (double)reps / t : 0.0;
    }
    qsort(g, (size_t)samples, sizeof(double), cmp_double);
    median = samples % 2 ? g[samples / 2] : 0.5 * (g[samples / 2 - 1] + g[samples / 2]);
    printf("{\"isa\": \"%s\", \"lanes\": %d, \"chains\": %d, \"reps\": %lu, \"samples\": %ld, \"gflops\": %.6g, "
           "\"max_gflops\": %.6g}\n",
           isa, lanes, chains, reps, samples, median, g[samples - 1]);
    free(g);
    return median;
}

int main(int argc, char **argv)
{
    double min_sample = argc > 1 ? atof(argv[1]) : 0.05, g, peak;
    long samples = argc > 2 ? atol(argv[2]) : 7;
    const char *peak_isa = "base";
    if (argc > 3 || min_sample < 0) {
        fprintf(stderr, "usage: fma_peak [MIN_SAMPLE_S [SAMPLES]]\n");
        return 2;
    }
    if (samples < 1) samples = 1;
    peak = measure("base", run_base, BASE_LANES, NACC, min_sample, samples);
#if FP_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        g = measure("avx2", run_avx2, 8, NACC, min_sample, samples);
        if (g > peak) {
            peak = g;
            peak_isa = "avx2";
        }
    }
    if (__builtin_cpu_supports("avx512f")) {
        g = measure("avx512", run_avx512, 16, NACC512, min_sample, samples);
        if (g > peak) {
            peak = g;
            peak_isa = "avx512";
        }
    }
#else
    (void)g;
#endif
    printf("{\"peak_gflops\": %.6g, \"isa\": \"%s\"}\n", peak, peak_isa);
    return 0;
}
