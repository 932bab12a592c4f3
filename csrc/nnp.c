/*
 * nnp.c - the nnpartials C core. See nnp.h for the API and FORMAT.md for the weight file.
 *
 * Layout of a loaded model (inside the caller's storage, aligned to 64 bytes):
 *   struct nnp_model | nnp_layer[n_layers] | per layer: W[rows][cols], b[cols], Wt[cols][rows]
 * W is kept twice (as stored and transposed) so that both the forward products (x W) and the reverse ones
 * (g W^T) run over contiguous memory.
 *
 * Computation is blocked: a block of points goes through the whole network before the next block starts,
 * so that its activations stay in cache. Every product is a small matrix product C = A B computed by
 * register-tiled kernels whose inner loops run over contiguous columns (the compiler vectorizes them).
 */
/* Floating-point code generation, whatever flags the library is built with (the builds also pass them):
 * - the library never reads floating-point exception flags, so GCC may treat floating-point operations as
 *   non-trapping (Clang's default), which lets it turn the selects of piecewise activations into vector code;
 * - a * b + c may be fused into one multiply-add (GCC's ISO modes turn that off; Clang fuses within an
 *   expression by default, which covers the kernels).
 * Neither permits reassociation. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#endif

#include "nnp.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if FLT_RADIX != 2 || FLT_MANT_DIG != 24 || DBL_MANT_DIG != 53
#error "nnp.c needs IEEE-754 binary32 float and binary64 double"
#endif
typedef char nnp_check_float_size[(sizeof(float) == 4 && sizeof(uint32_t) == 4) ? 1 : -1];

/* On x86-64 with GCC or Clang, the matrix kernels are compiled twice (baseline and AVX2+FMA) and chosen at
 * run time from the CPU's features; elsewhere, or with -DNNP_NO_DISPATCH, they are built once for the target
 * the compiler uses. */
#if !defined(NNP_NO_DISPATCH) && defined(__x86_64__) &&                                                       \
    ((defined(__clang__) && __clang_major__ >= 6) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 6))
#define NNP_X86_DISPATCH 1
#else
#define NNP_X86_DISPATCH 0
#endif
/* Block functions are compiled twice on x86-64 (baseline and AVX2+FMA) from one always-inline body. */
#if NNP_X86_DISPATCH
#define NNP_DISPATCHED(NAME, PARAMS, ARGS)                                                                     \
    static void NAME##_base PARAMS { NAME##_body ARGS; }                                                       \
    __attribute__((target("avx2,fma"))) static void NAME##_avx2 PARAMS { NAME##_body ARGS; }                  \
    static void NAME PARAMS                                                                                    \
    {                                                                                                          \
        if (have_avx2_fma())                                                                                   \
            NAME##_avx2 ARGS;                                                                                  \
        else                                                                                                   \
            NAME##_base ARGS;                                                                                  \
    }
#else
#define NNP_DISPATCHED(NAME, PARAMS, ARGS)                                                                     \
    static void NAME PARAMS { NAME##_body ARGS; }
#endif
#define NNP_RESTRICT restrict

#if defined(__GNUC__) || defined(__clang__)
#define NNP_INLINE static inline __attribute__((always_inline))
#else
#define NNP_INLINE static inline
#endif

#define NNP_HEADER_BYTES 32u
#define NNP_RECORD_BYTES 24u
#define NNP_ALIGN 64u
#define NNP_MODEL_TAG 0x4d50504eu /* "NPPM": marks an initialised model */
/* A block of points is sized so that its activation buffers hold about this many floats. */
#define NNP_BLOCK_FLOATS 16384u
#define NNP_MAX_BLOCK 72u
/* Single-point backward products of layers with at least this many columns read W by rows (dot products with
 * the adjoint); narrower ones read Wt like the forward products. */
#ifndef NNP_SP_ROWDOTS
#define NNP_SP_ROWDOTS 8u
#endif
/* Single-point reverse path (one backward pass per output): used for one point with at most this many outputs
 * (beyond it, the batch path's products, which share each weight load among the outputs, are faster). */
#ifndef NNP_SP_MAX_OUT
#define NNP_SP_MAX_OUT 2u
#endif
/* Row dot products: at most this many rows left are done one at a time (shorter dependency chains) */
#ifndef NNP_SP_FEW
#define NNP_SP_FEW 4u
#endif
/* rounding part of the finite-difference error estimate, in units of DBL_EPSILON * max(1, |f|) / h */
#ifndef NNP_FD_ROUNDING
#define NNP_FD_ROUNDING 16.0
#endif

typedef struct nnp_layer {
    size_t rows, cols;
    int act;
    float p0, p1;
    const float *W;  /* [rows][cols] */
    const float *b;  /* [cols] */
    const float *Wt; /* [cols][rows] */
} nnp_layer;

struct nnp_model {
    uint32_t tag;
    size_t n_in, n_out, n_layers;
    size_t max_cols; /* largest layer output width */
    size_t sum_cols; /* sum of layer output widths */
    size_t pattern_bits; /* bits of an activation pattern: one per unit of a non-linear layer, each layer
                            padded to whole bytes */
    int piecewise;       /* every activation is piecewise linear: linear, relu, leaky_relu, relu6, hard_sigmoid */
    const nnp_layer *layers;
};

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
/* Overflow-checked size arithmetic                                                                       */

static int add_sz(size_t a, size_t b, size_t *r)
{
    if (a > SIZE_MAX - b) return 0;
    *r = a + b;
    return 1;
}

static int mul_sz(size_t a, size_t b, size_t *r)
{
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *r = a * b;
    return 1;
}

/* bytes rounded up to NNP_ALIGN */
static int round_up(size_t bytes, size_t *r)
{
    if (!add_sz(bytes, NNP_ALIGN - 1, r)) return 0;
    *r -= *r % NNP_ALIGN;
    return 1;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Little-endian decoding and CRC-32                                                                      */

static uint32_t rd_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t rd_u64(const unsigned char *p)
{
    return (uint64_t)rd_u32(p) | ((uint64_t)rd_u32(p + 4) << 32);
}

static float rd_f32(const unsigned char *p)
{
    uint32_t u = rd_u32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static int finite_bits(const unsigned char *p)
{
    return (rd_u32(p) & 0x7f800000u) != 0x7f800000u;
}

static const uint32_t crc_table[256] = {
    0x00000000u, 0x77073096u, 0xee0e612cu, 0x990951bau, 0x076dc419u, 0x706af48fu, 0xe963a535u, 0x9e6495a3u,
    0x0edb8832u, 0x79dcb8a4u, 0xe0d5e91eu, 0x97d2d988u, 0x09b64c2bu, 0x7eb17cbdu, 0xe7b82d07u, 0x90bf1d91u,
    0x1db71064u, 0x6ab020f2u, 0xf3b97148u, 0x84be41deu, 0x1adad47du, 0x6ddde4ebu, 0xf4d4b551u, 0x83d385c7u,
    0x136c9856u, 0x646ba8c0u, 0xfd62f97au, 0x8a65c9ecu, 0x14015c4fu, 0x63066cd9u, 0xfa0f3d63u, 0x8d080df5u,
    0x3b6e20c8u, 0x4c69105eu, 0xd56041e4u, 0xa2677172u, 0x3c03e4d1u, 0x4b04d447u, 0xd20d85fdu, 0xa50ab56bu,
    0x35b5a8fau, 0x42b2986cu, 0xdbbbc9d6u, 0xacbcf940u, 0x32d86ce3u, 0x45df5c75u, 0xdcd60dcfu, 0xabd13d59u,
    0x26d930acu, 0x51de003au, 0xc8d75180u, 0xbfd06116u, 0x21b4f4b5u, 0x56b3c423u, 0xcfba9599u, 0xb8bda50fu,
    0x2802b89eu, 0x5f058808u, 0xc60cd9b2u, 0xb10be924u, 0x2f6f7c87u, 0x58684c11u, 0xc1611dabu, 0xb6662d3du,
    0x76dc4190u, 0x01db7106u, 0x98d220bcu, 0xefd5102au, 0x71b18589u, 0x06b6b51fu, 0x9fbfe4a5u, 0xe8b8d433u,
    0x7807c9a2u, 0x0f00f934u, 0x9609a88eu, 0xe10e9818u, 0x7f6a0dbbu, 0x086d3d2du, 0x91646c97u, 0xe6635c01u,
    0x6b6b51f4u, 0x1c6c6162u, 0x856530d8u, 0xf262004eu, 0x6c0695edu, 0x1b01a57bu, 0x8208f4c1u, 0xf50fc457u,
    0x65b0d9c6u, 0x12b7e950u, 0x8bbeb8eau, 0xfcb9887cu, 0x62dd1ddfu, 0x15da2d49u, 0x8cd37cf3u, 0xfbd44c65u,
    0x4db26158u, 0x3ab551ceu, 0xa3bc0074u, 0xd4bb30e2u, 0x4adfa541u, 0x3dd895d7u, 0xa4d1c46du, 0xd3d6f4fbu,
    0x4369e96au, 0x346ed9fcu, 0xad678846u, 0xda60b8d0u, 0x44042d73u, 0x33031de5u, 0xaa0a4c5fu, 0xdd0d7cc9u,
    0x5005713cu, 0x270241aau, 0xbe0b1010u, 0xc90c2086u, 0x5768b525u, 0x206f85b3u, 0xb966d409u, 0xce61e49fu,
    0x5edef90eu, 0x29d9c998u, 0xb0d09822u, 0xc7d7a8b4u, 0x59b33d17u, 0x2eb40d81u, 0xb7bd5c3bu, 0xc0ba6cadu,
    0xedb88320u, 0x9abfb3b6u, 0x03b6e20cu, 0x74b1d29au, 0xead54739u, 0x9dd277afu, 0x04db2615u, 0x73dc1683u,
    0xe3630b12u, 0x94643b84u, 0x0d6d6a3eu, 0x7a6a5aa8u, 0xe40ecf0bu, 0x9309ff9du, 0x0a00ae27u, 0x7d079eb1u,
    0xf00f9344u, 0x8708a3d2u, 0x1e01f268u, 0x6906c2feu, 0xf762575du, 0x806567cbu, 0x196c3671u, 0x6e6b06e7u,
    0xfed41b76u, 0x89d32be0u, 0x10da7a5au, 0x67dd4accu, 0xf9b9df6fu, 0x8ebeeff9u, 0x17b7be43u, 0x60b08ed5u,
    0xd6d6a3e8u, 0xa1d1937eu, 0x38d8c2c4u, 0x4fdff252u, 0xd1bb67f1u, 0xa6bc5767u, 0x3fb506ddu, 0x48b2364bu,
    0xd80d2bdau, 0xaf0a1b4cu, 0x36034af6u, 0x41047a60u, 0xdf60efc3u, 0xa867df55u, 0x316e8eefu, 0x4669be79u,
    0xcb61b38cu, 0xbc66831au, 0x256fd2a0u, 0x5268e236u, 0xcc0c7795u, 0xbb0b4703u, 0x220216b9u, 0x5505262fu,
    0xc5ba3bbeu, 0xb2bd0b28u, 0x2bb45a92u, 0x5cb36a04u, 0xc2d7ffa7u, 0xb5d0cf31u, 0x2cd99e8bu, 0x5bdeae1du,
    0x9b64c2b0u, 0xec63f226u, 0x756aa39cu, 0x026d930au, 0x9c0906a9u, 0xeb0e363fu, 0x72076785u, 0x05005713u,
    0x95bf4a82u, 0xe2b87a14u, 0x7bb12baeu, 0x0cb61b38u, 0x92d28e9bu, 0xe5d5be0du, 0x7cdcefb7u, 0x0bdbdf21u,
    0x86d3d2d4u, 0xf1d4e242u, 0x68ddb3f8u, 0x1fda836eu, 0x81be16cdu, 0xf6b9265bu, 0x6fb077e1u, 0x18b74777u,
    0x88085ae6u, 0xff0f6a70u, 0x66063bcau, 0x11010b5cu, 0x8f659effu, 0xf862ae69u, 0x616bffd3u, 0x166ccf45u,
    0xa00ae278u, 0xd70dd2eeu, 0x4e048354u, 0x3903b3c2u, 0xa7672661u, 0xd06016f7u, 0x4969474du, 0x3e6e77dbu,
    0xaed16a4au, 0xd9d65adcu, 0x40df0b66u, 0x37d83bf0u, 0xa9bcae53u, 0xdebb9ec5u, 0x47b2cf7fu, 0x30b5ffe9u,
    0xbdbdf21cu, 0xcabac28au, 0x53b39330u, 0x24b4a3a6u, 0xbad03605u, 0xcdd70693u, 0x54de5729u, 0x23d967bfu,
    0xb3667a2eu, 0xc4614ab8u, 0x5d681b02u, 0x2a6f2b94u, 0xb40bbe37u, 0xc30c8ea1u, 0x5a05df1bu, 0x2d02ef8du,
};

static uint32_t crc32_ieee(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    size_t i;
    for (i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 0xffu] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Validation                                                                                             */

/* Which of p0, p1 an activation uses: bit 0 = p0, bit 1 = p1. */
static const unsigned char act_params[NNP_ACT_COUNT] = {0, 0, 1, 1, 3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0};

typedef struct {
    size_t n_in, n_out, n_layers, n_params, max_cols, sum_cols, storage;
} nnp_info;

/* Full validation of buf[0..len). Fills *info on success. */
static int validate(const unsigned char *buf, size_t len, nnp_info *info)
{
    size_t n_in, n_out, n_layers, k, prev, params = 0, body, total, storage, max_cols = 0, sum_cols = 0;
    uint64_t file_size;
    const unsigned char *rec;

    if (buf == NULL && len != 0) return NNP_E_NULL;
    if (len < 4) return NNP_E_TRUNCATED;
    if (buf[0] != 'N' || buf[1] != 'N' || buf[2] != 'P' || buf[3] != 'K') return NNP_E_BAD_MAGIC;
    if (len < NNP_HEADER_BYTES) return NNP_E_TRUNCATED;
    if (rd_u32(buf + 4) != NNP_FORMAT_VERSION) return NNP_E_VERSION;
    file_size = rd_u64(buf + 24);
    if (file_size > (uint64_t)len) return NNP_E_TRUNCATED;
    if (file_size < (uint64_t)len) return NNP_E_SIZE_MISMATCH;
    if (rd_u32(buf + 20) != 0) return NNP_E_BAD_FIELD;
    if (rd_u32(buf + 8) < 1 || rd_u32(buf + 8) > NNP_MAX_DIM) return NNP_E_BAD_DIM;
    if (rd_u32(buf + 12) < 1 || rd_u32(buf + 12) > NNP_MAX_DIM) return NNP_E_BAD_DIM;
    if (rd_u32(buf + 16) < 1 || rd_u32(buf + 16) > NNP_MAX_LAYERS) return NNP_E_BAD_DIM;
    n_in = (size_t)rd_u32(buf + 8);
    n_out = (size_t)rd_u32(buf + 12);
    n_layers = (size_t)rd_u32(buf + 16);

    /* header + records + checksum; n_layers <= 4096 so this cannot overflow */
    body = NNP_HEADER_BYTES + NNP_RECORD_BYTES * n_layers;
    if (len < body + 4) return NNP_E_SIZE_MISMATCH;

    /* storage: aligned model struct and layer table, then aligned W, b, Wt per layer */
    if (!round_up(sizeof(struct nnp_model), &storage)) return NNP_E_TOO_LARGE;
    {
        size_t t;
        if (!mul_sz(n_layers, sizeof(nnp_layer), &t) || !round_up(t, &t) || !add_sz(storage, t, &storage) ||
            !add_sz(storage, NNP_ALIGN - 1, &storage))
            return NNP_E_TOO_LARGE;
    }

    prev = n_in;
    for (k = 0; k < n_layers; k++) {
        size_t rows, cols, rc, lp, bytes;
        uint32_t act;
        rec = buf + NNP_HEADER_BYTES + NNP_RECORD_BYTES * k;
        if (rd_u32(rec) < 1 || rd_u32(rec) > NNP_MAX_DIM) return NNP_E_BAD_DIM;
        if (rd_u32(rec + 4) < 1 || rd_u32(rec + 4) > NNP_MAX_DIM) return NNP_E_BAD_DIM;
        rows = (size_t)rd_u32(rec);
        cols = (size_t)rd_u32(rec + 4);
        if (rows != prev) return NNP_E_BAD_DIM;
        if (k + 1 == n_layers && cols != n_out) return NNP_E_BAD_DIM;
        act = rd_u32(rec + 8);
        if (act >= NNP_ACT_COUNT) return NNP_E_BAD_ACTIVATION;
        if (rd_u32(rec + 12) != 0) return NNP_E_BAD_FIELD;
        if (!finite_bits(rec + 16) || !finite_bits(rec + 20)) return NNP_E_NONFINITE;
        /* unused parameters must be +0 or -0 */
        if (!(act_params[act] & 1u) && (rd_u32(rec + 16) & 0x7fffffffu) != 0) return NNP_E_BAD_FIELD;
        if (!(act_params[act] & 2u) && (rd_u32(rec + 20) & 0x7fffffffu) != 0) return NNP_E_BAD_FIELD;
        prev = cols;
        if (!mul_sz(rows, cols, &rc) || !add_sz(rc, cols, &lp) || !add_sz(params, lp, &params))
            return NNP_E_TOO_LARGE;
        /* storage for W, b and Wt */
        {
            size_t wb, bb;
            if (!mul_sz(rc, sizeof(float), &wb) || !round_up(wb, &wb) || !mul_sz(cols, sizeof(float), &bb) ||
                !round_up(bb, &bb) || !mul_sz(wb, 2, &bytes) || !add_sz(bytes, bb, &bytes) ||
                !add_sz(storage, bytes, &storage))
                return NNP_E_TOO_LARGE;
        }
        if (cols > max_cols) max_cols = cols;
        sum_cols += cols; /* <= 4096 * 65536 */
    }

    /* total = body + 4 * params + 4 */
    if (!mul_sz(params, 4, &total) || !add_sz(total, body + 4, &total)) return NNP_E_SIZE_MISMATCH;
    if (total != len) return NNP_E_SIZE_MISMATCH;
    if (crc32_ieee(buf, len - 4) != rd_u32(buf + len - 4)) return NNP_E_CHECKSUM;
    {
        const unsigned char *p = buf + body, *end = buf + len - 4;
        for (; p < end; p += 4)
            if (!finite_bits(p)) return NNP_E_NONFINITE;
    }
    if (info != NULL) {
        info->n_in = n_in;
        info->n_out = n_out;
        info->n_layers = n_layers;
        info->n_params = params;
        info->max_cols = max_cols;
        info->sum_cols = sum_cols;
        info->storage = storage;
    }
    return NNP_OK;
}

int nnp_model_bytes(const unsigned char *buf, size_t len, size_t *needed)
{
    nnp_info info;
    int rc;
    if (buf == NULL || needed == NULL) return NNP_E_NULL;
    rc = validate(buf, len, &info);
    if (rc != NNP_OK) return rc;
    *needed = info.storage;
    return NNP_OK;
}

static unsigned char *align_ptr(unsigned char *p)
{
    size_t mis = (size_t)((uintptr_t)p % NNP_ALIGN);
    return mis ? p + (NNP_ALIGN - mis) : p;
}

int nnp_load(const unsigned char *buf, size_t len, void *storage, size_t storage_len, nnp_model **out)
{
    nnp_info info;
    int rc;
    unsigned char *base, *p;
    struct nnp_model *m;
    nnp_layer *layers;
    size_t k, off;

    if (out != NULL) *out = NULL;
    if (buf == NULL || storage == NULL || out == NULL) return NNP_E_NULL;
    rc = validate(buf, len, &info);
    if (rc != NNP_OK) return rc;
    if (storage_len < info.storage) return NNP_E_STORAGE;
#if NNP_X86_DISPATCH
    __builtin_cpu_init(); /* idempotent; makes the feature checks valid even before constructors ran */
#endif

    /* All offsets below stay within info.storage bytes of storage (validate() summed the same terms). */
    base = align_ptr((unsigned char *)storage);
    m = (struct nnp_model *)(void *)base;
    p = base + ((sizeof(struct nnp_model) + NNP_ALIGN - 1) / NNP_ALIGN) * NNP_ALIGN;
    layers = (nnp_layer *)(void *)p;
    p += ((info.n_layers * sizeof(nnp_layer) + NNP_ALIGN - 1) / NNP_ALIGN) * NNP_ALIGN;

    off = NNP_HEADER_BYTES + NNP_RECORD_BYTES * info.n_layers; /* first parameter byte */
    for (k = 0; k < info.n_layers; k++) {
        const unsigned char *rec = buf + NNP_HEADER_BYTES + NNP_RECORD_BYTES * k;
        size_t rows = (size_t)rd_u32(rec), cols = (size_t)rd_u32(rec + 4), rc_ = rows * cols, i, j;
        size_t wbytes = ((rc_ * sizeof(float) + NNP_ALIGN - 1) / NNP_ALIGN) * NNP_ALIGN;
        size_t bbytes = ((cols * sizeof(float) + NNP_ALIGN - 1) / NNP_ALIGN) * NNP_ALIGN;
        float *W = (float *)(void *)p;
        float *b = (float *)(void *)(p + wbytes);
        float *Wt = (float *)(void *)(p + wbytes + bbytes);
        for (i = 0; i < rows; i++)
            for (j = 0; j < cols; j++) {
                float w = rd_f32(buf + off + 4 * (i * cols + j));
                W[i * cols + j] = w;
                Wt[j * rows + i] = w;
            }
        off += 4 * rc_;
        for (j = 0; j < cols; j++) b[j] = rd_f32(buf + off + 4 * j);
        off += 4 * cols;
        layers[k].rows = rows;
        layers[k].cols = cols;
        layers[k].act = (int)rd_u32(rec + 8);
        layers[k].p0 = rd_f32(rec + 16);
        layers[k].p1 = rd_f32(rec + 20);
        layers[k].W = W;
        layers[k].b = b;
        layers[k].Wt = Wt;
        p += 2 * wbytes + bbytes;
    }
    m->tag = NNP_MODEL_TAG;
    m->n_in = info.n_in;
    m->n_out = info.n_out;
    m->n_layers = info.n_layers;
    m->max_cols = info.max_cols;
    m->sum_cols = info.sum_cols;
    m->layers = layers;
    m->pattern_bits = 0;
    m->piecewise = 1;
    for (k = 0; k < info.n_layers; k++) {
        switch (layers[k].act) {
        case NNP_ACT_LINEAR: break;
        case NNP_ACT_RELU:
        case NNP_ACT_LEAKY_RELU:
        case NNP_ACT_RELU6:
        case NNP_ACT_HARD_SIGMOID: m->pattern_bits += 8 * ((layers[k].cols + 7) / 8); break;
        default: m->piecewise = 0; break;
        }
    }
    *out = m;
    return NNP_OK;
}

static int model_ok(const nnp_model *m)
{
    return m != NULL && m->tag == NNP_MODEL_TAG;
}

size_t nnp_n_in(const nnp_model *m) { return model_ok(m) ? m->n_in : 0; }
size_t nnp_n_out(const nnp_model *m) { return model_ok(m) ? m->n_out : 0; }
size_t nnp_n_layers(const nnp_model *m) { return model_ok(m) ? m->n_layers : 0; }

int nnp_layer_info(const nnp_model *m, size_t k, size_t *rows, size_t *cols, int *activation, float *p0,
                   float *p1)
{
    const nnp_layer *L;
    if (m == NULL) return NNP_E_NULL;
    if (!model_ok(m) || k >= m->n_layers) return NNP_E_ARG;
    L = &m->layers[k];
    if (rows) *rows = L->rows;
    if (cols) *cols = L->cols;
    if (activation) *activation = L->act;
    if (p0) *p0 = L->p0;
    if (p1) *p1 = L->p1;
    return NNP_OK;
}

int nnp_auto_mode(const nnp_model *m)
{
    if (m == NULL) return NNP_E_NULL;
    if (!model_ok(m)) return NNP_E_ARG;
    /* Forward mode costs about (1 + n_in) matrix products per layer, reverse mode (1 + n_out) plus keeping
     * every layer's derivative; forward mode wins ties (one pass, less memory). */
    return (m->n_out < m->n_in) ? NNP_MODE_REVERSE : NNP_MODE_FORWARD;
}

/* Pattern cache sizes (see the pattern cache section below) */
#define NNP_CACHE_MIN_BATCH 256u
#define NNP_CACHE_BYTES ((size_t)1 << 20)
#define NNP_CACHE_MAX_ENTRY_SLOTS 1024u

typedef struct {
    size_t pw;    /* 4-byte slots of a pattern (one bit per unit of a non-linear layer, zero padded) */
    size_t jn;    /* floats of one Jacobian */
    size_t slots; /* slots of one entry: tag, pattern, Jacobian */
    size_t cap;   /* entries (power of two) */
    size_t table; /* slots of the table */
    size_t extra; /* slots per point of the block: current patterns and hashes, and the queue of misses
                     (derivatives, pattern, hash, destination, Jacobian) */
} cache_shape_t;

static int cache_shape(const nnp_model *m, cache_shape_t *cs)
{
    size_t cap = 1;
    if (!m->piecewise) return 0;
    cs->pw = (m->pattern_bits + 31) / 32;
    cs->jn = m->n_in * m->n_out; /* <= NNP_MAX_DIM^2: fits */
    if (cs->pw + cs->jn + 1 > NNP_CACHE_MAX_ENTRY_SLOTS) return 0;
    cs->slots = 1 + cs->pw + cs->jn;
    while (cap * 2 * cs->slots * 4 <= NNP_CACHE_BYTES && cap < 65536) cap *= 2; /* fits in a typical L2 */
    if (cap < 64) return 0;
    cs->cap = cap;
    cs->table = cap * cs->slots;
    cs->extra = (cs->pw + 1) + (m->sum_cols + cs->pw + 1 + 2 + cs->jn);
    return 1;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Workspace                                                                                              */

/* Workspace of an operation: fixed + per_point * block elements. */
static int ws_shape(const nnp_model *m, int op, size_t *fixed, size_t *per_point)
{
    size_t t, u;
    *fixed = 0;
    switch (op) {
    case NNP_WS_FORWARD:
    case NNP_WS_FORWARD_F64:
        /* two ping-pong activation buffers */
        if (!mul_sz(2, m->max_cols, per_point)) return NNP_E_TOO_LARGE;
        return NNP_OK;
    case NNP_WS_JACOBIAN_FORWARD:
        /* two ping-pong buffers of (1 + n_in) rows (value and tangents) per point, one derivative row */
        *fixed = m->max_cols;
        if (!mul_sz(m->n_in + 1, m->max_cols, &t) || !mul_sz(2, t, per_point)) return NNP_E_TOO_LARGE;
        return NNP_OK;
    case NNP_WS_JACOBIAN_REVERSE:
        /* values (2 rows), every layer's derivative, two adjoint buffers of n_out rows */
        if (!mul_sz(m->n_out, m->max_cols, &t) || !mul_sz(2, t, &t) || !mul_sz(2, m->max_cols, &u) ||
            !add_sz(t, u, &t) || !add_sz(t, m->sum_cols, per_point))
            return NNP_E_TOO_LARGE;
        return NNP_OK;
    case NNP_WS_FD_JACOBIAN_F64:
        /* 4 perturbed points, their 4 outputs and output scales, f(x), and the float64 forward workspace for
         * 4 points; per point nothing more */
        if (!mul_sz(4, m->n_in, &t) || !mul_sz(9, m->n_out, &u) || !add_sz(t, u, &t) ||
            !mul_sz(8, m->max_cols, &u) || !add_sz(t, u, fixed))
            return NNP_E_TOO_LARGE;
        *per_point = 0;
        return NNP_OK;
    default:
        return NNP_E_ARG;
    }
}

static size_t max_block(size_t per_point)
{
    size_t b = per_point ? NNP_BLOCK_FLOATS / per_point : NNP_MAX_BLOCK;
    if (b < 1) b = 1;
    if (b > NNP_MAX_BLOCK) b = NNP_MAX_BLOCK;
    if (b >= 24) b -= b % 24; /* whole row groups of the kernels (6 and 8 rows) */
    return b;
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
        cache_shape_t cs;
        if (cache_shape(m, &cs)) { /* room for the pattern cache (a few hundred kB at most) */
            fixed = cs.table;
            per_point += cs.extra;
        }
    }
    blk = max_block(per_point);
    if (blk > batch) blk = batch;
    if (!mul_sz(blk, per_point, &t) || !add_sz(t, fixed, &t)) return NNP_E_TOO_LARGE;
    *n_elems = t;
    return NNP_OK;
}

/* Block size usable with work_len elements, or 0 when not even one point fits. */
static size_t block_for(size_t fixed, size_t per_point, size_t batch, size_t work_len)
{
    size_t blk = max_block(per_point);
    if (blk > batch) blk = batch;
    if (work_len < fixed) return 0;
    if (per_point == 0) return blk;
    if ((work_len - fixed) / per_point < blk) blk = (work_len - fixed) / per_point;
    return blk;
}

/* Common argument checks; also rejects batches whose arrays could not be addressed. */
static int check_call(const nnp_model *m, size_t batch, const void *x, const void *y, int need_y, const void *work,
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
/* Matrix product kernels (float32)                                                                       */
/*
 * C[m][n] (row stride ldc) = A[m][k] (row stride lda) * B[k][n] (row stride n); Bt is B transposed ([n][k],
 * row stride k), used for narrow column remainders where a dot product over contiguous k is faster.
 */

#if (defined(__GNUC__) || defined(__clang__)) && !defined(NNP_PLAIN_C)
/* GCC/Clang vector extensions: 8 floats, one AVX register in the AVX2 clone, two SSE registers otherwise
 * (-DNNP_PLAIN_C builds the plain C99 versions below instead, for testing them).
 * The kernels sum over k in order, except the split-sum single-row ones (used only when a call has one point), so
 * a point evaluated alone may differ from the same point evaluated in a batch by float32 rounding. */
typedef float nnp_v8 __attribute__((vector_size(32)));
/* the same vector at any float-aligned address, allowed to alias float */
typedef float nnp_v8u __attribute__((vector_size(32), aligned(4), may_alias));

/* C[MR][8*NV] = A[MR][k] * B[k][8*NV] with MR * NV accumulators kept in registers */
#define NNP_KERNEL(MR, NV)                                                                                     \
    NNP_INLINE void k##MR##x##NV(size_t k, const float *A, size_t lda, const float *B, size_t ldb, float *C,   \
                                 size_t ldc)                                                                   \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[MR][NV];                                                                                    \
        size_t p_;                                                                                             \
        int r_, c_;                                                                                            \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NV; c_++) acc[r_][c_] = zero_;                                                   \
        for (p_ = 0; p_ < k; p_++) {                                                                           \
            const nnp_v8u *b_ = (const nnp_v8u *)(const void *)(B + p_ * ldb);                                 \
            for (r_ = 0; r_ < MR; r_++) {                                                                      \
                const float s_ = A[r_ * lda + p_];                                                             \
                const nnp_v8 a_ = {s_, s_, s_, s_, s_, s_, s_, s_};                                            \
                for (c_ = 0; c_ < NV; c_++) acc[r_][c_] += a_ * b_[c_];                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < NV; c_++) ((nnp_v8u *)(void *)(C + r_ * ldc))[c_] = acc[r_][c_];                 \
    }
/* One row, C[8*NV] = A[k] * B[k][8*NV], with the sum over k split into S interleaved partial sums so that
 * S * NV accumulators hide the FMA latency (a single row has no other independent work). */
#define NNP_KERNEL_SPLIT(NV, S)                                                                                \
    NNP_INLINE void k1x##NV##s(size_t k, const float *A, size_t lda, const float *B, size_t ldb, float *C,     \
                               size_t ldc)                                                                     \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[S][NV];                                                                                     \
        size_t p_ = 0;                                                                                         \
        int s_, c_, w_;                                                                                        \
        (void)lda;                                                                                             \
        (void)ldc;                                                                                             \
        for (s_ = 0; s_ < S; s_++)                                                                             \
            for (c_ = 0; c_ < NV; c_++) acc[s_][c_] = zero_;                                                   \
        for (; p_ + S <= k; p_ += S)                                                                           \
            for (s_ = 0; s_ < S; s_++) {                                                                       \
                const nnp_v8u *b_ = (const nnp_v8u *)(const void *)(B + (p_ + s_) * ldb);                      \
                const float x_ = A[p_ + s_];                                                                   \
                const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                            \
                for (c_ = 0; c_ < NV; c_++) acc[s_][c_] += a_ * b_[c_];                                        \
            }                                                                                                  \
        for (; p_ < k; p_++) {                                                                                 \
            const nnp_v8u *b_ = (const nnp_v8u *)(const void *)(B + p_ * ldb);                                 \
            const float x_ = A[p_];                                                                            \
            const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                                \
            for (c_ = 0; c_ < NV; c_++) acc[0][c_] += a_ * b_[c_];                                             \
        }                                                                                                      \
        for (w_ = S / 2; w_ > 0; w_ /= 2) /* pairwise: s <- s + (s + w) */                                   \
            for (s_ = 0; s_ < w_; s_++)                                                                        \
                for (c_ = 0; c_ < NV; c_++) acc[s_][c_] += acc[s_ + w_][c_];                                   \
        for (c_ = 0; c_ < NV; c_++) ((nnp_v8u *)(void *)C)[c_] = acc[0][c_];                                   \
    }
#define NNP_HAVE_SPLIT 1
#else
/* Plain C99 version of the same kernels. */
#define NNP_KERNEL(MR, NV)                                                                                     \
    NNP_INLINE void k##MR##x##NV(size_t k, const float *A, size_t lda, const float *B, size_t ldb, float *C,   \
                                 size_t ldc)                                                                   \
    {                                                                                                          \
        float acc[MR][8 * NV];                                                                                 \
        size_t p_;                                                                                             \
        int r_, c_;                                                                                            \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < 8 * NV; c_++) acc[r_][c_] = 0.0f;                                                \
        for (p_ = 0; p_ < k; p_++)                                                                             \
            for (r_ = 0; r_ < MR; r_++) {                                                                      \
                const float a_ = A[r_ * lda + p_];                                                             \
                for (c_ = 0; c_ < 8 * NV; c_++) acc[r_][c_] += a_ * B[p_ * ldb + c_];                          \
            }                                                                                                  \
        for (r_ = 0; r_ < MR; r_++)                                                                            \
            for (c_ = 0; c_ < 8 * NV; c_++) C[r_ * ldc + c_] = acc[r_][c_];                                    \
    }
#endif

NNP_KERNEL(6, 2)
NNP_KERNEL(5, 2)
NNP_KERNEL(4, 2)
NNP_KERNEL(3, 2)
NNP_KERNEL(2, 2)
NNP_KERNEL(1, 2)
NNP_KERNEL(8, 1)
NNP_KERNEL(7, 1)
NNP_KERNEL(6, 1)
NNP_KERNEL(5, 1)
NNP_KERNEL(4, 1)
NNP_KERNEL(3, 1)
NNP_KERNEL(2, 1)
NNP_KERNEL(1, 1)
NNP_KERNEL(3, 4)
NNP_KERNEL(2, 4)
NNP_KERNEL(1, 4)
NNP_KERNEL(1, 8)
#ifdef NNP_HAVE_SPLIT
NNP_KERNEL_SPLIT(4, 2)
NNP_KERNEL_SPLIT(2, 4)
NNP_KERNEL_SPLIT(1, 8)
#endif

/* dot product over contiguous memory with 8 independent lanes (vectorizes without reassociation) */
NNP_INLINE float dot8(size_t k, const float *a, const float *b)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t p = 0;
    int l;
    float s;
    for (; p + 8 <= k; p += 8)
        for (l = 0; l < 8; l++) acc[l] += a[p + l] * b[p + l];
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; p < k; p++) s += a[p] * b[p];
    return s;
}

/* rows in groups of GROUP (kernel KG), then the remainder (at most 7 rows) with a kernel of its size */
#define NNP_ROWS(NV, GROUP, KG)                                                                                \
    do {                                                                                                       \
        const float *Bj = B + j;                                                                               \
        for (i = 0; i + GROUP <= m; i += GROUP) KG(k, A + i * lda, lda, Bj, ldb, C + i * ldc + j, ldc);       \
        NNP_REM_##NV(m - i)                                                                                    \
    } while (0)
#define NNP_REM_CASE(R, NV)                                                                                    \
    case R: k##R##x##NV(k, A + i * lda, lda, Bj, ldb, C + i * ldc + j, ldc); break;
#define NNP_REM_4(r)                                                                                           \
    switch (r) {                                                                                               \
        NNP_REM_CASE(2, 4) NNP_REM_CASE(1, 4) default: break;                                                  \
    }
#define NNP_REM_2(r)                                                                                           \
    switch (r) {                                                                                               \
        NNP_REM_CASE(5, 2) NNP_REM_CASE(4, 2) NNP_REM_CASE(3, 2) NNP_REM_CASE(2, 2) NNP_REM_CASE(1, 2)         \
        default: break;                                                                                        \
    }
#define NNP_REM_1(r)                                                                                           \
    switch (r) {                                                                                               \
        NNP_REM_CASE(7, 1) NNP_REM_CASE(6, 1) NNP_REM_CASE(5, 1) NNP_REM_CASE(4, 1) NNP_REM_CASE(3, 1)         \
        NNP_REM_CASE(2, 1) NNP_REM_CASE(1, 1) default: break;                                                  \
    }

NNP_INLINE void gemm_body(size_t m, size_t k, size_t n, const float *A, size_t lda, const float *B,
                          const float *Bt, float *C, size_t ldc, int split)
{
    const size_t ldb = n;
    size_t i, j = 0;
    if (m == 1) { /* one row: 8 independent accumulators cover the FMA latency */
        for (; j + 64 <= n; j += 64) k1x8(k, A, lda, B + j, ldb, C + j, ldc);
#ifdef NNP_HAVE_SPLIT
        if (split) {
            for (; j + 32 <= n; j += 32) k1x4s(k, A, lda, B + j, ldb, C + j, ldc);
            for (; j + 16 <= n; j += 16) k1x2s(k, A, lda, B + j, ldb, C + j, ldc);
            for (; j + 8 <= n; j += 8) k1x1s(k, A, lda, B + j, ldb, C + j, ldc);
        }
#else
        (void)split;
#endif
    }
    if (m <= 3) /* few rows: wide tiles keep enough independent accumulators */
        for (; j + 32 <= n; j += 32) NNP_ROWS(4, 3, k3x4);
    for (; j + 16 <= n; j += 16) NNP_ROWS(2, 6, k6x2);
    for (; j + 8 <= n; j += 8) NNP_ROWS(1, 8, k8x1);
    for (; j < n; j++)
        for (i = 0; i < m; i++) C[i * ldc + j] = dot8(k, A + i * lda, Bt + j * k);
}

#if NNP_X86_DISPATCH
static int have_avx2_fma(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

#define gemm_f32 gemm_body

/* ------------------------------------------------------------------------------------------------------ */
/* Activations (float32). z holds pre-activations with the bias not yet added.                            */

#define SQRT1_2F 0.70710678118654752440f
#define INV_SQRT_2PI_F 0.39894228040143267794f
#define SQRT_2_OVER_PI_F 0.79788456080286535588f
#define GELU_C 0.044715f

/* z <- f(z + b) for n contiguous entries */
NNP_INLINE void act_f32(const nnp_layer *L, float *NNP_RESTRICT z, size_t n)
{
    const float *b = L->b;
    const float p0 = L->p0, p1 = L->p1;
    size_t j;
    switch (L->act) {
    case NNP_ACT_LINEAR:
        for (j = 0; j < n; j++) z[j] += b[j];
        break;
    case NNP_ACT_RELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v < 0.0f ? 0.0f : v;
        }
        break;
    case NNP_ACT_LEAKY_RELU:
        for (j = 0; j < n; j++) {
            const float v = z[j] + b[j], neg = p0 * v;
            z[j] = v > 0.0f ? v : neg;
        }
        break;
    case NNP_ACT_ELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v > 0.0f ? v : p0 * expm1f(v);
        }
        break;
    case NNP_ACT_SELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v > 0.0f ? p1 * v : p1 * p0 * expm1f(v);
        }
        break;
    case NNP_ACT_TANH:
        for (j = 0; j < n; j++) z[j] = tanhf(z[j] + b[j]);
        break;
    case NNP_ACT_SIGMOID:
        for (j = 0; j < n; j++) z[j] = 1.0f / (1.0f + expf(-(z[j] + b[j])));
        break;
    case NNP_ACT_HARD_SIGMOID:
        for (j = 0; j < n; j++) {
            float t = p0 * (z[j] + b[j]) + p1;
            z[j] = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
        }
        break;
    case NNP_ACT_SOFTPLUS:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = (v > 0.0f ? v : 0.0f) + log1pf(expf(-fabsf(v)));
        }
        break;
    case NNP_ACT_SOFTSIGN:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v * (1.0f / (1.0f + fabsf(v)));
        }
        break;
    case NNP_ACT_SWISH:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v * (1.0f / (1.0f + expf(-v)));
        }
        break;
    case NNP_ACT_GELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = 0.5f * v * (1.0f + erff(v * SQRT1_2F));
        }
        break;
    case NNP_ACT_GELU_TANH:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI_F * (v + GELU_C * v * v * v)));
        }
        break;
    case NNP_ACT_RELU6:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v);
        }
        break;
    default: /* NNP_ACT_EXPONENTIAL; codes were validated at load */
        for (j = 0; j < n; j++) z[j] = expf(z[j] + b[j]);
        break;
    }
}

/* z <- f(z + b) and d <- f'(z + b); the derivative uses the output where that is cheaper.
 * Kinks follow TensorFlow: relu'(0) = 0, leaky'(0) = alpha, elu'(0) = alpha (x <= 0 branch), selu'(0) = scale
 * (as tf.nn.selu's gradient), relu6' and hard_sigmoid' are 0 at both ends of the linear part. */
NNP_INLINE void act_d_f32_at(const nnp_layer *L, const float *b, float *NNP_RESTRICT z, float *NNP_RESTRICT d,
                             size_t n)
{
    const float p0 = L->p0, p1 = L->p1;
    size_t j;
    switch (L->act) {
    case NNP_ACT_LINEAR:
        for (j = 0; j < n; j++) {
            z[j] += b[j];
            d[j] = 1.0f;
        }
        break;
    case NNP_ACT_RELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v < 0.0f ? 0.0f : v;
            d[j] = v > 0.0f ? 1.0f : 0.0f;
        }
        break;
    case NNP_ACT_LEAKY_RELU:
        for (j = 0; j < n; j++) {
            /* both sides computed unconditionally: selects only, so the loop vectorizes */
            const float v = z[j] + b[j], neg = p0 * v;
            z[j] = v > 0.0f ? v : neg;
            d[j] = v > 0.0f ? 1.0f : p0;
        }
        break;
    case NNP_ACT_ELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            if (v > 0.0f) {
                z[j] = v;
                d[j] = 1.0f;
            } else {
                float e = expm1f(v);
                z[j] = p0 * e;
                d[j] = p0 * (e + 1.0f);
            }
        }
        break;
    case NNP_ACT_SELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            if (v < 0.0f) {
                float e = expm1f(v);
                z[j] = p1 * p0 * e;
                d[j] = p1 * p0 * (e + 1.0f);
            } else {
                z[j] = p1 * v;
                d[j] = p1;
            }
        }
        break;
    case NNP_ACT_TANH:
        for (j = 0; j < n; j++) {
            float a = tanhf(z[j] + b[j]);
            z[j] = a;
            d[j] = 1.0f - a * a;
        }
        break;
    case NNP_ACT_SIGMOID:
        for (j = 0; j < n; j++) {
            float a = 1.0f / (1.0f + expf(-(z[j] + b[j])));
            z[j] = a;
            d[j] = a * (1.0f - a);
        }
        break;
    case NNP_ACT_HARD_SIGMOID:
        for (j = 0; j < n; j++) {
            float t = p0 * (z[j] + b[j]) + p1;
            z[j] = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
            d[j] = (t > 0.0f && t < 1.0f) ? p0 : 0.0f;
        }
        break;
    case NNP_ACT_SOFTPLUS:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float e = expf(-fabsf(v));
            z[j] = (v > 0.0f ? v : 0.0f) + log1pf(e);
            d[j] = (v >= 0.0f ? 1.0f : e) / (1.0f + e);
        }
        break;
    case NNP_ACT_SOFTSIGN:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float q = 1.0f / (1.0f + fabsf(v));
            z[j] = v * q;
            d[j] = q * q;
        }
        break;
    case NNP_ACT_SWISH:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float s = 1.0f / (1.0f + expf(-v));
            z[j] = v * s;
            d[j] = s * (1.0f + v * (1.0f - s));
        }
        break;
    case NNP_ACT_GELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float c = 0.5f * (1.0f + erff(v * SQRT1_2F));
            z[j] = v * c;
            d[j] = c + v * INV_SQRT_2PI_F * expf(-0.5f * v * v);
        }
        break;
    case NNP_ACT_GELU_TANH:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float t = tanhf(SQRT_2_OVER_PI_F * (v + GELU_C * v * v * v));
            z[j] = 0.5f * v * (1.0f + t);
            d[j] = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * SQRT_2_OVER_PI_F * (1.0f + 3.0f * GELU_C * v * v);
        }
        break;
    case NNP_ACT_RELU6:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v);
            d[j] = (v > 0.0f && v < 6.0f) ? 1.0f : 0.0f;
        }
        break;
    default: /* NNP_ACT_EXPONENTIAL */
        for (j = 0; j < n; j++) {
            float a = expf(z[j] + b[j]);
            z[j] = a;
            d[j] = a;
        }
        break;
    }
}

NNP_INLINE void act_d_f32(const nnp_layer *L, float *NNP_RESTRICT z, float *NNP_RESTRICT d, size_t n)
{
    act_d_f32_at(L, L->b, z, d, n);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Forward (float32)                                                                                      */

NNP_INLINE void forward_block_body(const nnp_model *m, size_t np, const float *x, float *y, float *buf0, float *buf1,
                                   int split)
{
    const float *in = x;
    size_t in_stride = m->n_in, k;
    float *bufs[2];
    bufs[0] = buf0;
    bufs[1] = buf1;
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        int last = (k + 1 == m->n_layers);
        float *out = last ? y : bufs[k & 1];
        size_t i;
        gemm_f32(np, L->rows, L->cols, in, in_stride, L->W, L->Wt, out, L->cols, split);
        for (i = 0; i < np; i++) act_f32(L, out + i * L->cols, L->cols);
        in = out;
        in_stride = L->cols;
    }
}

NNP_DISPATCHED(forward_block, (const nnp_model *m, size_t np, const float *x, float *y, float *buf0, float *buf1,
                                int split),
               (m, np, x, y, buf0, buf1, split))

int nnp_forward(const nnp_model *m, size_t batch, const float *x, float *y, float *work, size_t work_len)
{
    size_t fixed, per_point, blk, done;
    int rc = check_call(m, batch, x, y, 1, work, m ? m->n_out : 0);
    if (rc != NNP_OK || batch == 0) return rc;
    rc = ws_shape(m, NNP_WS_FORWARD, &fixed, &per_point);
    if (rc != NNP_OK) return rc;
    blk = block_for(fixed, per_point, batch, work_len);
    if (blk == 0) return NNP_E_WORKSPACE;
    for (done = 0; done < batch; done += blk) {
        size_t np = batch - done < blk ? batch - done : blk;
        forward_block(m, np, x + done * m->n_in, y + done * m->n_out, work, work + blk * m->max_cols, batch == 1);
    }
    return NNP_OK;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian, forward mode: every point carries 1 value row and n_in tangent rows through the network.     */

NNP_INLINE void jac_fwd_block_body(const nnp_model *m, size_t np, const float *x, float *y, float *J, float *buf0,
                                   float *buf1, float *d, int split)
{
    const size_t n_in = m->n_in, R = n_in + 1; /* rows per point */
    size_t k, p, r, j;
    float *cur = buf0, *nxt = buf1;

    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        if (k == 0) {
            /* value rows: x W; tangent rows: e_j W = W[j] */
            gemm_f32(np, L->rows, c, x, n_in, L->W, L->Wt, nxt, R * c, split);
            for (p = 0; p < np; p++) {
                float *v = nxt + p * R * c;
                act_d_f32(L, v, d, c);
                for (r = 0; r < n_in; r++) {
                    const float *w = L->W + r * c;
                    float *t = v + (r + 1) * c;
                    for (j = 0; j < c; j++) t[j] = w[j] * d[j];
                }
            }
        } else {
            gemm_f32(np * R, L->rows, c, cur, L->rows, L->W, L->Wt, nxt, c, split);
            for (p = 0; p < np; p++) {
                float *v = nxt + p * R * c;
                act_d_f32(L, v, d, c);
                for (r = 1; r < R; r++) {
                    float *t = v + r * c;
                    for (j = 0; j < c; j++) t[j] *= d[j];
                }
            }
        }
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
    /* cur: per point [R][n_out]; row 0 = y, row 1 + j = d y / d x_j */
    for (p = 0; p < np; p++) {
        const float *v = cur + p * R * m->n_out;
        float *Jp = J + p * m->n_out * n_in;
        if (y) memcpy(y + p * m->n_out, v, m->n_out * sizeof(float));
        for (r = 0; r < n_in; r++)
            for (j = 0; j < m->n_out; j++) Jp[j * n_in + r] = v[(r + 1) * m->n_out + j];
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian, reverse mode: forward pass keeping each layer's derivative, then n_out adjoint rows per point */

/* Reverse mode, first half: values, keeping every layer's derivatives. D holds, per layer k, a [np][cols_k]
 * block at offset np * (sum of the widths before k). */
NNP_INLINE void rev_fwd_body(const nnp_model *m, size_t np, const float *x, float *y, float *v0, float *v1,
                             float *D, int split)
{
    const float *in = x;
    size_t in_stride = m->n_in, k, p, doff = 0;
    float *cur = v0, *nxt = v1;
    for (k = 0; k < m->n_layers; k++) {
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        gemm_f32(np, L->rows, c, in, in_stride, L->W, L->Wt, nxt, c, split);
        for (p = 0; p < np; p++) act_d_f32(L, nxt + p * c, D + doff + p * c, c);
        doff += np * c;
        in = nxt;
        in_stride = c;
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
    if (y) memcpy(y, cur, np * m->n_out * sizeof(float));
}

/* Reverse mode, second half: n_out adjoint rows per point, from the derivatives D alone, laid out as above for
 * blocks of ldp >= np points. Writes J [np][n_out][n_in]. */
NNP_INLINE void rev_bwd_body(const nnp_model *m, size_t np, size_t ldp, float *J, const float *D, float *g0,
                             float *g1, int split)
{
    const size_t n_out = m->n_out, L_n = m->n_layers;
    size_t k, p, i, j, doff = ldp * m->sum_cols;
    float *cur, *nxt;

    /* Adjoint rows are indexed (p * n_out + i). Start: row (p, i) = D_L[p][i] * W_L[:, i] */
    {
        const nnp_layer *L = &m->layers[L_n - 1];
        const size_t rws = L->rows;
        float *out;
        doff -= ldp * L->cols;
        out = (L_n == 1) ? J : g0;
        for (p = 0; p < np; p++)
            for (i = 0; i < n_out; i++) {
                const float sc = D[doff + p * n_out + i];
                const float *wt = L->Wt + i * rws;
                float *g = out + (p * n_out + i) * rws;
                for (j = 0; j < rws; j++) g[j] = sc * wt[j];
            }
    }
    cur = g0;
    nxt = g1;
    for (k = L_n - 1; k-- > 0;) {
        /* cur holds adjoints w.r.t. the output of layer k ([np * n_out][cols_k]); scale by D_k, then
         * multiply by W_k^T to get adjoints w.r.t. its input */
        const nnp_layer *L = &m->layers[k];
        const size_t c = L->cols;
        float *out = (k == 0) ? J : nxt;
        doff -= ldp * c;
        for (p = 0; p < np; p++) {
            const float *dp = D + doff + p * c;
            for (i = 0; i < n_out; i++) {
                float *g = cur + (p * n_out + i) * c;
                for (j = 0; j < c; j++) g[j] *= dp[j];
            }
        }
        gemm_f32(np * n_out, c, L->rows, cur, c, L->Wt, L->W, out, L->rows, split);
        {
            float *tmp = cur;
            cur = nxt;
            nxt = tmp;
        }
    }
}

NNP_DISPATCHED(jac_fwd_block, (const nnp_model *m, size_t np, const float *x, float *y, float *J, float *buf0,
                                float *buf1, float *d, int split),
               (m, np, x, y, J, buf0, buf1, d, split))
NNP_DISPATCHED(rev_fwd, (const nnp_model *m, size_t np, const float *x, float *y, float *v0, float *v1, float *D,
                          int split),
               (m, np, x, y, v0, v1, D, split))
NNP_DISPATCHED(rev_bwd, (const nnp_model *m, size_t np, size_t ldp, float *J, const float *D, float *g0, float *g1,
                          int split),
               (m, np, ldp, J, D, g0, g1, split))

/* ------------------------------------------------------------------------------------------------------ */
/* Jacobian of one point, reverse mode                                                                    */
/*
 * A call for one point runs its own path: one forward pass keeping each layer's derivative, then one adjoint
 * row per output back through the layers. The backward products read W itself (dot products of its rows with
 * the adjoint, eight rows at a time) rather than Wt, so that both passes share one copy of the weights in the
 * L1 cache. Bias, activation and the scaling by the derivative are applied to the sums while they are still in
 * registers.
 */

/* What the kernels do with finished sums v of columns j.. (vectors of 8, or single sums in the tails) */
enum { SP_STORE, SP_SCALE, SP_RELU, SP_LEAKY };
typedef struct {
    int kind;       /* SP_* */
    float p0;       /* SP_LEAKY: alpha */
    float *out;     /* values: v (SP_STORE), v * D (SP_SCALE), f(v) (activations) */
    float *d;       /* activations: f'(v) */
    const float *D; /* SP_SCALE */
} sp_epi_t;

#ifdef NNP_HAVE_SPLIT
typedef int nnp_v8i __attribute__((vector_size(32)));
#define NNP_LD(p) (*(const nnp_v8u *)(const void *)(p))
#define NNP_ST(p, v) (*(nnp_v8u *)(void *)(p) = (v))
#if defined(__clang__) || __GNUC__ >= 12
#define NNP_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define NNP_SHUF(a, b, ...) __builtin_shuffle(a, b, (nnp_v8i){__VA_ARGS__})
#endif
/* within each half: a's pairwise sums, then b's (the pattern of x86 hadd) */
#define NNP_HADD(a, b) (NNP_SHUF(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + NNP_SHUF(a, b, 1, 3, 9, 11, 5, 7, 13, 15))

/* *r = the sums of the lanes of a[0], ..., a[7] */
NNP_INLINE void hsum8x8(const nnp_v8 *a, nnp_v8 *r)
{
    const nnp_v8 h01 = NNP_HADD(a[0], a[1]), h23 = NNP_HADD(a[2], a[3]);
    const nnp_v8 h45 = NNP_HADD(a[4], a[5]), h67 = NNP_HADD(a[6], a[7]);
    const nnp_v8 q0 = NNP_HADD(h01, h23), q1 = NNP_HADD(h45, h67);
    *r = NNP_SHUF(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) + NNP_SHUF(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* Epilogue of the NV vectors of sums V[0..NV) of columns j..: a macro rather than a function, so that the sums
 * stay in registers (an array whose address is taken is kept in memory). The selects match act_d_f32 (NaN
 * takes the non-positive branch). */
#define NNP_SP_EPI(E, J, V, NV)                                                                                \
    do {                                                                                                       \
        const nnp_v8 z_ = {0, 0, 0, 0, 0, 0, 0, 0}, o_ = {1, 1, 1, 1, 1, 1, 1, 1};                             \
        const float a_ = (E)->p0;                                                                              \
        const nnp_v8 av_ = {a_, a_, a_, a_, a_, a_, a_, a_};                                                   \
        float *out_ = (E)->out + (J), *d_;                                                                     \
        int q_;                                                                                                \
        switch ((E)->kind) { /* d and D are only offset where they are used (they may be NULL) */            \
        case SP_STORE:                                                                                         \
            for (q_ = 0; q_ < NV; q_++) NNP_ST(out_ + 8 * q_, V[q_]);                                          \
            break;                                                                                             \
        case SP_SCALE:                                                                                         \
            for (q_ = 0; q_ < NV; q_++) NNP_ST(out_ + 8 * q_, V[q_] * NNP_LD((E)->D + (J) + 8 * q_));          \
            break;                                                                                             \
        case SP_RELU:                                                                                          \
            d_ = (E)->d + (J);                                                                                 \
            for (q_ = 0; q_ < NV; q_++) {                                                                      \
                const nnp_v8i neg_ = V[q_] < z_, pos_ = V[q_] > z_;                                            \
                NNP_ST(out_ + 8 * q_, (nnp_v8)(~neg_ & (nnp_v8i)V[q_]));                                       \
                NNP_ST(d_ + 8 * q_, (nnp_v8)(pos_ & (nnp_v8i)o_));                                             \
            }                                                                                                  \
            break;                                                                                             \
        default: /* SP_LEAKY */                                                                                \
            d_ = (E)->d + (J);                                                                                 \
            for (q_ = 0; q_ < NV; q_++) {                                                                      \
                const nnp_v8i pos_ = V[q_] > z_;                                                               \
                NNP_ST(out_ + 8 * q_, (nnp_v8)((pos_ & (nnp_v8i)V[q_]) | (~pos_ & (nnp_v8i)(av_ * V[q_]))));   \
                NNP_ST(d_ + 8 * q_, (nnp_v8)((pos_ & (nnp_v8i)o_) | (~pos_ & (nnp_v8i)av_)));                  \
            }                                                                                                  \
            break;                                                                                             \
        }                                                                                                      \
    } while (0)

/* one vector of 8 sums (no function: Clang warns about vector arguments in the baseline build) */
#define NNP_SP_EPI1(E, J, X)                                                                                   \
    do {                                                                                                       \
        const nnp_v8 v1_[1] = {X};                                                                             \
        NNP_SP_EPI(E, J, v1_, 1);                                                                              \
    } while (0)

/* Columns j..j+8*NV of init + x M for one row x[k] (M row stride ldm; init may be NULL), then the epilogue. The
 * sum over k is split into S interleaved partial sums (S * NV = 8 accumulators cover the latency of the FMAs).
 * x is read 8 values at a time and broadcast by shuffles: a broadcast from memory would cost a load, and loads
 * (two per cycle, one per FMA already) bound these products. Lane l of x goes to partial sum l % S. With KV > 0
 * the kernel is for k = 8 * KV exactly: a loop of known length, so that the accumulators stay in registers. */
#define NNP_SPR_LANE(XH, L)                                                                                    \
    do {                                                                                                       \
        const nnp_v8 a_ = NNP_SHUF(XH, XH, L, L, L, L, L + 4, L + 4, L + 4, L + 4);                            \
        for (c_ = 0; c_ < NV_; c_++) acc[(L + 4 * h_) % S_][c_] += a_ * NNP_LD(m_ + 8 * c_);                  \
        m_ += ldm;                                                                                             \
    } while (0)
#define NNP_SPR(NV, S, KV)                                                                                     \
    NNP_INLINE void spr##NV##x##S##_##KV(size_t k, const float *x, const float *M, size_t ldm,                 \
                                         const float *init, const sp_epi_t *e, size_t j)                       \
    {                                                                                                          \
        enum { NV_ = NV, S_ = S };                                                                             \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[S][NV];                                                                                     \
        const size_t kb_ = KV ? 8 * KV : k - k % 8; /* whole blocks of 8; with KV, k is 8 * KV */            \
        size_t p_ = 0;                                                                                         \
        int s_, c_, w_, h_;                                                                                    \
        for (s_ = 0; s_ < S; s_++)                                                                             \
            for (c_ = 0; c_ < NV; c_++) acc[s_][c_] = zero_;                                                   \
        if (init)                                                                                              \
            for (c_ = 0; c_ < NV; c_++) acc[0][c_] = NNP_LD(init + j + 8 * c_);                                \
        M += j;                                                                                                \
        for (; p_ < kb_; ) {                                                                                   \
            const nnp_v8 xv_ = NNP_LD(x + p_);                                                                 \
            const nnp_v8 x2_[2] = {NNP_SHUF(xv_, xv_, 0, 1, 2, 3, 0, 1, 2, 3),                                 \
                                   NNP_SHUF(xv_, xv_, 4, 5, 6, 7, 4, 5, 6, 7)};                                \
            const float *m_ = M + p_ * ldm;                                                                    \
            for (h_ = 0; h_ < 2; h_++) {                                                                       \
                NNP_SPR_LANE(x2_[h_], 0);                                                                      \
                NNP_SPR_LANE(x2_[h_], 1);                                                                      \
                NNP_SPR_LANE(x2_[h_], 2);                                                                      \
                NNP_SPR_LANE(x2_[h_], 3);                                                                      \
            }                                                                                                  \
            p_ += 8;                                                                                           \
        }                                                                                                      \
        for (; !KV && p_ < k; p_++) {                                                                          \
            const float *m_ = M + p_ * ldm, x_ = x[p_];                                                        \
            const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                                \
            for (c_ = 0; c_ < NV; c_++) acc[0][c_] += a_ * NNP_LD(m_ + 8 * c_);                                \
        }                                                                                                      \
        for (w_ = S / 2; w_ > 0; w_ /= 2)                                                                      \
            for (s_ = 0; s_ < w_; s_++)                                                                        \
                for (c_ = 0; c_ < NV; c_++) acc[s_][c_] += acc[s_ + w_][c_];                                   \
        NNP_SP_EPI(e, j, acc[0], NV);                                                                          \
    }
#define NNP_SPR_ALL(KV) NNP_SPR(8, 1, KV) NNP_SPR(4, 2, KV) NNP_SPR(2, 4, KV) NNP_SPR(1, 8, KV)
NNP_SPR_ALL(0)
NNP_SPR_ALL(1)
NNP_SPR_ALL(2)
NNP_SPR_ALL(4)
NNP_SPR_ALL(8)

/* k < 8 (such as the first layer of a network with few inputs): one partial sum per column vector */
#define NNP_SPK(NV)                                                                                            \
    NNP_INLINE void spk##NV(size_t k, const float *x, const float *M, size_t ldm, const float *init,           \
                            const sp_epi_t *e, size_t j)                                                       \
    {                                                                                                          \
        const nnp_v8 zero_ = {0, 0, 0, 0, 0, 0, 0, 0};                                                         \
        nnp_v8 acc[NV];                                                                                        \
        size_t p_;                                                                                             \
        int c_;                                                                                                \
        for (c_ = 0; c_ < NV; c_++) acc[c_] = init ? (nnp_v8)NNP_LD(init + j + 8 * c_) : zero_;              \
        M += j;                                                                                                \
        for (p_ = 0; p_ < k; p_++) {                                                                           \
            const float *m_ = M + p_ * ldm, x_ = x[p_];                                                        \
            const nnp_v8 a_ = {x_, x_, x_, x_, x_, x_, x_, x_};                                                \
            for (c_ = 0; c_ < NV; c_++) acc[c_] += a_ * NNP_LD(m_ + 8 * c_);                                   \
        }                                                                                                      \
        NNP_SP_EPI(e, j, acc, NV);                                                                             \
    }
NNP_SPK(8)
NNP_SPK(1)

/* Rows p.. of out[p] = M[p][0..k) . h, one row at a time with its sum split four ways (for a few rows, such as
 * the Jacobian's row when n_in is small: shorter dependency chains than a group of 8) */
NNP_INLINE void sp_rowdots_few(size_t p, size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    const nnp_v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const size_t kv = k - k % 8;
    size_t v, j;
    for (; p < rows; p++) {
        const float *w = M + p * k;
        nnp_v8 a[4];
        float s;
        int r;
        for (r = 0; r < 4; r++) a[r] = zero;
        for (v = 0; v + 32 <= kv; v += 32)
            for (r = 0; r < 4; r++) a[r] += NNP_LD(w + v + 8 * r) * NNP_LD(h + v + 8 * r);
        for (; v < kv; v += 8) a[0] += NNP_LD(w + v) * NNP_LD(h + v);
        a[0] = (a[0] + a[1]) + (a[2] + a[3]);
        a[0] += NNP_SHUF(a[0], a[0], 4, 5, 6, 7, 0, 1, 2, 3);
        a[0] += NNP_SHUF(a[0], a[0], 2, 3, 0, 1, 6, 7, 4, 5);
        a[0] += NNP_SHUF(a[0], a[0], 1, 0, 3, 2, 5, 4, 7, 6);
        s = a[0][0];
        for (j = kv; j < k; j++) s += w[j] * h[j];
        e->out[p] = e->kind == SP_SCALE ? s * e->D[p] : s;
    }
}

/* Rows p.. of out[p] = M[p][0..k) . h, eight rows at a time with their sums reduced together; epilogue
 * SP_STORE or SP_SCALE. */
NNP_INLINE void sp_rowdots_gen(size_t p, size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    const nnp_v8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
    const size_t kv = k - k % 8;
    size_t v, j;
    int r;
    if (rows - p <= NNP_SP_FEW) {
        sp_rowdots_few(p, rows, k, M, h, e);
        return;
    }
    for (; p < rows; p += 8) {
        nnp_v8 acc[8], res;
        const float *wr[8];
        for (r = 0; r < 8; r++) {
            wr[r] = M + (p + (size_t)r < rows ? p + (size_t)r : p) * k; /* past the end: repeat row p */
            acc[r] = zero;
        }
        for (v = 0; v < kv; v += 8) {
            const nnp_v8 hv = NNP_LD(h + v);
            for (r = 0; r < 8; r++) acc[r] += NNP_LD(wr[r] + v) * hv;
        }
        hsum8x8(acc, &res);
        if (kv < k) {
            float t[8];
            for (r = 0; r < 8; r++) {
                float s = 0.0f;
                for (j = kv; j < k; j++) s += wr[r][j] * h[j];
                t[r] = s;
            }
            res += NNP_LD(t);
        }
        if (p + 8 <= rows) {
            NNP_SP_EPI1(e, p, res);
        } else {
            float t[8];
            NNP_ST(t, res);
            for (j = p; j < rows; j++) e->out[j] = e->kind == SP_SCALE ? t[j - p] * e->D[j] : t[j - p];
        }
    }
}

/* The same for k = 8 * KV, h kept in registers: the rows of a group in two halves of four (the sums of a half
 * reduced to one vector before the next starts, to leave registers for h), then combined as in hsum8x8.
 * Returns the rows done (whole groups of 8). */
#define NNP_RD(KV)                                                                                             \
    NNP_INLINE size_t sp_rd##KV(size_t rows, const float *M, const float *h, const sp_epi_t *e)                \
    {                                                                                                          \
        nnp_v8 hv[KV], q[2];                                                                                   \
        size_t p;                                                                                              \
        int r, v, half;                                                                                        \
        for (v = 0; v < KV; v++) hv[v] = NNP_LD(h + 8 * v);                                                    \
        for (p = 0; p + 8 <= rows; p += 8) {                                                                   \
            for (half = 0; half < 2; half++) {                                                                 \
                const float *m_ = M + (p + 4 * (size_t)half) * (8 * KV);                                       \
                nnp_v8 a[4];                                                                                   \
                for (r = 0; r < 4; r++) {                                                                      \
                    a[r] = NNP_LD(m_ + r * 8 * KV) * hv[0];                                                    \
                    for (v = 1; v < KV; v++) a[r] += NNP_LD(m_ + r * 8 * KV + 8 * v) * hv[v];                  \
                }                                                                                              \
                q[half] = NNP_HADD(NNP_HADD(a[0], a[1]), NNP_HADD(a[2], a[3]));                                \
            }                                                                                                  \
            q[0] = NNP_SHUF(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +                                            \
                   NNP_SHUF(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);                                           \
            NNP_SP_EPI1(e, p, q[0]);                                                                           \
        }                                                                                                      \
        return p;                                                                                              \
    }
NNP_RD(1)
NNP_RD(2)
NNP_RD(4)
NNP_RD(8)

/* out[p] = M[p][0..k) . h for p < rows (see sp_rowdots_gen) */
NNP_INLINE void sp_rowdots(size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    size_t p;
    switch (k) {
    case 8: p = sp_rd1(rows, M, h, e); break;
    case 16: p = sp_rd2(rows, M, h, e); break;
    case 32: p = sp_rd4(rows, M, h, e); break;
    case 64: p = sp_rd8(rows, M, h, e); break;
    default: p = 0; break;
    }
    if (p < rows) sp_rowdots_gen(p, rows, k, M, h, e);
}

/* init + x M for one row x[k] and M [k][n] (Mt: M transposed): vector columns through the kernels, the last
 * n % 8 by dot products over Mt. Those tail columns get plain sums (without init), finished here for SP_STORE
 * and SP_SCALE; for activations the caller finishes them. */
NNP_INLINE size_t sp_matvec(size_t k, size_t n, const float *x, const float *M, const float *Mt, const float *init,
                            const sp_epi_t *e)
{
    size_t j = 0, t;
#define NNP_SP_COLS(KV)                                                                                        \
    do {                                                                                                       \
        for (; j + 64 <= n; j += 64) spr8x1_##KV(k, x, M, n, init, e, j);                                      \
        for (; j + 32 <= n; j += 32) spr4x2_##KV(k, x, M, n, init, e, j);                                      \
        for (; j + 16 <= n; j += 16) spr2x4_##KV(k, x, M, n, init, e, j);                                      \
        for (; j + 8 <= n; j += 8) spr1x8_##KV(k, x, M, n, init, e, j);                                        \
    } while (0)
    switch (k) {
    case 8: NNP_SP_COLS(1); break;
    case 16: NNP_SP_COLS(2); break;
    case 32: NNP_SP_COLS(4); break;
    case 64: NNP_SP_COLS(8); break;
    default:
        if (k < 8) {
            for (; j + 64 <= n; j += 64) spk8(k, x, M, n, init, e, j);
            for (; j + 8 <= n; j += 8) spk1(k, x, M, n, init, e, j);
        } else {
            NNP_SP_COLS(0);
        }
        break;
    }
#undef NNP_SP_COLS
    for (t = j; t < n; t++) {
        const float s = dot8(k, x, Mt + t * k);
        e->out[t] = e->kind == SP_SCALE ? s * e->D[t] : s;
    }
    return j;
}
#else
/* Plain C versions */
NNP_INLINE void sp_epi1(const sp_epi_t *e, size_t j, float v)
{
    switch (e->kind) {
    case SP_STORE: e->out[j] = v; break;
    case SP_SCALE: e->out[j] = v * e->D[j]; break;
    case SP_RELU:
        e->out[j] = v < 0.0f ? 0.0f : v;
        e->d[j] = v > 0.0f ? 1.0f : 0.0f;
        break;
    default:
        e->out[j] = v > 0.0f ? v : e->p0 * v;
        e->d[j] = v > 0.0f ? 1.0f : e->p0;
        break;
    }
}

NNP_INLINE void sp_rowdots(size_t rows, size_t k, const float *M, const float *h, const sp_epi_t *e)
{
    size_t p;
    for (p = 0; p < rows; p++) sp_epi1(e, p, dot8(k, M + p * k, h));
}

NNP_INLINE size_t sp_matvec(size_t k, size_t n, const float *x, const float *M, const float *Mt, const float *init,
                            const sp_epi_t *e)
{
    size_t j, p;
    (void)Mt;
    for (j = 0; j < n; j++) {
        float s = init ? init[j] : 0.0f;
        for (p = 0; p < k; p++) s += x[p] * M[p * n + j];
        sp_epi1(e, j, s);
    }
    return n;
}
#endif

/* y (may be NULL) and J [n_out][n_in] of the point x. Workspace (SP_WORK floats): v0, v1 [max_cols] for the
 * values, then the adjoints (g0, g1: the same buffers), D [sum_cols]. */
#define SP_WORK(m) (2 * (m)->max_cols + (m)->sum_cols)
NNP_INLINE void sp_jac_body(const nnp_model *m, const float *x, float *y, float *J, float *work)
{
    const size_t n_out = m->n_out, n_in = m->n_in, nl = m->n_layers, mc = m->max_cols;
    float *v0 = work, *v1 = work + mc, *D = work + 2 * mc, *g0 = v0, *g1 = v1;
    const float *in = x;
    size_t k, i, j, doff = 0;
    for (k = 0; k < nl; k++) {
        const nnp_layer *L = &m->layers[k];
        sp_epi_t e;
        size_t done;
        e.out = (k + 1 == nl && y != NULL) ? y : ((k & 1) ? v1 : v0);
        e.d = D + doff;
        e.D = NULL;
        e.p0 = L->p0;
        switch (L->act) {
        case NNP_ACT_LINEAR: /* leaky_relu with alpha 1: the same value and derivative, bit for bit */
            e.kind = SP_LEAKY;
            e.p0 = 1.0f;
            break;
        case NNP_ACT_RELU: e.kind = SP_RELU; break;
        case NNP_ACT_LEAKY_RELU: e.kind = SP_LEAKY; break;
        default: e.kind = SP_STORE; break;
        }
        done = sp_matvec(L->rows, L->cols, in, L->W, L->Wt, e.kind == SP_STORE ? NULL : L->b, &e);
        if (e.kind == SP_STORE)
            act_d_f32(L, e.out, e.d, L->cols);
        else if (done < L->cols)
            act_d_f32_at(L, L->b + done, e.out + done, e.d + done, L->cols - done);
        doff += L->cols;
        in = e.out;
    }
    for (i = 0; i < n_out; i++) {
        const nnp_layer *L = &m->layers[nl - 1];
        const float s = D[m->sum_cols - n_out + i], *wt = L->Wt + i * L->rows;
        const float *h;
        if (nl == 1) {
            for (j = 0; j < n_in; j++) J[i * n_in + j] = s * wt[j];
            continue;
        }
        /* adjoint of the pre-activations of layer nl - 2 */
        doff = m->sum_cols - n_out - L->rows;
        for (j = 0; j < L->rows; j++) g0[j] = s * wt[j] * D[doff + j];
        h = g0;
        for (k = nl - 1; k-- > 0;) {
            const nnp_layer *Lk = &m->layers[k];
            sp_epi_t e;
            e.p0 = 0.0f;
            e.d = NULL;
            if (k == 0) {
                e.kind = SP_STORE;
                e.out = J + i * n_in;
                e.D = NULL;
            } else {
                doff -= Lk->rows;
                e.kind = SP_SCALE;
                e.out = (h == g0) ? g1 : g0;
                e.D = D + doff;
            }
            if (Lk->cols >= NNP_SP_ROWDOTS)
                sp_rowdots(Lk->rows, Lk->cols, Lk->W, h, &e);
            else
                sp_matvec(Lk->cols, Lk->rows, h, Lk->Wt, Lk->W, NULL, &e);
            h = e.out;
        }
    }
}

NNP_DISPATCHED(sp_jac, (const nnp_model *m, const float *x, float *y, float *J, float *work), (m, x, y, J, work))

/* ------------------------------------------------------------------------------------------------------ */
/* Pattern cache (reverse mode, piecewise-linear networks)                                                */
/*
 * When every activation is piecewise linear, a point's derivatives D take one of two values per unit, and
 * the reverse pass depends on D alone. Points with the same activation pattern therefore have bit-for-bit the
 * same Jacobian: the cache stores it once per pattern (exact match on the whole pattern, not just a hash) and
 * copies it for the other points. Large batches in a bounded region of input space share few patterns, so
 * most reverse passes are skipped. The table lives in the caller's workspace and is cleared at every call.
 *
 * Entry (4-byte slots): tag (hash | 1, 0 = empty), pattern words, then the Jacobian (n_out * n_in floats).
 */
static void put_slot(float *slot, uint32_t v) { memcpy(slot, &v, sizeof v); }

static uint32_t get_slot(const float *slot)
{
    uint32_t v;
    memcpy(&v, slot, sizeof v);
    return v;
}

/* Activation patterns of a block of np points: for point p, pat + p * 4 * pw bytes hold one bit per unit of
 * each non-linear layer (each layer starting on a byte; bit u % 8 of byte u / 8 is unit u), 1 when its
 * derivative is not the low value of the activation (0 for relu, relu6, hard_sigmoid; alpha for leaky_relu),
 * zero padded to 4 * pw bytes. */
/* Pattern bits of one layer's derivatives d[0..cols) into b (bit u % 8 of byte u / 8, or-ed in) */
typedef void (*nnp_layer_bits_fn)(const float *d, size_t cols, float low, unsigned char *b);

static void layer_bits_scalar(const float *d, size_t cols, float low, unsigned char *b)
{
    size_t u;
    for (u = 0; u < cols; u++) b[u / 8] |= (unsigned char)((d[u] != low) << (u % 8));
}

NNP_INLINE void patterns_body(const nnp_model *m, size_t np, const float *D, unsigned char *pat, size_t pw,
                              nnp_layer_bits_fn layer_bits)
{
    size_t p, k, doff, n;
    for (p = 0; p < np; p++) {
        unsigned char *b = pat + p * 4 * pw;
        memset(b, 0, 4 * pw);
        doff = n = 0;
        for (k = 0; k < m->n_layers; k++) {
            const nnp_layer *L = &m->layers[k];
            const float *d = D + doff + p * L->cols;
            doff += np * L->cols;
            if (L->act == NNP_ACT_LINEAR) continue;
            layer_bits(d, L->cols, (L->act == NNP_ACT_LEAKY_RELU) ? L->p0 : 0.0f, b + n);
            n += (L->cols + 7) / 8;
        }
    }
}

static void block_patterns_base(const nnp_model *m, size_t np, const float *D, unsigned char *pat, size_t pw)
{
    patterns_body(m, np, D, pat, pw, layer_bits_scalar);
}

#if NNP_X86_DISPATCH
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static void layer_bits_avx2(const float *d, size_t cols, float low,
                                                                 unsigned char *b)
{
    const __m256 lv = _mm256_set1_ps(low);
    size_t u;
    for (u = 0; u + 8 <= cols; u += 8)
        b[u / 8] = (unsigned char)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(d + u), lv, _CMP_NEQ_UQ));
    layer_bits_scalar(d + u, cols - u, low, b + u / 8); /* u is a multiple of 8: the bits line up */
}

__attribute__((target("avx2,fma"))) static void block_patterns_avx2(const nnp_model *m, size_t np, const float *D,
                                                                     unsigned char *pat, size_t pw)
{
    patterns_body(m, np, D, pat, pw, layer_bits_avx2);
}
#endif

static void block_patterns(const nnp_model *m, size_t np, const float *D, unsigned char *pat, size_t pw)
{
#if NNP_X86_DISPATCH
    if (have_avx2_fma()) {
        block_patterns_avx2(m, np, D, pat, pw);
        return;
    }
#endif
    block_patterns_base(m, np, D, pat, pw);
}

static uint32_t pattern_hash(const unsigned char *pat, size_t pw)
{
    uint64_t h = 0x9e3779b97f4a7c15u, w;
    size_t i, n = 4 * pw;
    for (i = 0; i + 8 <= n; i += 8) {
        memcpy(&w, pat + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdu;
        h ^= h >> 32;
    }
    if (i < n) {
        w = 0;
        memcpy(&w, pat + i, n - i);
        h = (h ^ w) * 0xff51afd7ed558ccdu;
    }
    h ^= h >> 29;
    return (uint32_t)h | 1u;
}

/* The entry holding pattern pat, or the empty entry where it belongs (the table is at most 3/4 full). */
static float *cache_find(const cache_shape_t *cs, float *table, const unsigned char *pat, uint32_t h)
{
    size_t i = h & (cs->cap - 1), n;
    for (n = 0; n < cs->cap; n++) {
        float *e = table + i * cs->slots;
        uint32_t tag = get_slot(e);
        if (tag == 0) return e;
        if (tag == h && memcmp(e + 1, pat, 4 * cs->pw) == 0) return e;
        i = (i + 1) & (cs->cap - 1);
    }
    return NULL;
}

/* Scratch of the cached reverse mode, carved from the workspace. */
typedef struct {
    float *table;           /* cs.table slots */
    float *pat, *hash;      /* current block: [blk][pw] patterns, [blk] hashes */
    float *qD;              /* queue of misses: derivatives, laid out for blocks of blk points */
    float *qpat, *qhash;    /* their patterns and hashes */
    float *qdest;           /* their point indices (size_t, two slots each) */
    float *qJ;              /* their Jacobians */
    size_t nq, count, blk;  /* queued misses, cache entries, block size */
} cache_state_t;

/* Reverse passes for the queued misses (one full block at a time), their Jacobians into place and the cache. */
static void cache_flush(const nnp_model *m, const cache_shape_t *cs, cache_state_t *st, float *dy_dx, float *g0,
                        float *g1)
{
    size_t q;
    if (st->nq == 0) return;
    rev_bwd(m, st->nq, st->blk, st->qJ, st->qD, g0, g1, 0);
    for (q = 0; q < st->nq; q++) {
        const unsigned char *pat = (const unsigned char *)(st->qpat + q * cs->pw);
        const uint32_t h = get_slot(st->qhash + q);
        size_t dest;
        float *e;
        memcpy(&dest, st->qdest + 2 * q, sizeof dest);
        memcpy(dy_dx + dest * cs->jn, st->qJ + q * cs->jn, cs->jn * sizeof(float));
        if (st->count >= cs->cap / 4 * 3) continue; /* three quarters full: stop inserting */
        e = cache_find(cs, st->table, pat, h);
        if (e != NULL && get_slot(e) == 0) {
            put_slot(e, h);
            memcpy(e + 1, pat, 4 * cs->pw);
            memcpy(e + 1 + cs->pw, st->qJ + q * cs->jn, cs->jn * sizeof(float));
            st->count++;
        }
    }
    st->nq = 0;
}

/* One block through the cache: values and derivatives, then each point's Jacobian from the cache or queued. */
static void cache_block(const nnp_model *m, const cache_shape_t *cs, cache_state_t *st, size_t np, size_t first,
                        const float *x, float *y, float *dy_dx, float *v0, float *v1, float *D, float *g0, float *g1)
{
    size_t p, k;
    rev_fwd(m, np, x, y, v0, v1, D, 0);
    block_patterns(m, np, D, (unsigned char *)st->pat, cs->pw);
    for (p = 0; p < np; p++) {
        unsigned char *pat = (unsigned char *)(st->pat + p * cs->pw);
        uint32_t h;
        float *e;
        h = pattern_hash(pat, cs->pw);
        e = cache_find(cs, st->table, pat, h);
        if (e != NULL && get_slot(e) != 0) {
            memcpy(dy_dx + (first + p) * cs->jn, e + 1 + cs->pw, cs->jn * sizeof(float));
            continue;
        }
        {   /* queue the miss: its derivatives (layout of a block of blk points), pattern, hash, index */
            size_t off = 0, qoff = 0, dest = first + p, q = st->nq;
            for (k = 0; k < m->n_layers; k++) {
                const size_t c = m->layers[k].cols;
                memcpy(st->qD + qoff + q * c, D + off + p * c, c * sizeof(float));
                off += np * c;
                qoff += st->blk * c;
            }
            memcpy(st->qpat + q * cs->pw, pat, 4 * cs->pw);
            put_slot(st->qhash + q, h);
            memcpy(st->qdest + 2 * q, &dest, sizeof dest);
            if (++st->nq == st->blk) cache_flush(m, cs, st, dy_dx, g0, g1);
        }
    }
}

int nnp_jacobian(const nnp_model *m, int mode, size_t batch, const float *x, float *y, float *dy_dx,
                 float *work, size_t work_len)
{
    size_t fixed, per_point, blk, done, jn, t;
    int rc, auto_mode;
    if (m != NULL && model_ok(m)) {
        if (!mul_sz(m->n_in, m->n_out, &jn)) return NNP_E_ARG;
    } else {
        jn = 0;
    }
    rc = check_call(m, batch, x, dy_dx, 1, work, jn);
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
        /* within the reverse-mode workspace of one point (its per-point size is at least SP_WORK) */
        if (work_len >= SP_WORK(m)) {
            sp_jac(m, x, y, dy_dx, work);
            return NNP_OK;
        }
        if (auto_mode) mode = NNP_MODE_FORWARD; /* a workspace sized for forward mode only */
    }
    rc = ws_shape(m, mode == NNP_MODE_FORWARD ? NNP_WS_JACOBIAN_FORWARD : NNP_WS_JACOBIAN_REVERSE, &fixed,
                  &per_point);
    if (rc != NNP_OK) return rc;
    if (mode == NNP_MODE_REVERSE && batch >= NNP_CACHE_MIN_BATCH) {
        cache_shape_t cs;
        if (sizeof(size_t) <= 2 * sizeof(float) && cache_shape(m, &cs)) {
            const size_t pp = per_point + cs.extra; /* no overflow: ws_shape checked per_point, extra is small */
            size_t full = max_block(pp), e;
            if (full > batch) full = batch;
            if (work_len >= cs.table && (work_len - cs.table) / pp >= full) {
                cache_state_t st;
                size_t vsz, dsz, gsz;
                float *w;
                blk = block_for(cs.table, pp, batch, work_len);
                vsz = blk * m->max_cols;
                dsz = blk * m->sum_cols;
                gsz = blk * m->n_out * m->max_cols;
                w = work + 2 * vsz + dsz + 2 * gsz; /* after v0, v1, D, g0, g1 */
                st.pat = w;
                st.hash = st.pat + blk * cs.pw;
                st.qD = st.hash + blk;
                st.qpat = st.qD + dsz;
                st.qhash = st.qpat + blk * cs.pw;
                st.qdest = st.qhash + blk;
                st.qJ = st.qdest + 2 * blk;
                st.table = work + blk * pp; /* = st.qJ + blk * jn */
                st.nq = st.count = 0;
                st.blk = blk;
                for (e = 0; e < cs.cap; e++) put_slot(st.table + e * cs.slots, 0);
                for (done = 0; done < batch; done += blk) {
                    size_t np = batch - done < blk ? batch - done : blk;
                    cache_block(m, &cs, &st, np, done, x + done * m->n_in, y ? y + done * m->n_out : NULL, dy_dx,
                                work, work + vsz, work + 2 * vsz, work + 2 * vsz + dsz,
                                work + 2 * vsz + dsz + gsz);
                }
                cache_flush(m, &cs, &st, dy_dx, work + 2 * vsz + dsz, work + 2 * vsz + dsz + gsz);
                return NNP_OK;
            }
        }
    }
    blk = block_for(fixed, per_point, batch, work_len);
    if (blk == 0) return NNP_E_WORKSPACE;
    for (done = 0; done < batch; done += blk) {
        size_t np = batch - done < blk ? batch - done : blk;
        const float *xb = x + done * m->n_in;
        float *yb = y ? y + done * m->n_out : NULL;
        float *Jb = dy_dx + done * jn;
        if (mode == NNP_MODE_FORWARD) {
            t = blk * (m->n_in + 1) * m->max_cols;
            jac_fwd_block(m, np, xb, yb, Jb, work, work + t, work + 2 * t, batch == 1);
        } else {
            size_t vsz = blk * m->max_cols, dsz = blk * m->sum_cols, gsz = blk * m->n_out * m->max_cols;
            rev_fwd(m, np, xb, yb, work, work + vsz, work + 2 * vsz, batch == 1);
            rev_bwd(m, np, np, Jb, work + 2 * vsz, work + 2 * vsz + dsz, work + 2 * vsz + dsz + gsz, batch == 1);
        }
    }
    return NNP_OK;
}

/* ------------------------------------------------------------------------------------------------------ */
/* float64 forward and finite differences                                                                 */

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
    int rc = check_call(m, batch, x, y, 1, work, m ? m->n_out : 0);
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
    rc = check_call(m, batch, x, dy_dx, 1, work, jn);
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
            const double h = 6.0554544523933395e-06 * (fabs(xj) > 1.0 ? fabs(xj) : 1.0); /* cbrt(DBL_EPSILON) */
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
