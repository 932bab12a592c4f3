/*
 * nnp_bench - time the nnpartials C core alone (no Python). The benchmark suite runs it for its c_alone path
 * (cbench.py in the benchmarks folder), and `make -C csrc bench` runs it on the seed network that
 * test_nnp --write-seed-model writes.
 *
 *     nnp_bench MODEL.nnp X.f32 BATCH [OP [MIN_SAMPLE_S [SAMPLES [OUT.f32]]]]
 *
 * X.f32 holds BATCH * n_in raw little-endian float32 values (row-major [batch][n_in]); the word `random` in its
 * place means BATCH * n_in deterministic pseudo-random values in [-2, 2] (the same on every run), no file needed.
 * OP is one of
 *     jacobian            nnp_jacobian, NNP_MODE_AUTO, y and dy_dx (the default)
 *     jacobian_forward    nnp_jacobian, NNP_MODE_FORWARD
 *     jacobian_reverse    nnp_jacobian, NNP_MODE_REVERSE
 *     forward             nnp_forward, y only
 * each with the workspace nnp_workspace gives for it (NNP_WS_JACOBIAN, _JACOBIAN_FORWARD, _JACOBIAN_REVERSE,
 * _FORWARD). The call is repeated `reps` times per sample, with reps chosen so that one sample lasts at least
 * MIN_SAMPLE_S seconds (default 0.05), after a warm-up; SAMPLES samples are taken (default 15). One JSON line goes
 * to standard output:
 *
 *     {"op": "jacobian", "batch": 1, "reps": 123456, "samples": 15, "median_ns": 412.3, "min_ns": 405.1, ...}
 *
 * median_ns and min_ns are nanoseconds per call (per whole batch). With OUT.f32, the last call's y (batch*n_out)
 * followed by dy_dx (batch*n_out*n_in, jacobian ops only) are written there as raw float32, for the agreement check.
 * Times are wall-clock (CLOCK_MONOTONIC); built with -DNNP_BENCH_CPUTIME they are the process's CPU time instead
 * (for a machine shared with other load).
 *
 * Build: cc -std=c99 -O3 -ffp-contract=fast -fno-trapping-math csrc/bench/nnp_bench.c csrc/nnp*.c -lm -o nnp_bench
 */
#define _POSIX_C_SOURCE 199309L
#include "../nnp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
#ifdef NNP_BENCH_CPUTIME
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (!fp) return NULL;
    if (fseek(fp, 0, SEEK_END) != 0 || (n = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET) != 0) {
        fclose(fp);
        return NULL;
    }
    buf = (unsigned char *)malloc(n > 0 ? (size_t)n : 1);
    if (!buf || fread(buf, 1, (size_t)n, fp) != (size_t)n) {
        free(buf);
        fclose(fp);
        return NULL;
    }
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

/* n deterministic pseudo-random values in [-2, 2] (xorshift64, fixed seed) */
static float *random_points(size_t n)
{
    unsigned long long st = 0x9e3779b97f4a7c15ULL;
    float *x = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    if (!x) return NULL;
    for (i = 0; i < n; i++) {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        x[i] = (float)((double)(st >> 11) * (4.0 / 9007199254740991.0) - 2.0);
    }
    return x;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int die(const char *what, int rc)
{
    fprintf(stderr, "nnp_bench: %s: %s\n", what, rc ? nnp_strerror(rc) : "failed");
    return 2;
}

/* The operations OP may name: the workspace kind and, for nnp_jacobian, the mode (-1: nnp_forward). */
static const struct {
    const char *name;
    int ws, mode;
} ops[] = {{"jacobian", NNP_WS_JACOBIAN, NNP_MODE_AUTO},
           {"forward", NNP_WS_FORWARD, -1},
           {"jacobian_forward", NNP_WS_JACOBIAN_FORWARD, NNP_MODE_FORWARD},
           {"jacobian_reverse", NNP_WS_JACOBIAN_REVERSE, NNP_MODE_REVERSE}};

/* Sink for a value of every call's output, so that no call can be elided. */
static volatile float sink;

int main(int argc, char **argv)
{
    const char *op = argc > 4 ? argv[4] : "jacobian";
    double min_sample = argc > 5 ? atof(argv[5]) : 0.05;
    long samples = argc > 6 ? atol(argv[6]) : 15;
    const char *out_path = argc > 7 ? argv[7] : NULL;
    unsigned char *file;
    size_t flen, xlen, need, wlen, batch, n_in, n_out, ylen, jlen, reps = 1, r;
    void *storage;
    nnp_model *m;
    float *x, *y, *J = NULL, *work;
    double *times, t0, t;
    int rc, jac, mode = -1, ws = -1;
    long s;
    size_t k;

    if (argc < 4) {
        fprintf(stderr, "usage: nnp_bench MODEL.nnp X.f32|random BATCH "
                        "[jacobian|forward|jacobian_forward|jacobian_reverse [MIN_SAMPLE_S [SAMPLES [OUT.f32]]]]\n");
        return 2;
    }
    for (k = 0; k < sizeof ops / sizeof ops[0]; k++)
        if (strcmp(op, ops[k].name) == 0) {
            ws = ops[k].ws;
            mode = ops[k].mode;
        }
    if (ws < 0) {
        fprintf(stderr, "nnp_bench: OP must be jacobian, forward, jacobian_forward or jacobian_reverse, got %s\n", op);
        return 2;
    }
    jac = mode >= 0;
    if (samples < 1) samples = 1;
    batch = (size_t)strtoul(argv[3], NULL, 10);
    file = read_all(argv[1], &flen);
    if (!file) return die(argv[1], 0);
    if ((rc = nnp_model_bytes(file, flen, &need)) != NNP_OK) return die("nnp_model_bytes", rc);
    storage = malloc(need);
    if (!storage) return die("malloc", 0);
    if ((rc = nnp_load(file, flen, storage, need, &m)) != NNP_OK) return die("nnp_load", rc);
    free(file);
    n_in = nnp_n_in(m);
    n_out = nnp_n_out(m);
    if (strcmp(argv[2], "random") == 0) {
        x = random_points(batch * n_in);
        if (!x) return die("malloc", 0);
        xlen = batch * n_in * sizeof(float);
    } else {
        x = (float *)read_all(argv[2], &xlen);
    }
    if (!x || xlen != batch * n_in * sizeof(float)) {
        fprintf(stderr, "nnp_bench: %s must hold %lu float32 values (batch %lu x n_in %lu)\n", argv[2],
                (unsigned long)(batch * n_in), (unsigned long)batch, (unsigned long)n_in);
        return 2;
    }
    ylen = batch * n_out;
    jlen = ylen * n_in;
    if ((rc = nnp_workspace(m, ws, batch, &wlen)) != NNP_OK)
        return die("nnp_workspace", rc);
    y = (float *)malloc((ylen ? ylen : 1) * sizeof(float));
    work = (float *)malloc((wlen ? wlen : 1) * sizeof(float));
    if (jac) J = (float *)malloc((jlen ? jlen : 1) * sizeof(float));
    times = (double *)malloc((size_t)samples * sizeof(double));
    if (!y || !work || (jac && !J) || !times) return die("malloc", 0);

#define CALL()                                                                           \
    do {                                                                                 \
        rc = jac ? nnp_jacobian(m, mode, batch, x, y, J, work, wlen)                     \
                 : nnp_forward(m, batch, x, y, work, wlen);                              \
        if (rc != NNP_OK) return die(op, rc);                                            \
        sink = y[0];                                                                     \
    } while (0)

    /* warm-up and calibration: double reps until one sample lasts min_sample */
    CALL();
    for (;;) {
        t0 = now_s();
        for (r = 0; r < reps; r++) CALL();
        t = now_s() - t0;
        if (t >= min_sample || reps >= ((size_t)-1) / 4) break; /* no overflow, any size_t width */
        reps *= 2;
    }
    for (s = 0; s < samples; s++) {
        t0 = now_s();
        for (r = 0; r < reps; r++) CALL();
        times[s] = (now_s() - t0) / (double)reps;
    }
    qsort(times, (size_t)samples, sizeof(double), cmp_double);
    printf("{\"op\": \"%s\", \"batch\": %lu, \"n_in\": %lu, \"n_out\": %lu, \"reps\": %lu, \"samples\": %ld, "
           "\"median_ns\": %.6g, \"min_ns\": %.6g, \"max_ns\": %.6g}\n",
           op, (unsigned long)batch, (unsigned long)n_in, (unsigned long)n_out, (unsigned long)reps, samples,
           1e9 * (samples % 2 ? times[samples / 2] : 0.5 * (times[samples / 2 - 1] + times[samples / 2])),
           1e9 * times[0], 1e9 * times[samples - 1]);
    if (out_path) {
        FILE *fp = fopen(out_path, "wb");
        if (!fp || fwrite(y, sizeof(float), ylen, fp) != ylen || (jac && fwrite(J, sizeof(float), jlen, fp) != jlen)) {
            fprintf(stderr, "nnp_bench: cannot write %s\n", out_path);
            return 2;
        }
        fclose(fp);
    }
    free(times);
    free(J);
    free(work);
    free(y);
    free(x);
    free(storage);
    return 0;
}
