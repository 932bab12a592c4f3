/*
 * nnp_fd.c - float64 evaluation: the forward pass (weights promoted exactly) and the finite-difference Jacobian
 * with its per-entry error estimate (nnp.h), the independent cross-check of the float32 analytic Jacobian.
 * Straightforward loops, built once (no dispatch): accuracy, not speed, is their purpose.
 */
#include "nnp_internal.h"

#define SQRT1_2 0.70710678118654752440
#define SQRT_2_OVER_PI 0.79788456080286535588

static void act_f64(const nnp_layer *L, double *z, size_t n)
{
    const float *b = L->b;
    const double p0 = L->p0, p1 = L->p1;
    size_t j;
    for (j = 0; j < n; j++) {
        double v = z[j] + (double)b[j], a;
        switch (L->act) {
        case NNP_ACT_LINEAR: a = v; break;
        case NNP_ACT_RELU: a = v < 0.0 ? 0.0 : v; break;
        case NNP_ACT_LEAKY_RELU: a = v > 0.0 ? v : p0 * v; break;
        case NNP_ACT_ELU: a = v > 0.0 ? v : p0 * expm1(v); break;
        case NNP_ACT_SELU: a = v > 0.0 ? p1 * v : p1 * p0 * expm1(v); break;
        case NNP_ACT_TANH: a = tanh(v); break;
        case NNP_ACT_SIGMOID: a = 1.0 / (1.0 + exp(-v)); break;
        case NNP_ACT_HARD_SIGMOID: {
            double t = p0 * v + p1;
            a = t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t);
            break;
        }
        case NNP_ACT_SOFTPLUS: a = (v > 0.0 ? v : 0.0) + log1p(exp(-fabs(v))); break;
        case NNP_ACT_SOFTSIGN: a = v / (1.0 + fabs(v)); break;
        case NNP_ACT_SWISH: a = v / (1.0 + exp(-v)); break;
        case NNP_ACT_GELU: a = 0.5 * v * (1.0 + erf(v * SQRT1_2)); break;
        case NNP_ACT_GELU_TANH: a = 0.5 * v * (1.0 + tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v))); break;
        case NNP_ACT_RELU6: a = v < 0.0 ? 0.0 : (v > 6.0 ? 6.0 : v); break;
        default: a = exp(v); break;
        }
        z[j] = a;
    }
}

/* mag (may be NULL) receives, per point and output, |b| + sum |a w| of the last layer: the scale of the
 * rounding errors in its sums, for the finite-difference error estimate. */
static void forward_block_f64(const nnp_model *m, size_t np, const double *x, double *y, double *buf0,
                              double *buf1, double *mag)
{
    const double *in = x;
    size_t in_stride = m->n_in, k, i, p, j;
    double *bufs[2];
    bufs[0] = buf0;
    bufs[1] = buf1;
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        double *out = (k + 1 == m->n_layers) ? y : bufs[k & 1];
        const size_t c = L->cols;
        for (i = 0; i < np; i++) {
            const double *a = in + i * in_stride;
            double *o = out + i * c;
            for (j = 0; j < c; j++) o[j] = 0.0;
            for (p = 0; p < L->rows; p++) {
                const double ap = a[p];
                const float *w = L->W + p * c;
                for (j = 0; j < c; j++) o[j] += ap * (double)w[j];
            }
            if (mag != NULL && k + 1 == m->n_layers) {
                double *s = mag + i * c;
                for (j = 0; j < c; j++) s[j] = fabs((double)L->b[j]);
                for (p = 0; p < L->rows; p++) {
                    const double ap = fabs(a[p]);
                    const float *w = L->W + p * c;
                    for (j = 0; j < c; j++) s[j] += ap * fabs((double)w[j]);
                }
            }
            act_f64(L, o, c);
        }
        in = out;
        in_stride = c;
    }
}

int nnp_forward_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *work, size_t work_len)
{
    size_t fixed, per_point, blk, done;
    int rc = nnpi_check_call(m, batch, x, y, 1, work, m ? m->n_out : 0);
    if (rc != NNP_OK || batch == 0) return rc;
    rc = ws_shape(m, NNP_WS_FORWARD_F64, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    blk = block_for(fixed, per_point, batch, work_len);
    if (blk == 0) return NNP_E_WORKSPACE;
    for (done = 0; done < batch; done += blk) {
        size_t np = batch - done < blk ? batch - done : blk;
        forward_block_f64(m, np, x + done * m->n_in, y + done * m->n_out, work, work + blk * m->max_cols, NULL);
    }
    return NNP_OK;
}

int nnp_fd_jacobian_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *dy_dx, double *err,
                        double *work, size_t work_len)
{
    size_t fixed, per_point, n_in, n_out, jn, b, j, i;
    double *pts, *out, *fw0, *fw1, *mag, *f0;
    int rc;
    if (m != NULL && model_ok(m)) {
        if (!mul_sz(m->n_in, m->n_out, &jn)) return NNP_E_ARG;
    } else {
        jn = 0;
    }
    rc = nnpi_check_call(m, batch, x, dy_dx, 1, work, jn);
    if (rc != NNP_OK || batch == 0) return rc;
    rc = ws_shape(m, NNP_WS_FD_JACOBIAN_F64, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    if (work_len < fixed) return NNP_E_WORKSPACE;
    n_in = m->n_in;
    n_out = m->n_out;
    pts = work;              /* [4][n_in] */
    out = pts + 4 * n_in;    /* [4][n_out] */
    fw0 = out + 4 * n_out;   /* [4][max_cols] */
    fw1 = fw0 + 4 * m->max_cols;
    mag = fw1 + 4 * m->max_cols; /* [4][n_out] */
    f0 = mag + 4 * n_out;        /* [n_out] */

    for (b = 0; b < batch; b++) {
        const double *xb = x + b * n_in;
        double *Jb = dy_dx + b * jn;
        forward_block_f64(m, 1, xb, f0, fw0, fw1, NULL);
        if (y) memcpy(y + b * n_out, f0, n_out * sizeof(double));
        for (j = 0; j < n_in; j++) {
            const double xj = xb[j];
            const double h = NNP_FD_CBRT_EPS * (fabs(xj) > 1.0 ? fabs(xj) : 1.0);
            double s[4], step1, step2;
            size_t q;
            for (q = 0; q < 4; q++) memcpy(pts + q * n_in, xb, n_in * sizeof(double));
            pts[0 * n_in + j] = xj + h;
            pts[1 * n_in + j] = xj - h;
            pts[2 * n_in + j] = xj + 0.5 * h;
            pts[3 * n_in + j] = xj - 0.5 * h;
            for (q = 0; q < 4; q++) s[q] = pts[q * n_in + j];
            /* the steps actually taken (x + h is rounded) */
            step1 = s[0] - s[1];
            step2 = s[2] - s[3];
            forward_block_f64(m, 4, pts, out, fw0, fw1, mag);
            for (i = 0; i < n_out; i++) {
                const double fp1 = out[0 * n_out + i], fm1 = out[1 * n_out + i];
                const double fp2 = out[2 * n_out + i], fm2 = out[3 * n_out + i];
                const double d1 = (fp1 - fm1) / step1, d2 = (fp2 - fm2) / step2;
                const double r = (4.0 * d2 - d1) / 3.0;
                Jb[i * n_in + j] = r;
                if (err) {
                    /* kink term: the one-sided asymmetry (f(x+h) - 2 f(x) + f(x-h)) / h is h f'' for a smooth
                     * f and halves with h; next to a kink it stays at the jump of the slope */
                    const double a1 = (fp1 - 2.0 * f0[i] + fm1) / (0.5 * step1);
                    const double a2 = (fp2 - 2.0 * f0[i] + fm2) / (0.5 * step2);
                    double f = fmax(fmax(fabs(fp1), fabs(fm1)), fmax(fabs(fp2), fabs(fm2)));
                    f = fmax(f, fmax(fmax(mag[i], mag[n_out + i]), fmax(mag[2 * n_out + i], mag[3 * n_out + i])));
                    err[b * jn + i * n_in + j] = fabs(d1 - d2) + 2.0 * fabs(a2 - 0.5 * a1) +
                                                 NNP_FD_ROUNDING * DBL_EPSILON * fmax(1.0, f) / step2;
                }
            }
        }
    }
    return NNP_OK;
}
