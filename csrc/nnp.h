/*
 * nnp.h - the nnpartials C core: load a `model.nnp` weight file (see FORMAT.md), evaluate the network,
 * its analytic Jacobian, and a float64 finite-difference Jacobian with a per-entry error estimate; second
 * derivatives: the analytic Hessian, Laplacian and Hessian-vector products, and a float64 finite-difference Hessian.
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
 *   d2y_dx2 [batch][n_out][n_in][n_in]  d2y_dx2[b][i][j][k] = d2 y[b][i] / dx[b][j] dx[b][k] (symmetric in j, k)
 *   lap    [batch][n_out]          lap[b][i] = sum_j d2y_dx2[b][i][j][j]
 *   v      [batch][n_in]           a direction per point (nnp_hvp)
 *   hvp    [batch][n_out][n_in]    hvp[b][i][j] = sum_k d2y_dx2[b][i][j][k] v[b][k]
 *
 * Output buffers must not overlap input buffers or the workspace. A batch of 0 is valid and does nothing
 * (pointers may then be NULL). A model is read-only after nnp_load(): one model may be used by several
 * threads at once, each with its own workspace and output buffers.
 *
 * Results do not depend on how a batch is split into calls or blocks, with one exception: a call for a
 * single point uses faster one-row kernels (in reverse mode with n_out <= 2, a path of its own) that sum in a
 * different order, so it may differ from the same point inside a larger batch by float32 rounding. NaN and
 * Inf inputs propagate; nothing traps. On x86-64 the compute loops are built for the baseline ISA, for AVX2+FMA
 * and (the batch kernels) for AVX-512, chosen at run time when the model is loaded; the AVX2 and AVX-512 batch
 * kernels give bit-identical results. The environment variable NNP_MAX_ISA=avx2 or =base, read by nnp_load(),
 * caps the choice of that model's batch and single-point kernels (for testing and comparisons); the second-order
 * kernels are chosen by the CPU alone.
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
#define NNP_WS_HESSIAN 6          /* nnp_hessian */
#define NNP_WS_LAPLACIAN 7        /* nnp_laplacian */
#define NNP_WS_HVP 8              /* nnp_hvp */
#define NNP_WS_FD_HESSIAN_F64 9   /* nnp_fd_hessian_f64 (doubles) */

typedef struct nnp_model nnp_model;

/* Text for a status code (never NULL; "unknown error" for codes not listed above). */
const char *nnp_strerror(int code);

/*
 * Validate a weight file held in buf[0..len) and store in *needed the number of bytes of storage that
 * nnp_load() needs. Checks magic, version, flags and reserved fields, counts and dimensions, the file_size
 * field against len, the CRC-32 and that every real is finite. The buffer may sit at any address. The storage
 * holds each weight matrix four times (as stored, transposed, and both packed in panels for the batch kernels),
 * about 16 bytes per weight.
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
 * Second derivatives, float32, analytic (layouts above). y and dy_dx may be NULL; when not NULL they receive f(x)
 * and the Jacobian. Like nnp_jacobian the results do not depend on how a batch is split, and here not even a single
 * point differs from the same point in a batch; they may differ from nnp_jacobian's y and dy_dx by float32 rounding.
 *
 * Second derivatives of the activations: 0 for the piecewise-linear ones (linear, relu, leaky_relu, relu6,
 * hard_sigmoid): zero almost everywhere, and 0 at their kinks too, so a network of them has a Hessian of exactly 0.
 * elu'' = alpha e^z and selu'' = scale alpha e^z for z < 0, 0 for z > 0, and 0 at z = 0 (the z > 0 branch, as
 * TensorFlow's nested GradientTape of tf.nn.elu, Keras elu with any alpha and tf.nn.selu gives; for elu this is
 * not the branch of its first derivative, elu'(0) = alpha). softsign'' = -2 sign(z) / (1 + |z|)^3, 0 at z = 0
 * (where it jumps from 2 to -2; the nested GradientTape of z / (1 + |z|) gives 0 there, TensorFlow has no second
 * derivative of tf.nn.softsign). The smooth ones are their exact second derivatives: tanh'' = -2 f f',
 * sigmoid'' = f' (1 - 2 f), softplus'' = sigmoid(z) sigmoid(-z), swish'' = g (1 - g) (2 + z (1 - 2 g)) with g the
 * sigmoid, gelu'' = phi(z) (2 - z^2), gelu_tanh'' (through tanh), exponential'' = e^z.
 *
 * Workspace (nnp_workspace, NNP_WS_HESSIAN, NNP_WS_LAPLACIAN, NNP_WS_HVP): as for the Jacobian, it stops growing at
 * a block of points, but one point's worth grows with n_in: about 2 max_width (1 + n_in + n_in (n_in + 1) / 2)
 * floats for the Hessian of a model with n_out >= n_in (n_in + 1) / 2 (forward over forward: the value, n_in
 * tangent rows and one row per pair j <= k), (n_in + 3) sum_of_widths + (n_in + 1 + 2 n_out) max_width otherwise (a
 * forward pass keeping every layer's tangents, then one adjoint row per output: cheaper when there are few outputs),
 * 2 max_width (2 + n_in) for the Laplacian and 2 max_width (2 + 2 n_in) for Hessian-vector products. A size that
 * does not fit in size_t gives NNP_E_TOO_LARGE.
 */

/* The Hessian of every output. */
int nnp_hessian(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *d2y_dx2, float *work,
                size_t work_len);

/*
 * The Laplacian of every output (the trace of its Hessian), by one forward pass that carries per point the value,
 * the n_in tangent rows and one Laplacian row through each layer: for z = a W + b, a' = f(z),
 *   T' = f'(z) * (T W),   L' = f'(z) * (L W) + f''(z) * sum_j (T_j W)^2   (elementwise),
 * never the full Hessian: its cost grows like n_in, not n_in^2.
 */
int nnp_laplacian(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *lap, float *work,
                  size_t work_len);

/*
 * Hessian-vector products: hvp[b][i] = H_i(x[b]) v[b] for every output i, by one forward pass over the forward
 * pass of the direction v: per point the value, the tangents of the n_in inputs and of v, and the n_in rows of H v
 * (cost ~ n_in, not n_in^2). v is required (NULL gives NNP_E_NULL) and may hold any values; y may be NULL.
 */
int nnp_hvp(const nnp_model *m, size_t batch, const float *x, const float *v, float *y, float *hvp, float *work,
            size_t work_len);

/*
 * Finite-difference Hessian in float64: central differences of the analytic float64 Jacobian (forward mode, the
 * weights promoted exactly), with the steps, Richardson extrapolation and error estimate of nnp_fd_jacobian_f64
 * applied to J instead of f: for each point and input j, h_j = cbrt(DBL_EPSILON) * max(1, |x_j|) and h_j / 2,
 * column j of every output's Hessian = (4 D(h/2) - D(h)) / 3, D(s) = (J(x + s e_j) - J(x - s e_j)) / 2s; the
 * estimate is the sum of |D(h) - D(h/2)|, the kink term 2 |A(h/2) - A(h) / 2| with A(s) = (J(x + s e_j) - 2 J(x) +
 * J(x - s e_j)) / s (near a kink of a piecewise activation J jumps and this term is large), and the rounding term
 * 16 DBL_EPSILON S / (h/2) with S = max(1, |J|, |f'(z_i)| sum |T_j W[:, i]| of the last layer) over the evaluations.
 * The result is symmetrized: entries (j, k) and (k, j) both receive the mean of the two estimates, and the error
 * estimate the larger of the mean of their two estimates and half their difference. err (may be NULL) has the
 * layout of d2y_dx2. A heuristic, not a bound (as for the Jacobian). y (may be NULL) receives f(x) in float64.
 * Cost per point: 1 + 4 n_in float64 Jacobians. The workspace (NNP_WS_FD_HESSIAN_F64) does not depend on the batch.
 */
int nnp_fd_hessian_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *d2y_dx2, double *err,
                       double *work, size_t work_len);

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
