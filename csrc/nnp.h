/*
 * nnp.h - the nnpartials C core: load a `model.nnp` weight file (see FORMAT.md), evaluate the network,
 * its analytic Jacobian, and a float64 finite-difference Jacobian with a per-entry error estimate.
 *
 * Portable C99. The library never allocates memory, holds no global state (only constant tables) and does
 * no I/O: every buffer belongs to the caller, inputs are `const`, and every function returns an `int` status
 * (NNP_OK == 0, errors are negative; nnp_strerror() turns them into text).
 *
 * Typical use:
 *
 *     size_t need, wlen;
 *     nnp_model *m;
 *     nnp_model_bytes(file, file_len, &need);             // validate, get storage size
 *     storage = your_alloc(need);
 *     nnp_load(file, file_len, storage, need, &m);        // decode into storage (the file may be freed after)
 *     nnp_workspace(m, NNP_WS_JACOBIAN, batch, &wlen);    // scratch size, in floats
 *     work = your_alloc(wlen * sizeof(float));
 *     nnp_jacobian(m, NNP_MODE_AUTO, batch, x, y, dy_dx, work, wlen);
 *
 * Array layouts (row-major, contiguous):
 *   x      [batch][n_in]
 *   y      [batch][n_out]
 *   dy_dx  [batch][n_out][n_in]    dy_dx[b][i][j] = d y[b][i] / d x[b][j]
 *
 * Output buffers must not overlap input buffers or the workspace. A batch of 0 is valid and does nothing
 * (pointers may then be NULL). A model is read-only after nnp_load(): one model may be used by several
 * threads at once, each with its own workspace and output buffers.
 *
 * Results do not depend on how a batch is split into calls or blocks, with one exception: a call for a
 * single point uses faster one-row kernels (in reverse mode with n_out <= 2, a path of its own) that sum in a
 * different order, so it may differ from the same point inside a larger batch by float32 rounding. NaN and
 * Inf inputs propagate; nothing traps. On x86-64 the compute loops are built for the baseline ISA and for
 * AVX2+FMA, chosen at run time.
 */
#ifndef NNP_H
#define NNP_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Weight-file format version this library reads. */
#define NNP_FORMAT_VERSION 1
/* Limits of the format. */
#define NNP_MAX_LAYERS 4096
#define NNP_MAX_DIM 65536

/* Status codes. */
#define NNP_OK 0
#define NNP_E_NULL (-1)           /* a required pointer argument is NULL */
#define NNP_E_TRUNCATED (-2)      /* the buffer ends before the file does */
#define NNP_E_BAD_MAGIC (-3)      /* the buffer does not start with "NNPK" */
#define NNP_E_VERSION (-4)        /* unsupported format version */
#define NNP_E_BAD_FIELD (-5)      /* flags, a reserved field or an unused activation parameter is not 0 */
#define NNP_E_BAD_DIM (-6)        /* a count or dimension is 0, too large, or layers do not chain */
#define NNP_E_BAD_ACTIVATION (-7) /* unknown activation code */
#define NNP_E_SIZE_MISMATCH (-8)  /* file_size field, buffer length and layer dimensions disagree */
#define NNP_E_CHECKSUM (-9)       /* CRC-32 mismatch */
#define NNP_E_NONFINITE (-10)     /* a weight, bias or activation parameter is NaN or infinite */
#define NNP_E_STORAGE (-11)       /* the model storage given to nnp_load() is too small */
#define NNP_E_WORKSPACE (-12)     /* the workspace given to a compute function is too small */
#define NNP_E_ARG (-13)           /* an invalid argument (mode, operation, batch too large, ...) */
#define NNP_E_TOO_LARGE (-14)     /* a size does not fit in size_t on this platform */
#define NNP_E_INPUT (-15)         /* an input value is NaN or infinite (the *_checked functions) */

/* Activation codes (FORMAT.md). */
#define NNP_ACT_LINEAR 0
#define NNP_ACT_RELU 1
#define NNP_ACT_LEAKY_RELU 2
#define NNP_ACT_ELU 3
#define NNP_ACT_SELU 4
#define NNP_ACT_TANH 5
#define NNP_ACT_SIGMOID 6
#define NNP_ACT_HARD_SIGMOID 7
#define NNP_ACT_SOFTPLUS 8
#define NNP_ACT_SOFTSIGN 9
#define NNP_ACT_SWISH 10
#define NNP_ACT_GELU 11
#define NNP_ACT_GELU_TANH 12
#define NNP_ACT_RELU6 13
#define NNP_ACT_EXPONENTIAL 14
#define NNP_ACT_COUNT 15

/* Jacobian modes. AUTO picks forward mode (cost ~ n_in) or reverse mode (cost ~ n_out) by shape: reverse mode when
 * n_out < n_in. For one point with n_out <= 2 (and n_out < n_in) that is the single-point reverse path (one
 * forward pass, then one backward pass per output, fused kernels); otherwise, for batches of one or two points,
 * AUTO takes forward mode when n_in <= 2 (n_out + 1) (single-row products are load-bound). */
#define NNP_MODE_AUTO 0
#define NNP_MODE_FORWARD 1
#define NNP_MODE_REVERSE 2

/* Operations, for nnp_workspace(). The F32 ones count floats, the F64 ones count doubles. */
#define NNP_WS_FORWARD 0          /* nnp_forward */
#define NNP_WS_JACOBIAN 1         /* nnp_jacobian, NNP_MODE_AUTO */
#define NNP_WS_JACOBIAN_FORWARD 2 /* nnp_jacobian, NNP_MODE_FORWARD */
#define NNP_WS_JACOBIAN_REVERSE 3 /* nnp_jacobian, NNP_MODE_REVERSE */
#define NNP_WS_FORWARD_F64 4      /* nnp_forward_f64 (doubles) */
#define NNP_WS_FD_JACOBIAN_F64 5  /* nnp_fd_jacobian_f64 (doubles) */

typedef struct nnp_model nnp_model;

/* Text for a status code (never NULL; "unknown error" for codes not listed above). */
const char *nnp_strerror(int code);

/*
 * Validate a weight file held in buf[0..len) and store in *needed the number of bytes of storage that
 * nnp_load() needs. Checks magic, version, flags and reserved fields, counts and dimensions, the file_size
 * field against len, the CRC-32 and that every real is finite. The buffer may sit at any address.
 */
int nnp_model_bytes(const unsigned char *buf, size_t len, size_t *needed);

/*
 * Validate (as nnp_model_bytes) and decode the file into storage[0..storage_len), which may sit at any
 * address; *out then points into storage. The file buffer is not referenced afterwards. The model lives as
 * long as storage does; there is nothing to free.
 */
int nnp_load(const unsigned char *buf, size_t len, void *storage, size_t storage_len, nnp_model **out);

/* Shape of a loaded model (0 when m is NULL). */
size_t nnp_n_in(const nnp_model *m);
size_t nnp_n_out(const nnp_model *m);
size_t nnp_n_layers(const nnp_model *m);

/* Describe layer k (0-based). Any output pointer may be NULL. */
int nnp_layer_info(const nnp_model *m, size_t k, size_t *rows, size_t *cols, int *activation, float *p0,
                   float *p1);

/* The mode NNP_MODE_AUTO resolves to for this model and batches of more than two points: NNP_MODE_FORWARD or
 * NNP_MODE_REVERSE (or an error). */
int nnp_auto_mode(const nnp_model *m);

/*
 * Number of workspace elements (floats for the F32 operations, doubles for the F64 ones) that operation op
 * needs for a batch of `batch` points. Any workspace at least this large works; a smaller one that still
 * holds one point's worth also works (the batch is then processed in smaller blocks). The size does not
 * grow past a fixed block of points, so large batches need no large workspace.
 *
 * Reverse mode (NNP_WS_JACOBIAN, NNP_WS_JACOBIAN_REVERSE) on batches of 256 points or more: when every
 * activation is piecewise linear (linear, relu, leaky_relu, relu6, hard_sigmoid), the size includes a cache of
 * at most 1 MiB. Points with the same activation pattern have the same Jacobian (the reverse pass depends on
 * the pattern only), so the cache keeps one per pattern and copies it: the results are bit for bit those of
 * the full computation. A workspace without room for the cache works too, without it.
 */
int nnp_workspace(const nnp_model *m, int op, size_t batch, size_t *n_elems);

/* y = f(x) in float32. */
int nnp_forward(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len);

/*
 * Analytic Jacobian in float32. y may be NULL; when not NULL it receives f(x). mode is one of NNP_MODE_*.
 * Derivatives at the kinks of piecewise activations follow TensorFlow (FORMAT.md).
 */
int nnp_jacobian(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                 float *work, size_t work_len);

/*
 * As nnp_forward and nnp_jacobian, after checking that every value of x[0..batch*n_in) is finite: a NaN or an
 * infinity gives NNP_E_INPUT and nothing is written (nnp_first_nonfinite_f32 says where it is). Argument
 * errors are reported as by the unchecked functions. One call instead of two for wrappers that validate.
 */
int nnp_forward_checked(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len);
int nnp_jacobian_checked(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                         float *work, size_t work_len);

/* y = f(x) in float64 (the float32 weights are promoted exactly). */
int nnp_forward_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *work,
                    size_t work_len);

/*
 * Finite-difference Jacobian in float64. For each point and input j: central differences with step
 * h_j = cbrt(DBL_EPSILON) * max(1, |x_j|) and h_j / 2, combined by Richardson extrapolation
 * (4 D(h/2) - D(h)) / 3. err (may be NULL) receives a per-entry error estimate, the sum of
 *   |D(h) - D(h/2)|                      (difference of the two steps; also catches noise),
 *   2 |A(h/2) - A(h) / 2|                (kink term, A(s) = (f(x+s) - 2 f(x) + f(x-s)) / s, which is s f''
 *                                         for a smooth f but stays near the jump of the slope at a kink),
 *   16 DBL_EPSILON S / (h/2)             (rounding, S = max(1, |f|, |b| + sum |a w| of the last layer) over
 *                                         the evaluations: the scale of the rounding errors in f).
 * A large estimate flags a kink of a piecewise activation
 * within a step of x. The estimate is a heuristic, not a bound: rounding inside deeply nested exponentials
 * can exceed it. y (may be NULL) receives f(x) in float64.
 */
int nnp_fd_jacobian_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *dy_dx,
                        double *err, double *work, size_t work_len);

/*
 * Index of the first NaN or infinite value in x[0..n), or n when all are finite (x may be NULL when n is 0).
 * Checks the bit patterns, so it works whatever the floating-point environment. For wrappers that validate
 * inputs before computing.
 */
size_t nnp_first_nonfinite_f32(const float *x, size_t n);
size_t nnp_first_nonfinite_f64(const double *x, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* NNP_H */
