/*
 * nnp_kernels.h - private to the C core: the float32 pieces that the batch kernels (nnp_batch.c) and the
 * single-point path (nnp_point.c) share: activations with their derivatives, and dot products. All are
 * always-inline, so that each dispatched block function compiles its own copy for its target (nnp_simd.h).
 */
#ifndef NNP_KERNELS_H
#define NNP_KERNELS_H

#include "nnp_internal.h"

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
#if NNP_VECTOR_EXT
    /* the fused multiply-add written out: GCC would vectorize `s += a[p] * b[p]` as an in-order reduction in some
     * builds (AVX-512's masked loads make it pay for a few steps) and round the products apart from the sums there */
    for (; p < k; p++) s = fmaf(a[p], b[p], s);
#else
    for (; p < k; p++) s += a[p] * b[p];
#endif
    return s;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Activations (float32). z holds pre-activations with the bias not yet added.                            */

#define SQRT1_2F 0.70710678118654752440f
#define INV_SQRT_2PI_F 0.39894228040143267794f
#define SQRT_2_OVER_PI_F 0.79788456080286535588f
#define GELU_C 0.044715f

/* tanh(v) in float32, without a call to libm, so that the activation loops vectorize (tanhf, a call per unit, was
 * about a fifth of a Hessian of the 4 x 256 tanh physics network). |v| < 0.625: v + v^3 P(v^2), P fitted on
 * [0, 0.625] (relative error 1.4e-8); above: 1 - 2 / (e^2|v| + 1) with e^y = 2^k e^r, r = y - k ln 2 in two parts,
 * e^r to degree 7; both on |v|, then the sign of v put back as a bit (v itself where |v| is not a number). Largest
 * error 1.35 ulp over [2^-31, 20] (glibc 2.36's tanhf: 2.2 ulp); exact at 0 (either sign), +-1 from |v| = 9.01 on,
 * NaN for NaN. (Computed on |v| with one select and the sign as a bit, the loop has three compares and blends fewer
 * than with v's sign carried through both branches: 9 % faster with AVX-512, 19 % with AVX2, every one of the 2^32
 * inputs giving the same bits.) */
NNP_INLINE float nnp_tanhf(float v)
{
    const float ax = fabsf(v), t = v * v;
    const float p = -0.05376731332847701f + t * (0.020731528389333058f + t * -0.0058104671101367545f);
    const float ps = ax + (ax * t) * (-0.33333293148976084f + t * (0.133317616524757f + t * p));
    const float y = 2.0f * (ax < 20.0f ? ax : 20.0f); /* NaN: 20, so that k stays finite */
    const float k = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(y / ln 2), 0 .. 58 */
    const float r = (y - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    const float q = 1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)));
    const float er = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * q)));
    const unsigned int bits = (unsigned int)((int)k + 127) << 23; /* 2^k */
    float scale, a, res;
    unsigned int ab, vb;
    memcpy(&scale, &bits, sizeof scale);
    a = ax < 0.625f ? ps : 1.0f - 2.0f / (er * scale + 1.0f); /* tanh |v|, +0 at 0 */
    memcpy(&ab, &a, sizeof ab);
    memcpy(&vb, &v, sizeof vb);
    ab |= vb & 0x80000000u;
    memcpy(&res, &ab, sizeof res);
    return ax == ax ? res : v;
}

/* e^yc = er * 2^k for a yc within nnp_expf's clamps: k = round(yc / ln 2) (returned in *k), er = e^r to degree 7 */
NNP_INLINE float nnp_exp_reduced(float yc, float *k_out)
{
    const float k = (yc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(yc / ln 2) */
    const float r = (yc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    const float q = 1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)));
    *k_out = k;
    return 1.0f + (r + (r * r) * (0.5f + r * (1.0f / 6.0f + r * q))); /* 1 + (...): one rounding near 1 */
}

/* e^y in float32 without libm, for the activations built on it (sigmoid, swish, softplus, gelu; the exponential
 * activation itself keeps libm's expf, within half an ulp), vectorizable as nnp_tanhf: at most 1 ulp.
 * y = k ln 2 + r, |r| <= ln 2 / 2, r in two parts, e^r to degree 7 (truncation 5e-9 relative), times 2^(k/2) and
 * 2^(k - k/2) so that both scales are normal floats and results below the normal range round gradually. 0 below -104,
 * +inf above 88.72 and for +inf, NaN for NaN. */
NNP_INLINE float nnp_expf(float y)
{
    const float yc = y > -104.0f ? (y < 88.75f ? y : 88.75f) : -104.0f; /* NaN: -104, so that k stays finite */
    float k;
    const float er = nnp_exp_reduced(yc, &k); /* k in -150 .. 128 */
    const int ki = (int)k, k1 = ki / 2, k2 = ki - k1; /* each in -75 .. 64 */
    const unsigned int b1 = (unsigned int)(k1 + 127) << 23, b2 = (unsigned int)(k2 + 127) << 23;
    float s1, s2, e;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    e = (er * s1) * s2;
    e = y < -104.0f ? 0.0f : e;
    return y > 88.7228391f ? HUGE_VALF : (y == y ? e : y);
}

/* e^y for y <= 0, for gelu's e^(-v^2 / 2): nnp_expf's arithmetic without what that range does not need (no upper
 * end; one scale 2^k, as k >= -126), and 0 below y = -87, where e^y < 1.7e-38 (gelu's results there are below 1e-37
 * in size; nnp_expf would give them gradually). NaN gives a number: every use of it by gelu also multiplies by v, so
 * the results are NaN all the same. About a fifth cheaper than nnp_expf in the gelu loop. */
NNP_INLINE float nnp_exp_nonpos(float y)
{
    const float yc = y > -87.0f ? y : -87.0f; /* NaN: -87, so that k stays finite */
    float k;
    const float er = nnp_exp_reduced(yc, &k); /* k in -126 .. 0 */
    const unsigned int bits = (unsigned int)((int)k + 127) << 23; /* 2^k */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y < -87.0f ? 0.0f : er * scale;
}

/* The standard normal distribution function Phi(v) = (1 + erf(v / sqrt 2)) / 2 and e = exp(-v^2 / 2), for gelu,
 * without libm. With z = |v| / sqrt 2: erfc(z) = e * t * R(t), t = 1 / (1 + z / 2), R of degree 9 fitted for relative
 * error on z in [0, 10.5] (2.2e-8; evaluated in float32: 3.2e-7 relative); Phi = erfc(z) / 2 for v < 0 (no
 * cancellation, unlike 1 + erff(v / sqrt 2)), 1 - erfc(z) / 2 otherwise. The halving is folded into R's coefficients
 * (exact) and 1 + z / 2 is one multiply-add. v^2 is split exactly with fmaf (one instruction in the AVX2 build; a libm
 * call in the SSE2 baseline, which is correct but slower). Largest relative error of v Phi(v) over |v| <= 13.1 on a
 * 1.3e-5 grid: 5.7e-7 (at v = -13.1; 7.8e-7 with libm-free exp and the unfolded form before). */
NNP_INLINE float nnp_phif(float v, float *e_out)
{
    const float h = v * v, l = fmaf(v, v, -h); /* v^2 = h + l exactly: e keeps its accuracy for large |v| */
    const float e = nnp_exp_nonpos(-0.5f * h) * (1.0f - 0.5f * l);
    const float t = 1.0f / (1.0f + fabsf(v) * (0.5f * SQRT1_2F));
    const float R5 = 2.0141667e-01f +
                     t * (-3.234832e-01f + t * (2.0552556e-01f + t * (-5.7715178e-02f + t * 5.4034917e-03f)));
    const float R = 1.410339e-01f +
                    t * (1.4139362e-01f + t * (1.1963431e-01f + t * (1.1122163e-01f + t * (-4.4430807e-02f + t * R5))));
    const float hc = e * (t * R); /* erfc(z) / 2 */
    *e_out = e;
    return v < 0.0f ? hc : 1.0f - hc;
}

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
        for (j = 0; j < n; j++) z[j] = nnp_tanhf(z[j] + b[j]);
        break;
    case NNP_ACT_SIGMOID:
        for (j = 0; j < n; j++) z[j] = 1.0f / (1.0f + nnp_expf(-(z[j] + b[j])));
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
            z[j] = (v > 0.0f ? v : 0.0f) + log1pf(nnp_expf(-fabsf(v)));
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
            z[j] = v * (1.0f / (1.0f + nnp_expf(-v)));
        }
        break;
    case NNP_ACT_GELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j], e;
            z[j] = v * nnp_phif(v, &e);
        }
        break;
    case NNP_ACT_GELU_TANH:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            z[j] = 0.5f * v * (1.0f + nnp_tanhf(SQRT_2_OVER_PI_F * (v + GELU_C * v * v * v)));
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
            float a = nnp_tanhf(z[j] + b[j]);
            z[j] = a;
            d[j] = 1.0f - a * a;
        }
        break;
    case NNP_ACT_SIGMOID:
        for (j = 0; j < n; j++) {
            float a = 1.0f / (1.0f + nnp_expf(-(z[j] + b[j])));
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
            float e = nnp_expf(-fabsf(v));
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
            float s = 1.0f / (1.0f + nnp_expf(-v));
            z[j] = v * s;
            d[j] = s * (1.0f + v * (1.0f - s));
        }
        break;
    case NNP_ACT_GELU:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float e, c = nnp_phif(v, &e);
            z[j] = v * c;
            d[j] = c + v * INV_SQRT_2PI_F * e;
        }
        break;
    case NNP_ACT_GELU_TANH:
        for (j = 0; j < n; j++) {
            float v = z[j] + b[j];
            float t = nnp_tanhf(SQRT_2_OVER_PI_F * (v + GELU_C * v * v * v));
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

#endif /* NNP_KERNELS_H */
