/*
 * nnp_bench - time the nnpartials C core alone (no Python), for the benchmark suite.
 *
 *     nnp_bench MODEL.nnp X.f32 BATCH [OP [MIN_SAMPLE_S [SAMPLES [OUT.f32]]]]
 *
 * X.f32 holds BATCH * n_in raw little-endian float32 values (row-major [batch][n_in]). OP is "jacobian"
 * (nnp_jacobian, NNP_MODE_AUTO, y and dy_dx; the default) or "forward" (nnp_forward, y only). The call is repeated
 * `reps` times per sample, with reps chosen so that one sample lasts at least MIN_SAMPLE_S seconds (default 0.05),
 * after a warm-up; SAMPLES samples are taken (default 15). One JSON line goes to standard output:
 *
 *     {"op": "jacobian", "batch": 1, "reps": 123456, "samples": 15, "median_ns": 412.3, "min_ns": 405.1, ...}
 *
 * median_ns and min_ns are nanoseconds per call (per whole batch). With OUT.f32, the last call's y (batch*n_out)
 * followed by dy_dx (batch*n_out*n_in, jacobian only) are written there as raw float32, for the agreement check.
 *
 * Build: cc -std=c99 -O3 -ffp-contract=fast -I csrc benchmarks/c/nnp_bench.c csrc/nnp.c -lm -o nnp_bench
 */
#define _POSIX_C_SOURCE 199309L
#include "nnp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
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
    int rc, jac;
    long s;

    if (argc < 4) {
        fprintf(stderr, "usage: nnp_bench MODEL.nnp X.f32 BATCH [jacobian|forward [MIN_SAMPLE_S [SAMPLES [OUT.f32]]]]\n");
        return 2;
    }
    jac = strcmp(op, "jacobian") == 0;
    if (!jac && strcmp(op, "forward") != 0) {
        fprintf(stderr, "nnp_bench: OP must be jacobian or forward, got %s\n", op);
        return 2;
    }
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
    x = (float *)read_all(argv[2], &xlen);
    if (!x || xlen != batch * n_in * sizeof(float)) {
        fprintf(stderr, "nnp_bench: %s must hold %lu float32 values (batch %lu x n_in %lu)\n", argv[2],
                (unsigned long)(batch * n_in), (unsigned long)batch, (unsigned long)n_in);
        return 2;
    }
    ylen = batch * n_out;
    jlen = ylen * n_in;
    if ((rc = nnp_workspace(m, jac ? NNP_WS_JACOBIAN : NNP_WS_FORWARD, batch, &wlen)) != NNP_OK)
        return die("nnp_workspace", rc);
    y = (float *)malloc((ylen ? ylen : 1) * sizeof(float));
    work = (float *)malloc((wlen ? wlen : 1) * sizeof(float));
    if (jac) J = (float *)malloc((jlen ? jlen : 1) * sizeof(float));
    times = (double *)malloc((size_t)samples * sizeof(double));
    if (!y || !work || (jac && !J) || !times) return die("malloc", 0);

#define CALL()                                                                           \
    do {                                                                                 \
        rc = jac ? nnp_jacobian(m, NNP_MODE_AUTO, batch, x, y, J, work, wlen)            \
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
        if (t >= min_sample || reps >= ((size_t)1 << 40)) break;
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
