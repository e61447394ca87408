/* SIMD inner loops shared by the Cython kernels.
 *
 * Each function has one body per instruction set, picked at compile time:
 *   x86-64: AVX2 + FMA (vpmaddubsw with the sign trick; the sums of its 4 x 2 tile in inline
 *   assembly; -DEDGE_NO_ASM for intrinsics only), or where AVX-512 VNNI or AVX-VNNI exists
 *   vpdpbusd on u8 activations (a + 128) with a compensation term (see edge_dot_q8_tile), scalar;
 *   aarch64: NEON with the dot-product extension (sdot), plain NEON, scalar.
 * A portable build (EDGE_PORTABLE=1) compiles for the baseline and takes the scalar or plain NEON
 * body.  Parallelism across cores is the caller's job (OpenMP in the .pyx files); these functions
 * work on one row.
 *
 * int8 scheme (Q8_0-like): weights are int8 rows of K with one scale per group of 32 along K
 * (stored as fp16 in the file, widened to fp32 by the caller once per row); activations are
 * quantized on the fly by edge_quantize_row_q8 to int8 with one fp32 scale per group of 32, the
 * row zero padded to a multiple of 32.  The dot products accumulate int32 inside a group and fp32
 * across groups.  Both operands are stored in the interleaved layout described at
 * edge_q8_pack_index, weights by the converter and activations by edge_quantize_row_q8.
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

#if defined(EDGE_EMULATE_VNNI) && defined(__AVX2__)
#define EDGE_SIMD_NAME "avx2+emulated-vnni"     /* tests only: the VNNI body, vpdpbusd in AVX2 */
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
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

/* The bytes of one quantized activation row: its values (edge_q8_padded), then, where the VNNI
 * body runs, its compensation: for each block of the packed layout (below), eight int32 lanes
 * of 128 times the sum of the values that lane sees (sum_j of vpdpbusd(0x80 bytes, a_j)).  The
 * VNNI tile feeds the weights as the unsigned operand, w + 128 (w with its top bit flipped), so a
 * lane sums (w + 128) a = w a + 128 a, and subtracts the row's compensation once per block. */
static inline int edge_q8_n_blocks(int K) {
    const int n_groups = K / 32;
    return n_groups / 8 + ((n_groups & 4) != 0) + ((n_groups & 2) != 0) + ((n_groups & 1) != 0);
}

#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__) || defined(EDGE_EMULATE_VNNI)
#define EDGE_VNNI 1
/* acc + the 8 lanes of sum over 4 bytes of u8 a x s8 w (vpdpbusd: int32 sums, no saturation) */
#if defined(EDGE_EMULATE_VNNI)      /* tests only: the VNNI body on an AVX2 CPU, exact and slow */
static inline __m256i edge_dpbusd(__m256i acc, __m256i a, __m256i w) {
    const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(a)),
                                         _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w)));
    const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1)),
                                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1)));
    /* lo: pair sums of bytes 0-15 (lanes 2l, 2l+1 -> 4-byte chunk l), hi: bytes 16-31 */
    const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xd8);
    return _mm256_add_epi32(acc, sums);
}
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define edge_dpbusd(acc, a, w) _mm256_dpbusd_epi32((acc), (a), (w))
#else
#define edge_dpbusd(acc, a, w) _mm256_dpbusd_avx_epi32((acc), (a), (w))
#endif
#endif

static inline int edge_q8_row_bytes(int K) {
#if defined(EDGE_VNNI)
    return edge_q8_padded(K) + 32 * edge_q8_n_blocks(K);
#else
    return edge_q8_padded(K);
#endif
}

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

/* float -> IEEE half, rounding to nearest even (overflow to infinity, NaN stays a quiet NaN): the
 * KV cache's storage type.  F16C where it exists; otherwise the rounding spelled out. */
static inline uint16_t edge_f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((ax >> 13) & 0x3ffu);   /* NaN, made quiet */
    if (ax >= 0x477ff000u) return sign | 0x7c00u;       /* 65520 and up (infinity too) round to infinity */
    if (ax < 0x38800000u) {                             /* below 2^-14: a subnormal half, or zero */
        if (ax < 0x33000000u) return sign;              /* below 2^-25 (and 2^-25 itself, a tie) round to 0 */
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126u - (ax >> 23);   /* 14..24 */
        uint32_t h = m >> shift;
        const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rest > half || (rest == half && (h & 1u))) h++;
        return sign | (uint16_t)h;
    }
    uint32_t h = (ax >> 13) - (112u << 10);             /* exponent rebiased 127 -> 15, 10 mantissa bits */
    const uint32_t rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;    /* a carry moves into the exponent */
    return sign | (uint16_t)h;
#endif
}

/* n floats to halves and back: the KV cache stores K and V rows as halves, and attention widens a
 * block of them to fp32 before its dot products (exact: every half is a float). */
static inline void edge_f32_to_f16_row(const float *x, uint16_t *h, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1_u16(h + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
#endif
    for (; i < n; i++) h[i] = edge_f32_to_f16(x[i]);
}

static inline void edge_f16_to_f32_row(const uint16_t *h, float *x, int n) {
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
#endif
    for (; i < n; i++) x[i] = edge_f16_to_f32(h[i]);
}

/* Interleaved int8 rows.  Both operands of an int8 dot product, the weight rows (at convert time)
 * and the quantized activation rows (as they are quantized), are stored in one layout, so that a
 * 32-bit lane of a SIMD sum sees one group only.  The whole groups of a row are split into blocks:
 * as many blocks of 8 groups (256 values) as fit, then at most one block each of 4, 2 and 1 groups
 * (K = 576: two blocks of 8 and one of 2; K = 384: one of 8 and one of 4).  In a block of S groups
 * starting at value b, the 32-byte vector j < S holds in its 4-byte lane l chunk c = j (8/S) + l/S
 * of group g = l mod S:
 *
 *     packed[b + 32 j + 4 l + i] = natural[b + 32 g + 4 c + i]     (l < 8, i < 4),
 *
 * which for S = 8 is chunk j of all 8 groups, and for S = 1 the natural order.  Integer sums then
 * run over a whole block, and the group scales are applied once per block as one vector (lane l
 * scaled by group l mod S) instead of once per group.  The values of a last, partial group
 * (K mod 32) keep their natural order.  The layout is the same on every instruction set; NEON
 * reads a vector as two halves (lanes 0-3 and 4-7). */
#define EDGE_Q8_BLOCK 256
#ifndef EDGE_PREFETCH_LOCALITY
#define EDGE_PREFETCH_LOCALITY 3
#endif
#ifndef EDGE_PREFETCH_ROWS
#define EDGE_PREFETCH_ROWS 4
#endif
/* The most bytes of weight rows a matmul asks for at once: about the lines a core can have in
 * flight (Zen 4's L1 has 24 miss buffers).  More in one burst stalls the core until they arrive;
 * a matmul spreads them over its blocks instead (the down projection of a 16-row decode step from
 * memory: 1.28x). */
#ifndef EDGE_PREFETCH_BURST
#define EDGE_PREFETCH_BURST 1536
#endif
/* the largest int8 tile, rows x weight rows (edge_dot_q8_tile) */
#define EDGE_TILE_R 4
#define EDGE_TILE_C 2

/* The block holding whole group gi of a row of n_groups whole groups: its first group and size S. */
static inline void edge_q8_block_of(int gi, int n_groups, int *first, int *S) {
    const int full = n_groups / 8 * 8;
    if (gi < full) {
        *first = gi & ~7;
        *S = 8;
        return;
    }
    int b = full;
    for (int size = 4; size >= 1; size >>= 1)
        if (n_groups & size) {
            if (gi < b + size) {
                *first = b;
                *S = size;
                return;
            }
            b += size;
        }
    *first = gi;     /* not reached for gi < n_groups */
    *S = 1;
}

/* Where natural index k of a row of K values lives in the packed row. */
static inline int edge_q8_pack_index(int k, int K) {
    const int n_groups = K / 32;
    if (k >= n_groups * 32) return k;
    int first, S;
    edge_q8_block_of(k / 32, n_groups, &first, &S);
    const int g = k / 32 - first, c = (k & 31) >> 2, per = 8 / S;
    return 32 * first + 32 * (c / per) + 4 * ((c % per) * S + g) + (k & 3);
}

/* out[k] = value k of a packed int8 row (natural order) times its group's scale (fp16 bits): the
 * layout undone a 4-byte chunk at a time (an int8 embedding lookup). */
static inline void edge_q8_dequantize_row(const int8_t *packed, const uint16_t *scale, int K, float *out) {
    const int n_groups = K / 32;
    for (int g0 = 0; g0 < n_groups;) {
        int first, S;
        edge_q8_block_of(g0, n_groups, &first, &S);
        for (int j = 0; j < S; j++)
            for (int l = 0; l < 8; l++) {
                const int g = first + l % S;
                const float s = edge_f16_to_f32(scale[g]);
                const int8_t *src = packed + 32 * first + 32 * j + 4 * l;
                float *dst = out + 32 * g + 4 * (j * (8 / S) + l / S);
                for (int i = 0; i < 4; i++) dst[i] = (float)src[i] * s;
            }
        g0 = first + S;
    }
    for (int k = 32 * n_groups; k < K; k++) out[k] = (float)packed[k] * edge_f16_to_f32(scale[n_groups]);
}

#if defined(__AVX2__)
/* dst[32 c + 4 j .. +4) = chunk c (bytes 4c..4c+3) of r[j], for j, c < 8: an 8 x 8 transpose of
 * 4-byte chunks, stored as 8 vectors. */
static inline void edge_store_transposed_8x8(int8_t *dst, const __m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);       /* c0 c0 c1 c1 | c4 c4 c5 c5 */
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);   /* c2 c2 c3 c3 | c6 c6 c7 c7 */
    }
    for (int h = 0; h < 2; h++) {       /* rows 0-3, then 4-7 */
        __m256i *const v = u + 4 * h;
        const __m256i *const w = t + 4 * h;
        v[0] = _mm256_unpacklo_epi64(w[0], w[2]);       /* c0 of 4 rows | c4 */
        v[1] = _mm256_unpackhi_epi64(w[0], w[2]);       /* c1 | c5 */
        v[2] = _mm256_unpacklo_epi64(w[1], w[3]);       /* c2 | c6 */
        v[3] = _mm256_unpackhi_epi64(w[1], w[3]);       /* c3 | c7 */
    }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_si256((__m256i *)(dst + 32 * c), _mm256_permute2x128_si256(u[c], u[4 + c], 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 32 * (c + 4)), _mm256_permute2x128_si256(u[c], u[4 + c], 0x31));
    }
}
#endif

/* Quantize x[0..K) to int8 with one scale per group of 32: s = max|x| / 127, q = rint(x * 127/max|x|),
 * rounding half to even.  Writes q[0..edge_q8_row_bytes(K)): the values in the packed layout (zero
 * padded to a multiple of 32), then the compensation where the VNNI body runs; and s[0..ceil(K/32)). */
static inline void edge_quantize_row_q8(const float *x, int K, int8_t *q, float *s) {
    int g = 0, k0 = 0;
#if defined(__AVX2__)
    const int n_groups = K / EDGE_Q8_GROUP;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i block[8];
    for (; k0 + EDGE_Q8_GROUP <= K; k0 += EDGE_Q8_GROUP, g++) {
        const __m256 v0 = _mm256_loadu_ps(x + k0), v1 = _mm256_loadu_ps(x + k0 + 8);
        const __m256 v2 = _mm256_loadu_ps(x + k0 + 16), v3 = _mm256_loadu_ps(x + k0 + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* |x * inv| <= 127 up to rounding, so the saturating packs never clip */
        const __m256i i01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv)));
        const __m256i i23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv)));
        /* packs work within 128-bit lanes: 4-byte chunks come out as 0 2 4 6 1 3 5 7 */
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i01, i23), order);
        int first, S;
        edge_q8_block_of(g, n_groups, &first, &S);
        if (S == 1) {
            _mm256_storeu_si256((__m256i *)(q + k0), bytes);
        } else if (S == 8) {    /* a block's 8 groups kept, then stored transposed: vector c, lane j = chunk c of group j */
            block[g - first] = bytes;
            if (g - first == 7) edge_store_transposed_8x8(q + 32 * first, block);
        } else {   /* chunk c to vector c / per, lane (c % per) S + (g - first) */
            int32_t chunks[8];
            _mm256_storeu_si256((__m256i *)chunks, bytes);
            const int per = 8 / S;
            int8_t *dst = q + 32 * first + 4 * (g - first);
            for (int c = 0; c < 8; c++) memcpy(dst + 32 * (c / per) + 4 * S * (c % per), &chunks[c], 4);
        }
        s[g] = amax / 127.0f;
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    /* a group's 32 values quantized in four quarter-vectors (vcvtn rounds half to even, as lrintf),
     * then its eight 4-byte chunks put where the layout wants them */
    const int n_groups = K / EDGE_Q8_GROUP;
    for (; k0 + EDGE_Q8_GROUP <= K; k0 += EDGE_Q8_GROUP, g++) {
        float32x4_t v[8];
        for (int i = 0; i < 8; i++) v[i] = vld1q_f32(x + k0 + 4 * i);
        float32x4_t m = vabsq_f32(v[0]);
        for (int i = 1; i < 8; i++) m = vmaxnmq_f32(m, vabsq_f32(v[i]));      /* a NaN skipped, as the loop does */
        const float amax = vmaxnmvq_f32(m);
        const float32x4_t inv = vdupq_n_f32(amax > 0.0f ? 127.0f / amax : 0.0f);
        int16x8_t h[4];
        for (int i = 0; i < 4; i++)     /* |x * inv| <= 127 up to rounding: the narrowings never clip */
            h[i] = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[2 * i], inv))),
                                vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[2 * i + 1], inv))));
        uint32_t chunks[8];
        vst1q_s8((int8_t *)chunks, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
        vst1q_s8((int8_t *)chunks + 16, vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
        int first, S;
        edge_q8_block_of(g, n_groups, &first, &S);
        const int per = 8 / S;      /* chunk c to vector c / per, lane (c % per) S + (g - first) */
        int8_t *dst = q + 32 * first + 4 * (g - first);
        for (int c = 0; c < 8; c++) memcpy(dst + 32 * (c / per) + 4 * S * (c % per), &chunks[c], 4);
        s[g] = amax / 127.0f;
    }
#endif
    for (; k0 < K; k0 += EDGE_Q8_GROUP, g++) {
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
            q[edge_q8_pack_index(k, K)] = (int8_t)v;
        }
        s[g] = amax / 127.0f;
    }
    for (int k = K; k < edge_q8_padded(K); k++) q[k] = 0;
#if defined(EDGE_VNNI)
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    int32_t *comp = (int32_t *)(q + edge_q8_padded(K));
    for (int first = 0, b = 0, S; first < K / 32; first += S, b++) {
        edge_q8_block_of(first, K / 32, &first, &S);
        __m256i sum = _mm256_setzero_si256();
        for (int j = 0; j < S; j++)
            sum = edge_dpbusd(sum, flip, _mm256_loadu_si256((const __m256i *)(q + 32 * (first + j))));
        _mm256_storeu_si256((__m256i *)(comp + 8 * b), sum);
    }
#endif
}

/* sum over group g of q_k * w_k for one group in natural order, the last one possibly partial. */
static inline int32_t edge_dot_i8_plain(const int8_t *q, const int8_t *w, int n) {
    int32_t sum = 0;
    for (int i = 0; i < n; i++) sum += (int32_t)q[i] * (int32_t)w[i];
    return sum;
}

#if defined(__AVX2__)
/* ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): the order of the hadd tree that sums eight
 * vectors at once in edge_dot_q8_tile, so that a dot product does not depend on the tile shape
 * that computed it (a sequence's results must not depend on what it is batched with). */
static inline float edge_hsum_ps(__m256 v) {
    const __m256 h = _mm256_hadd_ps(v, v);
    const __m256 h2 = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1)));
}

/* The 8 scales of a block of S groups by lane (lane l: group l mod S), from p[0..S). */
static inline __attribute__((always_inline)) __m256 edge_block_scales(const int S, const float *p) {
    if (S == 8) return _mm256_loadu_ps(p);
    if (S == 4) return _mm256_broadcast_ps((const __m128 *)p);
    if (S == 2) return _mm256_castpd_ps(_mm256_broadcast_sd((const double *)p));
    return _mm256_broadcast_ss(p);
}

/* The same from S IEEE halves (a weight row's scales as the file stores them), widened in register. */
static inline __attribute__((always_inline)) __m256 edge_block_scales_f16(const int S, const uint16_t *p) {
#if defined(__F16C__)
    __m128i h;
    if (S == 8) h = _mm_loadu_si128((const __m128i *)p);
    else if (S == 4) { int64_t v; memcpy(&v, p, 8); h = _mm_set1_epi64x(v); }
    else if (S == 2) { int32_t v; memcpy(&v, p, 4); h = _mm_set1_epi32(v); }
    else h = _mm_set1_epi16((short)p[0]);
    return _mm256_cvtph_ps(h);
#else
    float f[8];
    for (int i = 0; i < S; i++) f[i] = edge_f16_to_f32(p[i]);
    return edge_block_scales(S, f);
#endif
}

#if !defined(EDGE_VNNI) && defined(__x86_64__) && defined(__GNUC__) && !defined(EDGE_NO_ASM)
#define EDGE_ASM_TILE 1
/* The int32 sums of a 4 x 2 tile over S vectors of 32 bytes (the AVX2 body of edge_q8_tile_block,
 * sign trick and all), with every register placed by hand: the eight sums stay in ymm0-7, the
 * weight vectors in ymm9-10, the constant 1 (int16) in ymm8.  Written with intrinsics the same
 * loop needs 16 vector registers plus the tile's fp32 sums, and gcc spills sums to the stack
 * inside it; this body measured 11-21% faster on Zen 3 (alternating runs, identical results).
 * Activation row r is q + r q_stride; the sums of (r, c) go to sums[8 (2 r + c) .. + 8). */
static inline __attribute__((always_inline)) void
edge_q8_sums_4x2_asm(const int8_t *q, size_t q_stride, const int8_t *w0, const int8_t *w1, int S, int32_t *sums) {
    const int8_t *q3 = q + 3 * q_stride;
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
        "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpcmpeqw %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpsrlw $15, %%ymm8, %%ymm8\n\t"            /* 1 in every int16 lane */
        "1:\n\t"
        "vmovdqu (%[w0]), %%ymm9\n\t"
        "vmovdqu (%[w1]), %%ymm10\n\t"
        /* one activation row: a in ymm11, |a| in ymm12, sign(a) w0 and sign(a) w1 in ymm13-14, then
         * maddubs (u8 x s8 pairs to int16), madd by 1 (int16 pairs to int32), add to the sums */
#define EDGE_ASM_ROW(A, SUM0, SUM1) \
        "vmovdqu " A ", %%ymm11\n\t" \
        "vpsignb %%ymm11, %%ymm11, %%ymm12\n\t" \
        "vpsignb %%ymm11, %%ymm9, %%ymm13\n\t" \
        "vpsignb %%ymm11, %%ymm10, %%ymm14\n\t" \
        "vpmaddubsw %%ymm13, %%ymm12, %%ymm13\n\t" \
        "vpmaddubsw %%ymm14, %%ymm12, %%ymm14\n\t" \
        "vpmaddwd %%ymm8, %%ymm13, %%ymm13\n\t" \
        "vpmaddwd %%ymm8, %%ymm14, %%ymm14\n\t" \
        "vpaddd %%ymm13, " SUM0 ", " SUM0 "\n\t" \
        "vpaddd %%ymm14, " SUM1 ", " SUM1 "\n\t"
        EDGE_ASM_ROW("(%[q])", "%%ymm0", "%%ymm1")
        EDGE_ASM_ROW("(%[q],%[qs],1)", "%%ymm2", "%%ymm3")
        EDGE_ASM_ROW("(%[q],%[qs],2)", "%%ymm4", "%%ymm5")
        EDGE_ASM_ROW("(%[q3])", "%%ymm6", "%%ymm7")
#undef EDGE_ASM_ROW
        "add $32, %[q]\n\t"
        "add $32, %[q3]\n\t"
        "add $32, %[w0]\n\t"
        "add $32, %[w1]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vmovdqa %%ymm0, (%[sums])\n\t"
        "vmovdqa %%ymm1, 32(%[sums])\n\t"
        "vmovdqa %%ymm2, 64(%[sums])\n\t"
        "vmovdqa %%ymm3, 96(%[sums])\n\t"
        "vmovdqa %%ymm4, 128(%[sums])\n\t"
        "vmovdqa %%ymm5, 160(%[sums])\n\t"
        "vmovdqa %%ymm6, 192(%[sums])\n\t"
        "vmovdqa %%ymm7, 224(%[sums])\n\t"
        : [q] "+r"(q), [q3] "+r"(q3), [w0] "+r"(w0), [w1] "+r"(w1), [n] "+r"(S)
        : [qs] "r"(q_stride), [sums] "r"(sums)
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
          "xmm12", "xmm13", "xmm14", "memory", "cc");
}
#endif

/* One block of S groups (S vectors of 32 bytes from value k, first group g; its compensation at
 * byte comp_at of each activation row) of an R x C tile: int32 sums over the block, then
 * acc[r][c] += sums * (xs_r * ws_c) by lane. */
static inline __attribute__((always_inline)) void
edge_q8_tile_block(const int S, const int R, const int C, const int8_t *q, size_t q_stride, const float *xs,
                   size_t xs_stride, const int8_t *const *w, const uint16_t *const *ws, int k, int g, int comp_at,
                   __m256 acc[EDGE_TILE_R][EDGE_TILE_C]) {
    __m256i isum[EDGE_TILE_R][EDGE_TILE_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) isum[r][c] = _mm256_setzero_si256();
#if defined(EDGE_VNNI)
    /* u8 x s8 without the sign trick: (w + 128) . a - 128 . a, where w + 128 is w with its top
     * bit flipped and 128 . a is the activation row's compensation, summed when it was quantized
     * (edge_q8_row_bytes): one vpdpbusd per row and weight vector, and a flip per weight vector */
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int j = 0; j < S; j++) {
        __m256i uw[EDGE_TILE_C];
        for (int c = 0; c < C; c++)
            uw[c] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w[c] + k + 32 * j)), flip);
        for (int r = 0; r < R; r++) {
            __m256i av = _mm256_loadu_si256((const __m256i *)(q + r * q_stride + k + 32 * j));
            __asm__("" : "+x"(av));     /* loaded once for the C weight rows, not folded into each vpdpbusd */
            for (int c = 0; c < C; c++) isum[r][c] = edge_dpbusd(isum[r][c], uw[c], av);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m256i comp = _mm256_loadu_si256((const __m256i *)(q + r * q_stride + comp_at));
        for (int c = 0; c < C; c++) isum[r][c] = _mm256_sub_epi32(isum[r][c], comp);
    }
#else
    /* |a| (u8) x sign(a) w (s8): pairs sum to at most 2 * 127 * 127, no saturation */
#if defined(EDGE_ASM_TILE)
    if (R == 4 && C == 2) {         /* the prefill and batch tile: the same sums, in assembly */
        int32_t sums[EDGE_TILE_R * EDGE_TILE_C * 8] __attribute__((aligned(32)));
        edge_q8_sums_4x2_asm(q + k, q_stride, w[0] + k, w[1] + k, S, sums);
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 2; c++) isum[r][c] = _mm256_load_si256((const __m256i *)(sums + 8 * (2 * r + c)));
    } else
#endif
    {
        const __m256i ones = _mm256_set1_epi16(1);
        for (int j = 0; j < S; j++) {
            __m256i wv[EDGE_TILE_C];
            for (int c = 0; c < C; c++) wv[c] = _mm256_loadu_si256((const __m256i *)(w[c] + k + 32 * j));
            for (int r = 0; r < R; r++) {
                const __m256i av = _mm256_loadu_si256((const __m256i *)(q + r * q_stride + k + 32 * j));
                const __m256i ua = _mm256_sign_epi8(av, av);
                for (int c = 0; c < C; c++)
                    isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(ua, _mm256_sign_epi8(wv[c], av)), ones));
            }
        }
    }
#endif
    __m256 wsv[EDGE_TILE_C];
    for (int c = 0; c < C; c++) wsv[c] = edge_block_scales_f16(S, ws[c] + g);
    for (int r = 0; r < R; r++) {
        const __m256 xsv = edge_block_scales(S, xs + r * xs_stride + g);
        for (int c = 0; c < C; c++)
            acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), _mm256_mul_ps(xsv, wsv[c]), acc[r][c]);
    }
}
#endif

#if defined(__ARM_NEON) && defined(__aarch64__)
/* The scales of a block of S groups for lanes 0-3 (lo) and 4-7 (hi): lane l, group l mod S. */
static inline __attribute__((always_inline)) void
edge_block_scales_neon(const int S, const float *p, float32x4_t *lo, float32x4_t *hi) {
    if (S == 8) {
        *lo = vld1q_f32(p);
        *hi = vld1q_f32(p + 4);
        return;
    }
    *lo = S == 4 ? vld1q_f32(p) : S == 2 ? vcombine_f32(vld1_f32(p), vld1_f32(p)) : vdupq_n_f32(p[0]);
    *hi = *lo;
}

/* The same from S IEEE halves, widened in register (fcvtl: every aarch64 has it). */
static inline __attribute__((always_inline)) void
edge_block_scales_neon_f16(const int S, const uint16_t *p, float32x4_t *lo, float32x4_t *hi) {
    uint16x4_t h;
    if (S >= 4) {
        h = vld1_u16(p);
    } else if (S == 2) {
        uint32_t pair;
        memcpy(&pair, p, 4);
        h = vreinterpret_u16_u32(vdup_n_u32(pair));
    } else {
        h = vdup_n_u16(p[0]);
    }
    *lo = vcvt_f32_f16(vreinterpret_f16_u16(h));
    *hi = S == 8 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4))) : *lo;
}

static inline __attribute__((always_inline)) void
edge_q8_tile_block_neon(const int S, const int R, const int C, const int8_t *q, size_t q_stride, const float *xs,
                        size_t xs_stride, const int8_t *const *w, const uint16_t *const *ws, int k, int g,
                        float32x4_t acc[EDGE_TILE_R][EDGE_TILE_C]) {
    int32x4_t lo[EDGE_TILE_R][EDGE_TILE_C], hi[EDGE_TILE_R][EDGE_TILE_C];    /* lanes 0-3 and 4-7 */
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) lo[r][c] = hi[r][c] = vdupq_n_s32(0);
    for (int j = 0; j < S; j++) {
        for (int r = 0; r < R; r++) {
            const int8x16_t a0 = vld1q_s8(q + r * q_stride + k + 32 * j);
            const int8x16_t a1 = vld1q_s8(q + r * q_stride + k + 32 * j + 16);
            for (int c = 0; c < C; c++) {
                const int8x16_t w0 = vld1q_s8(w[c] + k + 32 * j), w1 = vld1q_s8(w[c] + k + 32 * j + 16);
#if defined(__ARM_FEATURE_DOTPROD)
                lo[r][c] = vdotq_s32(lo[r][c], a0, w0);
                hi[r][c] = vdotq_s32(hi[r][c], a1, w1);
#else
                /* vpaddl pairs, then vpadd folds them into one 4-byte chunk per lane */
                const int32x4_t p0 = vpaddlq_s16(vmull_s8(vget_low_s8(a0), vget_low_s8(w0)));
                const int32x4_t p1 = vpaddlq_s16(vmull_s8(vget_high_s8(a0), vget_high_s8(w0)));
                const int32x4_t p2 = vpaddlq_s16(vmull_s8(vget_low_s8(a1), vget_low_s8(w1)));
                const int32x4_t p3 = vpaddlq_s16(vmull_s8(vget_high_s8(a1), vget_high_s8(w1)));
                lo[r][c] = vaddq_s32(lo[r][c], vpaddq_s32(p0, p1));
                hi[r][c] = vaddq_s32(hi[r][c], vpaddq_s32(p2, p3));
#endif
            }
        }
    }
    float32x4_t wlo[EDGE_TILE_C], whi[EDGE_TILE_C];
    for (int c = 0; c < C; c++) edge_block_scales_neon_f16(S, ws[c] + g, &wlo[c], &whi[c]);
    for (int r = 0; r < R; r++) {
        float32x4_t x0, x1;
        edge_block_scales_neon(S, xs + r * xs_stride + g, &x0, &x1);
        for (int c = 0; c < C; c++) {
            acc[r][c] = vfmaq_f32(acc[r][c], vcvtq_f32_s32(lo[r][c]), vmulq_f32(x0, wlo[c]));
            acc[r][c] = vfmaq_f32(acc[r][c], vcvtq_f32_s32(hi[r][c]), vmulq_f32(x1, whi[c]));
        }
    }
}
#endif

/* The plain-C body of a block of S groups: 32 running products (element e of every vector), a
 * loop the compiler vectorizes for the baseline ISA; lane l = e / 4 belongs to group l mod S. */
static inline void edge_q8_tile_block_plain(const int S, const int R, const int C, const int8_t *q, size_t q_stride,
                                            const float *xs, size_t xs_stride, const int8_t *const *w,
                                            const uint16_t *const *ws, int k, int g, float *out) {
    float wsf[EDGE_TILE_C][8];                 /* the weight rows' scales, widened once for all R rows */
    for (int c = 0; c < C; c++)
        for (int gg = 0; gg < S; gg++) wsf[c][gg] = edge_f16_to_f32(ws[c][g + gg]);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            const int8_t *a = q + r * q_stride + k, *b = w[c] + k;
            int32_t lane[32] = {0};
            for (int j = 0; j < S; j++)
                for (int e = 0; e < 32; e++) lane[e] += (int32_t)a[32 * j + e] * (int32_t)b[32 * j + e];
            for (int gg = 0; gg < S; gg++) {
                int32_t sum = 0;
                for (int l = gg; l < 8; l += S) sum += lane[4 * l] + lane[4 * l + 1] + lane[4 * l + 2] + lane[4 * l + 3];
                out[r * C + c] += (float)sum * (xs[r * xs_stride + g + gg] * wsf[c][gg]);
            }
        }
}

#if defined(__AVX2__)
/* A 4 x 2 tile's results, in the order of edge_dot_q8_tile's hadd tree (row r's pair in lanes 2r,
 * 2r + 1), plus bias[0..2) if given, stored as four pairs: out[r * out_stride + c]. */
static inline __attribute__((always_inline)) void
edge_store_4x2(__m256 v, float *out, size_t out_stride, const float *bias) {
    if (bias != NULL) v = _mm256_add_ps(v, _mm256_castpd_ps(_mm256_broadcast_sd((const double *)bias)));
    const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    _mm_storel_pi((__m64 *)out, lo);
    _mm_storeh_pi((__m64 *)(out + out_stride), lo);
    _mm_storel_pi((__m64 *)(out + 2 * out_stride), hi);
    _mm_storeh_pi((__m64 *)(out + 3 * out_stride), hi);
}
#endif

/* An R x C tile of int8 dot products: out[r * out_stride + c] = sum_g xs_r[g] ws_c[g] sum_{k in g} q_r,k w_c,k
 * (+ bias[c] when bias is not NULL, added last) for R packed activation rows (q + r * q_stride,
 * scales xs + r * xs_stride) and C packed weight rows (w[c], scales ws[c] as IEEE halves, the
 * file's bits, widened in register).  int32 inside a group, fp32 across groups.  Each weight
 * vector is loaded once for R rows and each activation vector once for C weight rows.  Called
 * with constant R <= EDGE_TILE_R and C <= EDGE_TILE_C, and inlined, so that the compiler keeps the
 * tile in registers: the arrays have fixed sizes (sized by R and C they would be variable-length
 * arrays, which live on the stack, and every update of a sum would go through memory). */
static inline __attribute__((always_inline)) void
edge_dot_q8_tile(const int R, const int C, const int8_t *q, size_t q_stride, const float *xs, size_t xs_stride,
                 const int8_t *const *w, const uint16_t *const *ws, int K, float *out, size_t out_stride,
                 const float *bias) {
    const int n_groups = K / EDGE_Q8_GROUP, full = n_groups / 8 * 8;
    float sum[EDGE_TILE_R * EDGE_TILE_C];
    int g = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[EDGE_TILE_R][EDGE_TILE_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    int comp_at = edge_q8_padded(K);        /* the block's compensation in an activation row (VNNI) */
#define EDGE_TILE_BLOCK(S) \
    do { \
        edge_q8_tile_block(S, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, comp_at, acc); \
        g += S; \
        comp_at += 32; \
    } while (0)
    while (g < full) EDGE_TILE_BLOCK(8);
    if (n_groups & 4) EDGE_TILE_BLOCK(4);
    if (n_groups & 2) EDGE_TILE_BLOCK(2);
    if (n_groups & 1) EDGE_TILE_BLOCK(1);
#undef EDGE_TILE_BLOCK
    if (R * C == 8) {       /* eight horizontal sums as one transposing hadd tree */
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][0], acc[0][1]), _mm256_hadd_ps(acc[1][0], acc[1][1]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[2][0], acc[2][1]), _mm256_hadd_ps(acc[3][0], acc[3][1]));
        const __m256 all = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        if (32 * g == K) {  /* no partial group: bias and stores straight from the register */
            edge_store_4x2(all, out, out_stride, bias);
            return;
        }
        _mm256_storeu_ps(sum, all);
    } else {
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) sum[r * C + c] = edge_hsum_ps(acc[r][c]);
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float32x4_t acc[EDGE_TILE_R][EDGE_TILE_C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = vdupq_n_f32(0.0f);
    for (; g < full; g += 8) edge_q8_tile_block_neon(8, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, acc);
    if (n_groups & 4) { edge_q8_tile_block_neon(4, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, acc); g += 4; }
    if (n_groups & 2) { edge_q8_tile_block_neon(2, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, acc); g += 2; }
    if (n_groups & 1) { edge_q8_tile_block_neon(1, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, acc); g += 1; }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sum[r * C + c] = vaddvq_f32(acc[r][c]);
#else
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sum[r * C + c] = 0.0f;
    for (; g < full; g += 8) edge_q8_tile_block_plain(8, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, sum);
    if (n_groups & 4) { edge_q8_tile_block_plain(4, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, sum); g += 4; }
    if (n_groups & 2) { edge_q8_tile_block_plain(2, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, sum); g += 2; }
    if (n_groups & 1) { edge_q8_tile_block_plain(1, R, C, q, q_stride, xs, xs_stride, w, ws, 32 * g, g, sum); g += 1; }
#endif
    /* a last, partial group in natural order, reading no weight byte past K */
    const int k = 32 * g;
    if (k < K)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                sum[r * C + c] += (float)edge_dot_i8_plain(q + r * q_stride + k, w[c] + k, K - k) *
                                  (xs[r * xs_stride + g] * edge_f16_to_f32(ws[c][g]));
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[r * out_stride + c] = bias != NULL ? sum[r * C + c] + bias[c] : sum[r * C + c];
}

/* Ask for [p, p + bytes) to be brought towards the cache ahead of its use: a matmul's next weight
 * rows on its first pass over them (not in a decode step, whose single stream of rows the hardware
 * prefetcher follows better), attention's next KV block. */
static inline void edge_prefetch(const void *p, size_t bytes) {
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, EDGE_PREFETCH_LOCALITY);
}

/* Load one byte of every cache line of [p, p + bytes): plain loads, independent of each other, which
 * the core runs as far ahead as it can and which set the hardware prefetcher streaming.  A one-row
 * attention task does little arithmetic per byte of its KV chunk; read head by head, a block at a
 * time, the chunk came from memory at 7 GB/s a core (Zen 4), touched whole first at 12-14 (an
 * attention call of 2,000 cold keys on one thread: 127 us against 213; prefetching the same lines
 * instead: 161). */
static inline void edge_touch(const void *p, size_t bytes) {
    const uintptr_t end = (uintptr_t)p + bytes;
    for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a < end; a += 64) (void)*(const volatile uint8_t *)a;
}

/* One packed activation row against one packed weight row (inlined: a decode step calls it for
 * every weight row, and as a call it cost 4-5% of a one-row matmul's time). */
static inline __attribute__((always_inline)) float
edge_dot_q8(const int8_t *q, const float *xs, const int8_t *w, const uint16_t *ws, int K) {
    float out;
    edge_dot_q8_tile(1, 1, q, 0, xs, 0, &w, &ws, K, &out, 0, NULL);
    return out;
}

/* Four activation rows (q + r * q_stride) against one weight row (a decode step of four or more
 * rows): out[r * out_stride] (+ bias[0] if bias is not NULL), each with the bits of edge_dot_q8.
 * The weight row is read once for the four, whose sums run side by side. */
static inline __attribute__((always_inline)) void
edge_dot_q8_4x1(const int8_t *q, size_t q_stride, const float *xs, size_t xs_stride, const int8_t *w,
                const uint16_t *ws, int K, float *out, size_t out_stride, const float *bias) {
    edge_dot_q8_tile(4, 1, q, q_stride, xs, xs_stride, &w, &ws, K, out, out_stride, bias);
}

/* One activation row against two weight rows (the rows left over from 4 x 2 tiles): out[c]
 * (+ bias[c] if bias is not NULL). */
static inline __attribute__((always_inline)) void
edge_dot_q8_1x2(const int8_t *q, const float *xs, const int8_t *w0, const int8_t *w1,
                const uint16_t *ws0, const uint16_t *ws1, int K, float *out, const float *bias) {
    const int8_t *w[2] = {w0, w1};
    const uint16_t *ws[2] = {ws0, ws1};
    edge_dot_q8_tile(1, 2, q, 0, xs, 0, w, ws, K, out, 0, bias);
}

/* Four activation rows (q + r * q_stride) against two weight rows (prefill):
 * out[r * out_stride + c] (+ bias[c] if bias is not NULL). */
static inline __attribute__((always_inline)) void
edge_dot_q8_4x2(const int8_t *q, size_t q_stride, const float *xs, size_t xs_stride,
                const int8_t *w0, const int8_t *w1, const uint16_t *ws0, const uint16_t *ws1,
                int K, float *out, size_t out_stride, const float *bias) {
    const int8_t *w[2] = {w0, w1};
    const uint16_t *ws[2] = {ws0, ws1};
    edge_dot_q8_tile(4, 2, q, q_stride, xs, xs_stride, w, ws, K, out, out_stride, bias);
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

/* Attention's two inner loops over n key/value rows (row j at k + j * stride), in fp32, for nq
 * queries that read the same keys: the query heads that share one KV head (grouped-query
 * attention; q_stride = head_dim) or the same head of rows that see the same keys (q_stride = the
 * row width).  Query g is q + g * q_stride, its scores are scores + g * scores_stride.  Every K and
 * V row loaded into a register serves all nq queries.
 *
 * edge_scores_f32_queries: scores_g[j] = scale * dot(q_g, k_j).  Where AVX2 exists and head_dim is a
 * multiple of 8, keys go four at a time (eight for three queries where AVX-512's 32 registers hold
 * the 24 sums): each (head, key) pair keeps eight running sums, folded into four scores by a
 * transposing hadd tree.  With NEON (head_dim a multiple of 4) the same tiles keep four running
 * sums per pair, folded by pairwise adds.  The last n % 4 keys go through edge_dot_f32.  A
 * score depends only on q_g, k_j and whether j is among the last n % 4, never on nq or on how queries
 * are grouped. */
#define EDGE_KV_ROW_MAX 512         /* the longest head edge_scores_f16_queries takes */
/* EDGE_F16C: the vector loops widen halves in register (F16C on x86-64, fcvtl on every aarch64) */
#if defined(__F16C__) || (defined(__ARM_NEON) && defined(__aarch64__))
#define EDGE_F16C 1
#else
#define EDGE_F16C 0
#endif
#if defined(__AVX2__) && defined(__FMA__)
/* Keep a loaded vector in a register: without this gcc folds the load into every FMA that uses it,
 * and a K or V row shared by three queries is read from cache three times. */
#if defined(__AVX512VL__)
#define EDGE_IN_REGISTER(v) __asm__("" : "+v"(v))     /* any of the 32 vector registers */
#else
#define EDGE_IN_REGISTER(v) __asm__("" : "+x"(v))
#endif

static inline __attribute__((always_inline)) __m128 edge_fold4_ps(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

/* Eight K or V values from p + i: floats, or halves widened in register (H16: only where F16C
 * exists, EDGE_F16C; the callers take their plain loops for halves otherwise, whose sums are not
 * in the vector loops' order, so attention widens blocks first there). */
static inline __attribute__((always_inline)) __m256 edge_load8_kv(const void *p, size_t i, const int H16) {
#if defined(__F16C__)
    if (H16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
#endif
    return _mm256_loadu_ps((const float *)p + i);
}

static inline __attribute__((always_inline)) void
edge_scores_fixed(const int NQ, const int NK, const float *q, size_t q_stride, const void *k, size_t stride,
                  int j, int hd, __m128 vscale, float *scores, size_t scores_stride, const int H16) {
    const char *kc[8];
    for (int c = 0; c < NK; c++) kc[c] = (const char *)k + (size_t)(j + c) * stride * (H16 ? 2 : 4);
    __m256 acc[3][8];               /* NQ x NK <= 12 sums, with the NQ query vectors and one key in registers */
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NK; c++) acc[g][c] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) {
        __m256 qv[3];
        for (int g = 0; g < NQ; g++) {
            qv[g] = _mm256_loadu_ps(q + g * q_stride + d);
            EDGE_IN_REGISTER(qv[g]);
        }
        for (int c = 0; c < NK; c++) {
            __m256 kv = edge_load8_kv(kc[c], d, H16);
            EDGE_IN_REGISTER(kv);
            for (int g = 0; g < NQ; g++) acc[g][c] = _mm256_fmadd_ps(qv[g], kv, acc[g][c]);
        }
    }
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NK; c += 4)
            _mm_storeu_ps(scores + g * scores_stride + j + c,
                          _mm_mul_ps(edge_fold4_ps(acc[g][c], acc[g][c + 1], acc[g][c + 2], acc[g][c + 3]), vscale));
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
/* Four K or V values from p + i: floats, or halves widened in register. */
static inline __attribute__((always_inline)) float32x4_t edge_load4_kv(const void *p, size_t i, const int H16) {
    if (H16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p + i)));
    return vld1q_f32((const float *)p + i);
}

/* The NEON body of edge_scores_fixed: four running sums per (query, key), folded into four scores
 * by pairwise adds; a score depends on q_g and k_j alone, as there. */
static inline __attribute__((always_inline)) void
edge_scores_fixed(const int NQ, const int NK, const float *q, size_t q_stride, const void *k, size_t stride,
                  int j, int hd, float32x4_t vscale, float *scores, size_t scores_stride, const int H16) {
    const char *kc[8];
    for (int c = 0; c < NK; c++) kc[c] = (const char *)k + (size_t)(j + c) * stride * (H16 ? 2 : 4);
    float32x4_t acc[3][8];
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NK; c++) acc[g][c] = vdupq_n_f32(0.0f);
    for (int d = 0; d < hd; d += 4) {
        float32x4_t qv[3];
        for (int g = 0; g < NQ; g++) qv[g] = vld1q_f32(q + g * q_stride + d);
        for (int c = 0; c < NK; c++) {
            const float32x4_t kv = edge_load4_kv(kc[c], d, H16);
            for (int g = 0; g < NQ; g++) acc[g][c] = vfmaq_f32(acc[g][c], qv[g], kv);
        }
    }
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NK; c += 4) {
            const float32x4_t folded = vpaddq_f32(vpaddq_f32(acc[g][c], acc[g][c + 1]),
                                                  vpaddq_f32(acc[g][c + 2], acc[g][c + 3]));
            vst1q_f32(scores + g * scores_stride + j + c, vmulq_f32(folded, vscale));
        }
}
#endif

/* The tiles' scale vector and the widest tile of three queries: eight keys where 24 sums fit in the
 * registers (AVX-512's 32, NEON's 32), four otherwise. */
#if defined(__AVX2__) && defined(__FMA__)
#define EDGE_SCORES_TILES 1
#define EDGE_SCORES_STEP 8          /* head_dim a multiple of this */
typedef __m128 edge_scale4_t;
#define edge_scale4(s) _mm_set1_ps(s)
#if defined(__AVX512VL__)
#define EDGE_SCORES_WIDE 1
#else
#define EDGE_SCORES_WIDE 0
#endif
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define EDGE_SCORES_TILES 1
#define EDGE_SCORES_STEP 4
typedef float32x4_t edge_scale4_t;
#define edge_scale4(s) vdupq_n_f32(s)
#define EDGE_SCORES_WIDE 1
#endif

static inline __attribute__((always_inline)) void
edge_scores_queries(const float *q, int nq, size_t q_stride, const void *k, size_t stride, int n, int hd, float scale,
                    float *scores, size_t scores_stride, const int H16) {
    int j = 0;
#if defined(EDGE_SCORES_TILES)
    if (hd % EDGE_SCORES_STEP == 0 && (!H16 || EDGE_F16C)) {
        const edge_scale4_t vscale = edge_scale4(scale);
        int g = 0;
#define EDGE_SCORES_FIXED(NQ, NK) \
        edge_scores_fixed(NQ, NK, q + g * q_stride, q_stride, k, stride, j, hd, vscale, scores + g * scores_stride, \
                          scores_stride, H16)
        for (; g + 3 <= nq; g += 3) {
            j = 0;
            if (EDGE_SCORES_WIDE)
                for (; j + 8 <= n; j += 8) EDGE_SCORES_FIXED(3, 8);     /* 24 sums in 32 registers */
            for (; j + 4 <= n; j += 4) EDGE_SCORES_FIXED(3, 4);
        }
        if (nq - g == 2)
            for (j = 0; j + 4 <= n; j += 4) EDGE_SCORES_FIXED(2, 4);
        if (nq - g == 1) {          /* one head: eight keys at a time, so that eight sums are in flight */
            for (j = 0; j + 8 <= n; j += 8) EDGE_SCORES_FIXED(1, 8);
            for (; j + 4 <= n; j += 4) EDGE_SCORES_FIXED(1, 4);
        }
#undef EDGE_SCORES_FIXED
        j = n - n % 4;
    }
#endif
    for (; j < n; j++) {
        const float *kj = (const float *)k + (size_t)j * stride;
        float row[EDGE_KV_ROW_MAX];             /* H16: the key widened (hd <= EDGE_KV_ROW_MAX) */
        if (H16) {
            edge_f16_to_f32_row((const uint16_t *)k + (size_t)j * stride, row, hd);
            kj = row;
        }
        for (int g = 0; g < nq; g++) scores[g * scores_stride + j] = edge_dot_f32(q + g * q_stride, kj, hd) * scale;
    }
}

static inline void edge_scores_f32_queries(const float *q, int nq, size_t q_stride, const float *k, size_t stride,
                                         int n, int hd, float scale, float *scores, size_t scores_stride) {
    edge_scores_queries(q, nq, q_stride, k, stride, n, hd, scale, scores, scores_stride, 0);
}

/* The same over keys stored as halves (rows of stride halves), widened in register as they are
 * loaded: the same scores as widening the rows first (every half is a float).  hd <= EDGE_KV_ROW_MAX. */
static inline void edge_scores_f16_queries(const float *q, int nq, size_t q_stride, const uint16_t *k, size_t stride,
                                         int n, int hd, float scale, float *scores, size_t scores_stride) {
    edge_scores_queries(q, nq, q_stride, k, stride, n, hd, scale, scores, scores_stride, 1);
}

/* one query head: scores[j] = scale * dot(q, k_j) */
static inline void edge_scores_f32(const float *q, const float *k, size_t stride, int n, int hd, float scale,
                                   float *scores) {
    edge_scores_f32_queries(q, 1, 0, k, stride, n, hd, scale, scores, 0);
}

/* edge_weighted_sum_f32_queries: o_g[0..hd) += sum_j p_g[j] * v_j, with o_g = o + g * o_stride and
 * p_g[j] = p[g * p_stride + j] (edge_weighted_sum_queries: p[g * p_stride + j * p_jstride]).  Where
 * AVX2 exists and head_dim is a multiple of 32, the outputs of up to three queries (six with
 * AVX-512VL) over 32 columns stay in registers across all n rows (three queries with NEON); each
 * element's sum runs over j in order whatever the grouping, so the result does not depend on nq. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) void
edge_weighted_sum_fixed(const int NQ, const int NC, float *o, size_t o_stride, const float *p, size_t p_stride,
                        size_t p_jstride, const void *v, size_t stride, int n, const int H16) {
    __m256 acc[6][8];               /* NQ heads x NC vectors of 8 columns, NQ x NC <= 12 (24 with AVX-512VL) */
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NC; c++) acc[g][c] = _mm256_loadu_ps(o + g * o_stride + 8 * c);
    for (int j = 0; j < n; j++) {
        const char *vj = (const char *)v + (size_t)j * stride * (H16 ? 2 : 4);
        __m256 pj[6];
        for (int g = 0; g < NQ; g++) pj[g] = _mm256_broadcast_ss(p + g * p_stride + j * p_jstride);
        for (int c = 0; c < NC; c++) {
            __m256 vv = edge_load8_kv(vj, 8 * c, H16);
            EDGE_IN_REGISTER(vv);
            for (int g = 0; g < NQ; g++) acc[g][c] = _mm256_fmadd_ps(pj[g], vv, acc[g][c]);
        }
    }
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NC; c++) _mm256_storeu_ps(o + g * o_stride + 8 * c, acc[g][c]);
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
/* The NEON body: NQ heads x NC vectors of 4 columns in registers across all n rows. */
static inline __attribute__((always_inline)) void
edge_weighted_sum_fixed(const int NQ, const int NC, float *o, size_t o_stride, const float *p, size_t p_stride,
                        size_t p_jstride, const void *v, size_t stride, int n, const int H16) {
    float32x4_t acc[3][8];          /* NQ x NC <= 24 */
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NC; c++) acc[g][c] = vld1q_f32(o + g * o_stride + 4 * c);
    for (int j = 0; j < n; j++) {
        const char *vj = (const char *)v + (size_t)j * stride * (H16 ? 2 : 4);
        float32x4_t pj[3];
        for (int g = 0; g < NQ; g++) pj[g] = vdupq_n_f32(p[g * p_stride + j * p_jstride]);
        for (int c = 0; c < NC; c++) {
            const float32x4_t vv = edge_load4_kv(vj, 4 * c, H16);
            for (int g = 0; g < NQ; g++) acc[g][c] = vfmaq_f32(acc[g][c], pj[g], vv);
        }
    }
    for (int g = 0; g < NQ; g++)
        for (int c = 0; c < NC; c++) vst1q_f32(o + g * o_stride + 4 * c, acc[g][c]);
}
#endif

static inline __attribute__((always_inline)) void
edge_weighted_sum_queries(float *o, int nq, size_t o_stride, const float *p, size_t p_stride, size_t p_jstride,
                          const void *v, size_t stride, int n, int hd, const int H16) {
#if defined(__AVX2__) && defined(__FMA__)
    if (hd % 32 == 0 && (!H16 || EDGE_F16C)) {
        int g = 0;
#if defined(__AVX512VL__)
        for (; g + 6 <= nq; g += 6)     /* 24 sums in AVX-512's 32 registers */
            for (int d = 0; d < hd; d += 32)
                edge_weighted_sum_fixed(6, 4, o + g * o_stride + d, o_stride, p + g * p_stride, p_stride, p_jstride,
                                        (const char *)v + d * (H16 ? 2 : 4), stride, n, H16);
#endif
        for (; g + 3 <= nq; g += 3)
            for (int d = 0; d < hd; d += 32)
                edge_weighted_sum_fixed(3, 4, o + g * o_stride + d, o_stride, p + g * p_stride, p_stride, p_jstride,
                                        (const char *)v + d * (H16 ? 2 : 4), stride, n, H16);
        if (nq - g == 2)
            for (int d = 0; d < hd; d += 32)
                edge_weighted_sum_fixed(2, 4, o + g * o_stride + d, o_stride, p + g * p_stride, p_stride, p_jstride,
                                        (const char *)v + d * (H16 ? 2 : 4), stride, n, H16);
        if (nq - g == 1) {          /* one head: 64 columns at a time where they fit, eight sums in flight */
            int d = 0;
            for (; d + 64 <= hd; d += 64)
                edge_weighted_sum_fixed(1, 8, o + g * o_stride + d, o_stride, p + g * p_stride, p_stride, p_jstride,
                                        (const char *)v + d * (H16 ? 2 : 4), stride, n, H16);
            if (d < hd)
                edge_weighted_sum_fixed(1, 4, o + g * o_stride + d, o_stride, p + g * p_stride, p_stride, p_jstride,
                                        (const char *)v + d * (H16 ? 2 : 4), stride, n, H16);
        }
        return;
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    if (hd % 32 == 0) {     /* three heads (or the rest) at a time, 32 columns each */
        for (int g = 0; g < nq; g += 3) {
            const int NQ = nq - g >= 3 ? 3 : nq - g;
            for (int d = 0; d < hd; d += 32) {
                float *og = o + g * o_stride + d;
                const float *pg = p + g * p_stride;
                const void *vd = (const char *)v + d * (H16 ? 2 : 4);
                if (NQ == 3) edge_weighted_sum_fixed(3, 8, og, o_stride, pg, p_stride, p_jstride, vd, stride, n, H16);
                else if (NQ == 2) edge_weighted_sum_fixed(2, 8, og, o_stride, pg, p_stride, p_jstride, vd, stride, n, H16);
                else edge_weighted_sum_fixed(1, 8, og, o_stride, pg, p_stride, p_jstride, vd, stride, n, H16);
            }
        }
        return;
    }
#endif
    for (int g = 0; g < nq; g++)
        for (int j = 0; j < n; j++) {
            const float pj = p[g * p_stride + j * p_jstride];
            for (int d = 0; d < hd; d++)
                o[g * o_stride + d] += pj * (H16 ? edge_f16_to_f32(((const uint16_t *)v)[(size_t)j * stride + d])
                                                 : ((const float *)v)[(size_t)j * stride + d]);
        }
}

static inline void edge_weighted_sum_f32_queries(float *o, int nq, size_t o_stride, const float *p, size_t p_stride,
                                               const float *v, size_t stride, int n, int hd) {
    edge_weighted_sum_queries(o, nq, o_stride, p, p_stride, 1, v, stride, n, hd, 0);
}

/* The same over values stored as halves, widened in register as they are loaded (the same sums). */
static inline void edge_weighted_sum_f16_queries(float *o, int nq, size_t o_stride, const float *p, size_t p_stride,
                                               const uint16_t *v, size_t stride, int n, int hd) {
    edge_weighted_sum_queries(o, nq, o_stride, p, p_stride, 1, v, stride, n, hd, 1);
}

/* one query head: o[0..hd) += sum_j p[j] * v_j */
static inline void edge_weighted_sum_f32(float *o, const float *p, const float *v, size_t stride, int n, int hd) {
    edge_weighted_sum_f32_queries(o, 1, 0, p, 0, v, stride, n, hd);
}

/* sum of n bytes as unsigned integers: one vpsadbw per 32 bytes, so that memory, not the core,
 * sets the pace. */
static inline uint64_t edge_sum_u8(const uint8_t *p, size_t n) {
    size_t i = 0;
    uint64_t total = 0;
#if defined(__AVX2__)
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    const __m256i zero = _mm256_setzero_si256();
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm256_add_epi64(acc0, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(p + i)), zero));
        acc1 = _mm256_add_epi64(acc1, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(p + i + 32)), zero));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(acc0, acc1));
    total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#elif defined(__ARM_NEON) && defined(__aarch64__)
    uint64x2_t acc = vdupq_n_u64(0);
    for (; i + 16 <= n; i += 16) acc = vpadalq_u32(acc, vpaddlq_u16(vpaddlq_u8(vld1q_u8(p + i))));
    total = vaddvq_u64(acc);
#endif
    for (; i < n; i++) total += p[i];
    return total;
}

/* The sum of four vectors of four doubles: ((s0 + s1) + (s2 + s3)), then its lanes. */
#if defined(__AVX2__)
static inline double edge_hsum_4x4_pd(__m256d s0, __m256d s1, __m256d s2, __m256d s3) {
    const __m256d s = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif

/* The statistics of the norms, in double: sum_i x_i, and sum_i (x_i - mean)^2 (with mean 0:
 * rmsnorm's sum of squares; x - 0 is exact, so it is the plain sum of squares).  Four running sums
 * of four lanes where AVX2 exists, four scalar sums otherwise, so that the additions are not one
 * serial chain. */
#if defined(__ARM_NEON) && defined(__aarch64__)
/* NEON holds the AVX2 bodies' four vectors of four doubles as pairs, s[2 v] (lanes 0-1) and
 * s[2 v + 1] (lanes 2-3) of vector v, and folds them in edge_hsum_4x4_pd's order: the same sums. */
static inline double edge_hsum_4x4_neon(const float64x2_t s[8]) {
    const float64x2_t lo = vaddq_f64(vaddq_f64(s[0], s[2]), vaddq_f64(s[4], s[6]));
    const float64x2_t hi = vaddq_f64(vaddq_f64(s[1], s[3]), vaddq_f64(s[5], s[7]));
    const float64x2_t h = vaddq_f64(lo, hi);
    return vgetq_lane_f64(h, 0) + vgetq_lane_f64(h, 1);
}

/* x[2 j], x[2 j + 1] as doubles, j < 8: the sixteen values of one step */
static inline void edge_load16_f64(const float *x, float64x2_t v[8]) {
    for (int j = 0; j < 4; j++) {
        const float32x4_t f = vld1q_f32(x + 4 * j);
        v[2 * j] = vcvt_f64_f32(vget_low_f32(f));
        v[2 * j + 1] = vcvt_high_f64_f32(f);
    }
}
#endif

static inline double edge_sum_f64(const float *x, int n) {
    int i = 0;
    double total = 0.0;
#if defined(__AVX2__)
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm_loadu_ps(x + i)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)));
        s2 = _mm256_add_pd(s2, _mm256_cvtps_pd(_mm_loadu_ps(x + i + 8)));
        s3 = _mm256_add_pd(s3, _mm256_cvtps_pd(_mm_loadu_ps(x + i + 12)));
    }
    total = edge_hsum_4x4_pd(s0, s1, s2, s3);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float64x2_t s[8], v[8];
    for (int j = 0; j < 8; j++) s[j] = vdupq_n_f64(0.0);
    for (; i + 16 <= n; i += 16) {
        edge_load16_f64(x + i, v);
        for (int j = 0; j < 8; j++) s[j] = vaddq_f64(s[j], v[j]);
    }
    total = edge_hsum_4x4_neon(s);
#else
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (; i + 4 <= n; i += 4) {
        s0 += x[i];
        s1 += x[i + 1];
        s2 += x[i + 2];
        s3 += x[i + 3];
    }
    total = (s0 + s1) + (s2 + s3);
#endif
    for (; i < n; i++) total += x[i];
    return total;
}

static inline double edge_sumsq_centered_f64(const float *x, int n, double mean) {
    int i = 0;
    double total = 0.0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256d m = _mm256_set1_pd(mean);
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 16 <= n; i += 16) {
        const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), m);
        const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)), m);
        const __m256d c = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 8)), m);
        const __m256d d = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 12)), m);
        s0 = _mm256_fmadd_pd(a, a, s0);
        s1 = _mm256_fmadd_pd(b, b, s1);
        s2 = _mm256_fmadd_pd(c, c, s2);
        s3 = _mm256_fmadd_pd(d, d, s3);
    }
    total = edge_hsum_4x4_pd(s0, s1, s2, s3);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const float64x2_t m = vdupq_n_f64(mean);
    float64x2_t s[8], v[8];
    for (int j = 0; j < 8; j++) s[j] = vdupq_n_f64(0.0);
    for (; i + 16 <= n; i += 16) {
        edge_load16_f64(x + i, v);
        for (int j = 0; j < 8; j++) {
            const float64x2_t a = vsubq_f64(v[j], m);
            s[j] = vfmaq_f64(s[j], a, a);
        }
    }
    total = edge_hsum_4x4_neon(s);
#else
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (; i + 4 <= n; i += 4) {
        const double a = x[i] - mean, b = x[i + 1] - mean, c = x[i + 2] - mean, d = x[i + 3] - mean;
        s0 += a * a;
        s1 += b * b;
        s2 += c * c;
        s3 += d * d;
    }
    total = (s0 + s1) + (s2 + s3);
#endif
    for (; i < n; i++) total += (x[i] - mean) * (x[i] - mean);
    return total;
}

static inline double edge_sumsq_f64(const float *x, int n) { return edge_sumsq_centered_f64(x, n, 0.0); }

/* Softmax of x[0..n) in place, in fp32: x = exp(x - max) / sum.  edge_exp_shifted_f32 is its first
 * half: x = exp(x - max), returning the sum and max (n >= 1); a long context's attention keeps
 * those per chunk of keys and combines the chunks later.  The exponential is the classic
 * Cephes range reduction (x = k ln2 + r, |r| <= ln2/2) with a degree-5 polynomial, eight lanes at
 * a time where AVX2 exists and four with aarch64's NEON, the same bits (about 1 ulp); plain expf
 * otherwise. */
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
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define EDGE_EXP_F32X4 1
/* edge_exp_ps in NEON, four lanes at a time: the same operations in the same order, so the same
 * bits (vmaxnm, like maxps, gives the bound for a NaN; vfms(x, k, c) is fnmadd(k, c, x); k is a whole
 * number, so converting it truncating or rounding is the same). */
static inline float32x4_t edge_exp_f32x4(float32x4_t x) {
    x = vminnmq_f32(vmaxnmq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
    const float32x4_t k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, k, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, k, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, r);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, r);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, r);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, r);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, r);
    y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), y, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}
#endif

static inline double edge_exp_shifted_f32(float *x, int n, float *max_out) {
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
#elif defined(EDGE_EXP_F32X4)
    /* the AVX2 body's eight lanes as two quarter-vectors, summed and folded in its order, so that
     * the same exps give the same total (the same n % 8 go through expf) */
    if (n >= 8) {
        float32x4_t m4 = vmaxq_f32(vld1q_f32(x), vld1q_f32(x + 4));
        for (i = 8; i + 8 <= n; i += 8) m4 = vmaxq_f32(m4, vmaxq_f32(vld1q_f32(x + i), vld1q_f32(x + i + 4)));
        mx = vmaxvq_f32(m4);
    }
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    const float32x4_t vmax = vdupq_n_f32(mx);
    float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
    for (i = 0; i + 8 <= n; i += 8) {
        const float32x4_t e0 = edge_exp_f32x4(vsubq_f32(vld1q_f32(x + i), vmax));
        const float32x4_t e1 = edge_exp_f32x4(vsubq_f32(vld1q_f32(x + i + 4), vmax));
        vst1q_f32(x + i, e0);
        vst1q_f32(x + i + 4, e1);
        lo = vaddq_f32(lo, e0);
        hi = vaddq_f32(hi, e1);
    }
    const float32x4_t s4 = vaddq_f32(lo, hi);                       /* lanes l + l + 4 */
    const float32x2_t s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));     /* (0 + 2), (1 + 3) */
    total = vget_lane_f32(s2, 0) + vget_lane_f32(s2, 1);
#else
    for (i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    i = 0;
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        total += x[i];
    }
    *max_out = mx;
    return total;
}

static inline void edge_softmax_f32(float *x, int n) {
    float mx;
    const float inv = (float)(1.0 / edge_exp_shifted_f32(x, n, &mx));
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* Encoder attention with a run's query rows in SIMD lanes (AVX2 with FMA, aarch64's NEON): the rows of a run see
 * the same keys, so a key's element d, broadcast, multiplies element d of eight rows at once, and a
 * score needs no horizontal sum (edge_scores_queries folds eight partial sums per score, which at
 * an encoder's head_dim of 32 costs as much as the products).  The run's queries are first
 * transposed, qt[d * RP + r] (RP: the rows rounded up to a multiple of 8, the padding rows zero),
 * and the probabilities stay transposed, p[j * RP + r].  Each score is one chain of fused
 * multiply-adds over d in order, each row's softmax runs over j in order, in its own lane: a row's
 * result depends neither on the run it is in nor on its place in it. */
static inline int edge_lanes_rows(int n_rows) { return (n_rows + 7) & ~7; }

/* qt[d * RP + r] = q[r * q_stride + d] for r < n_rows, 0 for n_rows <= r < RP (RP a multiple of 8). */
static inline void edge_transpose_queries(const float *q, size_t q_stride, int n_rows, int hd, float *qt, int RP) {
#if defined(__AVX2__)
    if (hd % 8 == 0) {          /* 8 x 8 blocks, transposed in register */
        for (int r0 = 0; r0 < RP; r0 += 8)
            for (int d0 = 0; d0 < hd; d0 += 8) {
                __m256 a[8], b[8];
                for (int i = 0; i < 8; i++)
                    a[i] = r0 + i < n_rows ? _mm256_loadu_ps(q + (size_t)(r0 + i) * q_stride + d0) : _mm256_setzero_ps();
                for (int i = 0; i < 8; i += 2) {
                    b[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);          /* rows i, i+1 interleaved */
                    b[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
                }
                for (int i = 0; i < 8; i += 4) {     /* a[i + c]: columns c and c + 4 of rows i..i+3 */
                    a[i] = _mm256_shuffle_ps(b[i], b[i + 2], 0x44);
                    a[i + 1] = _mm256_shuffle_ps(b[i], b[i + 2], 0xee);
                    a[i + 2] = _mm256_shuffle_ps(b[i + 1], b[i + 3], 0x44);
                    a[i + 3] = _mm256_shuffle_ps(b[i + 1], b[i + 3], 0xee);
                }
                for (int i = 0; i < 4; i++) {       /* a[i]: columns i and i + 4 of rows 0-3; a[i + 4]: of rows 4-7 */
                    _mm256_storeu_ps(qt + (size_t)(d0 + i) * RP + r0, _mm256_permute2f128_ps(a[i], a[i + 4], 0x20));
                    _mm256_storeu_ps(qt + (size_t)(d0 + i + 4) * RP + r0, _mm256_permute2f128_ps(a[i], a[i + 4], 0x31));
                }
            }
        return;
    }
#endif
    for (int d = 0; d < hd; d++) {
        float *row = qt + (size_t)d * RP;
        for (int r = 0; r < n_rows; r++) row[r] = q[r * q_stride + d];
        for (int r = n_rows; r < RP; r++) row[r] = 0.0f;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define EDGE_ROWS_IN_LANES 1
#if defined(__AVX512VL__)
#define EDGE_LANE_KEYS 12       /* keys per tile: 12 x 2 sums, with 32 vector registers */
#else
#define EDGE_LANE_KEYS 6        /* 6 x 2 sums and 3 operands in AVX2's 16 registers */
#endif

/* Keys j..j+NK-1 against V vectors of 8 rows (from row vector r8): p[(j + c) * RP + 8 (r8 + v) + lane]
 * = scale * sum_d qt[d][row] k_{j+c}[d], the sum a chain of fmas over d in order. */
static inline __attribute__((always_inline)) void
edge_scores_lanes_fixed(const int V, const int NK, const float *qt, int RP, int r8, const float *k, size_t k_stride,
                        int j, int hd, __m256 vscale, float *p) {
    __m256 acc[EDGE_LANE_KEYS][2];
    for (int c = 0; c < NK; c++)
        for (int v = 0; v < V; v++) acc[c][v] = _mm256_setzero_ps();
    const float *kj = k + (size_t)j * k_stride;
    for (int d = 0; d < hd; d++) {
        __m256 qv[2];
        for (int v = 0; v < V; v++) {
            qv[v] = _mm256_loadu_ps(qt + (size_t)d * RP + 8 * (r8 + v));
            EDGE_IN_REGISTER(qv[v]);
        }
        for (int c = 0; c < NK; c++) {
            const __m256 kv = _mm256_broadcast_ss(kj + c * k_stride + d);
            for (int v = 0; v < V; v++) acc[c][v] = _mm256_fmadd_ps(qv[v], kv, acc[c][v]);
        }
    }
    for (int c = 0; c < NK; c++)
        for (int v = 0; v < V; v++)
            _mm256_storeu_ps(p + (size_t)(j + c) * RP + 8 * (r8 + v), _mm256_mul_ps(acc[c][v], vscale));
}

/* p[j * RP + r] = softmax over j < n of scale * q_r . k_j, for the RP rows of qt (edge_transpose_queries):
 * each row's max, exponentials and their sum (in order over j) in its own lane, then 1 / sum. */
static inline void edge_attention_probs_lanes(const float *qt, int RP, const float *k, size_t k_stride, int n,
                                              int hd, float scale, float *p) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int r8 = 0; r8 < RP / 8; r8 += 2) {
        int j = 0;
        if (RP / 8 - r8 >= 2) {
            for (; j + EDGE_LANE_KEYS <= n; j += EDGE_LANE_KEYS)
                edge_scores_lanes_fixed(2, EDGE_LANE_KEYS, qt, RP, r8, k, k_stride, j, hd, vscale, p);
            for (; j < n; j++) edge_scores_lanes_fixed(2, 1, qt, RP, r8, k, k_stride, j, hd, vscale, p);
        } else {
            for (; j + EDGE_LANE_KEYS <= n; j += EDGE_LANE_KEYS)
                edge_scores_lanes_fixed(1, EDGE_LANE_KEYS, qt, RP, r8, k, k_stride, j, hd, vscale, p);
            for (; j < n; j++) edge_scores_lanes_fixed(1, 1, qt, RP, r8, k, k_stride, j, hd, vscale, p);
        }
    }
    for (int r = 0; r < RP; r += 8) {
        __m256 mx = _mm256_loadu_ps(p + r);
        for (int j = 1; j < n; j++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(p + (size_t)j * RP + r));
        __m256 sum = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            const __m256 e = edge_exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + (size_t)j * RP + r), mx));
            _mm256_storeu_ps(p + (size_t)j * RP + r, e);
            sum = _mm256_add_ps(sum, e);
        }
        const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
        for (int j = 0; j < n; j++)
            _mm256_storeu_ps(p + (size_t)j * RP + r, _mm256_mul_ps(_mm256_loadu_ps(p + (size_t)j * RP + r), inv));
    }
}
#elif defined(EDGE_EXP_F32X4)
#define EDGE_ROWS_IN_LANES 1
#define EDGE_LANE_KEYS 6        /* keys per tile: 6 x 4 sums of 4 rows, 4 query vectors, in NEON's 32 registers */

/* The NEON body: keys j..j+NK-1 against V vectors of 4 rows (from row vector r4), each score the
 * same chain of fmas over d in order as with AVX2, so the same bits. */
static inline __attribute__((always_inline)) void
edge_scores_lanes_neon(const int V, const int NK, const float *qt, int RP, int r4, const float *k, size_t k_stride,
                       int j, int hd, float32x4_t vscale, float *p) {
    float32x4_t acc[EDGE_LANE_KEYS][4];
    for (int c = 0; c < NK; c++)
        for (int v = 0; v < V; v++) acc[c][v] = vdupq_n_f32(0.0f);
    const float *kj = k + (size_t)j * k_stride;
    for (int d = 0; d < hd; d++) {
        float32x4_t qv[4];
        for (int v = 0; v < V; v++) qv[v] = vld1q_f32(qt + (size_t)d * RP + 4 * (r4 + v));
        for (int c = 0; c < NK; c++) {
            const float32x4_t kv = vld1q_dup_f32(kj + c * k_stride + d);
            for (int v = 0; v < V; v++) acc[c][v] = vfmaq_f32(acc[c][v], qv[v], kv);
        }
    }
    for (int c = 0; c < NK; c++)
        for (int v = 0; v < V; v++) vst1q_f32(p + (size_t)(j + c) * RP + 4 * (r4 + v), vmulq_f32(acc[c][v], vscale));
}

/* edge_attention_probs_lanes (above) in NEON: 16 rows (or the last 8) at a time, then each row's
 * softmax in its lane, in the AVX2 body's order and with its exp (edge_exp_f32x4). */
static inline void edge_attention_probs_lanes(const float *qt, int RP, const float *k, size_t k_stride, int n,
                                              int hd, float scale, float *p) {
    const float32x4_t vscale = vdupq_n_f32(scale);
    for (int r4 = 0; r4 < RP / 4; r4 += 4) {
        int j = 0;
        if (RP / 4 - r4 >= 4) {
            for (; j + EDGE_LANE_KEYS <= n; j += EDGE_LANE_KEYS)
                edge_scores_lanes_neon(4, EDGE_LANE_KEYS, qt, RP, r4, k, k_stride, j, hd, vscale, p);
            for (; j < n; j++) edge_scores_lanes_neon(4, 1, qt, RP, r4, k, k_stride, j, hd, vscale, p);
        } else {        /* the last 8 rows (RP is a multiple of 8) */
            for (; j + EDGE_LANE_KEYS <= n; j += EDGE_LANE_KEYS)
                edge_scores_lanes_neon(2, EDGE_LANE_KEYS, qt, RP, r4, k, k_stride, j, hd, vscale, p);
            for (; j < n; j++) edge_scores_lanes_neon(2, 1, qt, RP, r4, k, k_stride, j, hd, vscale, p);
        }
    }
    for (int r = 0; r < RP; r += 4) {
        float32x4_t mx = vld1q_f32(p + r);
        for (int j = 1; j < n; j++) mx = vmaxq_f32(mx, vld1q_f32(p + (size_t)j * RP + r));
        float32x4_t sum = vdupq_n_f32(0.0f);
        for (int j = 0; j < n; j++) {
            const float32x4_t e = edge_exp_f32x4(vsubq_f32(vld1q_f32(p + (size_t)j * RP + r), mx));
            vst1q_f32(p + (size_t)j * RP + r, e);
            sum = vaddq_f32(sum, e);
        }
        const float32x4_t inv = vdivq_f32(vdupq_n_f32(1.0f), sum);
        for (int j = 0; j < n; j++) vst1q_f32(p + (size_t)j * RP + r, vmulq_f32(vld1q_f32(p + (size_t)j * RP + r), inv));
    }
}
#else
#define EDGE_ROWS_IN_LANES 0    /* attention_varlen takes edge_scores_f32_queries; this is its plain twin */
static inline void edge_attention_probs_lanes(const float *qt, int RP, const float *k, size_t k_stride, int n,
                                              int hd, float scale, float *p) {
    for (int r = 0; r < RP; r++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j < n; j++) {
            float s = 0.0f;
            for (int d = 0; d < hd; d++) s = fmaf(qt[(size_t)d * RP + r], k[(size_t)j * k_stride + d], s);
            p[(size_t)j * RP + r] = s * scale;
            mx = p[(size_t)j * RP + r] > mx ? p[(size_t)j * RP + r] : mx;
        }
        for (int j = 0; j < n; j++) {
            p[(size_t)j * RP + r] = expf(p[(size_t)j * RP + r] - mx);
            sum += p[(size_t)j * RP + r];
        }
        for (int j = 0; j < n; j++) p[(size_t)j * RP + r] *= 1.0f / sum;
    }
}
#endif

/* The first index of the largest of x[0..n) (n >= 1), NaNs skipped (0 when x[0] is one): the
 * scalar loop `if (x[i] > x[best]) best = i`.  Where AVX2 exists, the maximum eight lanes at a
 * time (four with NEON; a NaN lane never replaces the running maximum), then the first lane equal
 * to it. */
static inline int edge_argmax_f32(const float *x, int n) {
    if (x[0] != x[0]) return 0;
    int i = 0;
    float mx = x[0];
#if defined(__AVX2__)
    __m256 m = _mm256_set1_ps(x[0]);
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(_mm_movehl_ps(m4, m4), m4);
    m4 = _mm_max_ss(_mm_movehdup_ps(m4), m4);
    mx = _mm_cvtss_f32(m4);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float32x4_t m = vdupq_n_f32(x[0]);
    for (; i + 4 <= n; i += 4) m = vmaxnmq_f32(m, vld1q_f32(x + i));     /* a NaN lane keeps m */
    mx = vmaxnmvq_f32(m);
#endif
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    i = 0;
#if defined(__AVX2__)
    const __m256 vm = _mm256_set1_ps(mx);
    for (; i + 8 <= n; i += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vm, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz(hit);
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const float32x4_t vm = vdupq_n_f32(mx);
    for (; i + 4 <= n; i += 4)
        if (vmaxvq_u32(vceqq_f32(vld1q_f32(x + i), vm))) break;        /* the first lane equal, below */
#endif
    for (; i < n; i++)
        if (x[i] == mx) return i;
    return 0;
}

/* The largest of x[0..n) (n >= 1) as the loop `if (x[i] > m) m = x[i]` from m = x[0] finds it (a
 * NaN never replaces m; NaN if x[0] is one): four lanes at a time where AVX2 exists, two with NEON. */
static inline double edge_max_f64(const double *x, int n) {
    int i = 0;
    double m = x[0];
#if defined(__AVX2__)
    if (n >= 4) {
        __m256d v = _mm256_set1_pd(x[0]);
        for (; i + 4 <= n; i += 4) v = _mm256_max_pd(_mm256_loadu_pd(x + i), v);   /* a NaN lane keeps v */
        double lanes[4];
        _mm256_storeu_pd(lanes, v);
        for (int l = 0; l < 4; l++) m = lanes[l] > m ? lanes[l] : m;
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    if (n >= 2 && m == m) {
        float64x2_t v = vdupq_n_f64(m);
        for (; i + 2 <= n; i += 2) v = vmaxnmq_f64(v, vld1q_f64(x + i));   /* a NaN lane keeps v */
        m = vmaxnmvq_f64(v);
    }
#endif
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* The indices i (ascending) with x[i] >= tau, into idx; returns how many. */
static inline int edge_indices_at_least_f64(const double *x, int n, double tau, int32_t *idx) {
    int i = 0, m = 0;
#if defined(__AVX2__)
    const __m256d t = _mm256_set1_pd(tau);
    for (; i + 4 <= n; i += 4) {
        int hit = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + i), t, _CMP_GE_OQ));
        while (hit) {
            idx[m++] = i + __builtin_ctz(hit);
            hit &= hit - 1;
        }
    }
#endif
    for (; i < n; i++)
        if (x[i] >= tau) idx[m++] = i;
    return m;
}

/* The first j in [i, n) with x[j] > tau, or n (a NaN is never above): four at a time where AVX2
 * exists, two with NEON (top_k's scan, which almost every key fails). */
static inline int edge_first_above_f64(const double *x, int i, int n, double tau) {
#if defined(__AVX2__)
    const __m256d t = _mm256_set1_pd(tau);
    for (; i + 4 <= n; i += 4) {
        const int hit = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + i), t, _CMP_GT_OQ));
        if (hit) return i + __builtin_ctz(hit);
    }
#elif defined(__ARM_NEON) && defined(__aarch64__)
    const float64x2_t t = vdupq_n_f64(tau);
    for (; i + 2 <= n; i += 2) {
        const uint64x2_t hit = vcgtq_f64(vld1q_f64(x + i), t);
        if (vgetq_lane_u64(hit, 0)) return i;
        if (vgetq_lane_u64(hit, 1)) return i + 1;
    }
#endif
    for (; i < n; i++)
        if (x[i] > tau) return i;
    return n;
}

/* e[i] = exp(z[i] / temperature - zmax) in double (sampling's weights; e may be z).  Where AVX2
 * exists, four lanes at a time: x = k ln2 + r with |r| <= ln2 / 2 (r from one fused multiply-add
 * each with ln2's leading and trailing doubles), exp(r) by its Taylor series to r^13 / 13! (the
 * rest is below 5e-18 of it), times 2^k built in the exponent bits: within an ulp of libm (every
 * x from -700 to 5 in steps of 7e-4).  A lane below -708 (a result near or below the smallest
 * normal double), or not a number, goes through libm's exp.  aarch64's NEON runs the same operations
 * two lanes at a time: from the same logits, the same weights (built with gcc, which fuses alike on
 * both), so the same draws. */
#if defined(__AVX2__) && defined(__FMA__)
static inline __attribute__((always_inline)) __m256d edge_exp_pd(__m256d x) {     /* x >= -708 */
    const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0.6931471805599453), x);
    r = _mm256_fnmadd_pd(k, _mm256_set1_pd(2.3190468138462996e-17), r);
    /* exp(r) = 1 + r q(r), q(r) = 1 + r / 2! + ... + r^12 / 13! in Estrin's order (pairs of terms,
     * then pairs of pairs with r^2, r^4 and r^8: a chain of 5 operations instead of Horner's 12);
     * the 1 added last, in a fused multiply-add, as Horner's last step adds it */
#define EDGE_TERMS(a, b) _mm256_fmadd_pd(_mm256_set1_pd(1.0 / (b)), r, _mm256_set1_pd(1.0 / (a)))
    const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2), r8 = _mm256_mul_pd(r4, r4);
    const __m256d q01 = EDGE_TERMS(1.0, 2.0), q23 = EDGE_TERMS(6.0, 24.0), q45 = EDGE_TERMS(120.0, 720.0),
                  q67 = EDGE_TERMS(5040.0, 40320.0), q89 = EDGE_TERMS(362880.0, 3628800.0),
                  q1011 = EDGE_TERMS(39916800.0, 479001600.0);
#undef EDGE_TERMS
    const __m256d q0_3 = _mm256_fmadd_pd(q23, r2, q01), q4_7 = _mm256_fmadd_pd(q67, r2, q45),
                  q8_11 = _mm256_fmadd_pd(q1011, r2, q89);
    const __m256d q0_7 = _mm256_fmadd_pd(q4_7, r4, q0_3),
                  q8_12 = _mm256_fmadd_pd(_mm256_set1_pd(1.0 / 6227020800.0), r4, q8_11);
    const __m256d y = _mm256_fmadd_pd(_mm256_fmadd_pd(q8_12, r8, q0_7), r, _mm256_set1_pd(1.0));
    const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)),
                                                            _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(y, _mm256_castsi256_pd(bits));
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
/* edge_exp_pd in NEON, two lanes at a time: the same operations in the same order, so the same
 * weights, and the same draws, as on x86-64 (vfms(x, k, c) is fnmadd(k, c, x)). */
static inline __attribute__((always_inline)) float64x2_t edge_exp_f64x2(float64x2_t x) {     /* x >= -708 */
    const float64x2_t k = vrndnq_f64(vmulq_f64(x, vdupq_n_f64(1.4426950408889634)));
    float64x2_t r = vfmsq_f64(x, k, vdupq_n_f64(0.6931471805599453));
    r = vfmsq_f64(r, k, vdupq_n_f64(2.3190468138462996e-17));
#define EDGE_TERMS(a, b) vfmaq_f64(vdupq_n_f64(1.0 / (a)), vdupq_n_f64(1.0 / (b)), r)
    const float64x2_t r2 = vmulq_f64(r, r), r4 = vmulq_f64(r2, r2), r8 = vmulq_f64(r4, r4);
    const float64x2_t q01 = EDGE_TERMS(1.0, 2.0), q23 = EDGE_TERMS(6.0, 24.0), q45 = EDGE_TERMS(120.0, 720.0),
                      q67 = EDGE_TERMS(5040.0, 40320.0), q89 = EDGE_TERMS(362880.0, 3628800.0),
                      q1011 = EDGE_TERMS(39916800.0, 479001600.0);
#undef EDGE_TERMS
    const float64x2_t q0_3 = vfmaq_f64(q01, q23, r2), q4_7 = vfmaq_f64(q45, q67, r2), q8_11 = vfmaq_f64(q89, q1011, r2);
    const float64x2_t q0_7 = vfmaq_f64(q0_3, q4_7, r4),
                      q8_12 = vfmaq_f64(q8_11, vdupq_n_f64(1.0 / 6227020800.0), r4);
    const float64x2_t y = vfmaq_f64(vdupq_n_f64(1.0), vfmaq_f64(q0_7, q8_12, r8), r);
    const int64x2_t bits = vshlq_n_s64(vaddq_s64(vcvtq_s64_f64(k), vdupq_n_s64(1023)), 52);
    return vmulq_f64(y, vreinterpretq_f64_s64(bits));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* Eight of them where a lane is below -708 or not a number: the others as everywhere, those through
 * libm (z may be e: all of z is read before e is written). */
static __attribute__((noinline)) void edge_exp_keys8_rare_f64(const double *z, double temperature, double zmax,
                                                               double *e) {
    const __m256d vt = _mm256_set1_pd(temperature), vmax = _mm256_set1_pd(zmax), low = _mm256_set1_pd(-708.0);
    double x[8], y[8];
    _mm256_storeu_pd(x, _mm256_sub_pd(_mm256_div_pd(_mm256_loadu_pd(z), vt), vmax));
    _mm256_storeu_pd(x + 4, _mm256_sub_pd(_mm256_div_pd(_mm256_loadu_pd(z + 4), vt), vmax));
    _mm256_storeu_pd(y, edge_exp_pd(_mm256_max_pd(_mm256_loadu_pd(x), low)));
    _mm256_storeu_pd(y + 4, edge_exp_pd(_mm256_max_pd(_mm256_loadu_pd(x + 4), low)));
    for (int j = 0; j < 8; j++) e[j] = x[j] >= -708.0 ? y[j] : exp(x[j]);
}

/* Eight of them (z + 8 may not be read). */
static inline __attribute__((always_inline)) void edge_exp_keys8_f64(const double *z, double temperature,
                                                                      double zmax, double *e) {
    const __m256d vt = _mm256_set1_pd(temperature), vmax = _mm256_set1_pd(zmax), low = _mm256_set1_pd(-708.0);
    const __m256d x0 = _mm256_sub_pd(_mm256_div_pd(_mm256_loadu_pd(z), vt), vmax);
    const __m256d x1 = _mm256_sub_pd(_mm256_div_pd(_mm256_loadu_pd(z + 4), vt), vmax);
    if ((_mm256_movemask_pd(_mm256_cmp_pd(x0, low, _CMP_GE_OQ)) &
         _mm256_movemask_pd(_mm256_cmp_pd(x1, low, _CMP_GE_OQ))) != 15) {
        edge_exp_keys8_rare_f64(z, temperature, zmax, e);
        return;
    }
    const __m256d e0 = edge_exp_pd(x0), e1 = edge_exp_pd(x1);  /* two chains of operations in flight */
    _mm256_storeu_pd(e, e0);
    _mm256_storeu_pd(e + 4, e1);
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define EDGE_EXP_KEYS8 1
/* The same two functions in NEON: four pairs of lanes. */
static __attribute__((noinline)) void edge_exp_keys8_rare_f64(const double *z, double temperature, double zmax,
                                                               double *e) {
    const float64x2_t vt = vdupq_n_f64(temperature), vmax = vdupq_n_f64(zmax), low = vdupq_n_f64(-708.0);
    double x[8], y[8];
    for (int j = 0; j < 8; j += 2) vst1q_f64(x + j, vsubq_f64(vdivq_f64(vld1q_f64(z + j), vt), vmax));
    for (int j = 0; j < 8; j += 2) vst1q_f64(y + j, edge_exp_f64x2(vmaxnmq_f64(vld1q_f64(x + j), low)));
    for (int j = 0; j < 8; j++) e[j] = x[j] >= -708.0 ? y[j] : exp(x[j]);
}

static inline __attribute__((always_inline)) void edge_exp_keys8_f64(const double *z, double temperature,
                                                                      double zmax, double *e) {
    const float64x2_t vt = vdupq_n_f64(temperature), vmax = vdupq_n_f64(zmax), low = vdupq_n_f64(-708.0);
    float64x2_t x[4];
    uint64x2_t in_range = vdupq_n_u64(~(uint64_t)0);
    for (int j = 0; j < 4; j++) {
        x[j] = vsubq_f64(vdivq_f64(vld1q_f64(z + 2 * j), vt), vmax);
        in_range = vandq_u64(in_range, vcgeq_f64(x[j], low));        /* false for a NaN, as _CMP_GE_OQ */
    }
    if ((vgetq_lane_u64(in_range, 0) & vgetq_lane_u64(in_range, 1)) != ~(uint64_t)0) {
        edge_exp_keys8_rare_f64(z, temperature, zmax, e);
        return;
    }
    for (int j = 0; j < 4; j++) vst1q_f64(e + 2 * j, edge_exp_f64x2(x[j]));
}
#endif

/* Each weight is a function of its key alone, wherever it sits in z (equal keys, equal weights:
 * the ranking by weight keeps their ties), and only those below -708 go through libm. */
static inline void edge_exp_keys_f64(const double *z, int n, double temperature, double zmax, double *e) {
    int i = 0;
#if (defined(__AVX2__) && defined(__FMA__)) || defined(EDGE_EXP_KEYS8)
    for (; i + 8 <= n; i += 8) edge_exp_keys8_f64(z + i, temperature, zmax, e + i);
    if (i < n) {                        /* the last few, padded with the first of them */
        double zt[8], et[8];
        for (int j = 0; j < 8; j++) zt[j] = z[i + (i + j < n ? j : 0)];
        edge_exp_keys8_f64(zt, temperature, zmax, et);
        for (int j = 0; i + j < n; j++) e[i + j] = et[j];
    }
#else
    for (; i < n; i++) e[i] = exp(z[i] / temperature - zmax);
#endif
}

/* Sampling draws from blocks of EDGE_DRAW_BLOCK weights: a draw finds its block by bisecting the
 * blocks' running sums, then walks that block alone.  A block's sum adds four lanes (lane j: e[j],
 * e[j + 4], ... in order), then (lane 0 + lane 1) + (lane 2 + lane 3); a partial last block adds in
 * index order.  Unlike one running sum over the whole row (a chain of 49,152 dependent additions,
 * half the cost of a draw from SmolLM2's vocabulary), the blocks' sums run four lanes wide and
 * overlap the next block's exps.  reference.sample_logits adds in the same order. */
#define EDGE_DRAW_BLOCK 64

static inline double edge_draw_block_sum_f64(const double *e, int n) {
    if (n < EDGE_DRAW_BLOCK) {
        double s = e[0];
        for (int i = 1; i < n; i++) s += e[i];
        return s;
    }
#if defined(__AVX2__)
    __m256d acc = _mm256_loadu_pd(e);
    for (int i = 4; i < EDGE_DRAW_BLOCK; i += 4) acc = _mm256_add_pd(acc, _mm256_loadu_pd(e + i));
    const __m128d pairs = _mm_hadd_pd(_mm256_castpd256_pd128(acc), _mm256_extractf128_pd(acc, 1));
    return _mm_cvtsd_f64(pairs) + _mm_cvtsd_f64(_mm_unpackhi_pd(pairs, pairs));
#else
    double lane[4] = {e[0], e[1], e[2], e[3]};
    for (int i = 4; i < EDGE_DRAW_BLOCK; i += 4)
        for (int j = 0; j < 4; j++) lane[j] += e[i + j];
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
#endif
}

/* edge_exp_keys_f64 over z[0..n) (e may be z), a block at a time, and the running sums of the
 * blocks' sums: sums[b] = (block 0) + ... + (block b), added in block order.  Returns the total. */
static inline double edge_exp_keys_blocks_f64(const double *z, int n, double temperature, double zmax, double *e,
                                              double *sums) {
    double total = 0.0;
    for (int i = 0, b = 0; i < n; i += EDGE_DRAW_BLOCK, b++) {
        const int m = n - i < EDGE_DRAW_BLOCK ? n - i : EDGE_DRAW_BLOCK;
        edge_exp_keys_f64(z + i, m, temperature, zmax, e + i);
        total += edge_draw_block_sum_f64(e + i, m);
        sums[b] = total;
    }
    return total;
}

/* x[i] = gelu(x[i]) = 0.5 x (1 + erf(x / sqrt 2)), in place.  erfc(z) for z >= 0 is Abramowitz &
 * Stegun 7.1.26, t (a1 + t (a2 + ... a5 t)) exp(-z^2) with t = 1 / (1 + p z), absolute error below
 * 1.5e-7; 1 + erf(-z) is taken as erfc(z) directly, so negative inputs lose nothing to
 * cancellation.  Eight lanes at a time where AVX2 exists, four with NEON (the same bits); erff otherwise. */
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
#elif defined(EDGE_EXP_F32X4)
    const float32x4_t half = vdupq_n_f32(0.5f), one = vdupq_n_f32(1.0f), two = vdupq_n_f32(2.0f);
    for (; i + 4 <= n - n % 8; i += 4) {    /* as many as the AVX2 body takes: the rest through erff */
        const float32x4_t v = vld1q_f32(x + i);
        const float32x4_t z = vmulq_f32(vabsq_f32(v), vdupq_n_f32(0.70710678118654752f));
        const float32x4_t t = vdivq_f32(one, vfmaq_f32(one, vdupq_n_f32(0.3275911f), z));
        float32x4_t p = vdupq_n_f32(1.061405429f);
        p = vfmaq_f32(vdupq_n_f32(-1.453152027f), p, t);
        p = vfmaq_f32(vdupq_n_f32(1.421413741f), p, t);
        p = vfmaq_f32(vdupq_n_f32(-0.284496736f), p, t);
        p = vfmaq_f32(vdupq_n_f32(0.254829592f), p, t);
        const float32x4_t erfc = vmulq_f32(vmulq_f32(p, t), edge_exp_f32x4(vmulq_f32(vnegq_f32(z), z)));
        const float32x4_t one_plus_erf = vbslq_f32(vcltq_f32(v, vdupq_n_f32(0.0f)), erfc, vsubq_f32(two, erfc));
        vst1q_f32(x + i, vmulq_f32(vmulq_f32(half, v), one_plus_erf));
    }
#endif
    for (; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)); the exp as softmax's (AVX2, NEON). */
static inline void edge_silu_mul_f32(float *out, const float *gate, const float *up, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = edge_exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
#elif defined(EDGE_EXP_F32X4)
    const float32x4_t one = vdupq_n_f32(1.0f);
    for (; i + 4 <= n - n % 8; i += 4) {    /* as many as the AVX2 body takes: the rest through expf */
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t e = edge_exp_f32x4(vsubq_f32(vdupq_n_f32(0.0f), g));
        vst1q_f32(out + i, vmulq_f32(vdivq_f32(g, vaddq_f32(one, e)), vld1q_f32(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#endif /* EDGE_SIMD_H */
