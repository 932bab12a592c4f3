/*
 * nnp.c - the nnpartials C core's public entry points for float32 computation (nnp.h; FORMAT.md for the weight
 * file): status text, workspace sizes, argument checks, and the choice of path for a Jacobian (single point,
 * blocks in forward or reverse mode, pattern cache), which the other units carry out. nnp_internal.h lists the
 * units and what each one does.
 */
#include "nnp_internal.h"

/* ------------------------------------------------------------------------------------------------------ */
/* Status text                                                                                            */

const char *nnp_strerror(int code)
{
    switch (code) {
    case NNP_OK: return "success";
    case NNP_E_NULL: return "a required pointer argument is NULL";
    case NNP_E_TRUNCATED: return "weight file is truncated (the buffer ends before the file does)";
    case NNP_E_BAD_MAGIC: return "not a weight file (bad magic, expected \"NNPK\")";
    case NNP_E_VERSION: return "unsupported weight file version (this library reads version 1)";
    case NNP_E_BAD_FIELD: return "weight file has a non-zero flags, reserved or unused parameter field";
    case NNP_E_BAD_DIM: return "weight file has a bad count or dimension (zero, too large, or layers do not chain)";
    case NNP_E_BAD_ACTIVATION: return "weight file has an unknown activation code";
    case NNP_E_SIZE_MISMATCH: return "weight file size does not match its header and layer dimensions";
    case NNP_E_CHECKSUM: return "weight file checksum (CRC-32) mismatch";
    case NNP_E_NONFINITE: return "weight file holds a NaN or infinite weight, bias or parameter";
    case NNP_E_STORAGE: return "model storage too small";
    case NNP_E_WORKSPACE: return "workspace too small";
    case NNP_E_ARG: return "invalid argument";
    case NNP_E_TOO_LARGE: return "size too large for this platform";
    case NNP_E_INPUT: return "an input value is NaN or infinite";
    default: return "unknown error";
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Mode, workspace, argument checks                                                                       */

int nnp_auto_mode(const nnp_model *m)
{
    if (m == NULL) return NNP_E_NULL;
    if (!model_ok(m)) return NNP_E_ARG;
    /* Forward mode costs about (1 + n_in) matrix products per layer, reverse mode (1 + n_out) plus keeping
     * every layer's derivative; forward mode wins ties (one pass, less memory). */
    return (m->n_out < m->n_in) ? NNP_MODE_REVERSE : NNP_MODE_FORWARD;
}

int nnp_workspace(const nnp_model *m, int op, size_t batch, size_t *n_elems)
{
    size_t fixed, per_point, blk, t;
    int rc;
    if (m == NULL || n_elems == NULL) return NNP_E_NULL;
    if (!model_ok(m)) return NNP_E_ARG;
    if (op == NNP_WS_JACOBIAN) { /* AUTO may take either mode (it depends on the batch): enough for both */
        size_t a, b;
        rc = nnp_workspace(m, NNP_WS_JACOBIAN_FORWARD, batch, &a);
        if (rc == NNP_OK) rc = nnp_workspace(m, NNP_WS_JACOBIAN_REVERSE, batch, &b);
        if (rc == NNP_OK) *n_elems = a > b ? a : b;
        return rc;
    }
    rc = ws_shape(m, op, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    if (batch == 0) {
        *n_elems = 0;
        return NNP_OK;
    }
    if (op == NNP_WS_JACOBIAN_REVERSE && batch >= NNP_CACHE_MIN_BATCH) {
        nnpi_cache_shape_t cs;
        if (nnpi_cache_shape(m, &cs)) { /* room for the pattern cache (a few hundred kB at most) */
            fixed = cs.table;
            per_point += cs.extra;
        }
    }
    blk = max_block_of(per_point, ws_block_budget(op));
    if (blk > batch) blk = batch;
    if (!mul_sz(blk, per_point, &t) || !add_sz(t, fixed, &t)) return NNP_E_TOO_LARGE;
    *n_elems = t;
    return NNP_OK;
}

/* Common argument checks; also rejects batches whose arrays could not be addressed. */
int nnpi_check_call(const nnp_model *m, size_t batch, const void *x, const void *y, int need_y, const void *work,
                    size_t out_per_point)
{
    size_t t;
    if (m == NULL) return NNP_E_NULL;
    if (!model_ok(m)) return NNP_E_ARG;
    if (batch == 0) return NNP_OK;
    if (x == NULL || (need_y && y == NULL) || work == NULL) return NNP_E_NULL;
    if (!mul_sz(batch, m->n_in, &t) || !mul_sz(t, sizeof(double), &t)) return NNP_E_ARG;
    if (!mul_sz(batch, out_per_point, &t) || !mul_sz(t, sizeof(double), &t)) return NNP_E_ARG;
    return NNP_OK;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Forward pass and Jacobian (float32)                                                                    */

int nnp_forward(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len)
{
    int rc = nnpi_check_call(m, batch, x, y, 1, work, m ? m->n_out : 0);
    if (rc != NNP_OK || batch == 0) return rc;
    return nnpi_forward_batch(m, batch, x, y, work, work_len);
}

int nnp_jacobian(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                 float *work, size_t work_len)
{
    size_t jn;
    int rc, auto_mode;
    if (m != NULL && model_ok(m)) {
        if (!mul_sz(m->n_in, m->n_out, &jn)) return NNP_E_ARG;
    } else {
        jn = 0;
    }
    rc = nnpi_check_call(m, batch, x, dy_dx, 1, work, jn);
    if (rc != NNP_OK) return rc;
    auto_mode = mode == NNP_MODE_AUTO;
    if (mode == NNP_MODE_AUTO) {
        mode = nnp_auto_mode(m);
        /* One point and few outputs: the single-point reverse path (one backward pass per output) when
         * n_out < n_in, as for batches. Otherwise, for one or two points, reverse mode's products are single
         * rows, bound by loading every weight twice; forward mode shares each weight load among 1 + n_in rows
         * and wins while n_in is small. */
        if (mode == NNP_MODE_REVERSE && batch <= 2 && !(batch == 1 && m->n_out <= NNP_SP_MAX_OUT) &&
            m->n_in <= 2 * (m->n_out + 1))
            mode = NNP_MODE_FORWARD;
    }
    if (mode != NNP_MODE_FORWARD && mode != NNP_MODE_REVERSE) return NNP_E_ARG;
    if (batch == 0) return NNP_OK;
    if (mode == NNP_MODE_REVERSE && batch == 1 && m->n_out <= NNP_SP_MAX_OUT) {
        /* within the reverse-mode workspace of one point (its per-point size is at least NNP_SP_WORK) */
        if (work_len >= NNP_SP_WORK(m)) {
            nnpi_point_jacobian(m, x, y, dy_dx, work);
            return NNP_OK;
        }
        if (auto_mode) mode = NNP_MODE_FORWARD; /* a workspace sized for forward mode only */
    }
    /* blocks in forward or reverse mode; reverse mode on large batches through the pattern cache when it applies */
    return nnpi_jacobian_batch(m, mode, batch, x, y, dy_dx, work, work_len);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Input checks                                                                                           */

size_t nnp_first_nonfinite_f32(const float *x, size_t n)
{
    size_t i;
    if (x == NULL) return n;
    for (i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        if ((u & 0x7f800000u) == 0x7f800000u) return i;
    }
    return n;
}

/* 0 when x[0..batch*n_in) holds a NaN or infinity; 1 otherwise, including arguments the compute functions reject
 * (they report those). */
static int input_finite(const nnp_model *m, size_t batch, const float *x)
{
    size_t len;
    if (!model_ok(m) || x == NULL || !mul_sz(batch, m->n_in, &len)) return 1;
    return nnp_first_nonfinite_f32(x, len) == len;
}

int nnp_forward_checked(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len)
{
    if (!input_finite(m, batch, x)) return NNP_E_INPUT;
    return nnp_forward(m, batch, x, y, work, work_len);
}

int nnp_jacobian_checked(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                         float *work, size_t work_len)
{
    if (!input_finite(m, batch, x)) return NNP_E_INPUT;
    return nnp_jacobian(m, mode, batch, x, y, dy_dx, work, work_len);
}

size_t nnp_first_nonfinite_f64(const double *x, size_t n)
{
    size_t i;
    if (x == NULL) return n;
    for (i = 0; i < n; i++) {
        uint64_t u;
        memcpy(&u, x + i, sizeof u);
        if ((u & UINT64_C(0x7ff0000000000000)) == UINT64_C(0x7ff0000000000000)) return i;
    }
    return n;
}
