/*
 * nnp_format.c - the weight file (FORMAT.md): little-endian decoding, CRC-32, validation of a hostile buffer
 * (every count, size and offset checked before use), decoding into the caller's storage, and the shape of a
 * loaded model. No floating-point arithmetic beyond copying the weights.
 */
#include "nnp_internal.h"

#include <stdlib.h>

#define NNP_HEADER_BYTES 32u
#define NNP_RECORD_BYTES 24u

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
        /* storage for W, b, Wt and the packed copies (dimensions <= 65536: whole panels cannot overflow a size_t
         * of 64 bits, but are checked like the rest) */
        {
            size_t wb, bb, pw, pt;
            if (!mul_sz(rc, sizeof(float), &wb) || !round_up(wb, &wb) || !mul_sz(cols, sizeof(float), &bb) ||
                !round_up(bb, &bb) || !mul_sz(wb, 2, &bytes) || !add_sz(bytes, bb, &bytes) ||
                !mul_sz((cols + NNP_PANEL - 1) / NNP_PANEL * NNP_PANEL, rows, &pw) ||
                !mul_sz(pw, sizeof(float), &pw) || !round_up(pw, &pw) ||
                !mul_sz((rows + NNP_PANEL - 1) / NNP_PANEL * NNP_PANEL, cols, &pt) ||
                !mul_sz(pt, sizeof(float), &pt) || !round_up(pt, &pt) || !add_sz(bytes, pw, &bytes) ||
                !add_sz(bytes, pt, &bytes) || !add_sz(storage, bytes, &storage))
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

/* A [rows][cols] packed in panels of NNP_PANEL columns at *p (nnp_internal.h), the last one zero-padded; advances *p
 * past it, to the next aligned address. */
static const float *pack_panels(const float *A, size_t rows, size_t cols, unsigned char **p)
{
    float *P = (float *)(void *)*p;
    const size_t npan = (cols + NNP_PANEL - 1) / NNP_PANEL;
    size_t q, i, c;
    for (q = 0; q < npan; q++)
        for (i = 0; i < rows; i++)
            for (c = 0; c < NNP_PANEL; c++) {
                const size_t j = q * NNP_PANEL + c;
                P[(q * rows + i) * NNP_PANEL + c] = j < cols ? A[i * cols + j] : 0.0f;
            }
    *p += ((npan * NNP_PANEL * rows * sizeof(float) + NNP_ALIGN - 1) / NNP_ALIGN) * NNP_ALIGN;
    return P;
}

/* The kernels of the batch paths for this CPU (nnp_simd.h), at most the level the environment variable NNP_MAX_ISA
 * names ("base", "avx2", "avx512"; unset or anything else: no limit), which lets tests compare the builds. */
static int choose_isa(void)
{
    const char *cap = getenv("NNP_MAX_ISA");
    int isa = nnp_cpu_isa();
    if (cap != NULL) {
        if (strcmp(cap, "base") == 0) isa = 0;
        else if (strcmp(cap, "avx2") == 0 && isa > 1) isa = 1;
    }
    return isa;
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
    nnp_cpu_init(); /* run-time dispatch (nnp_simd.h): valid feature checks even before constructors ran */

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
        layers[k].Wp = pack_panels(W, rows, cols, &p);
        layers[k].Wtp = pack_panels(Wt, cols, rows, &p);
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
    m->isa = choose_isa();
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
