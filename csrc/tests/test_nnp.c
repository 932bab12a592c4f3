/*
 * test_nnp.c - self-contained tests of the C core.
 *
 * Builds weight files in memory (with its own writer and its own bitwise CRC-32, crc32_bitwise.h), and checks:
 *   - float32 forward against a straightforward float64 reference written here,
 *   - the analytic Jacobian (both modes) against a float64 reference Jacobian (chain rule written here),
 *   - both Jacobian modes agree, and the automatic mode equals one of them,
 *   - the float64 finite-difference Jacobian against the reference, and that its error estimate covers it,
 *   - derivative conventions at the kinks of piecewise activations,
 *   - every corruption gives its error code, every truncated prefix and every single-bit flip is rejected,
 *   - unaligned file buffers and storage, small workspaces, NULL arguments,
 *   - second derivatives (Hessian, Laplacian, Hessian-vector products) against a float64 forward-over-forward
 *     reference written here (its f'' checked against differences of f'), the float64 finite-difference Hessian
 *     and its error estimate, exact zeros of piecewise-linear networks and at kinks, and their own arguments.
 *
 * Usage: test_nnp                       run the tests
 *        test_nnp --write-model F       write a small valid model (2 inputs, 2 outputs) to F and exit
 *        test_nnp --write-seed-model F  write a seed-shaped network to F and exit (for `make bench`): 2 inputs ->
 *                                       Dense 64, 64, 32, 32, 16, 16, 8 leaky_relu (alpha 0.3) -> Dense 1 linear,
 *                                       with the seeded random weights of make_model
 */
#if !defined(_POSIX_C_SOURCE) && (defined(__unix__) || defined(__APPLE__))
#define _POSIX_C_SOURCE 200112L /* setenv, for the kernel-level test */
#endif
#include "../nnp.h"
#include "crc32_bitwise.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0, checks = 0;
static double max_ratio = 0;

#define CHECK(cond, ...)                                                                                       \
    do {                                                                                                       \
        checks++;                                                                                              \
        if (!(cond)) {                                                                                         \
            failures++;                                                                                        \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                               \
            fprintf(stderr, __VA_ARGS__);                                                                      \
            fprintf(stderr, "\n");                                                                             \
        }                                                                                                      \
    } while (0)

#define CHECK_RC(got, want, what)                                                                              \
    CHECK((got) == (want), "%s: got %d (%s), want %d (%s)", what, got, nnp_strerror(got), want,               \
          nnp_strerror(want))

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ---------------------------------------------------------------------------------------------------- */
/* deterministic random numbers                                                                          */

static unsigned long long rng_state = 88172645463325252ULL;

static double urand(void) /* uniform in [0, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}

static double urange(double lo, double hi) { return lo + (hi - lo) * urand(); }

/* ---------------------------------------------------------------------------------------------------- */
/* writer                                                                                                */

typedef struct {
    size_t rows, cols;
    unsigned act;
    float p0, p1;
    float *W, *b;
} tlayer;

typedef struct {
    size_t n_in, n_out, n_layers;
    tlayer *L;
} tmodel;

static void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v & 0xff);
    p[1] = (unsigned char)((v >> 8) & 0xff);
    p[2] = (unsigned char)((v >> 16) & 0xff);
    p[3] = (unsigned char)((v >> 24) & 0xff);
}

static void put_f32(unsigned char *p, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    put_u32(p, u);
}

static void fix_crc(unsigned char *buf, size_t len) { put_u32(buf + len - 4, crc32_bitwise(buf, len - 4)); }

static unsigned char *write_model(const tmodel *m, size_t *len_out)
{
    size_t n = 32 + 24 * m->n_layers + 4, k, i, off;
    unsigned char *buf;
    for (k = 0; k < m->n_layers; k++) n += 4 * (m->L[k].rows * m->L[k].cols + m->L[k].cols);
    buf = (unsigned char *)xmalloc(n);
    memcpy(buf, "NNPK", 4);
    put_u32(buf + 4, 1);
    put_u32(buf + 8, (uint32_t)m->n_in);
    put_u32(buf + 12, (uint32_t)m->n_out);
    put_u32(buf + 16, (uint32_t)m->n_layers);
    put_u32(buf + 20, 0);
    put_u32(buf + 24, (uint32_t)n);
    put_u32(buf + 28, 0);
    for (k = 0; k < m->n_layers; k++) {
        unsigned char *r = buf + 32 + 24 * k;
        put_u32(r, (uint32_t)m->L[k].rows);
        put_u32(r + 4, (uint32_t)m->L[k].cols);
        put_u32(r + 8, m->L[k].act);
        put_u32(r + 12, 0);
        put_f32(r + 16, m->L[k].p0);
        put_f32(r + 20, m->L[k].p1);
    }
    off = 32 + 24 * m->n_layers;
    for (k = 0; k < m->n_layers; k++) {
        for (i = 0; i < m->L[k].rows * m->L[k].cols; i++, off += 4) put_f32(buf + off, m->L[k].W[i]);
        for (i = 0; i < m->L[k].cols; i++, off += 4) put_f32(buf + off, m->L[k].b[i]);
    }
    fix_crc(buf, n);
    *len_out = n;
    return buf;
}

static void default_params(unsigned act, float *p0, float *p1)
{
    *p0 = 0.0f;
    *p1 = 0.0f;
    if (act == NNP_ACT_LEAKY_RELU) *p0 = 0.2f;
    if (act == NNP_ACT_ELU) *p0 = 0.7f;
    if (act == NNP_ACT_SELU) {
        *p0 = 1.6732632423543772f;
        *p1 = 1.0507009873554805f;
    }
    if (act == NNP_ACT_HARD_SIGMOID) {
        *p0 = 1.0f / 6.0f;
        *p1 = 0.5f;
    }
}

/* n_in -> widths[0] -> ... -> widths[nw-1]; hidden layers use act, the last layer out_act */
static tmodel make_model(size_t n_in, const size_t *widths, size_t nw, unsigned act, unsigned out_act)
{
    tmodel m;
    size_t k, i, prev = n_in;
    m.n_in = n_in;
    m.n_out = widths[nw - 1];
    m.n_layers = nw;
    m.L = (tlayer *)xmalloc(nw * sizeof(tlayer));
    for (k = 0; k < nw; k++) {
        tlayer *L = &m.L[k];
        double s = 1.3 / sqrt((double)prev);
        L->rows = prev;
        L->cols = widths[k];
        L->act = (k + 1 == nw) ? out_act : act;
        default_params(L->act, &L->p0, &L->p1);
        L->W = (float *)xmalloc(L->rows * L->cols * sizeof(float));
        L->b = (float *)xmalloc(L->cols * sizeof(float));
        for (i = 0; i < L->rows * L->cols; i++) L->W[i] = (float)urange(-s, s);
        for (i = 0; i < L->cols; i++) L->b[i] = (float)urange(-0.3, 0.3);
        prev = widths[k];
    }
    return m;
}

static void free_model(tmodel *m)
{
    size_t k;
    for (k = 0; k < m->n_layers; k++) {
        free(m->L[k].W);
        free(m->L[k].b);
    }
    free(m->L);
}

/* ---------------------------------------------------------------------------------------------------- */
/* float64 reference: activation, its derivative (from the input), and the distance to a kink           */

static double ref_act(unsigned a, double x, double p0, double p1)
{
    switch (a) {
    case 0: return x;
    case 1: return x > 0 ? x : 0;
    case 2: return x > 0 ? x : p0 * x;
    case 3: return x > 0 ? x : p0 * (exp(x) - 1);
    case 4: return x > 0 ? p1 * x : p1 * p0 * (exp(x) - 1);
    case 5: return tanh(x);
    case 6: return 1 / (1 + exp(-x));
    case 7: return fmin(1, fmax(0, p0 * x + p1));
    case 8: return log(1 + exp(x));
    case 9: return x / (1 + fabs(x));
    case 10: return x / (1 + exp(-x));
    case 11: return 0.5 * x * (1 + erf(x / sqrt(2.0)));
    case 12: return 0.5 * x * (1 + tanh(sqrt(2 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
    case 13: return fmin(6, fmax(0, x));
    default: return exp(x);
    }
}

static double ref_dact(unsigned a, double x, double p0, double p1)
{
    double s, t, c;
    switch (a) {
    case 0: return 1;
    case 1: return x > 0 ? 1 : 0;
    case 2: return x > 0 ? 1 : p0;
    case 3: return x > 0 ? 1 : p0 * exp(x);
    case 4: return x >= 0 ? p1 : p1 * p0 * exp(x);
    case 5: t = tanh(x); return 1 - t * t;
    case 6: s = 1 / (1 + exp(-x)); return s * (1 - s);
    case 7: t = p0 * x + p1; return (t > 0 && t < 1) ? p0 : 0;
    case 8: return 1 / (1 + exp(-x));
    case 9: return 1 / ((1 + fabs(x)) * (1 + fabs(x)));
    case 10: s = 1 / (1 + exp(-x)); return s + x * s * (1 - s);
    case 11: return 0.5 * (1 + erf(x / sqrt(2.0))) + x * exp(-0.5 * x * x) / sqrt(2 * 3.14159265358979323846);
    case 12:
        c = sqrt(2 / 3.14159265358979323846);
        t = tanh(c * (x + 0.044715 * x * x * x));
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x);
    case 13: return (x > 0 && x < 6) ? 1 : 0;
    default: return exp(x);
    }
}

static double kink_distance(unsigned a, double x, double p0, double p1)
{
    switch (a) {
    case 1: case 2: case 3: case 4: return fabs(x);
    case 7: return fmin(fabs(p0 * x + p1), fabs(p0 * x + p1 - 1)) / fabs(p0);
    case 13: return fmin(fabs(x), fabs(x - 6));
    default: return INFINITY;
    }
}

/* y [n_out] and J [n_out][n_in] at one point; returns the smallest distance of a pre-activation to a kink */
static double ref_eval(const tmodel *m, const double *x, double *y, double *J)
{
    size_t k, i, j, q, maxw = m->n_in;
    double *a, *T, *z, *Tn, kd = INFINITY;
    for (k = 0; k < m->n_layers; k++)
        if (m->L[k].cols > maxw) maxw = m->L[k].cols;
    a = (double *)xmalloc(maxw * sizeof(double));
    z = (double *)xmalloc(maxw * sizeof(double));
    T = (double *)xmalloc(maxw * m->n_in * sizeof(double));  /* T[unit][input] */
    Tn = (double *)xmalloc(maxw * m->n_in * sizeof(double));
    for (i = 0; i < m->n_in; i++) {
        a[i] = x[i];
        for (q = 0; q < m->n_in; q++) T[i * m->n_in + q] = (i == q);
    }
    for (k = 0; k < m->n_layers; k++) {
        const tlayer *L = &m->L[k];
        for (j = 0; j < L->cols; j++) {
            double s = L->b[j];
            for (i = 0; i < L->rows; i++) s += a[i] * (double)L->W[i * L->cols + j];
            z[j] = s;
            for (q = 0; q < m->n_in; q++) {
                double t = 0;
                for (i = 0; i < L->rows; i++) t += T[i * m->n_in + q] * (double)L->W[i * L->cols + j];
                Tn[j * m->n_in + q] = t * ref_dact(L->act, s, L->p0, L->p1);
            }
            kd = fmin(kd, kink_distance(L->act, s, L->p0, L->p1));
        }
        for (j = 0; j < L->cols; j++) a[j] = ref_act(L->act, z[j], L->p0, L->p1);
        memcpy(T, Tn, L->cols * m->n_in * sizeof(double));
    }
    for (j = 0; j < m->n_out; j++) {
        y[j] = a[j];
        for (q = 0; q < m->n_in; q++) J[j * m->n_in + q] = T[j * m->n_in + q];
    }
    free(a);
    free(z);
    free(T);
    free(Tn);
    return kd;
}

/* ---------------------------------------------------------------------------------------------------- */
/* helpers around the library                                                                            */

static nnp_model *load_copy(const unsigned char *buf, size_t len, void **storage_out)
{
    size_t need = 0;
    nnp_model *m = NULL;
    int rc = nnp_model_bytes(buf, len, &need);
    CHECK_RC(rc, NNP_OK, "nnp_model_bytes");
    if (rc != NNP_OK) return NULL;
    *storage_out = xmalloc(need);
    rc = nnp_load(buf, len, *storage_out, need, &m);
    CHECK_RC(rc, NNP_OK, "nnp_load");
    return m;
}

/* tm written to the file format and loaded into fresh storage (NULL, with a failure counted, if that fails) */
static nnp_model *load_tmodel(const tmodel *tm, void **storage_out)
{
    size_t len;
    unsigned char *file = write_model(tm, &len);
    nnp_model *m = load_copy(file, len, storage_out);
    free(file);
    return m;
}

/* The one-unit model x -> act(1 * x + 0) with parameters p0, p1, loaded into fresh storage (NULL if that fails) */
static nnp_model *load_unit(unsigned act, float p0, float p1, void **storage_out)
{
    tlayer L;
    tmodel tm;
    float W = 1.0f, bb = 0.0f;
    L.rows = L.cols = 1;
    L.act = act;
    L.p0 = p0;
    L.p1 = p1;
    L.W = &W;
    L.b = &bb;
    tm.n_in = tm.n_out = tm.n_layers = 1;
    tm.L = &L;
    return load_tmodel(&tm, storage_out);
}

static const char *act_names[NNP_ACT_COUNT] = {"linear", "relu", "leaky_relu", "elu", "selu", "tanh", "sigmoid",
                                               "hard_sigmoid", "softplus", "softsign", "swish", "gelu",
                                               "gelu_tanh", "relu6", "exponential"};

/* Compare everything for one model on `batch` random points in [-lo, hi]^n_in. */
static void check_model(const tmodel *tm, size_t batch, double lo, double hi, const char *what)
{
    size_t b, i, n_in = tm->n_in, n_out = tm->n_out, jn = n_in * n_out, wlen, wf, wr, wd, skipped = 0;
    void *storage = NULL;
    nnp_model *m;
    float *x, *y, *yj, *Jf, *Jr, *Ja, *work;
    double *xd, *yd, *yref, *Jref, *Jfd, *err, *wd64, max_fwd = 0, max_jac = 0, max_fd = 0, max_mode = 0;
    int rc;

    m = load_tmodel(tm, &storage); /* the file is freed: the model must not refer to it */
    if (!m) return;
    CHECK(nnp_n_in(m) == n_in && nnp_n_out(m) == n_out && nnp_n_layers(m) == tm->n_layers, "%s: shape", what);

    x = (float *)xmalloc(batch * n_in * sizeof(float));
    xd = (double *)xmalloc(batch * n_in * sizeof(double));
    y = (float *)xmalloc(batch * n_out * sizeof(float));
    yj = (float *)xmalloc(batch * n_out * sizeof(float));
    yd = (double *)xmalloc(batch * n_out * sizeof(double));
    yref = (double *)xmalloc(n_out * sizeof(double));
    Jref = (double *)xmalloc(jn * sizeof(double));
    Jf = (float *)xmalloc(batch * jn * sizeof(float));
    Jr = (float *)xmalloc(batch * jn * sizeof(float));
    Ja = (float *)xmalloc(batch * jn * sizeof(float));
    Jfd = (double *)xmalloc(batch * jn * sizeof(double));
    err = (double *)xmalloc(batch * jn * sizeof(double));
    for (i = 0; i < batch * n_in; i++) {
        x[i] = (float)urange(lo, hi);
        xd[i] = x[i];
    }

    rc = nnp_workspace(m, NNP_WS_FORWARD, batch, &wlen);
    CHECK_RC(rc, NNP_OK, "workspace forward");
    rc = nnp_workspace(m, NNP_WS_JACOBIAN_FORWARD, batch, &wf);
    CHECK_RC(rc, NNP_OK, "workspace jac fwd");
    rc = nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, batch, &wr);
    CHECK_RC(rc, NNP_OK, "workspace jac rev");
    if (wf > wlen) wlen = wf;
    if (wr > wlen) wlen = wr;
    work = (float *)xmalloc(wlen * sizeof(float));
    rc = nnp_workspace(m, NNP_WS_FD_JACOBIAN_F64, batch, &wd);
    CHECK_RC(rc, NNP_OK, "workspace fd");
    rc = nnp_workspace(m, NNP_WS_FORWARD_F64, batch, &wf);
    CHECK_RC(rc, NNP_OK, "workspace f64");
    if (wf > wd) wd = wf;
    wd64 = (double *)xmalloc(wd * sizeof(double));

    rc = nnp_forward(m, batch, x, y, work, wlen);
    CHECK_RC(rc, NNP_OK, "nnp_forward");
    rc = nnp_jacobian(m, NNP_MODE_FORWARD, batch, x, yj, Jf, work, wlen);
    CHECK_RC(rc, NNP_OK, "nnp_jacobian forward");
    rc = nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, NULL, Jr, work, wlen);
    CHECK_RC(rc, NNP_OK, "nnp_jacobian reverse");
    rc = nnp_jacobian(m, NNP_MODE_AUTO, batch, x, NULL, Ja, work, wlen);
    CHECK_RC(rc, NNP_OK, "nnp_jacobian auto");
    rc = nnp_fd_jacobian_f64(m, batch, xd, yd, Jfd, err, wd64, wd);
    CHECK_RC(rc, NNP_OK, "nnp_fd_jacobian_f64");
    CHECK(memcmp(Ja, nnp_auto_mode(m) == NNP_MODE_FORWARD ? Jf : Jr, batch * jn * sizeof(float)) == 0,
          "%s: auto mode equals the mode it picks", what);
    CHECK(memcmp(y, yj, batch * n_out * sizeof(float)) == 0, "%s: jacobian's y equals forward's y", what);
    {
        /* the float64 forward pass: the finite differences' f(x), bit for bit */
        double *yf = (double *)xmalloc(batch * n_out * sizeof(double));
        rc = nnp_forward_f64(m, batch, xd, yf, wd64, wd);
        CHECK_RC(rc, NNP_OK, "nnp_forward_f64");
        CHECK(memcmp(yf, yd, batch * n_out * sizeof(double)) == 0, "%s: forward_f64 equals fd's f(x)", what);
        free(yf);
    }

    for (b = 0; b < batch; b++) {
        double ys = 1, js = 1, kd = ref_eval(tm, xd + b * n_in, yref, Jref);
        for (i = 0; i < n_out; i++) ys = fmax(ys, fabs(yref[i]));
        for (i = 0; i < jn; i++) js = fmax(js, fabs(Jref[i]));
        for (i = 0; i < n_out; i++) {
            max_fwd = fmax(max_fwd, fabs(y[b * n_out + i] - yref[i]) / ys);
            CHECK(fabs(yd[b * n_out + i] - yref[i]) <= 1e-12 * ys, "%s: f64 forward", what);
        }
        for (i = 0; i < jn; i++) {
            max_jac = fmax(max_jac, fabs(Jf[b * jn + i] - Jref[i]) / js);
            max_jac = fmax(max_jac, fabs(Jr[b * jn + i] - Jref[i]) / js);
            max_mode = fmax(max_mode, fabs(Jf[b * jn + i] - Jr[b * jn + i]) / js);
        }
        if (kd < 1e-3) { /* a kink within reach of the finite-difference steps */
            skipped++;
            continue;
        }
        for (i = 0; i < jn; i++) {
            double e = fabs(Jfd[b * jn + i] - Jref[i]);
            max_fd = fmax(max_fd, e / js);
            if (getenv("NNP_TEST_VERBOSE")) max_ratio = fmax(max_ratio, e / err[b * jn + i]);
            /* the estimate is a heuristic (rounding inside stacked exponentials can exceed it a little) */
            CHECK(e <= 2 * err[b * jn + i] + 1e-12 * js, "%s: fd error %.3g beyond twice its estimate %.3g (point %lu)",
                  what, e, err[b * jn + i], (unsigned long)b);
        }
    }
    {
        /* float32 rounding relative to max(1, |y|); a stack of exponential layers multiplies each layer's relative
         * rounding by its pre-activations' size, so it gets twice the room (2.01e-6 seen with in-order sums) */
        double fwd_tol = 2e-6;
        for (i = 0; i < tm->n_layers; i++)
            if (tm->L[i].act == NNP_ACT_EXPONENTIAL) fwd_tol = 4e-6;
        CHECK(max_fwd <= fwd_tol, "%s: forward error %.3g", what, max_fwd);
    }
    CHECK(max_jac <= 1e-5, "%s: jacobian error %.3g", what, max_jac);
    CHECK(max_mode <= 1e-5, "%s: forward/reverse mode difference %.3g", what, max_mode);
    CHECK(max_fd <= 1e-8, "%s: fd error %.3g", what, max_fd);
    CHECK(skipped * 2 <= batch, "%s: too many points near a kink (%lu)", what, (unsigned long)skipped);
    if (getenv("NNP_TEST_VERBOSE"))
        printf("  %-28s fwd %.2e  jac %.2e  modes %.2e  fd %.2e  (near kink: %lu)\n", what, max_fwd, max_jac,
               max_mode, max_fd, (unsigned long)skipped);

    /* a workspace for one point only must give the same results (smaller blocks) */
    {
        size_t w1, w2;
        float *Jsmall = (float *)xmalloc(batch * jn * sizeof(float));
        nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, 1, &w1);
        nnp_workspace(m, NNP_WS_JACOBIAN_FORWARD, 1, &w2);
        rc = nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, NULL, Jsmall, work, w1);
        CHECK_RC(rc, NNP_OK, "reverse, one-point workspace");
        CHECK(memcmp(Jsmall, Jr, batch * jn * sizeof(float)) == 0, "%s: reverse blocks change results", what);
        rc = nnp_jacobian(m, NNP_MODE_FORWARD, batch, x, NULL, Jsmall, work, w2);
        CHECK_RC(rc, NNP_OK, "forward, one-point workspace");
        CHECK(memcmp(Jsmall, Jf, batch * jn * sizeof(float)) == 0, "%s: forward blocks change results", what);
        if (w1 > 0) {
            rc = nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, NULL, Jsmall, work, w1 - 1);
            CHECK_RC(rc, NNP_E_WORKSPACE, "reverse, workspace too small");
        }
        rc = nnp_forward(m, batch, x, y, work, 0);
        CHECK_RC(rc, NNP_E_WORKSPACE, "forward, no workspace");
        free(Jsmall);
    }

    free(x); free(xd); free(y); free(yj); free(yd); free(yref); free(Jref); free(Jf); free(Jr); free(Ja);
    free(Jfd); free(err); free(work); free(wd64); free(storage);
}

static void test_activations(void)
{
    static const size_t deep[] = {16, 12, 9, 3};
    static const size_t wide_out[] = {20, 40, 24}; /* n_out > n_in: forward mode */
    static const size_t seed[] = {64, 64, 32, 32, 16, 16, 8, 1};
    unsigned a;
    char what[96];
    for (a = 0; a < NNP_ACT_COUNT; a++) {
        tmodel tm;
        double lo = -2.5, hi = 2.5;
        if (a == NNP_ACT_EXPONENTIAL) {
            lo = -1;
            hi = 1;
        }
        sprintf(what, "%s 5->16,12,9,3", act_names[a]);
        tm = make_model(5, deep, 4, a, NNP_ACT_LINEAR);
        check_model(&tm, 67, lo, hi, what);
        free_model(&tm);
        sprintf(what, "%s 3->20,40,24 (same out)", act_names[a]);
        tm = make_model(3, wide_out, 3, a, a);
        check_model(&tm, 29, lo, hi, what);
        free_model(&tm);
    }
    {
        tmodel tm = make_model(2, seed, 8, NNP_ACT_LEAKY_RELU, NNP_ACT_LINEAR);
        check_model(&tm, 150, -2, 2, "leaky seed 2->64..8->1");
        free_model(&tm);
    }
    {
        static const size_t one[] = {4};
        tmodel tm = make_model(7, one, 1, NNP_ACT_TANH, NNP_ACT_TANH);
        check_model(&tm, 10, -2, 2, "single layer 7->4 tanh");
        free_model(&tm);
    }
    {
        static const size_t w[] = {33, 17, 1};
        tmodel tm = make_model(1, w, 3, NNP_ACT_SWISH, NNP_ACT_LINEAR);
        check_model(&tm, 200, -3, 3, "swish 1->33,17,1");
        free_model(&tm);
    }
}

/* One point at a time (batch 1): reverse mode with n_out <= 2 runs the single-point path (its own kernels: bias,
 * activation and derivative fused, the backward pass over W). Compare it, point by point, with the batch paths,
 * forward mode and the float64 reference; check the automatic mode's choice, y == NULL, NaN inputs and the
 * workspace checks. */
static void check_single_point(size_t n_in, const size_t *widths, size_t nw, unsigned act, unsigned out_act,
                               size_t npts, const char *what)
{
    tmodel tm = make_model(n_in, widths, nw, act, out_act);
    size_t n_out = widths[nw - 1], jn, i, b, wr1, wf1, wa1, wbig, wmin;
    void *storage = NULL;
    nnp_model *m;
    float *x, *yb, *Jb, *y1, *J1, *J1n, *Ja, *Jf, *work;
    double *xd, *yref, *Jref, err_y = 0, err_j = 0, err_b = 0, err_f = 0, lo = -2.5, hi = 2.5;
    int rc, sp_auto;
    if (act == NNP_ACT_EXPONENTIAL || out_act == NNP_ACT_EXPONENTIAL) lo = -1, hi = 1;
    m = load_tmodel(&tm, &storage);
    if (!m) {
        free_model(&tm);
        return;
    }
    jn = n_in * n_out;
    x = (float *)xmalloc(npts * n_in * sizeof(float));
    xd = (double *)xmalloc(n_in * sizeof(double));
    yb = (float *)xmalloc(npts * n_out * sizeof(float));
    Jb = (float *)xmalloc(npts * jn * sizeof(float));
    y1 = (float *)xmalloc(n_out * sizeof(float));
    J1 = (float *)xmalloc(jn * sizeof(float));
    J1n = (float *)xmalloc(jn * sizeof(float));
    Ja = (float *)xmalloc(jn * sizeof(float));
    Jf = (float *)xmalloc(jn * sizeof(float));
    yref = (double *)xmalloc(n_out * sizeof(double));
    Jref = (double *)xmalloc(jn * sizeof(double));
    nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, 1, &wr1);
    nnp_workspace(m, NNP_WS_JACOBIAN_FORWARD, 1, &wf1);
    nnp_workspace(m, NNP_WS_JACOBIAN, 1, &wa1);
    nnp_workspace(m, NNP_WS_JACOBIAN, npts, &wbig);
    CHECK(wa1 >= wr1 && wa1 >= wf1, "%s: auto workspace covers both modes", what);
    if (wbig < wa1) wbig = wa1;
    work = (float *)xmalloc(wbig * sizeof(float));
    for (i = 0; i < npts * n_in; i++) x[i] = (float)urange(lo, hi);
    /* the batch (blocked) reverse path for all points at once */
    rc = nnp_jacobian(m, NNP_MODE_REVERSE, npts, x, yb, Jb, work, wbig);
    CHECK_RC(rc, NNP_OK, "batch reverse");
    /* AUTO for one point takes the single-point path exactly when n_out < n_in and n_out <= 2 */
    sp_auto = n_out < n_in && n_out <= 2;
    for (b = 0; b < npts; b++) {
        const float *xb = x + b * n_in;
        double ys = 1, js = 1;
        for (i = 0; i < n_in; i++) xd[i] = xb[i];
        ref_eval(&tm, xd, yref, Jref);
        for (i = 0; i < n_out; i++) ys = fmax(ys, fabs(yref[i]));
        for (i = 0; i < jn; i++) js = fmax(js, fabs(Jref[i]));
        rc = nnp_jacobian(m, NNP_MODE_REVERSE, 1, xb, y1, J1, work, wr1);
        CHECK_RC(rc, NNP_OK, "single-point reverse");
        rc = nnp_jacobian(m, NNP_MODE_REVERSE, 1, xb, NULL, J1n, work, wr1);
        CHECK_RC(rc, NNP_OK, "single-point reverse, y NULL");
        CHECK(memcmp(J1, J1n, jn * sizeof(float)) == 0, "%s: y == NULL changes J (point %lu)", what,
              (unsigned long)b);
        rc = nnp_jacobian(m, NNP_MODE_FORWARD, 1, xb, NULL, Jf, work, wf1);
        CHECK_RC(rc, NNP_OK, "single-point forward");
        rc = nnp_jacobian(m, NNP_MODE_AUTO, 1, xb, NULL, Ja, work, wa1);
        CHECK_RC(rc, NNP_OK, "single-point auto");
        CHECK(memcmp(Ja, sp_auto ? J1 : Jf, jn * sizeof(float)) == 0, "%s: auto for one point takes %s mode", what,
              sp_auto ? "reverse" : "forward");
        for (i = 0; i < n_out; i++) {
            err_y = fmax(err_y, fabs(y1[i] - yref[i]) / ys);
            err_y = fmax(err_y, fabs(y1[i] - yb[b * n_out + i]) / ys);
        }
        for (i = 0; i < jn; i++) {
            err_j = fmax(err_j, fabs(J1[i] - Jref[i]) / js);
            err_b = fmax(err_b, fabs(J1[i] - Jb[b * jn + i]) / js);
            err_f = fmax(err_f, fabs(J1[i] - Jf[i]) / js);
        }
    }
    CHECK(err_y <= 2e-6, "%s: single-point y error %.3g", what, err_y);
    CHECK(err_j <= 1e-5, "%s: single-point jacobian error %.3g", what, err_j);
    CHECK(err_b <= 1e-5, "%s: single-point vs batch reverse %.3g", what, err_b);
    CHECK(err_f <= 1e-5, "%s: single-point reverse vs forward %.3g", what, err_f);
    if (getenv("NNP_TEST_VERBOSE"))
        printf("  %-36s y %.2e  jac %.2e  vs batch %.2e  vs fwd %.2e\n", what, err_y, err_j, err_b, err_f);

    /* NaN and infinite inputs propagate as in the batch path */
    {
        float xs[2 * 64];
        size_t q;
        if (n_in <= 64) {
            for (q = 0; q < 2 * n_in; q++) xs[q] = 0.25f;
            xs[0] = (float)NAN;
            xs[n_in] = (float)INFINITY;
            rc = nnp_jacobian(m, NNP_MODE_REVERSE, 2, xs, yb, Jb, work, wbig);
            CHECK_RC(rc, NNP_OK, "batch reverse, non-finite");
            for (q = 0; q < 2; q++) {
                rc = nnp_jacobian(m, NNP_MODE_REVERSE, 1, xs + q * n_in, y1, J1, work, wr1);
                CHECK_RC(rc, NNP_OK, "single-point reverse, non-finite");
                for (i = 0; i < n_out; i++)
                    CHECK(isnan(y1[i]) == isnan(yb[q * n_out + i]) && isinf(y1[i]) == isinf(yb[q * n_out + i]),
                          "%s: non-finite input %lu: y[%lu] %g, batch %g", what, (unsigned long)q, (unsigned long)i,
                          (double)y1[i], (double)yb[q * n_out + i]);
                for (i = 0; i < jn; i++)
                    CHECK(isnan(J1[i]) == isnan(Jb[q * jn + i]) && isinf(J1[i]) == isinf(Jb[q * jn + i]),
                          "%s: non-finite input %lu: J[%lu] %g, batch %g", what, (unsigned long)q, (unsigned long)i,
                          (double)J1[i], (double)Jb[q * jn + i]);
            }
        }
    }

    /* workspace: the reverse one works (checked above); anything smaller than the single-point path needs is an
     * error in reverse mode, and AUTO falls back to forward mode when its workspace is large enough for that */
    if (n_out <= 2) {
        size_t mc = 0, sc = 0, k;
        for (k = 0; k < nw; k++) {
            mc = widths[k] > mc ? widths[k] : mc;
            sc += widths[k];
        }
        wmin = 2 * mc + sc; /* two value buffers (reused for the adjoints) and every layer's derivative */
        CHECK(wr1 >= wmin, "%s: reverse workspace %lu holds the single-point path's %lu", what, (unsigned long)wr1,
              (unsigned long)wmin);
        rc = nnp_jacobian(m, NNP_MODE_REVERSE, 1, x, y1, J1, work, wmin);
        CHECK_RC(rc, NNP_OK, "single-point reverse, exact workspace");
        rc = nnp_jacobian(m, NNP_MODE_REVERSE, 1, x, y1, J1, work, wmin - 1);
        CHECK_RC(rc, NNP_E_WORKSPACE, "single-point reverse, workspace too small");
        if (getenv("NNP_TEST_VERBOSE") && sp_auto && wf1 < wmin) printf("  (auto falls back to forward mode)\n");
        if (sp_auto && wf1 < wmin) {
            rc = nnp_jacobian(m, NNP_MODE_AUTO, 1, x, NULL, Ja, work, wf1);
            CHECK_RC(rc, NNP_OK, "auto, forward-mode workspace");
            rc = nnp_jacobian(m, NNP_MODE_FORWARD, 1, x, NULL, Jf, work, wf1);
            CHECK(memcmp(Ja, Jf, jn * sizeof(float)) == 0, "%s: auto falls back to forward mode", what);
        }
    }
    free(x); free(xd); free(yb); free(Jb); free(y1); free(J1); free(J1n); free(Ja); free(Jf); free(yref);
    free(Jref); free(work); free(storage);
    free_model(&tm);
}

static void test_single_point(void)
{
    static const size_t seed[] = {64, 64, 32, 32, 16, 16, 8, 1};
    static const size_t odd[] = {16, 12, 9, 2};       /* widths not multiples of 8, n_out 2 */
    static const size_t one1[] = {1}, one2[] = {2};   /* one layer */
    static const size_t thin[] = {33, 17, 1};         /* n_in 1 (forward mode for AUTO) */
    static const size_t wide[] = {8, 24, 40, 72, 2};  /* a layer wider than 64, inner sizes 24 and 40 */
    static const size_t big[] = {130, 7, 2};          /* 130 columns: blocks of 64 and a tail */
    static const size_t sq[] = {16, 16, 1};
    static const size_t in64[] = {64, 1};             /* the last backward product has 64 rows */
    static const size_t in12[] = {8, 1};              /* ... 12 rows: a group of 8 and 4 left */
    static const size_t deep3[] = {20, 40, 24, 3};    /* n_out 3: the batch path */
    static const size_t narrow[] = {8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 1}; /* forward mode needs less workspace */
    unsigned a;
    char what[96];
    for (a = 0; a < NNP_ACT_COUNT; a++) {
        sprintf(what, "%s 5->16,12,9,2", act_names[a]);
        check_single_point(5, odd, 4, a, NNP_ACT_LINEAR, 25, what);
        sprintf(what, "%s 9->8,24,40,72,2 (same out)", act_names[a]);
        check_single_point(9, wide, 5, a, a, 12, what);
        sprintf(what, "%s 7->2 one layer", act_names[a]);
        check_single_point(7, one2, 1, a, a, 12, what);
        sprintf(what, "%s 1->33,17,1", act_names[a]);
        check_single_point(1, thin, 3, a, NNP_ACT_LINEAR, 12, what);
    }
    check_single_point(2, seed, 8, NNP_ACT_LEAKY_RELU, NNP_ACT_LINEAR, 60, "leaky seed 2->64..8->1");
    check_single_point(2, seed, 8, NNP_ACT_RELU, NNP_ACT_RELU, 40, "relu seed 2->64..8->1 (relu out)");
    check_single_point(2, seed, 8, NNP_ACT_TANH, NNP_ACT_SIGMOID, 20, "tanh seed 2->64..8->1 (sigmoid out)");
    check_single_point(3, one1, 1, NNP_ACT_LEAKY_RELU, NNP_ACT_LEAKY_RELU, 20, "leaky 3->1 one layer");
    check_single_point(13, big, 3, NNP_ACT_ELU, NNP_ACT_LINEAR, 10, "elu 13->130,7,2");
    check_single_point(16, sq, 3, NNP_ACT_SWISH, NNP_ACT_LINEAR, 10, "swish 16->16,16,1");
    check_single_point(64, in64, 2, NNP_ACT_LEAKY_RELU, NNP_ACT_LINEAR, 10, "leaky 64->64,1");
    check_single_point(12, in12, 2, NNP_ACT_RELU6, NNP_ACT_LINEAR, 10, "relu6 12->8,1");
    check_single_point(4, deep3, 4, NNP_ACT_GELU, NNP_ACT_LINEAR, 10, "gelu 4->20,40,24,3 (batch path)");
    check_single_point(2, narrow, 11, NNP_ACT_LEAKY_RELU, NNP_ACT_LINEAR, 10, "leaky 2->8 x10->1");
}

/* Derivatives exactly at kinks: one layer, W = identity, b = 0, so z = x. The wanted values are TensorFlow's
 * GradientTape of the op (tests/test_kinks.py checks the same against TensorFlow itself): relu'(0) = 0,
 * leaky_relu'(0) = alpha for every alpha, elu'(0) = alpha (tf.nn.elu: 1; Keras elu(x, alpha): alpha),
 * selu'(0) = scale (tf.nn.selu), relu6' = 0 at 0 and 6, hard_sigmoid (relu6(x + 3) / 6) 0 at -3 and 3; the same
 * at -0. own: p0, p1 given here instead of default_params. */
static void test_kinks(void)
{
    struct {
        unsigned act;
        float x;
        float want;
        int own;
        float p0, p1;
    } cases[] = {
        {NNP_ACT_RELU, 0.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_RELU, -0.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_LEAKY_RELU, 0.0f, 0.2f, 0, 0, 0},
        {NNP_ACT_LEAKY_RELU, -0.0f, 0.2f, 0, 0, 0},
        {NNP_ACT_LEAKY_RELU, 0.0f, 1.5f, 1, 1.5f, 0.0f},
        {NNP_ACT_LEAKY_RELU, -0.0f, 1.5f, 1, 1.5f, 0.0f},
        {NNP_ACT_LEAKY_RELU, 0.0f, -0.5f, 1, -0.5f, 0.0f},
        {NNP_ACT_LEAKY_RELU, 0.0f, 0.0f, 1, 0.0f, 0.0f},
        {NNP_ACT_ELU, 0.0f, 0.7f, 0, 0, 0},
        {NNP_ACT_ELU, -0.0f, 0.7f, 0, 0, 0},
        {NNP_ACT_ELU, 0.0f, 1.0f, 1, 1.0f, 0.0f},
        {NNP_ACT_SELU, 0.0f, 1.0507009873554805f, 0, 0, 0},
        {NNP_ACT_SELU, -0.0f, 1.0507009873554805f, 0, 0, 0},
        {NNP_ACT_RELU6, 0.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_RELU6, -0.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_RELU6, 6.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_HARD_SIGMOID, -3.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_HARD_SIGMOID, 3.0f, 0.0f, 0, 0, 0},
        {NNP_ACT_HARD_SIGMOID, 0.0f, 1.0f / 6.0f, 0, 0, 0},
        {NNP_ACT_HARD_SIGMOID, -2.5f, 0.0f, 1, 0.2f, 0.5f},
        {NNP_ACT_HARD_SIGMOID, 2.5f, 0.0f, 1, 0.2f, 0.5f},
    };
    size_t c;
    for (c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        float J = -1, y, work[256];
        void *storage = NULL;
        nnp_model *m;
        int mode;
        float p0, p1;
        default_params(cases[c].act, &p0, &p1);
        if (cases[c].own) {
            p0 = cases[c].p0;
            p1 = cases[c].p1;
        }
        m = load_unit(cases[c].act, p0, p1, &storage);
        if (!m) continue;
        if (cases[c].act != NNP_ACT_HARD_SIGMOID || cases[c].x != 0.0f) {
            /* finite differences straddle the kink: the error estimate must cover the actual error */
            double xd = cases[c].x, fd, err, wd[64];
            int rc = nnp_fd_jacobian_f64(m, 1, &xd, NULL, &fd, &err, wd, 64);
            CHECK_RC(rc, NNP_OK, "fd at kink");
            CHECK(fabs(fd - (double)cases[c].want) <= err, "%s at %g: fd %.6g, error estimate %.3g",
                  act_names[cases[c].act], (double)cases[c].x, fd, err);
        }
        for (mode = NNP_MODE_FORWARD; mode <= NNP_MODE_REVERSE; mode++) {
            int rc = nnp_jacobian(m, mode, 1, &cases[c].x, &y, &J, work, 256);
            CHECK_RC(rc, NNP_OK, "kink jacobian");
            CHECK(J == cases[c].want, "%s'(%g) = %.9g, want %.9g (mode %d)", act_names[cases[c].act],
                  (double)cases[c].x, (double)J, (double)cases[c].want, mode);
        }
        free(storage);
    }
}

/* Kinks, signed zeros and NaN in 8 units at once (W = identity, b = 0, then a linear layer 8 -> 2 with
 * J[0][j] = f'(x_j) and J[1][j] = (j + 1) f'(x_j)): the single-point path's vector epilogue must give the same
 * derivatives as the batch path and forward mode, bit for bit. */
static void test_kinks_vector(void)
{
    static const float xs[8] = {0.0f, -0.0f, 6.0f, -3.0f, 3.0f, 1e-30f, -1e-30f, 2.5f};
    unsigned a;
    for (a = 0; a < NNP_ACT_COUNT; a++) {
        tlayer L[2];
        tmodel tm;
        float W1[64], b1[8], W2[16], b2[2], x3[24], y1[2], yb[6], J1[16], Jb[48], Jf[16], work[4096];
        size_t i, q;
        void *storage = NULL;
        nnp_model *m;
        int rc, nan_case;
        for (i = 0; i < 64; i++) W1[i] = (i % 9 == 0) ? 1.0f : 0.0f;
        for (i = 0; i < 8; i++) {
            b1[i] = 0.0f;
            W2[2 * i] = 1.0f;
            W2[2 * i + 1] = (float)(i + 1);
        }
        b2[0] = b2[1] = 0.0f;
        L[0].rows = L[0].cols = 8;
        L[0].act = a;
        default_params(a, &L[0].p0, &L[0].p1);
        L[0].W = W1;
        L[0].b = b1;
        L[1].rows = 8;
        L[1].cols = 2;
        L[1].act = NNP_ACT_LINEAR;
        L[1].p0 = L[1].p1 = 0.0f;
        L[1].W = W2;
        L[1].b = b2;
        tm.n_in = 8;
        tm.n_out = 2;
        tm.n_layers = 2;
        tm.L = L;
        m = load_tmodel(&tm, &storage);
        if (!m) continue;
        for (nan_case = 0; nan_case < 2; nan_case++) {
            for (q = 0; q < 3; q++)
                for (i = 0; i < 8; i++) x3[q * 8 + i] = xs[i];
            if (nan_case)
                for (q = 0; q < 3; q++) x3[q * 8 + 3] = (float)NAN;
            rc = nnp_jacobian(m, NNP_MODE_REVERSE, 3, x3, yb, Jb, work, 4096);
            CHECK_RC(rc, NNP_OK, "kinks, batch reverse");
            rc = nnp_jacobian(m, NNP_MODE_REVERSE, 1, x3, y1, J1, work, 4096);
            CHECK_RC(rc, NNP_OK, "kinks, single point");
            rc = nnp_jacobian(m, NNP_MODE_FORWARD, 1, x3, NULL, Jf, work, 4096);
            CHECK_RC(rc, NNP_OK, "kinks, forward");
            for (i = 0; i < 16; i++) {
                CHECK(memcmp(&J1[i], &Jb[i], sizeof(float)) == 0, "%s kinks: J[%lu] single point %g, batch %g",
                      act_names[a], (unsigned long)i, (double)J1[i], (double)Jb[i]);
                CHECK(memcmp(&J1[i], &Jf[i], sizeof(float)) == 0, "%s kinks: J[%lu] single point %g, forward %g",
                      act_names[a], (unsigned long)i, (double)J1[i], (double)Jf[i]);
            }
            for (i = 0; i < 2; i++)
                CHECK(fabs(y1[i] - yb[i]) <= 1e-6 * fmax(1.0, fabs(yb[i])) || (isnan(y1[i]) && isnan(yb[i])),
                      "%s kinks: y[%lu] single point %g, batch %g", act_names[a], (unsigned long)i, (double)y1[i],
                      (double)yb[i]);
        }
        free(storage);
    }
}

/* A small valid file: 3 -> 4 (tanh) -> 2 (linear). */
static unsigned char *small_file(size_t *len)
{
    static const size_t w[] = {4, 2};
    tmodel tm = make_model(3, w, 2, NNP_ACT_TANH, NNP_ACT_LINEAR);
    unsigned char *f = write_model(&tm, len);
    free_model(&tm);
    return f;
}

static int parse(const unsigned char *buf, size_t len)
{
    size_t need;
    return nnp_model_bytes(buf, len, &need);
}

static void test_corruptions(void)
{
    size_t len, n, i;
    unsigned char *good = small_file(&len), *b = (unsigned char *)xmalloc(len + 8);
    size_t p_off = 32 + 24 * 2; /* first parameter */
    int rc, bit;

    CHECK_RC(parse(good, len), NNP_OK, "valid file");

#define MUTATE(stmt, fixcrc, want, what)                                                                       \
    do {                                                                                                       \
        memcpy(b, good, len);                                                                                  \
        stmt;                                                                                                  \
        if (fixcrc) fix_crc(b, len);                                                                           \
        rc = parse(b, len);                                                                                    \
        CHECK_RC(rc, want, what);                                                                              \
    } while (0)

    MUTATE(b[0] = 'X', 0, NNP_E_BAD_MAGIC, "bad magic");
    MUTATE(b[3] = 'k', 1, NNP_E_BAD_MAGIC, "bad magic, crc fixed");
    MUTATE(put_u32(b + 4, 2), 1, NNP_E_VERSION, "version 2");
    MUTATE(put_u32(b + 4, 0), 0, NNP_E_VERSION, "version 0");
    MUTATE(put_u32(b + 20, 1), 1, NNP_E_BAD_FIELD, "flags");
    MUTATE(put_u32(b + 32 + 12, 7), 1, NNP_E_BAD_FIELD, "reserved");
    MUTATE(put_f32(b + 32 + 16, 0.5f), 1, NNP_E_BAD_FIELD, "unused p0 of tanh");
    MUTATE(put_f32(b + 32 + 24 + 20, 1.0f), 1, NNP_E_BAD_FIELD, "unused p1 of linear");
    MUTATE(put_u32(b + 16, 0), 1, NNP_E_BAD_DIM, "zero layers");
    MUTATE(put_u32(b + 16, 4097), 1, NNP_E_BAD_DIM, "4097 layers");
    MUTATE(put_u32(b + 16, 3), 1, NNP_E_BAD_DIM, "layer count larger than records (dims do not chain)");
    MUTATE(put_u32(b + 8, 0), 1, NNP_E_BAD_DIM, "n_in 0");
    MUTATE(put_u32(b + 8, 65537), 1, NNP_E_BAD_DIM, "n_in too large");
    MUTATE(put_u32(b + 12, 0), 1, NNP_E_BAD_DIM, "n_out 0");
    MUTATE(put_u32(b + 8, 2), 1, NNP_E_BAD_DIM, "n_in differs from first rows");
    MUTATE(put_u32(b + 12, 3), 1, NNP_E_BAD_DIM, "n_out differs from last cols");
    MUTATE(put_u32(b + 32 + 4, 5), 1, NNP_E_BAD_DIM, "layers do not chain");
    MUTATE(put_u32(b + 32 + 4, 0xffffffffu), 1, NNP_E_BAD_DIM, "huge dimension");
    MUTATE((put_u32(b + 32 + 4, 65536), put_u32(b + 32 + 24, 65536)), 1, NNP_E_SIZE_MISMATCH,
           "large consistent dimensions, file too small");
    MUTATE((put_u32(b + 12, 1), put_u32(b + 32 + 24 + 4, 1)), 1, NNP_E_SIZE_MISMATCH,
           "consistent dims, wrong size");
    MUTATE(put_u32(b + 32 + 8, NNP_ACT_COUNT), 1, NNP_E_BAD_ACTIVATION, "activation 15");
    MUTATE(put_u32(b + 32 + 8, 0x80000000u), 1, NNP_E_BAD_ACTIVATION, "activation huge");
    MUTATE(put_u32(b + 24, (uint32_t)len + 1), 1, NNP_E_TRUNCATED, "file_size larger than buffer");
    MUTATE(put_u32(b + 24, (uint32_t)len - 1), 1, NNP_E_SIZE_MISMATCH, "file_size smaller than buffer");
    MUTATE(put_u32(b + 28, 1), 1, NNP_E_TRUNCATED, "file_size high word");
    MUTATE(b[p_off + 5] ^= 0x10, 0, NNP_E_CHECKSUM, "flipped weight bit");
    MUTATE(b[len - 1] ^= 0x01, 0, NNP_E_CHECKSUM, "flipped crc bit");
    MUTATE(put_u32(b + p_off, 0x7fc00000u), 1, NNP_E_NONFINITE, "NaN weight");
    MUTATE(put_u32(b + len - 8, 0xff800000u), 1, NNP_E_NONFINITE, "-Inf bias");
    {
        /* a leaky layer with an infinite alpha */
        static const size_t w[] = {2};
        tmodel tm = make_model(2, w, 1, NNP_ACT_LEAKY_RELU, NNP_ACT_LEAKY_RELU);
        size_t l2;
        unsigned char *f = write_model(&tm, &l2);
        put_u32(f + 32 + 16, 0x7f800000u);
        fix_crc(f, l2);
        CHECK_RC(parse(f, l2), NNP_E_NONFINITE, "infinite alpha");
        free(f);
        free_model(&tm);
    }

    /* trailing bytes */
    memcpy(b, good, len);
    b[len] = 0;
    CHECK_RC(parse(b, len + 1), NNP_E_SIZE_MISMATCH, "trailing byte");

    /* every truncated prefix */
    for (n = 0; n < len; n++) {
        unsigned char *pre = (unsigned char *)xmalloc(n); /* exact size so that valgrind/ASan see overreads */
        memcpy(pre, good, n);
        rc = parse(pre, n);
        CHECK(rc == NNP_E_TRUNCATED, "prefix of %lu bytes: got %d (%s)", (unsigned long)n, rc, nnp_strerror(rc));
        free(pre);
    }

    /* every single-bit flip is rejected (CRC-32 detects all of them) */
    for (i = 0; i < len; i++)
        for (bit = 0; bit < 8; bit++) {
            memcpy(b, good, len);
            b[i] ^= (unsigned char)(1u << bit);
            rc = parse(b, len);
            CHECK(rc != NNP_OK, "bit %d of byte %lu flipped: accepted", bit, (unsigned long)i);
        }

    /* unaligned file buffer and unaligned storage */
    {
        unsigned char *mis = (unsigned char *)xmalloc(len + 3), *st;
        size_t need, off;
        nnp_model *m = NULL;
        float x[3] = {0.1f, -0.2f, 0.3f}, y1[2], y2[2], work[64];
        memcpy(mis + 3, good, len);
        CHECK_RC(nnp_model_bytes(mis + 3, len, &need), NNP_OK, "unaligned buffer");
        st = (unsigned char *)xmalloc(need + 8);
        for (off = 1; off < 8; off += 3) {
            CHECK_RC(nnp_load(mis + 3, len, st + off, need, &m), NNP_OK, "unaligned storage");
            CHECK_RC(nnp_forward(m, 1, x, off == 1 ? y1 : y2, work, 64), NNP_OK, "forward on unaligned model");
        }
        CHECK(memcmp(y1, y2, sizeof y1) == 0, "results independent of storage alignment");
        CHECK_RC(nnp_load(mis + 3, len, st, need - 1, &m), NNP_E_STORAGE, "storage too small");
        CHECK(m == NULL, "out is NULL after a failed load");
        free(st);
        free(mis);
    }
    free(b);
    free(good);
#undef MUTATE
}

static void test_arguments(void)
{
    size_t len, need, w;
    unsigned char *f = small_file(&len);
    void *storage = NULL;
    nnp_model *m = load_copy(f, len, &storage);
    float x[6] = {0}, y[4], J[12], work[512];
    double xd[3] = {0}, Jd[6], wd[512];
    if (!m) return;
    CHECK_RC(nnp_model_bytes(NULL, len, &need), NNP_E_NULL, "NULL buffer");
    CHECK_RC(nnp_model_bytes(f, len, NULL), NNP_E_NULL, "NULL needed");
    CHECK_RC(nnp_load(f, len, NULL, 0, &m), NNP_E_NULL, "NULL storage");
    m = NULL;
    CHECK_RC(nnp_load(f, len, storage, 1 << 20, NULL), NNP_E_NULL, "NULL out");
    CHECK_RC(nnp_load(f, len, storage, 1 << 20, &m), NNP_OK, "reload");
    CHECK_RC(nnp_workspace(m, 99, 1, &w), NNP_E_ARG, "bad workspace op");
    CHECK_RC(nnp_workspace(NULL, NNP_WS_FORWARD, 1, &w), NNP_E_NULL, "NULL model");
    CHECK_RC(nnp_workspace(m, NNP_WS_FORWARD, 0, &w), NNP_OK, "workspace for empty batch");
    CHECK(w == 0, "empty batch needs no workspace");
    CHECK_RC(nnp_jacobian(m, 7, 1, x, y, J, work, 512), NNP_E_ARG, "bad mode");
    CHECK_RC(nnp_jacobian(m, NNP_MODE_AUTO, 1, NULL, y, J, work, 512), NNP_E_NULL, "NULL x");
    CHECK_RC(nnp_jacobian(m, NNP_MODE_AUTO, 1, x, y, NULL, work, 512), NNP_E_NULL, "NULL dy_dx");
    CHECK_RC(nnp_jacobian(m, NNP_MODE_AUTO, 1, x, y, J, NULL, 512), NNP_E_NULL, "NULL work");
    CHECK_RC(nnp_forward(m, 0, NULL, NULL, NULL, 0), NNP_OK, "empty batch");
    CHECK_RC(nnp_forward(NULL, 1, x, y, work, 512), NNP_E_NULL, "forward NULL model");
    CHECK_RC(nnp_forward(m, (size_t)-1, x, y, work, 512), NNP_E_ARG, "absurd batch");
    CHECK_RC(nnp_fd_jacobian_f64(m, 1, xd, NULL, Jd, NULL, wd, 1), NNP_E_WORKSPACE, "fd workspace");
    CHECK_RC(nnp_fd_jacobian_f64(m, 1, xd, NULL, Jd, NULL, wd, 512), NNP_OK, "fd without y and err");
    CHECK_RC(nnp_layer_info(m, 2, NULL, NULL, NULL, NULL, NULL), NNP_E_ARG, "layer index");
    {
        size_t r, c;
        int a;
        float p0, p1;
        CHECK_RC(nnp_layer_info(m, 0, &r, &c, &a, &p0, &p1), NNP_OK, "layer info");
        CHECK(r == 3 && c == 4 && a == NNP_ACT_TANH && p0 == 0 && p1 == 0, "layer info values");
    }
    CHECK(strcmp(nnp_strerror(12345), "unknown error") == 0, "unknown code text");
    {
        float xf[4] = {1.0f, -0.0f, 3.0e38f, 2.0f};
        double xdd[3] = {1.0, -1e308, 0.0};
        CHECK(nnp_first_nonfinite_f32(xf, 4) == 4, "finite floats");
        CHECK(nnp_first_nonfinite_f32(NULL, 0) == 0, "empty floats");
        xf[2] = (float)(xf[2] * 10.0f); /* overflows to +inf */
        CHECK(nnp_first_nonfinite_f32(xf, 4) == 2, "inf found");
        xf[1] = (float)NAN;
        CHECK(nnp_first_nonfinite_f32(xf, 4) == 1, "NaN found first");
        CHECK(nnp_first_nonfinite_f64(xdd, 3) == 3, "finite doubles");
        xdd[2] = -INFINITY;
        CHECK(nnp_first_nonfinite_f64(xdd, 3) == 2, "-inf double found");
    }
    {
        /* the checked entry points: same results as the unchecked ones on finite input; NNP_E_INPUT, with
         * nothing written, as soon as one value of any point is NaN or infinite */
        float xc[6] = {0.5f, -1.0f, 2.0f, 0.25f, 0.0f, -3.0f}, y1[4], y2[4], J1[12], J2[12];
        int mode, k, i, rc;
        for (mode = NNP_MODE_AUTO; mode <= NNP_MODE_REVERSE; mode++) {
            size_t batch;
            for (batch = 1; batch <= 2; batch++) {
                CHECK_RC(nnp_jacobian(m, mode, batch, xc, y1, J1, work, 512), NNP_OK, "unchecked jacobian");
                CHECK_RC(nnp_jacobian_checked(m, mode, batch, xc, y2, J2, work, 512), NNP_OK, "checked jacobian");
                CHECK(memcmp(y1, y2, batch * 2 * sizeof(float)) == 0 &&
                          memcmp(J1, J2, batch * 6 * sizeof(float)) == 0, "checked = unchecked, mode %d", mode);
            }
        }
        CHECK_RC(nnp_forward(m, 2, xc, y1, work, 512), NNP_OK, "unchecked forward");
        CHECK_RC(nnp_forward_checked(m, 2, xc, y2, work, 512), NNP_OK, "checked forward");
        CHECK(memcmp(y1, y2, 4 * sizeof(float)) == 0, "checked forward = unchecked");
        for (k = 0; k < 6; k++) {
            const float bad = k % 2 ? (float)NAN : (k == 2 ? -(float)INFINITY : (float)INFINITY);
            const float keep = xc[k];
            xc[k] = bad;
            for (i = 0; i < 4; i++) y2[i] = 7.0f;
            for (i = 0; i < 12; i++) J2[i] = 7.0f;
            rc = nnp_jacobian_checked(m, NNP_MODE_AUTO, 2, xc, y2, J2, work, 512);
            CHECK(rc == NNP_E_INPUT, "non-finite x[%d]: got %d", k, rc);
            rc = nnp_forward_checked(m, 2, xc, y2, work, 512);
            CHECK(rc == NNP_E_INPUT, "forward, non-finite x[%d]: got %d", k, rc);
            CHECK(y2[0] == 7.0f && y2[3] == 7.0f && J2[0] == 7.0f && J2[11] == 7.0f, "nothing written (x[%d])", k);
            /* the first point alone is checked only where it is read */
            rc = nnp_jacobian_checked(m, NNP_MODE_AUTO, 1, xc, y2, J2, work, 512);
            CHECK(rc == (k < 3 ? NNP_E_INPUT : NNP_OK), "one point, non-finite x[%d]: got %d", k, rc);
            xc[k] = keep;
        }
        CHECK_RC(nnp_jacobian_checked(NULL, NNP_MODE_AUTO, 1, xc, y2, J2, work, 512), NNP_E_NULL, "checked, NULL m");
        CHECK_RC(nnp_jacobian_checked(m, NNP_MODE_AUTO, 1, NULL, y2, J2, work, 512), NNP_E_NULL, "checked, NULL x");
        CHECK_RC(nnp_jacobian_checked(m, 9, 1, xc, y2, J2, work, 512), NNP_E_ARG, "checked, bad mode");
        CHECK_RC(nnp_forward_checked(m, 0, NULL, NULL, NULL, 0), NNP_OK, "checked, empty batch");
        CHECK_RC(nnp_forward_checked(m, (size_t)-1, xc, y2, work, 512), NNP_E_ARG, "checked, absurd batch");
    }
    {
        int c;
        for (c = 0; c >= -15; c--) CHECK(strcmp(nnp_strerror(c), "unknown error") != 0, "text for %d", c);
    }
    free(storage);
    free(f);
}

/* Reverse mode with the pattern cache (full workspace, batch >= 256) against reverse mode without it (a
 * workspace sized for a small batch): bit-for-bit the same Jacobians. Points repeat (cache hits) or are spread
 * out (many patterns, filling the table past the point where it stops inserting). */
static void check_cache(size_t n_in, const size_t *widths, size_t nw, unsigned act, size_t batch, double spread,
                        size_t distinct, const char *what)
{
    tmodel tm = make_model(n_in, widths, nw, act, NNP_ACT_LINEAR);
    size_t wbig, wsmall, i, n_out = widths[nw - 1], jn;
    void *storage = NULL;
    nnp_model *m;
    float *x, *J1, *J2, *y1, *y2, *work;
    int rc;
    if (act == NNP_ACT_RELU6) tm.L[0].act = NNP_ACT_HARD_SIGMOID, default_params(NNP_ACT_HARD_SIGMOID, &tm.L[0].p0,
                                                                                 &tm.L[0].p1);
    m = load_tmodel(&tm, &storage);
    if (!m) {
        free_model(&tm);
        return;
    }
    jn = n_in * n_out;
    nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, batch, &wbig);
    nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, 8, &wsmall);
    x = (float *)xmalloc(batch * n_in * sizeof(float));
    y1 = (float *)xmalloc(batch * n_out * sizeof(float));
    y2 = (float *)xmalloc(batch * n_out * sizeof(float));
    J1 = (float *)xmalloc(batch * jn * sizeof(float));
    J2 = (float *)xmalloc(batch * jn * sizeof(float));
    work = (float *)xmalloc(wbig * sizeof(float));
    for (i = 0; i < batch * n_in; i++)
        x[i] = (float)urange(-spread, spread);
    if (distinct) /* repeat the first `distinct` points */
        for (i = distinct * n_in; i < batch * n_in; i++) x[i] = x[i % (distinct * n_in)];
    rc = nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, y1, J1, work, wsmall);
    CHECK_RC(rc, NNP_OK, "reverse without cache");
    rc = nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, y2, J2, work, wbig);
    CHECK_RC(rc, NNP_OK, "reverse with cache");
    CHECK(wbig > wsmall + 1000, "%s: the full workspace has room for the cache", what);
    CHECK(memcmp(J1, J2, batch * jn * sizeof(float)) == 0, "%s: cached Jacobians differ", what);
    CHECK(memcmp(y1, y2, batch * n_out * sizeof(float)) == 0, "%s: cached y differs", what);
    free(x); free(y1); free(y2); free(J1); free(J2); free(work); free(storage);
    free_model(&tm);
}

static void test_pattern_cache(void)
{
    static const size_t seed[] = {64, 64, 32, 32, 16, 16, 8, 1};
    static const size_t multi[] = {12, 9, 3};
    static const size_t wide[] = {64, 1};
    check_cache(2, seed, 8, NNP_ACT_LEAKY_RELU, 3000, 2.0, 0, "leaky seed, random points");
    check_cache(2, seed, 8, NNP_ACT_LEAKY_RELU, 2000, 2.0, 37, "leaky seed, 37 points repeated");
    check_cache(4, multi, 3, NNP_ACT_RELU, 1500, 1.5, 0, "relu 4->12,9,3");
    check_cache(4, multi, 3, NNP_ACT_RELU6, 1500, 8.0, 0, "hard_sigmoid + relu6 4->12,9,3");
    check_cache(5, multi, 3, NNP_ACT_LEAKY_RELU, 700, 1.0, 5, "leaky 5->12,9,3 repeated");
    /* 64 relu units in 6-D: nearly every point has its own pattern; the table fills up and stops inserting */
    check_cache(6, wide, 2, NNP_ACT_RELU, 40000, 3.0, 0, "relu 6->64->1, table full");
}

/* ---------------------------------------------------------------------------------------------------- */
/* second derivatives                                                                                    */

#define REF_PI 3.14159265358979323846

/* f''(x) in float64, from the definitions of FORMAT.md (test_second_activations checks it against central
 * differences of ref_dact); 0 for the piecewise-linear activations, and at x = 0 for elu, selu and softsign (nnp.h) */
static double ref_d2act(unsigned a, double x, double p0, double p1)
{
    double s, t, c, u1;
    switch (a) {
    case 3: return x < 0 ? p0 * exp(x) : 0;
    case 4: return x < 0 ? p1 * p0 * exp(x) : 0;
    case 5: t = tanh(x); return -2 * t * (1 - t * t);
    case 6: s = 1 / (1 + exp(-x)); return s * (1 - s) * (1 - 2 * s);
    case 8: s = 1 / (1 + exp(-x)); return s * (1 - s);
    case 9: t = 1 / (1 + fabs(x)); return x > 0 ? -2 * t * t * t : (x < 0 ? 2 * t * t * t : 0);
    case 10: s = 1 / (1 + exp(-x)); return s * (1 - s) * (2 + x * (1 - 2 * s));
    case 11: return (2 - x * x) * exp(-0.5 * x * x) / sqrt(2 * REF_PI);
    case 12:
        c = sqrt(2 / REF_PI);
        t = tanh(c * (x + 0.044715 * x * x * x));
        u1 = c * (1 + 3 * 0.044715 * x * x);
        return (1 - t * t) * (u1 + 0.5 * x * (6 * c * 0.044715 * x - 2 * t * u1 * u1));
    case 14: return exp(x);
    default: return 0; /* linear, relu, leaky_relu, hard_sigmoid, relu6 */
    }
}

/* distance to a point where f' is not smooth (f'' jumps): the kinks, and 0 for elu, selu, softsign */
static double kink_distance2(unsigned a, double x, double p0, double p1)
{
    return a == 9 ? fabs(x) : kink_distance(a, x, p0, p1);
}

/* y [n_out], J [n_out][n_in], H [n_out][n_in][n_in] at one point, float64, forward over forward: every unit carries
 * its value, gradient T[q] and Hessian Q[q][r]. Returns the smallest distance of a pre-activation to a kink2. */
static double ref_eval2(const tmodel *m, const double *x, double *y, double *J, double *H)
{
    const size_t n = m->n_in, nn = n * n;
    size_t k, i, j, q, r, maxw = n;
    double *a, *z, *T, *Tn, *Q, *Qn, kd = INFINITY;
    for (k = 0; k < m->n_layers; k++)
        if (m->L[k].cols > maxw) maxw = m->L[k].cols;
    a = (double *)xmalloc(maxw * sizeof(double));
    z = (double *)xmalloc(maxw * sizeof(double));
    T = (double *)xmalloc(maxw * n * sizeof(double));
    Tn = (double *)xmalloc(maxw * n * sizeof(double));
    Q = (double *)xmalloc(maxw * nn * sizeof(double));
    Qn = (double *)xmalloc(maxw * nn * sizeof(double));
    for (i = 0; i < n; i++) {
        a[i] = x[i];
        for (q = 0; q < n; q++) T[i * n + q] = (i == q);
        for (q = 0; q < nn; q++) Q[i * nn + q] = 0;
    }
    for (k = 0; k < m->n_layers; k++) {
        const tlayer *L = &m->L[k];
        for (j = 0; j < L->cols; j++) {
            double s = L->b[j], d1, d2;
            for (i = 0; i < L->rows; i++) s += a[i] * (double)L->W[i * L->cols + j];
            z[j] = s;
            d1 = ref_dact(L->act, s, L->p0, L->p1);
            d2 = ref_d2act(L->act, s, L->p0, L->p1);
            for (q = 0; q < n; q++) {
                double t = 0;
                for (i = 0; i < L->rows; i++) t += T[i * n + q] * (double)L->W[i * L->cols + j];
                Tn[j * n + q] = t;
            }
            for (q = 0; q < n; q++)
                for (r = 0; r < n; r++) {
                    double t = 0;
                    for (i = 0; i < L->rows; i++) t += Q[i * nn + q * n + r] * (double)L->W[i * L->cols + j];
                    Qn[j * nn + q * n + r] = d1 * t + d2 * Tn[j * n + q] * Tn[j * n + r];
                }
            for (q = 0; q < n; q++) Tn[j * n + q] *= d1;
            kd = fmin(kd, kink_distance2(L->act, s, L->p0, L->p1));
        }
        for (j = 0; j < L->cols; j++) a[j] = ref_act(L->act, z[j], L->p0, L->p1);
        memcpy(T, Tn, L->cols * n * sizeof(double));
        memcpy(Q, Qn, L->cols * nn * sizeof(double));
    }
    for (j = 0; j < m->n_out; j++) {
        y[j] = a[j];
        for (q = 0; q < n; q++) J[j * n + q] = T[j * n + q];
        for (q = 0; q < nn; q++) H[j * nn + q] = Q[j * nn + q];
    }
    free(a); free(z); free(T); free(Tn); free(Q); free(Qn);
    return kd;
}

/* f'' of every activation: the reference formulas against central differences of ref_dact, and the C core's (the
 * Hessian of one unit, z = x) against the formulas, away from kinks; exactly 0 at the kinks. */
/* tanh is computed without libm (nnp_kernels.h: nnp_tanhf): one unit with weight 1 gives tanh(x) as the forward
 * value and 1 - tanh^2 as the Jacobian; against tanh in double over a dense sweep of [-12, 12] and special values,
 * the value within 2 ulp (of the result) and exact where tanh is 0 or rounds to +-1 */
static void test_tanh_accuracy(void)
{
    float work[4096];
    static float xf[4001], y[4001], J[4001];
    void *storage = NULL;
    nnp_model *m;
    size_t i, n = 4001;
    double worst = 0.0;
    m = load_unit(NNP_ACT_TANH, 0.0f, 0.0f, &storage);
    CHECK(m != NULL, "tanh unit model loads");
    if (!m) return;
    for (i = 0; i < n; i++) xf[i] = (float)(-12.0 + 0.006 * (double)i);
    xf[0] = 0.0f;
    xf[1] = -0.0f;
    xf[2] = 1e-30f;
    xf[3] = -1e-7f;
    xf[4] = 0.625f;
    xf[5] = nextafterf(0.625f, 0.0f);
    xf[6] = 9.5f;
    xf[7] = -40.0f;
    xf[8] = 1e30f;
    CHECK_RC(nnp_forward(m, n, xf, y, work, 4096), NNP_OK, "tanh forward");
    CHECK_RC(nnp_jacobian(m, NNP_MODE_FORWARD, n, xf, NULL, J, work, 4096), NNP_OK, "tanh jacobian");
    for (i = 0; i < n; i++) {
        const double want = tanh((double)xf[i]);
        const float wf = (float)want;
        const double ulp = fabs((double)nextafterf(wf, 2.0f * wf + 1.0f) - (double)wf);
        const double e = ulp > 0 ? fabs((double)y[i] - want) / ulp : 0.0;
        worst = fmax(worst, e);
        CHECK(e <= 2.0, "tanh(%.9g) = %.9g, want %.9g (%.2f ulp)", (double)xf[i], (double)y[i], want, e);
        CHECK(fabs((double)J[i] - (1.0 - want * want)) <= 4 * FLT_EPSILON, "tanh'(%.9g) = %.9g", (double)xf[i],
              (double)J[i]);
        if (wf == 1.0f || wf == -1.0f || want == 0.0) CHECK(y[i] == wf, "tanh(%.9g) exact", (double)xf[i]);
    }
    free(storage);
    (void)worst;
}

/* The smooth activations that use the C core's own exponential (nnp_expf) and normal distribution function (gelu's
 * Phi, through erfc), and the exponential activation (libm's expf): y and dy/dx of a one-unit layer over a dense
 * sweep, against the float64 reference, each within a relative tolerance of a few float32 ulps plus an absolute one
 * where float32 itself must round (outputs near 1, or the cancellation in 1 + t of gelu_tanh). Also the ends of the
 * exponential's range and NaN. */
static void test_smooth_accuracy(void)
{
    static const unsigned acts[] = {6, 8, 10, 11, 12, 14}; /* sigmoid softplus swish gelu gelu_tanh exponential */
    /* per activation: relative and absolute tolerance of y, of dy/dx (the absolute ones scale with max(1, |x|)) */
    static const double tol[][4] = {{2.4e-7, 6e-8, 2.4e-7, 6e-8},   {3e-7, 1e-38, 3e-7, 6e-8},
                                    {3e-7, 1.2e-7, 3e-7, 2.4e-7},   {2e-6, 1e-38, 2e-6, 2.4e-7},
                                    {3e-7, 2.4e-7, 3e-7, 4.8e-7},   {2.4e-7, 1e-44, 2.4e-7, 1e-44}};
    size_t t;
    for (t = 0; t < sizeof acts / sizeof acts[0]; t++) {
        const unsigned a = acts[t];
        float p0, p1, work[4096];
        static float xf[4001], y[4001], J[4001];
        void *storage = NULL;
        nnp_model *m;
        size_t i, n = 4001;
        const double lo = a == 14 ? -100.0 : -20.0, hi = a == 14 ? 88.7 : 20.0;
        default_params(a, &p0, &p1);
        m = load_unit(a, p0, p1, &storage);
        CHECK(m != NULL, "%s unit model loads", act_names[a]);
        if (!m) continue;
        for (i = 0; i < n; i++) xf[i] = (float)(lo + (hi - lo) * (double)i / (double)(n - 1));
        xf[0] = 0.0f;
        xf[1] = -0.0f;
        xf[2] = 1e-30f;
        xf[3] = -1e-7f;
        CHECK_RC(nnp_forward(m, n, xf, y, work, 4096), NNP_OK, act_names[a]);
        CHECK_RC(nnp_jacobian(m, NNP_MODE_FORWARD, n, xf, NULL, J, work, 4096), NNP_OK, act_names[a]);
        for (i = 0; i < n; i++) {
            const double x = (double)xf[i], sc = fmax(1.0, fabs(x));
            const double wy = a == 11 ? x * 0.5 * erfc(-x / sqrt(2.0)) : ref_act(a, x, p0, p1);
            const double wj = ref_dact(a, x, p0, p1);
            CHECK(fabs((double)y[i] - wy) <= tol[t][0] * fabs(wy) + tol[t][1] * sc, "%s(%.9g) = %.9g, want %.9g",
                  act_names[a], x, (double)y[i], wy);
            CHECK(fabs((double)J[i] - wj) <= tol[t][2] * fabs(wj) + tol[t][3] * sc, "%s'(%.9g) = %.9g, want %.9g",
                  act_names[a], x, (double)J[i], wj);
        }
        { /* NaN propagates (and the clamps of the exponential's argument must not turn it into a number) */
            const float xn = (float)NAN;
            float yn;
            CHECK_RC(nnp_forward(m, 1, &xn, &yn, work, 4096), NNP_OK, "NaN forward");
            CHECK(yn != yn, "%s(NaN) = %g, want NaN", act_names[a], (double)yn);
        }
        if (a == 14) { /* the ends of the exponential */
            static const float xs[] = {-110.0f, -104.5f, -87.0f, 88.72f, 88.73f, 100.0f};
            float ys[6];
            CHECK_RC(nnp_forward(m, 6, xs, ys, work, 4096), NNP_OK, "exp ends");
            CHECK(ys[0] == 0.0f && ys[1] == 0.0f, "exp(-110), exp(-104.5) = %g, %g, want 0", (double)ys[0],
                  (double)ys[1]);
            CHECK(fabs((double)ys[2] - exp(-87.0)) <= 2.4e-7 * exp(-87.0), "exp(-87) = %g", (double)ys[2]);
            CHECK(fabs((double)ys[3] - exp((double)xs[3])) <= 2.4e-7 * exp((double)xs[3]), "exp(88.72) = %g",
                  (double)ys[3]);
            CHECK(isinf(ys[4]) && isinf(ys[5]), "exp(88.73), exp(100) = %g, %g, want inf", (double)ys[4],
                  (double)ys[5]);
        }
        free(storage);
    }
}

/* The batch kernels of each instruction set that uses multiply-adds (AVX2+FMA and AVX-512, on packed weights) sum
 * every entry in the same order, so their results agree bit for bit: y, both Jacobian modes (through the pattern
 * cache for the relu model at 300 points), for odd widths, two points, and partial row groups and panels. Models
 * loaded under NNP_MAX_ISA=avx2 and without a limit; on a CPU without AVX-512 both are AVX2 and this checks nothing
 * new. (A call with one point takes the split-sum single-row kernels, which each build compiles on its own; their
 * results may differ by rounding and are checked against the reference instead.) */
static void test_isa_agreement(void)
{
#if defined(__unix__) || defined(__APPLE__)
    static const size_t w_odd[] = {37, 131, 19, 3}, w_phys[] = {64, 48, 2}, w_one[] = {17, 1}, w_cache[] = {33, 20, 2};
    static const struct {
        size_t n_in;
        const size_t *w;
        size_t nw;
        unsigned act;
    } cases[] = {{5, w_odd, 4, NNP_ACT_GELU},   {3, w_phys, 3, NNP_ACT_TANH}, {7, w_one, 2, NNP_ACT_SIGMOID},
                 {4, w_cache, 3, NNP_ACT_RELU}, {5, w_odd, 4, NNP_ACT_SWISH}};
    static const size_t batches[] = {2, 3, 13, 37, 300};
    size_t c, bi, i;
    const char *old = getenv("NNP_MAX_ISA");
    for (c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tmodel tm = make_model(cases[c].n_in, cases[c].w, cases[c].nw, cases[c].act, NNP_ACT_LINEAR);
        void *s_a = NULL, *s_b = NULL;
        nnp_model *ma, *mb;
        setenv("NNP_MAX_ISA", "avx2", 1);
        ma = load_tmodel(&tm, &s_a);
        unsetenv("NNP_MAX_ISA");
        mb = load_tmodel(&tm, &s_b);
        if (ma && mb)
            for (bi = 0; bi < sizeof batches / sizeof batches[0]; bi++) {
                const size_t batch = batches[bi], n_in = tm.n_in, n_out = tm.n_out, jn = n_in * n_out;
                size_t wl = 0, w1, op;
                float *x = (float *)xmalloc(batch * n_in * sizeof(float)), *work;
                float *ya = (float *)xmalloc(batch * n_out * sizeof(float));
                float *yb = (float *)xmalloc(batch * n_out * sizeof(float));
                float *Ja = (float *)xmalloc(batch * jn * sizeof(float));
                float *Jb = (float *)xmalloc(batch * jn * sizeof(float));
                static const int ws[] = {NNP_WS_FORWARD, NNP_WS_JACOBIAN_FORWARD, NNP_WS_JACOBIAN_REVERSE};
                for (i = 0; i < 3; i++) {
                    CHECK_RC(nnp_workspace(mb, ws[i], batch, &w1), NNP_OK, "workspace");
                    if (w1 > wl) wl = w1;
                }
                work = (float *)xmalloc(wl * sizeof(float));
                for (i = 0; i < batch * n_in; i++) x[i] = (float)(2.5 * sin(0.37 * (double)(i + 7 * c)));
                for (op = 0; op < 3; op++) {
                    if (op == 0) {
                        CHECK_RC(nnp_forward(ma, batch, x, ya, work, wl), NNP_OK, "forward avx2");
                        CHECK_RC(nnp_forward(mb, batch, x, yb, work, wl), NNP_OK, "forward best");
                    } else {
                        const int mode = op == 1 ? NNP_MODE_FORWARD : NNP_MODE_REVERSE;
                        CHECK_RC(nnp_jacobian(ma, mode, batch, x, ya, Ja, work, wl), NNP_OK, "jacobian avx2");
                        CHECK_RC(nnp_jacobian(mb, mode, batch, x, yb, Jb, work, wl), NNP_OK, "jacobian best");
                        CHECK(memcmp(Ja, Jb, batch * jn * sizeof(float)) == 0,
                              "%s %lu->..%lu, batch %lu, %s mode: the Jacobians of the two kernel sets differ",
                              act_names[cases[c].act], (unsigned long)n_in, (unsigned long)n_out,
                              (unsigned long)batch, op == 1 ? "forward" : "reverse");
                    }
                    CHECK(memcmp(ya, yb, batch * n_out * sizeof(float)) == 0,
                          "%s %lu->..%lu, batch %lu, op %lu: y of the two kernel sets differs", act_names[cases[c].act],
                          (unsigned long)n_in, (unsigned long)n_out, (unsigned long)batch, (unsigned long)op);
                }
                free(x);
                free(ya);
                free(yb);
                free(Ja);
                free(Jb);
                free(work);
            }
        free(s_a);
        free(s_b);
        free_model(&tm);
    }
    if (old != NULL) setenv("NNP_MAX_ISA", old, 1);
#endif
}

static void test_second_activations(void)
{
    unsigned a;
    for (a = 0; a < NNP_ACT_COUNT; a++) {
        float p0f, p1f, xf[161], H[161], lap[161], hv[161], vv[161], work[4096];
        double err_ref = 0, err_c = 0;
        void *storage = NULL;
        nnp_model *m;
        size_t i;
        default_params(a, &p0f, &p1f);
        m = load_unit(a, p0f, p1f, &storage);
        if (!m) continue;
        for (i = 0; i < 161; i++) {
            /* -4 .. 4, 0 and the kinks included; (i - 80) / 20 is exactly 0 at i = 80 in every build, where
             * -4 + 0.05 i became a fused multiply-add with -march=native and gave 2.2e-16 there (softsign'' is -2
             * at any positive input, 0 only at 0) */
            xf[i] = (float)((double)((int)i - 80) / 20.0);
            vv[i] = 0.5f;
        }
        CHECK_RC(nnp_hessian(m, 161, xf, NULL, NULL, H, work, 4096), NNP_OK, "unit hessian");
        CHECK_RC(nnp_laplacian(m, 161, xf, NULL, NULL, lap, work, 4096), NNP_OK, "unit laplacian");
        CHECK_RC(nnp_hvp(m, 161, xf, vv, NULL, hv, work, 4096), NNP_OK, "unit hvp");
        for (i = 0; i < 161; i++) {
            const double x = xf[i], p0 = p0f, p1 = p1f, h = 1e-6;
            const double want = ref_d2act(a, x, p0, p1);
            CHECK(memcmp(&lap[i], &H[i], sizeof(float)) == 0, "%s: laplacian of one unit is its hessian", act_names[a]);
            CHECK(fabs(hv[i] - 0.5 * H[i]) <= 1e-6 * fmax(1.0, fabs(H[i])), "%s: hvp of one unit", act_names[a]);
            if (kink_distance2(a, x, p0, p1) < 1e-3) {
                CHECK(H[i] == 0.0f, "%s''(%g) = %g, want 0 at the kink", act_names[a], x, (double)H[i]);
                continue;
            }
            if (a == NNP_ACT_EXPONENTIAL && x > 2) continue;
            err_ref = fmax(err_ref, fabs(want - (ref_dact(a, x + h, p0, p1) - ref_dact(a, x - h, p0, p1)) / (2 * h)) /
                                        fmax(1.0, fabs(want)));
            err_c = fmax(err_c, fabs(H[i] - want) / fmax(1.0, fabs(want)));
            if (a == NNP_ACT_LINEAR || a == NNP_ACT_RELU || a == NNP_ACT_LEAKY_RELU || a == NNP_ACT_RELU6 ||
                a == NNP_ACT_HARD_SIGMOID)
                CHECK(H[i] == 0.0f, "%s'' is not exactly 0 at %g", act_names[a], x);
        }
        CHECK(err_ref <= 1e-8, "%s: reference f'' against differences of f': %.3g", act_names[a], err_ref);
        CHECK(err_c <= 1e-6, "%s: C core's f'' against the reference: %.3g", act_names[a], err_c);
        if (getenv("NNP_TEST_VERBOSE"))
            printf("  f'' %-14s ref vs fd %.2e  C vs ref %.2e\n", act_names[a], err_ref, err_c);
        free(storage);
    }
}

/* Everything of the second derivatives for one model on `batch` random points in [lo, hi]^n_in. */
static void check_second(const tmodel *tm, size_t batch, double lo, double hi, const char *what)
{
    const size_t n_in = tm->n_in, n_out = tm->n_out, jn = n_in * n_out, hn = jn * n_in;
    size_t b, i, j, q, w, wlen = 0, wd, w1, skipped = 0;
    void *storage = NULL;
    nnp_model *m;
    float *x, *v, *y, *J, *H, *y2, *J2, *L, *y3, *V, *H2, *L2, *V2, *work;
    double *xd, *yd, *Hfd, *err, *Hfd2, *wdbuf, *yref, *Jref, *Href;
    double max_y = 0, max_j = 0, max_h = 0, max_l = 0, max_v = 0, max_fd = 0, max_fd32 = 0;
    int ops[3] = {NNP_WS_HESSIAN, NNP_WS_LAPLACIAN, NNP_WS_HVP}, piecewise = 1, o;

    m = load_tmodel(tm, &storage);
    if (!m) return;
    for (i = 0; i < tm->n_layers; i++) {
        const unsigned act = tm->L[i].act;
        if (!(act == NNP_ACT_LINEAR || act == NNP_ACT_RELU || act == NNP_ACT_LEAKY_RELU || act == NNP_ACT_RELU6 ||
              act == NNP_ACT_HARD_SIGMOID))
            piecewise = 0;
    }
    x = (float *)xmalloc(batch * n_in * sizeof(float));
    v = (float *)xmalloc(batch * n_in * sizeof(float));
    xd = (double *)xmalloc(batch * n_in * sizeof(double));
    y = (float *)xmalloc(batch * n_out * sizeof(float));
    y2 = (float *)xmalloc(batch * n_out * sizeof(float));
    y3 = (float *)xmalloc(batch * n_out * sizeof(float));
    yd = (double *)xmalloc(batch * n_out * sizeof(double));
    J = (float *)xmalloc(batch * jn * sizeof(float));
    J2 = (float *)xmalloc(batch * jn * sizeof(float));
    V = (float *)xmalloc(batch * jn * sizeof(float));
    V2 = (float *)xmalloc(batch * jn * sizeof(float));
    L = (float *)xmalloc(batch * n_out * sizeof(float));
    L2 = (float *)xmalloc(batch * n_out * sizeof(float));
    H = (float *)xmalloc(batch * hn * sizeof(float));
    H2 = (float *)xmalloc(batch * hn * sizeof(float));
    Hfd = (double *)xmalloc(batch * hn * sizeof(double));
    Hfd2 = (double *)xmalloc(batch * hn * sizeof(double));
    err = (double *)xmalloc(batch * hn * sizeof(double));
    yref = (double *)xmalloc(n_out * sizeof(double));
    Jref = (double *)xmalloc(jn * sizeof(double));
    Href = (double *)xmalloc(hn * sizeof(double));
    for (i = 0; i < batch * n_in; i++) {
        x[i] = (float)urange(lo, hi);
        xd[i] = x[i];
        v[i] = (float)urange(-1, 1);
    }
    for (o = 0; o < 3; o++) {
        CHECK_RC(nnp_workspace(m, ops[o], batch, &w), NNP_OK, "second-order workspace");
        if (w > wlen) wlen = w;
    }
    work = (float *)xmalloc(wlen * sizeof(float));
    CHECK_RC(nnp_workspace(m, NNP_WS_FD_HESSIAN_F64, batch, &wd), NNP_OK, "fd hessian workspace");
    wdbuf = (double *)xmalloc(wd * sizeof(double));

    CHECK_RC(nnp_hessian(m, batch, x, y, J, H, work, wlen), NNP_OK, "nnp_hessian");
    CHECK_RC(nnp_laplacian(m, batch, x, y2, J2, L, work, wlen), NNP_OK, "nnp_laplacian");
    CHECK_RC(nnp_hvp(m, batch, x, v, y3, V, work, wlen), NNP_OK, "nnp_hvp");
    CHECK_RC(nnp_fd_hessian_f64(m, batch, xd, yd, Hfd, err, wdbuf, wd), NNP_OK, "nnp_fd_hessian_f64");

    for (b = 0; b < batch; b++) {
        const float *Hb = H + b * hn, *Vb = V + b * jn, *vb = v + b * n_in;
        double ys = 1, js = 1, hs = 1, kd = ref_eval2(tm, xd + b * n_in, yref, Jref, Href);
        for (i = 0; i < n_out; i++) ys = fmax(ys, fabs(yref[i]));
        for (i = 0; i < jn; i++) js = fmax(js, fabs(Jref[i]));
        for (i = 0; i < hn; i++) hs = fmax(hs, fabs(Href[i]));
        for (i = 0; i < n_out; i++) {
            max_y = fmax(max_y, fabs(y[b * n_out + i] - yref[i]) / ys);
            max_y = fmax(max_y, fabs(y2[b * n_out + i] - yref[i]) / ys);
            max_y = fmax(max_y, fabs(y3[b * n_out + i] - yref[i]) / ys);
            CHECK(fabs(yd[b * n_out + i] - yref[i]) <= 1e-12 * ys, "%s: fd hessian's y", what);
        }
        for (i = 0; i < jn; i++) {
            max_j = fmax(max_j, fabs(J[b * jn + i] - Jref[i]) / js);
            max_j = fmax(max_j, fabs(J2[b * jn + i] - Jref[i]) / js);
        }
        for (i = 0; i < n_out; i++)
            for (j = 0; j < n_in; j++)
                for (q = 0; q < n_in; q++) {
                    const size_t e = (i * n_in + j) * n_in + q, et = (i * n_in + q) * n_in + j;
                    CHECK(memcmp(&Hb[e], &Hb[et], sizeof(float)) == 0 && Hfd[b * hn + e] == Hfd[b * hn + et],
                          "%s: hessian not symmetric (point %lu)", what, (unsigned long)b);
                }
        if (piecewise) {
            for (i = 0; i < hn; i++) CHECK(Hb[i] == 0.0f, "%s: piecewise-linear network, hessian not 0", what);
            for (i = 0; i < jn; i++) CHECK(Vb[i] == 0.0f, "%s: piecewise-linear network, hvp not 0", what);
            for (i = 0; i < n_out; i++) CHECK(L[b * n_out + i] == 0.0f, "%s: piecewise-linear, laplacian not 0", what);
        }
        if (kd < 1e-3) { /* an f'' jump within reach of float32 rounding or of the finite-difference steps */
            skipped++;
            continue;
        }
        for (i = 0; i < hn; i++) {
            const double e = fabs(Hfd[b * hn + i] - Href[i]);
            max_h = fmax(max_h, fabs(Hb[i] - Href[i]) / hs);
            max_fd = fmax(max_fd, e / hs);
            max_fd32 = fmax(max_fd32, fabs(Hb[i] - Hfd[b * hn + i]) / (err[b * hn + i] + 1e-5 * hs));
            CHECK(e <= 2 * err[b * hn + i] + 1e-12 * hs, "%s: fd hessian error %.3g beyond twice its estimate %.3g",
                  what, e, err[b * hn + i]);
        }
        for (i = 0; i < n_out; i++) {
            double tr = 0;
            for (j = 0; j < n_in; j++) tr += Href[(i * n_in + j) * n_in + j];
            max_l = fmax(max_l, fabs(L[b * n_out + i] - tr) / hs);
            for (j = 0; j < n_in; j++) {
                double hv = 0;
                for (q = 0; q < n_in; q++) hv += Href[(i * n_in + j) * n_in + q] * vb[q];
                max_v = fmax(max_v, fabs(Vb[i * n_in + j] - hv) / hs);
            }
        }
    }
    CHECK(max_y <= 2e-6, "%s: second-order y error %.3g", what, max_y);
    CHECK(max_j <= 1e-5, "%s: second-order dy_dx error %.3g", what, max_j);
    CHECK(max_h <= 1e-5, "%s: hessian error %.3g", what, max_h);
    CHECK(max_l <= 1e-5, "%s: laplacian error %.3g", what, max_l);
    CHECK(max_v <= 1e-5, "%s: hvp error %.3g", what, max_v);
    CHECK(max_fd <= 1e-8, "%s: fd hessian error %.3g", what, max_fd);
    CHECK(max_fd32 <= 1.0, "%s: float32 hessian beyond the fd estimate + 1e-5: %.3g", what, max_fd32);
    CHECK(skipped * 2 <= batch, "%s: too many points near a kink (%lu)", what, (unsigned long)skipped);
    if (getenv("NNP_TEST_VERBOSE"))
        printf("  %-34s H %.2e  L %.2e  Hv %.2e  fd %.2e  (near kink: %lu)\n", what, max_h, max_l, max_v, max_fd,
               (unsigned long)skipped);

    /* y and dy_dx NULL; a workspace for one point only (blocks of one); each point alone; err and y NULL: the same
     * bits. One point's workspace less one element is too small. */
    CHECK_RC(nnp_workspace(m, NNP_WS_HESSIAN, 1, &w1), NNP_OK, "hessian workspace, one point");
    CHECK_RC(nnp_hessian(m, batch, x, NULL, NULL, H2, work, w1), NNP_OK, "hessian, one-point workspace");
    CHECK(memcmp(H, H2, batch * hn * sizeof(float)) == 0, "%s: hessian depends on the blocks or on y/J", what);
    CHECK_RC(nnp_hessian(m, batch, x, y, J, H2, work, w1 - 1), NNP_E_WORKSPACE, "hessian, workspace too small");
    CHECK_RC(nnp_workspace(m, NNP_WS_LAPLACIAN, 1, &w1), NNP_OK, "laplacian workspace, one point");
    CHECK_RC(nnp_laplacian(m, batch, x, NULL, NULL, L2, work, w1), NNP_OK, "laplacian, one-point workspace");
    CHECK(memcmp(L, L2, batch * n_out * sizeof(float)) == 0, "%s: laplacian depends on the blocks", what);
    CHECK_RC(nnp_laplacian(m, batch, x, y, J, L2, work, w1 - 1), NNP_E_WORKSPACE, "laplacian, workspace too small");
    CHECK_RC(nnp_workspace(m, NNP_WS_HVP, 1, &w1), NNP_OK, "hvp workspace, one point");
    CHECK_RC(nnp_hvp(m, batch, x, v, NULL, V2, work, w1), NNP_OK, "hvp, one-point workspace");
    CHECK(memcmp(V, V2, batch * jn * sizeof(float)) == 0, "%s: hvp depends on the blocks", what);
    CHECK_RC(nnp_hvp(m, batch, x, v, y, V2, work, w1 - 1), NNP_E_WORKSPACE, "hvp, workspace too small");
    for (b = 0; b < batch; b += 7) {
        CHECK_RC(nnp_hessian(m, 1, x + b * n_in, y2, J2, H2, work, wlen), NNP_OK, "hessian of one point");
        CHECK(memcmp(H2, H + b * hn, hn * sizeof(float)) == 0 && memcmp(J2, J + b * jn, jn * sizeof(float)) == 0 &&
                  memcmp(y2, y + b * n_out, n_out * sizeof(float)) == 0,
              "%s: point %lu alone differs from the batch", what, (unsigned long)b);
        CHECK_RC(nnp_hvp(m, 1, x + b * n_in, v + b * n_in, NULL, V2, work, wlen), NNP_OK, "hvp of one point");
        CHECK(memcmp(V2, V + b * jn, jn * sizeof(float)) == 0, "%s: hvp of point %lu alone", what, (unsigned long)b);
    }
    CHECK_RC(nnp_fd_hessian_f64(m, batch, xd, NULL, Hfd2, NULL, wdbuf, wd), NNP_OK, "fd hessian without y, err");
    CHECK(memcmp(Hfd, Hfd2, batch * hn * sizeof(double)) == 0, "%s: fd hessian depends on y/err", what);
    CHECK_RC(nnp_fd_hessian_f64(m, batch, xd, NULL, Hfd2, NULL, wdbuf, wd - 1), NNP_E_WORKSPACE, "fd, small ws");

    free(x); free(v); free(xd); free(y); free(y2); free(y3); free(yd); free(J); free(J2); free(V); free(V2);
    free(L); free(L2); free(H); free(H2); free(Hfd); free(Hfd2); free(err); free(yref); free(Jref); free(Href);
    free(work); free(wdbuf); free(storage);
}

static void test_second(void)
{
    static const size_t rev[] = {9, 7, 2};      /* 2 outputs < 6 pairs: forward then reverse */
    static const size_t ff[] = {9, 6, 4};       /* 4 outputs >= 3 pairs: forward over forward */
    static const size_t wide[] = {40, 24, 17, 2};
    static const size_t seed[] = {64, 64, 32, 32, 16, 16, 8, 1};
    static const size_t thin[] = {33, 17, 1};
    static const size_t one[] = {3};
    static const size_t mixed[] = {12, 9, 8, 11, 10, 6, 3};
    /* layers of at least 16384 weights (NNP_REV_DOT_MIN_WEIGHTS in nnp_second.c): the reverse products as dot
     * products with W's rows (so_rev_dot), widths that are not multiples of 8 or of its groups of 24 rows; 1, 2 and 5
     * adjoint rows per point, so that its tiles of 3, 2 and 1 rows all meet (blocks of many points, one point) */
    static const size_t big2[] = {131, 130, 129, 2}, big1[] = {129, 131, 130, 1}, big5[] = {130, 133, 5};
    static const unsigned mixed_acts[] = {NNP_ACT_RELU, NNP_ACT_TANH, NNP_ACT_LEAKY_RELU, NNP_ACT_GELU,
                                          NNP_ACT_HARD_SIGMOID, NNP_ACT_ELU, NNP_ACT_SIGMOID};
    unsigned a;
    size_t k;
    char what[96];
    test_tanh_accuracy();
    test_smooth_accuracy();
    test_isa_agreement();
    test_second_activations();
    for (a = 0; a < NNP_ACT_COUNT; a++) {
        tmodel tm;
        const double lo = a == NNP_ACT_EXPONENTIAL ? -1 : -2.5, hi = -lo;
        sprintf(what, "%s 3->9,7,2", act_names[a]);
        tm = make_model(3, rev, 3, a, NNP_ACT_LINEAR);
        check_second(&tm, 40, lo, hi, what);
        free_model(&tm);
        sprintf(what, "%s 2->9,6,4 (same out)", act_names[a]);
        tm = make_model(2, ff, 3, a, a);
        check_second(&tm, 30, lo, hi, what);
        free_model(&tm);
    }
    {
        tmodel tm = make_model(3, wide, 4, NNP_ACT_TANH, NNP_ACT_LINEAR);
        check_second(&tm, 20, -2, 2, "tanh 3->40,24,17,2");
        free_model(&tm);
        tm = make_model(2, seed, 8, NNP_ACT_SOFTPLUS, NNP_ACT_LINEAR);
        check_second(&tm, 30, -2, 2, "softplus seed 2->64..8->1");
        free_model(&tm);
        tm = make_model(1, thin, 3, NNP_ACT_SWISH, NNP_ACT_LINEAR);
        check_second(&tm, 30, -3, 3, "swish 1->33,17,1");
        free_model(&tm);
        tm = make_model(4, one, 1, NNP_ACT_GELU_TANH, NNP_ACT_GELU_TANH);
        check_second(&tm, 20, -2, 2, "gelu_tanh 4->3 one layer");
        free_model(&tm);
        tm = make_model(3, rev, 3, NNP_ACT_RELU, NNP_ACT_SIGMOID); /* only the output layer has an f'' */
        check_second(&tm, 40, -2, 2, "relu 3->9,7,2 (sigmoid out)");
        tm.L[1].act = NNP_ACT_SOFTPLUS; /* piecewise-linear below a smooth layer */
        check_second(&tm, 40, -2, 2, "relu, softplus 3->9,7,2 (sigmoid out)");
        free_model(&tm);
        tm = make_model(3, mixed, 7, NNP_ACT_LINEAR, NNP_ACT_LINEAR);
        for (k = 0; k < 7; k++) {
            tm.L[k].act = mixed_acts[k];
            default_params(mixed_acts[k], &tm.L[k].p0, &tm.L[k].p1);
        }
        check_second(&tm, 40, -2, 2, "mixed 3->12,9,8,11,10,6,3");
        free_model(&tm);
        tm = make_model(3, big2, 4, NNP_ACT_TANH, NNP_ACT_LINEAR);
        check_second(&tm, 29, -2, 2, "tanh 3->131,130,129,2");
        free_model(&tm);
        tm = make_model(3, big1, 4, NNP_ACT_GELU, NNP_ACT_SIGMOID);
        check_second(&tm, 31, -2, 2, "gelu 3->129,131,130,1 (sigmoid out)");
        free_model(&tm);
        tm = make_model(4, big5, 3, NNP_ACT_SOFTPLUS, NNP_ACT_LINEAR);
        tm.L[0].act = NNP_ACT_RELU; /* piecewise-linear first layer: the reverse pass stops above it */
        check_second(&tm, 25, -2, 2, "relu, softplus 4->130,133,5");
        free_model(&tm);
    }
}

/* NaN and infinite inputs propagate, nothing traps, and the other points of the batch are unaffected; arguments */
static void test_second_arguments(void)
{
    static const size_t w[] = {8, 5, 2};
    tmodel tm = make_model(3, w, 3, NNP_ACT_TANH, NNP_ACT_LINEAR);
    void *storage = NULL;
    nnp_model *m = load_tmodel(&tm, &storage);
    float x[9] = {0.5f, -1.0f, 0.25f, 0.1f, 0.2f, 0.3f, -0.7f, 1.5f, 2.0f}, v[9], y[6], J[18], H[54], L[6], V[18];
    float y1[2], H1[18], V1[18], work[8192];
    double xd[3] = {0.1, 0.2, 0.3}, Hd[18], wd[8192];
    size_t i, ws;
    if (!m) {
        free_model(&tm);
        return;
    }
    for (i = 0; i < 9; i++) v[i] = 1.0f - 0.25f * (float)i;
    x[3] = (float)NAN;
    x[7] = (float)INFINITY;
    CHECK_RC(nnp_hessian(m, 3, x, y, J, H, work, 8192), NNP_OK, "hessian with NaN and inf");
    CHECK(isnan(y[2]) && isnan(y[3]) && !isfinite(H[18]), "NaN input: NaN outputs and second derivatives");
    /* (point 2 has an infinite input: tanh saturates, its outputs may well be finite) */
    CHECK_RC(nnp_hessian(m, 1, x, y1, NULL, H1, work, 8192), NNP_OK, "hessian of point 0");
    CHECK(memcmp(H1, H, sizeof H1) == 0 && memcmp(y1, y, sizeof y1) == 0, "a NaN point changes another point");
    CHECK_RC(nnp_laplacian(m, 3, x, y, NULL, L, work, 8192), NNP_OK, "laplacian with NaN");
    CHECK(isnan(L[2]) && isfinite(L[0]), "laplacian: NaN propagates to its point only");
    v[1] = (float)NAN;
    CHECK_RC(nnp_hvp(m, 3, x, v, NULL, V, work, 8192), NNP_OK, "hvp with NaN direction");
    CHECK(isnan(V[0]) && isnan(V[6]), "hvp: NaN direction and NaN point propagate");
    v[1] = 0.75f;
    x[3] = 0.1f;
    x[7] = 0.2f;
    CHECK_RC(nnp_hvp(m, 1, x, v, NULL, V1, work, 8192), NNP_OK, "hvp one point");

    /* arguments */
    CHECK_RC(nnp_hessian(NULL, 1, x, y, J, H, work, 8192), NNP_E_NULL, "hessian NULL model");
    CHECK_RC(nnp_hessian(m, 1, NULL, y, J, H, work, 8192), NNP_E_NULL, "hessian NULL x");
    CHECK_RC(nnp_hessian(m, 1, x, y, J, NULL, work, 8192), NNP_E_NULL, "hessian NULL d2y_dx2");
    CHECK_RC(nnp_hessian(m, 1, x, y, J, H, NULL, 8192), NNP_E_NULL, "hessian NULL work");
    CHECK_RC(nnp_hessian(m, 0, NULL, NULL, NULL, NULL, NULL, 0), NNP_OK, "hessian empty batch");
    CHECK_RC(nnp_hessian(m, (size_t)-1, x, y, J, H, work, 8192), NNP_E_ARG, "hessian absurd batch");
    CHECK_RC(nnp_hessian(m, 1, x, y, J, H, work, 0), NNP_E_WORKSPACE, "hessian no workspace");
    CHECK_RC(nnp_laplacian(m, 1, x, y, J, NULL, work, 8192), NNP_E_NULL, "laplacian NULL lap");
    CHECK_RC(nnp_laplacian(m, 0, NULL, NULL, NULL, NULL, NULL, 0), NNP_OK, "laplacian empty batch");
    CHECK_RC(nnp_laplacian(m, (size_t)-1, x, y, J, L, work, 8192), NNP_E_ARG, "laplacian absurd batch");
    CHECK_RC(nnp_laplacian(m, 1, x, NULL, NULL, L, work, 0), NNP_E_WORKSPACE, "laplacian no workspace");
    CHECK_RC(nnp_hvp(m, 1, x, NULL, y, V, work, 8192), NNP_E_NULL, "hvp NULL v");
    CHECK_RC(nnp_hvp(m, 1, x, v, y, NULL, work, 8192), NNP_E_NULL, "hvp NULL hvp");
    CHECK_RC(nnp_hvp(m, 0, NULL, NULL, NULL, NULL, NULL, 0), NNP_OK, "hvp empty batch");
    CHECK_RC(nnp_hvp(m, (size_t)-1, x, v, y, V, work, 8192), NNP_E_ARG, "hvp absurd batch");
    CHECK_RC(nnp_fd_hessian_f64(m, 1, xd, NULL, Hd, NULL, wd, 1), NNP_E_WORKSPACE, "fd hessian workspace");
    CHECK_RC(nnp_fd_hessian_f64(m, 1, xd, NULL, NULL, NULL, wd, 8192), NNP_E_NULL, "fd hessian NULL out");
    CHECK_RC(nnp_fd_hessian_f64(m, 0, NULL, NULL, NULL, NULL, NULL, 0), NNP_OK, "fd hessian empty batch");
    CHECK_RC(nnp_fd_hessian_f64(m, 1, xd, NULL, Hd, NULL, wd, 8192), NNP_OK, "fd hessian");
    CHECK_RC(nnp_workspace(m, NNP_WS_HESSIAN, 0, &ws), NNP_OK, "hessian workspace, empty batch");
    CHECK(ws == 0, "empty batch needs no workspace");
    CHECK_RC(nnp_workspace(m, NNP_WS_FD_HESSIAN_F64 + 1, 1, &ws), NNP_E_ARG, "workspace op past the last");
    {
        /* the workspace stops growing at a block of points */
        size_t w1000, wbig;
        CHECK_RC(nnp_workspace(m, NNP_WS_HESSIAN, 1000, &w1000), NNP_OK, "hessian workspace 1000");
        CHECK_RC(nnp_workspace(m, NNP_WS_HESSIAN, (size_t)1 << 40, &wbig), NNP_OK, "hessian workspace 2^40");
        CHECK(w1000 == wbig && wbig < 200000, "hessian workspace bounded (%lu)", (unsigned long)wbig);
    }
    free(storage);
    free_model(&tm);
}

/* tm written to the file format at path, then freed; 0 on success */
static int write_tmodel_file(tmodel *tm, const char *path)
{
    size_t len;
    unsigned char *f = write_model(tm, &len);
    FILE *fp = fopen(path, "wb");
    int ok = fp && fwrite(f, 1, len, fp) == len;
    if (fp && fclose(fp) != 0) ok = 0;
    free(f);
    free_model(tm);
    if (!ok) fprintf(stderr, "cannot write %s\n", path);
    return ok ? 0 : 1;
}

static int write_model_file(const char *path)
{
    static const size_t w[] = {8, 6, 2};
    tmodel tm = make_model(2, w, 3, NNP_ACT_TANH, NNP_ACT_LINEAR);
    return write_tmodel_file(&tm, path);
}

static int write_seed_model_file(const char *path)
{
    static const size_t w[] = {64, 64, 32, 32, 16, 16, 8, 1};
    tmodel tm = make_model(2, w, 8, NNP_ACT_LEAKY_RELU, NNP_ACT_LINEAR);
    size_t k;
    for (k = 0; k + 1 < tm.n_layers; k++) tm.L[k].p0 = 0.3f;
    return write_tmodel_file(&tm, path);
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--write-model") == 0) return write_model_file(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--write-seed-model") == 0) return write_seed_model_file(argv[2]);
    if (argc != 1) {
        fprintf(stderr, "usage: %s [--write-model FILE | --write-seed-model FILE]\n", argv[0]);
        return 2;
    }
    test_activations();
    test_single_point();
    test_kinks();
    test_kinks_vector();
    test_pattern_cache();
    test_corruptions();
    test_arguments();
    test_second();
    test_second_arguments();
    if (getenv("NNP_TEST_VERBOSE")) printf("largest fd error / estimate: %.3g\n", max_ratio);
    printf("test_nnp: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
