/*
 * libFuzzer harness for the weight-file parser and the compute paths.
 *
 * Each input is tried twice: as given, and with the file_size field and the CRC-32 repaired, so that the
 * fuzzer reaches the checks behind them. When a file loads, every operation runs on a few points taken from
 * the input (models are capped in size so that runs stay fast), and small models also run a batch large enough
 * for the reverse-mode pattern cache, checked bit for bit against the same batch without it.
 */
#include "../nnp.h"
#include "../tests/crc32_bitwise.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
