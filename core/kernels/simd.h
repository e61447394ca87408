/* SIMD inner loops shared by the Cython kernels.
 *
 * Each function has one body per instruction set, picked at compile time:
 *   x86-64: AVX2 + FMA (vpmaddubsw with the sign trick), or vpdpbusd where AVX-512 VNNI or AVX-VNNI
 *   exists, scalar;
 *   aarch64: NEON with the dot-product extension (sdot), plain NEON, scalar.
 * A portable build (EDGE_PORTABLE=1) compiles for the baseline and takes the scalar or plain NEON
 * body.  Parallelism across cores is the caller's job (OpenMP in the .pyx files); these functions
 * work on one row.
 *
 * int8 scheme (Q8_0-like): weights are int8 rows of K with one scale per group of 32 along K
 * (stored as fp16 in the file, widened to fp32 by the caller once per row); activations are
 * quantized on the fly by edge_quantize_row_q8 to int8 with one fp32 scale per group of 32, the
 * row zero padded to a multiple of 32.  edge_dot_q8 accumulates int32 inside a group and fp32
 * across groups.
 */
#ifndef EDGE_SIMD_H
#define EDGE_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define EDGE_Q8_GROUP 32

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define EDGE_SIMD_NAME "avx2+avx512-vnni"
#elif defined(__AVXVNNI__)
#define EDGE_SIMD_NAME "avx2+avx-vnni"
#elif defined(__AVX2__)
#define EDGE_SIMD_NAME "avx2"
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define EDGE_SIMD_NAME "neon-dotprod"
#elif defined(__ARM_NEON)
#define EDGE_SIMD_NAME "neon"
#else
#define EDGE_SIMD_NAME "scalar"
#endif

static inline const char *edge_simd_name(void) { return EDGE_SIMD_NAME; }

/* K rounded up to a multiple of 32: the padded length of a quantized activation row. */
static inline int edge_q8_padded(int K) { return (K + 31) & ~31; }

/* IEEE half -> float. */
static inline float edge_f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        const float f = (float)mant * 5.9604644775390625e-8f; /* mant * 2^-24: zero or subnormal */
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112u) << 23) | (mant << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* dst[i] = float(src[i]) for n IEEE halves, eight at a time where F16C exists. */
static inline void edge_f16_to_f32_row(const uint16_t *src, float *dst, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = edge_f16_to_f32(src[i]);
}

/* Quantize x[0..K) to int8 with one scale per group of 32: s = max|x| / 127, q = rint(x * 127/max|x|).
 * Writes q[0..Kp) (zero padded to a multiple of 32) and s[0..ceil(K/32)). */
static inline void edge_quantize_row_q8(const float *x, int K, int8_t *q, float *s) {
    int g = 0;
    for (int k0 = 0; k0 < K; k0 += EDGE_Q8_GROUP, g++) {
        const int k1 = k0 + EDGE_Q8_GROUP < K ? k0 + EDGE_Q8_GROUP : K;
        float amax = 0.0f;
        for (int k = k0; k < k1; k++) {
            const float a = fabsf(x[k]);
            amax = a > amax ? a : amax;
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int k = k0; k < k1; k++) {
            int v = (int)lrintf(x[k] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[k] = (int8_t)v;
        }
        s[g] = amax / 127.0f;
    }
    for (int k = K; k < edge_q8_padded(K); k++) q[k] = 0;
}

/* sum_g xs[g] * ws[g] * sum_{k in group g} q_k * w_k: the dot product of an int8 activation row
 * (q, one scale xs per group of 32) with an int8 weight row (w, one scale ws per group of 32).
 * int32 accumulation inside a group, fp32 across groups. */
static inline float edge_dot_q8(const int8_t *q, const float *xs, const int8_t *w, const float *ws, int K) {
    int k = 0, g = 0;
    float total = 0.0f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
#if !((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (; k + 32 <= K; k += 32, g++) {
        const __m256i av = _mm256_loadu_si256((const __m256i *)(q + k));
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        /* |a| (u8) x sign(a)*w (s8): pairs sum to at most 2*127*127, no saturation. */
        const __m256i ua = _mm256_sign_epi8(av, av), sw = _mm256_sign_epi8(wv, av);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        const __m256i p32 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, sw);
#elif defined(__AVXVNNI__)
        const __m256i p32 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ua, sw);
#else
        const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(ua, sw), ones);
#endif
        const __m256 scale = _mm256_set1_ps(xs[g] * ws[g]);
#if defined(__FMA__)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc);
#else
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(p32), scale));
#endif
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    total = _mm_cvtss_f32(s4);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (; k + 32 <= K; k += 32, g++) {
#if defined(__ARM_FEATURE_DOTPROD)
        int32x4_t p = vdotq_s32(vdupq_n_s32(0), vld1q_s8(q + k), vld1q_s8(w + k));
        p = vdotq_s32(p, vld1q_s8(q + k + 16), vld1q_s8(w + k + 16));
#else
        int32x4_t p = vdupq_n_s32(0);
        for (int h = 0; h < 32; h += 16) {
            const int8x16_t a = vld1q_s8(q + k + h), b = vld1q_s8(w + k + h);
            p = vpadalq_s16(p, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
            p = vpadalq_s16(p, vmull_s8(vget_high_s8(a), vget_high_s8(b)));
        }
#endif
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), xs[g] * ws[g]);
    }
    total = vaddvq_f32(acc);
#endif
    /* the remaining groups (all of them in a scalar build), the last one possibly partial */
    for (; k < K; k += EDGE_Q8_GROUP, g++) {
        const int k1 = k + EDGE_Q8_GROUP < K ? k + EDGE_Q8_GROUP : K;
        int32_t sum = 0;
        for (int i = k; i < k1; i++) sum += (int32_t)q[i] * (int32_t)w[i];
        total += (float)sum * (xs[g] * ws[g]);
    }
    return total;
}

/* A 4 x 2 block of edge_dot_q8: out[2r + c] = dot(activation row r, weight row c), for the
 * prefill shape.  Each weight vector is loaded once for four rows and |a| once for two weight
 * rows; the scales are multiplied per group.  Rows are q + r * q_stride (and xs + r * xs_stride). */
static inline void edge_dot_q8_4x2(const int8_t *q, size_t q_stride, const float *xs, size_t xs_stride,
                                   const int8_t *w0, const int8_t *w1, const float *ws0, const float *ws1,
                                   int K, float *out) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#if !((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    int k = 0, g = 0;
    for (; k + 32 <= K; k += 32, g++) {
        const __m256i wa = _mm256_loadu_si256((const __m256i *)(w0 + k));
        const __m256i wb = _mm256_loadu_si256((const __m256i *)(w1 + k));
        const __m256 sa = _mm256_set1_ps(ws0[g]), sb = _mm256_set1_ps(ws1[g]);
        for (int r = 0; r < 4; r++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *)(q + r * q_stride + k));
            const __m256i ua = _mm256_sign_epi8(av, av);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            const __m256i pa = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, _mm256_sign_epi8(wa, av));
            const __m256i pb = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, _mm256_sign_epi8(wb, av));
#elif defined(__AVXVNNI__)
            const __m256i pa = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ua, _mm256_sign_epi8(wa, av));
            const __m256i pb = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), ua, _mm256_sign_epi8(wb, av));
#else
            const __m256i pa = _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(wa, av)), ones);
            const __m256i pb = _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(wb, av)), ones);
#endif
            const __m256 sx = _mm256_broadcast_ss(xs + r * xs_stride + g);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pa), _mm256_mul_ps(sx, sa), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pb), _mm256_mul_ps(sx, sb), acc[r][1]);
        }
    }
    for (int r = 0; r < 4; r++) {
        for (int c = 0; c < 2; c++) {
            __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r][c]), _mm256_extractf128_ps(acc[r][c], 1));
            s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
            out[2 * r + c] = _mm_cvtss_f32(s4);
        }
        if (k < K) {   /* the last, partial group */
            const int8_t *a = q + r * q_stride;
            int32_t s0 = 0, s1 = 0;
            for (int i = k; i < K; i++) {
                s0 += (int32_t)a[i] * (int32_t)w0[i];
                s1 += (int32_t)a[i] * (int32_t)w1[i];
            }
            out[2 * r] += (float)s0 * (xs[r * xs_stride + g] * ws0[g]);
            out[2 * r + 1] += (float)s1 * (xs[r * xs_stride + g] * ws1[g]);
        }
    }
#else
    for (int r = 0; r < 4; r++) {
        out[2 * r] = edge_dot_q8(q + r * q_stride, xs + r * xs_stride, w0, ws0, K);
        out[2 * r + 1] = edge_dot_q8(q + r * q_stride, xs + r * xs_stride, w1, ws1, K);
    }
#endif
}

/* sum_k a_k * b_k in fp32. */
static inline float edge_dot_f32(const float *a, const float *b, int K) {
    int k = 0;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
    }
    for (; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float total = _mm_cvtss_f32(s4);
    for (; k < K; k++) total += a[k] * b[k];
    return total;
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    for (; k + 8 <= K; k += 8) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + k), vld1q_f32(b + k));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + k + 4), vld1q_f32(b + k + 4));
    }
    float total = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; k < K; k++) total += a[k] * b[k];
    return total;
#else
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (; k + 4 <= K; k += 4) {
        s0 += a[k] * b[k];
        s1 += a[k + 1] * b[k + 1];
        s2 += a[k + 2] * b[k + 2];
        s3 += a[k + 3] * b[k + 3];
    }
    for (; k < K; k++) s0 += a[k] * b[k];
    return (s0 + s1) + (s2 + s3);
#endif
}

/* Softmax of x[0..n) in place, in fp32: x = exp(x - max) / sum.  The exponential is the classic
 * Cephes range reduction (x = k ln2 + r, |r| <= ln2/2) with a degree-5 polynomial, eight lanes at
 * a time where AVX2 exists (about 1 ulp); plain expf otherwise. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 edge_exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline void edge_softmax_f32(float *x, int n) {
    int i = 0;
    float mx = x[0];
    double total = 0.0;
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 8) {
        __m256 m8 = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        mx = _mm_cvtss_f32(m4);
    }
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    const __m256 vmax = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = edge_exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    total = _mm_cvtss_f32(s4);
#else
    for (i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    i = 0;
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        total += x[i];
    }
    const float inv = (float)(1.0 / total);
    for (i = 0; i < n; i++) x[i] *= inv;
}

/* x[i] = gelu(x[i]) = 0.5 x (1 + erf(x / sqrt 2)), in place.  erfc(z) for z >= 0 is Abramowitz &
 * Stegun 7.1.26, t (a1 + t (a2 + ... a5 t)) exp(-z^2) with t = 1 / (1 + p z), absolute error below
 * 1.5e-7; 1 + erf(-z) is taken as erfc(z) directly, so negative inputs lose nothing to
 * cancellation.  Eight lanes at a time where AVX2 exists; erff otherwise. */
static inline void edge_gelu_erf_f32(float *x, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(0.70710678118654752f));
        const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), z, one));
        __m256 p = _mm256_set1_ps(1.061405429f);
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
        p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
        const __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), edge_exp_ps(_mm256_mul_ps(_mm256_xor_ps(z, sign), z)));
        const __m256 negative = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
        const __m256 one_plus_erf = _mm256_blendv_ps(_mm256_sub_ps(two, erfc), erfc, negative);
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v), one_plus_erf));
    }
#endif
    for (; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). */
static inline void edge_silu_mul_f32(float *out, const float *gate, const float *up, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = edge_exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#endif /* EDGE_SIMD_H */
