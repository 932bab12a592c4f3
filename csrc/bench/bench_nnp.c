/*
 * bench_nnp - time the C core on the seed network (2 inputs -> 64,64,32,32,16,16,8 leaky_relu -> 1 linear).
 *
 *     make bench            (or: out/bench_nnp [batch])
 *
 * Prints nanoseconds per point for forward, Jacobian (auto, forward, reverse mode) at batch 1 and at a large
 * batch (default 100000). Single-threaded. Timing only; nothing here is a test.
 */
#define _POSIX_C_SOURCE 199309L
#include "../nnp.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* -DNNP_BENCH_CPUTIME: count the process's CPU time instead of wall time (for a machine shared with other load) */
static double now(void)
{
    struct timespec ts;
#ifdef NNP_BENCH_CPUTIME
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t crc(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        c ^= p[i];
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static void put32(unsigned char *p, uint32_t v)
{
    int k;
    for (k = 0; k < 4; k++) p[k] = (unsigned char)(v >> (8 * k));
}

static void putf(unsigned char *p, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    put32(p, u);
}

int main(int argc, char **argv)
{
    static const size_t dims[] = {2, 64, 64, 32, 32, 16, 16, 8, 1};
    const size_t L = 8;
    size_t n = 32 + 24 * L + 4, k, i, off, need, wlen, batch = argc > 1 ? (size_t)atol(argv[1]) : 100000, b, reps;
    unsigned char *f;
    void *st;
    nnp_model *m;
    float *x, *y, *J, *work;
    int mode;
    unsigned s = 12345;
    for (k = 0; k < L; k++) n += 4 * (dims[k] * dims[k + 1] + dims[k + 1]);
    f = (unsigned char *)calloc(n, 1);
    memcpy(f, "NNPK", 4);
    put32(f + 4, 1);
    put32(f + 8, 2);
    put32(f + 12, 1);
    put32(f + 16, (uint32_t)L);
    put32(f + 24, (uint32_t)n);
    off = 32 + 24 * L;
    for (k = 0; k < L; k++) {
        unsigned char *r = f + 32 + 24 * k;
        put32(r, (uint32_t)dims[k]);
        put32(r + 4, (uint32_t)dims[k + 1]);
        put32(r + 8, k + 1 < L ? NNP_ACT_LEAKY_RELU : NNP_ACT_LINEAR);
        if (k + 1 < L) putf(r + 16, 0.3f);
        for (i = 0; i < dims[k] * dims[k + 1] + dims[k + 1]; i++, off += 4) {
            s = s * 1103515245u + 12345u;
            putf(f + off, ((float)((s >> 8) & 0xffff) / 65536.0f - 0.5f) * 0.4f);
        }
    }
    put32(f + n - 4, crc(f, n - 4));
    if (nnp_model_bytes(f, n, &need) != NNP_OK) return 1;
    st = malloc(need);
    if (nnp_load(f, n, st, need, &m) != NNP_OK) return 1;
    x = (float *)malloc(2 * batch * sizeof(float));
    y = (float *)malloc(batch * sizeof(float));
    J = (float *)malloc(2 * batch * sizeof(float));
    for (i = 0; i < 2 * batch; i++) x[i] = (float)((double)(i % 1000) / 500.0 - 1.0);
    nnp_workspace(m, NNP_WS_JACOBIAN_FORWARD, batch, &wlen);
    nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, batch, &need);
    if (need > wlen) wlen = need;
    work = (float *)malloc(wlen * sizeof(float));
    printf("seed network, auto mode = %s\n", nnp_auto_mode(m) == NNP_MODE_FORWARD ? "forward" : "reverse");
    for (b = 1; b <= batch; b = (b == 1 && batch > 1 ? batch : batch + 1)) {
        for (mode = -1; mode <= NNP_MODE_REVERSE; mode++) {
            double t0, best = 1e30;
            int trial;
            reps = b == 1 ? 200000 : 3;
            for (trial = 0; trial < 5; trial++) {
                size_t r;
                t0 = now();
                for (r = 0; r < reps; r++) {
                    if (mode < 0)
                        nnp_forward(m, b, x, y, work, wlen);
                    else
                        nnp_jacobian(m, mode, b, x, y, J, work, wlen);
                }
                t0 = (now() - t0) / (double)(reps * b);
                if (t0 < best) best = t0;
            }
            printf("batch %7lu  %-16s %8.1f ns/point\n", (unsigned long)b,
                   mode < 0 ? "forward" : mode == 0 ? "jacobian auto" : mode == 1 ? "jacobian forward" : "jacobian reverse",
                   best * 1e9);
        }
    }
    free(f); free(st); free(x); free(y); free(J); free(work);
    return 0;
}
