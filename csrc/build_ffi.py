"""cffi build script for ``nnpartials._core`` (API mode, out-of-line), compiled from the C core's units (``SOURCES``).

Used by ``setup.py`` (``cffi_modules=["csrc/build_ffi.py:ffibuilder"]``). The cdef below mirrors ``csrc/nnp.h``;
``tests/test_c_build.py::test_cdef_matches_header`` checks that they agree.
"""

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# The library's units: every csrc/nnp*.c, as in csrc/Makefile's SRCS (tests/test_c_build.py checks that they agree).
SOURCES = ["nnp.c", "nnp_format.c", "nnp_batch.c", "nnp_point.c", "nnp_fd.c", "nnp_second.c"]
HEADERS = ["nnp.h", "nnp_internal.h", "nnp_simd.h", "nnp_kernels.h"]

CDEF = """
#define NNP_FORMAT_VERSION 1
#define NNP_MAX_LAYERS 4096
#define NNP_MAX_DIM 65536

#define NNP_OK 0
#define NNP_E_NULL -1
#define NNP_E_TRUNCATED -2
#define NNP_E_BAD_MAGIC -3
#define NNP_E_VERSION -4
#define NNP_E_BAD_FIELD -5
#define NNP_E_BAD_DIM -6
#define NNP_E_BAD_ACTIVATION -7
#define NNP_E_SIZE_MISMATCH -8
#define NNP_E_CHECKSUM -9
#define NNP_E_NONFINITE -10
#define NNP_E_STORAGE -11
#define NNP_E_WORKSPACE -12
#define NNP_E_ARG -13
#define NNP_E_TOO_LARGE -14
#define NNP_E_INPUT -15

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

#define NNP_MODE_AUTO 0
#define NNP_MODE_FORWARD 1
#define NNP_MODE_REVERSE 2

#define NNP_WS_FORWARD 0
#define NNP_WS_JACOBIAN 1
#define NNP_WS_JACOBIAN_FORWARD 2
#define NNP_WS_JACOBIAN_REVERSE 3
#define NNP_WS_FORWARD_F64 4
#define NNP_WS_FD_JACOBIAN_F64 5
#define NNP_WS_HESSIAN 6
#define NNP_WS_LAPLACIAN 7
#define NNP_WS_HVP 8
#define NNP_WS_FD_HESSIAN_F64 9

typedef struct nnp_model nnp_model;

const char *nnp_strerror(int code);
int nnp_model_bytes(const unsigned char *buf, size_t len, size_t *needed);
int nnp_load(const unsigned char *buf, size_t len, void *storage, size_t storage_len, nnp_model **out);
size_t nnp_n_in(const nnp_model *m);
size_t nnp_n_out(const nnp_model *m);
size_t nnp_n_layers(const nnp_model *m);
int nnp_layer_info(const nnp_model *m, size_t k, size_t *rows, size_t *cols, int *activation, float *p0,
                   float *p1);
int nnp_auto_mode(const nnp_model *m);
int nnp_workspace(const nnp_model *m, int op, size_t batch, size_t *n_elems);
int nnp_forward(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len);
int nnp_jacobian(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                 float *work, size_t work_len);
int nnp_forward_checked(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len);
int nnp_jacobian_checked(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                         float *work, size_t work_len);
int nnp_forward_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *work,
                    size_t work_len);
int nnp_fd_jacobian_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *dy_dx,
                        double *err, double *work, size_t work_len);
int nnp_hessian(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *d2y_dx2, float *work,
                size_t work_len);
int nnp_laplacian(const nnp_model *m, size_t batch, const float *x, float *y, float *dy_dx, float *lap, float *work,
                  size_t work_len);
int nnp_hvp(const nnp_model *m, size_t batch, const float *x, const float *v, float *y, float *hvp, float *work,
            size_t work_len);
int nnp_fd_hessian_f64(const nnp_model *m, size_t batch, const double *x, double *y, double *d2y_dx2, double *err,
                       double *work, size_t work_len);
size_t nnp_first_nonfinite_f32(const float *x, size_t n);
size_t nnp_first_nonfinite_f64(const double *x, size_t n);
"""


def _compile_args():
    if sys.platform == "win32" and "GCC" not in sys.version:
        return ["/O2", "/fp:precise"]
    # No -march=native: the module must run on any CPU of its platform; on x86-64 the compute kernels pick an
    # AVX2+FMA build at run time. Same floating-point flags as csrc/Makefile (see there).
    return ["-O3", "-std=c99", "-ffp-contract=fast", "-fno-trapping-math"]


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "nnpartials._core",
    '#include "nnp.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, f)) for f in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(os.path.join(HERE, f)) for f in HEADERS],
    extra_compile_args=_compile_args(),
    libraries=[] if sys.platform == "win32" else ["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
