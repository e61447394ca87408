/* SIMD inner loops shared by the Cython kernels.
 *
 * Each function has one body per instruction set, picked at compile time:
 *   x86-64: AVX-512 VNNI (vpdpbusd), AVX2 + FMA (vpmaddubsw sign trick), scalar;
 *   aarch64: NEON with the dot-product extension (sdot), plain NEON, scalar.
 * A portable build (EDGE_PORTABLE=1) compiles for the baseline and takes the scalar or plain NEON
 * body.  Parallelism across cores is the caller's job (OpenMP in the .pyx files); these functions
 * work on one row.
 *
 * int8 activation layout (produced by edge_quantize_row_q8, consumed by edge_dot_q8):
 *   q[0..Kp)     int8 values, Kp = K rounded up to 64, zero padded;
 *   ls[0..Kp/4)  one float per 4-byte lane: the scale of the 32-element group that holds the lane,
 *                so an int32 lane of a SIMD dot product is scaled by one multiply;
 *   comp         128 * sum_g scale_g * sum_{k in g} q_k: the correction for the u8 x s8 VNNI
 *                instruction, which sees (w + 128) instead of w.
 * Weights are int8 rows of K (no padding) with one fp32 scale per row, applied by the caller.
 */
#ifndef EDGE_SIMD_H
#define EDGE_SIMD_H

#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define EDGE_Q8_GROUP 32

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define EDGE_SIMD_NAME "avx512-vnni"
#define EDGE_Q8_VNNI 1
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

/* K rounded up to a multiple of 64: the padded length of a quantized activation row. */
static inline int edge_q8_padded(int K) { return (K + 63) & ~63; }

/* Quantize x[0..K) to int8 with one scale per group of 32: s = max|x| / 127, q = rint(x * 127/max|x|).
 * Writes q[0..Kp), ls[0..Kp/4), gs[0..ceil(K/32)) and *comp (see the layout above). */
static inline void edge_quantize_row_q8(const float *x, int K, int8_t *q, float *ls, float *gs,
                                        float *comp) {
    const int Kp = edge_q8_padded(K);
    float c = 0.0f;
    int g = 0;
    for (int k0 = 0; k0 < K; k0 += EDGE_Q8_GROUP, g++) {
        const int k1 = k0 + EDGE_Q8_GROUP < K ? k0 + EDGE_Q8_GROUP : K;
        float amax = 0.0f;
        for (int k = k0; k < k1; k++) {
            const float a = fabsf(x[k]);
            amax = a > amax ? a : amax;
        }
        const float s = amax / 127.0f;
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int k = k0; k < k1; k++) {
            int v = (int)lrintf(x[k] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[k] = (int8_t)v;
            sum += v;
        }
        gs[g] = s;
        c += s * (float)sum;
        for (int j = k0 / 4; j < k0 / 4 + EDGE_Q8_GROUP / 4; j++) ls[j] = s;
    }
    for (int k = K; k < Kp; k++) q[k] = 0;
    for (int j = (g * EDGE_Q8_GROUP) / 4; j < Kp / 4; j++) ls[j] = 0.0f;
    *comp = 128.0f * c;
}

/* sum_k x_k * w_k for a quantized activation row (q, ls, comp) and an int8 weight row w[0..K),
 * before the weight row's scale. */
static inline float edge_dot_q8(const int8_t *q, const float *ls, float comp, const int8_t *w, int K) {
    int k = 0;
#if defined(EDGE_Q8_VNNI)
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc = _mm512_setzero_ps();
    for (; k < K; k += 64) {
        __m512i wv;
        if (k + 64 <= K) {
            wv = _mm512_loadu_si512((const void *)(w + k));
        } else {
            const __mmask64 m = (__mmask64)(~0ULL >> (64 - (K - k)));
            wv = _mm512_maskz_loadu_epi8(m, (const void *)(w + k));
        }
        /* (w ^ 0x80) read as u8 is w + 128; q is zero beyond K, so the padding adds nothing. */
        const __m512i av = _mm512_loadu_si512((const void *)(q + k));
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(wv, flip), av);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(ls + k / 4), acc);
    }
    return _mm512_reduce_add_ps(acc) - comp;
#elif defined(__AVX2__)
    (void)comp;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        const __m256i av = _mm256_loadu_si256((const __m256i *)(q + k));
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        /* |a| x sign(a)*w: u8 x s8 pairs sum to at most 2*127*127, no saturation. */
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(av, av), _mm256_sign_epi8(wv, av));
        const __m256i p32 = _mm256_madd_epi16(p16, ones);
#if defined(__FMA__)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_loadu_ps(ls + k / 4), acc);
#else
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(p32), _mm256_loadu_ps(ls + k / 4)));
#endif
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    float total = _mm_cvtss_f32(s4);
    int tail = 0;
    for (; k < K; k++) tail += (int)q[k] * (int)w[k];
    return total + (float)tail * ls[(K - 1) / 4];
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
    (void)comp;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (; k + 16 <= K; k += 16) {
        const int32x4_t p = vdotq_s32(vdupq_n_s32(0), vld1q_s8(q + k), vld1q_s8(w + k));
        acc = vfmaq_f32(acc, vcvtq_f32_s32(p), vld1q_f32(ls + k / 4));
    }
    float total = vaddvq_f32(acc);
    int tail = 0;
    for (; k < K; k++) tail += (int)q[k] * (int)w[k];
    return total + (float)tail * ls[(K - 1) / 4];
#elif defined(__ARM_NEON)
    (void)comp;
    float total = 0.0f;
    for (; k + 16 <= K; k += 16) {
        const int8x16_t a = vld1q_s8(q + k), b = vld1q_s8(w + k);
        int32x4_t p = vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b)));
        p = vpadalq_s16(p, vmull_s8(vget_high_s8(a), vget_high_s8(b)));
        total += (float)vaddvq_s32(p) * ls[k / 4]; /* 16 | 32: one group per step */
    }
    int tail = 0;
    for (; k < K; k++) tail += (int)q[k] * (int)w[k];
    return total + (float)tail * ls[(K - 1) / 4];
#else
    (void)comp;
    float total = 0.0f;
    for (; k < K; k += EDGE_Q8_GROUP) {
        const int k1 = k + EDGE_Q8_GROUP < K ? k + EDGE_Q8_GROUP : K;
        int32_t sum = 0;
        for (int i = k; i < k1; i++) sum += (int32_t)q[i] * (int32_t)w[i];
        total += (float)sum * ls[k / 4];
    }
    return total;
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

#endif /* EDGE_SIMD_H */
