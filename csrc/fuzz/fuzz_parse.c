/*
 * libFuzzer harness for the weight-file parser and the compute paths.
 *
 * Each input is tried twice: as given, and with the file_size field and the CRC-32 repaired, so that the
 * fuzzer reaches the checks behind them. When a file loads, every operation runs on a few points taken from
 * the input (models are capped in size so that runs stay fast), and small models also run a batch large enough
 * for the reverse-mode pattern cache, checked bit for bit against the same batch without it, and the second
 * derivatives (small models) with two workspace sizes, checked bit for bit against each other.
 */
#include "../nnp.h"
#include "../tests/crc32_bitwise.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Second derivatives (small models): every function on a few points from the input, NaN included, with the workspace
 * nnp_workspace gives and with one point's worth (blocks of one): the results must agree bit for bit, and a point
 * alone must give the row of the batch. */
static void second(const nnp_model *m, const unsigned char *buf, size_t len)
{
    const size_t batch = 3, n_in = nnp_n_in(m), n_out = nnp_n_out(m), hn = n_in * n_in * n_out;
    static const int ops[3] = {NNP_WS_HESSIAN, NNP_WS_LAPLACIAN, NNP_WS_HVP};
    size_t w[3], w1[3], wd = 0, wmax = 0, i;
    float *x, *v, *y, *J, *H, *H2, *L, *L2, *V, *V2, *work;
    double *xd, *Hd, *err, *wdb;
    int o;
    for (o = 0; o < 3; o++) {
        if (nnp_workspace(m, ops[o], batch, &w[o]) != NNP_OK || nnp_workspace(m, ops[o], 1, &w1[o]) != NNP_OK)
            abort();
        if (w1[o] > w[o]) abort();
        if (w[o] > wmax) wmax = w[o];
    }
    if (nnp_workspace(m, NNP_WS_FD_HESSIAN_F64, batch, &wd) != NNP_OK) abort();
    x = (float *)malloc(batch * n_in * sizeof(float));
    v = (float *)malloc(batch * n_in * sizeof(float));
    y = (float *)malloc(batch * n_out * sizeof(float));
    J = (float *)malloc(batch * n_in * n_out * sizeof(float));
    H = (float *)malloc(batch * hn * sizeof(float));
    H2 = (float *)malloc(batch * hn * sizeof(float));
    L = (float *)malloc(batch * n_out * sizeof(float));
    L2 = (float *)malloc(batch * n_out * sizeof(float));
    V = (float *)malloc(batch * n_in * n_out * sizeof(float));
    V2 = (float *)malloc(batch * n_in * n_out * sizeof(float));
    work = (float *)malloc(wmax * sizeof(float));
    xd = (double *)malloc(batch * n_in * sizeof(double));
    Hd = (double *)malloc(batch * hn * sizeof(double));
    err = (double *)malloc(batch * hn * sizeof(double));
    wdb = (double *)malloc(wd * sizeof(double));
    if (x && v && y && J && H && H2 && L && L2 && V && V2 && work && xd && Hd && err && wdb) {
        for (i = 0; i < batch * n_in; i++) {
            x[i] = (float)((double)buf[(3 * i + 1) % len] / 64.0 - 2.0);
            v[i] = (float)((double)buf[(5 * i + 2) % len] / 128.0 - 1.0);
            xd[i] = x[i];
        }
        if (len > 40 && buf[40] == 0xff) x[n_in] = (float)NAN; /* sometimes a NaN in the second point */
        if (nnp_hessian(m, batch, x, y, J, H, work, w[0]) != NNP_OK ||
            nnp_hessian(m, batch, x, NULL, NULL, H2, work, w1[0]) != NNP_OK ||
            memcmp(H, H2, batch * hn * sizeof(float)) != 0)
            abort();
        if (nnp_hessian(m, 1, x, y, J, H2, work, w1[0]) != NNP_OK || memcmp(H, H2, hn * sizeof(float)) != 0) abort();
        if (nnp_hessian(m, 1, x, y, J, H2, work, w1[0] - 1) != NNP_E_WORKSPACE) abort();
        if (nnp_laplacian(m, batch, x, y, J, L, work, w[1]) != NNP_OK ||
            nnp_laplacian(m, batch, x, NULL, NULL, L2, work, w1[1]) != NNP_OK ||
            memcmp(L, L2, batch * n_out * sizeof(float)) != 0)
            abort();
        if (nnp_hvp(m, batch, x, v, y, V, work, w[2]) != NNP_OK ||
            nnp_hvp(m, batch, x, v, NULL, V2, work, w1[2]) != NNP_OK ||
            memcmp(V, V2, batch * n_in * n_out * sizeof(float)) != 0)
            abort();
        if (nnp_fd_hessian_f64(m, batch, xd, NULL, Hd, err, wdb, wd) != NNP_OK) abort();
        if (nnp_fd_hessian_f64(m, batch, xd, NULL, Hd, err, wdb, wd - 1) != NNP_E_WORKSPACE) abort();
    }
    free(x); free(v); free(y); free(J); free(H); free(H2); free(L); free(L2); free(V); free(V2); free(work);
    free(xd); free(Hd); free(err); free(wdb);
}

/* Reverse mode on a batch large enough for the pattern cache, with and without it: must agree bit for bit. */
static void differential(const nnp_model *m, const unsigned char *buf, size_t len)
{
    const size_t batch = 260, n_in = nnp_n_in(m), n_out = nnp_n_out(m);
    size_t wbig = 0, wsmall = 0, i;
    float *x, *J1, *J2, *work;
    if (nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, batch, &wbig) != NNP_OK ||
        nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, 4, &wsmall) != NNP_OK)
        abort();
    x = (float *)malloc(batch * n_in * sizeof(float));
    J1 = (float *)malloc(batch * n_in * n_out * sizeof(float));
    J2 = (float *)malloc(batch * n_in * n_out * sizeof(float));
    work = (float *)malloc(wbig * sizeof(float));
    if (x && J1 && J2 && work) {
        for (i = 0; i < batch * n_in; i++) x[i] = (float)((double)buf[(7 * i) % len] / 32.0 - 4.0);
        if (nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, NULL, J1, work, wsmall) != NNP_OK) abort();
        if (nnp_jacobian(m, NNP_MODE_REVERSE, batch, x, NULL, J2, work, wbig) != NNP_OK) abort();
        if (memcmp(J1, J2, batch * n_in * n_out * sizeof(float)) != 0) abort();
    }
    free(x); free(J1); free(J2); free(work);
}

static void exercise(const unsigned char *buf, size_t len)
{
    size_t need = 0, n_in, n_out, w, wmax = 0, batch = 3, i;
    void *storage;
    nnp_model *m = NULL;
    float *x, *y, *J, *work;
    double *xd, *yd, *Jd, *err, *wd;
    int op, mode, rc = nnp_model_bytes(buf, len, &need);
    if (rc != NNP_OK) return;
    if (need > (1u << 22)) return; /* keep runs fast */
    storage = malloc(need);
    if (!storage) return;
    rc = nnp_load(buf, len, storage, need, &m);
    if (rc != NNP_OK || m == NULL) abort(); /* validated files must load */
    n_in = nnp_n_in(m);
    n_out = nnp_n_out(m);
    if (n_in * n_out > 4096) {
        free(storage);
        return;
    }
    for (op = NNP_WS_FORWARD; op <= NNP_WS_FD_JACOBIAN_F64; op++) {
        if (nnp_workspace(m, op, batch, &w) != NNP_OK) abort();
        if (w > wmax) wmax = w;
    }
    x = (float *)malloc(batch * n_in * sizeof(float));
    y = (float *)malloc(batch * n_out * sizeof(float));
    J = (float *)malloc(batch * n_in * n_out * sizeof(float));
    work = (float *)malloc(wmax * sizeof(float));
    xd = (double *)malloc(batch * n_in * sizeof(double));
    yd = (double *)malloc(batch * n_out * sizeof(double));
    Jd = (double *)malloc(batch * n_in * n_out * sizeof(double));
    err = (double *)malloc(batch * n_in * n_out * sizeof(double));
    wd = (double *)malloc(wmax * sizeof(double));
    if (x && y && J && work && xd && yd && Jd && err && wd) {
        for (i = 0; i < batch * n_in; i++) {
            x[i] = (float)((double)buf[i % len] / 64.0 - 2.0);
            xd[i] = x[i];
        }
        if (nnp_forward(m, batch, x, y, work, wmax) != NNP_OK) abort();
        for (mode = NNP_MODE_AUTO; mode <= NNP_MODE_REVERSE; mode++) {
            if (nnp_jacobian(m, mode, batch, x, y, J, work, wmax) != NNP_OK) abort();
            /* one point: its own kernels (the single-point reverse path when n_out <= 2) */
            if (nnp_jacobian(m, mode, 1, x, y, J, work, wmax) != NNP_OK) abort();
        }
        /* the checked entry points: finite x computes, a NaN in the last value is refused */
        if (nnp_jacobian_checked(m, NNP_MODE_AUTO, batch, x, y, J, work, wmax) != NNP_OK ||
            nnp_forward_checked(m, batch, x, y, work, wmax) != NNP_OK)
            abort();
        x[batch * n_in - 1] = (float)NAN;
        if (nnp_jacobian_checked(m, NNP_MODE_AUTO, batch, x, y, J, work, wmax) != NNP_E_INPUT ||
            nnp_forward_checked(m, batch, x, y, work, wmax) != NNP_E_INPUT)
            abort();
        x[batch * n_in - 1] = (float)xd[batch * n_in - 1];
        /* one point with exactly the reverse-mode workspace it asks for */
        if (nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, 1, &w) != NNP_OK ||
            nnp_jacobian(m, NNP_MODE_REVERSE, 1, x, NULL, J, work, w) != NNP_OK)
            abort();
        if (nnp_forward_f64(m, batch, xd, yd, wd, wmax) != NNP_OK) abort();
        if (nnp_fd_jacobian_f64(m, batch, xd, yd, Jd, err, wd, wmax) != NNP_OK) abort();
    }
    free(x); free(y); free(J); free(work); free(xd); free(yd); free(Jd); free(err); free(wd);
    if (need <= (1u << 16) && n_in * n_out <= 64) differential(m, buf, len);
    if (need <= (1u << 16) && n_in <= 8 && n_in * n_in * n_out <= 1024) second(m, buf, len);
    free(storage);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *copy;
    exercise(data, size);
    if (size < 36) return 0;
    copy = (unsigned char *)malloc(size);
    if (!copy) return 0;
    memcpy(copy, data, size);
    {
        uint64_t n = size;
        uint32_t crc;
        int k;
        for (k = 0; k < 8; k++) copy[24 + k] = (unsigned char)((n >> (8 * k)) & 0xff);
        crc = crc32_bitwise(copy, size - 4);
        for (k = 0; k < 4; k++) copy[size - 4 + k] = (unsigned char)((crc >> (8 * k)) & 0xff);
    }
    exercise(copy, size);
    free(copy);
    return 0;
}
