/* Cross-architecture check of core/kernels/simd.h: every SIMD body against plain C on random data.
 *
 * Built and run by tests/test_simd_arch.py for the host and, where a cross compiler and qemu are
 * installed, for aarch64 (NEON with and without the dot-product extension).  Prints the
 * instruction set, "ok" and a digest of the elementwise exps' results (check_exps), or the first
 * mismatch and exits 1.
 */
#include <stdio.h>
#include <stdlib.h>

#include "simd.h"

static uint32_t rng_state = 12345u;
static float uniform(void) { /* xorshift32 -> [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return (float)(rng_state >> 8) / 8388608.0f - 1.0f;
}

static float plain_dot_q8(const int8_t *q, const float *xs, const int8_t *w, const float *ws, int K) {
    float total = 0.0f;
    for (int g = 0; g * 32 < K; g++) {
        int32_t sum = 0;
        for (int k = g * 32; k < K && k < g * 32 + 32; k++) sum += (int32_t)q[k] * (int32_t)w[k];
        total += (float)sum * (xs[g] * ws[g]);
    }
    return total;
}

/* The interleaved layout, spelled out independently of edge_q8_pack_index: the whole groups in
 * blocks of 8 while 8 remain, then blocks of 4, 2 and 1 groups; in a block of S groups at value b,
 * lane l of 32-byte vector j holds 4-byte chunk j * (8 / S) + l / S of group l % S. */
static int plain_pack_index(int k, int K) {
    int b = 0, left = K / 32;
    while (left > 0) {
        const int S = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (k < b + 32 * S) {
            const int group = (k - b) / 32, chunk = (k - b) % 32 / 4;
            const int j = chunk / (8 / S), lane = chunk % (8 / S) * S + group;
            return b + 32 * j + 4 * lane + k % 4;
        }
        b += 32 * S;
        left -= S;
    }
    return k;
}

static void plain_pack(const int8_t *natural, int8_t *packed, int K) {
    for (int k = 0; k < K; k++) packed[plain_pack_index(k, K)] = natural[k];
}

static void plain_unpack(const int8_t *packed, int8_t *natural, int K) {
    for (int k = 0; k < K; k++) natural[k] = packed[plain_pack_index(k, K)];
}

/* float -> half (the KV cache's storage): every half round-trips; a value halfway between two
 * neighbours goes to the even one and one float step either side to the nearer; past 65504 the
 * tie at 65520 goes to infinity.  The row conversions (F16C, NEON or plain) agree with the scalar
 * one, both ways. */
static int check_f16(void) {
    for (uint32_t h = 0; h < 0x10000u; h++) {
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) continue;          /* NaN */
        if (edge_f32_to_f16(edge_f16_to_f32((uint16_t)h)) != h) {
            printf("f16 round trip %#x -> %#x\n", h, edge_f32_to_f16(edge_f16_to_f32((uint16_t)h)));
            return 1;
        }
    }
    for (uint32_t h = 0; h < 0x7bffu; h++)
        for (int neg = 0; neg < 2; neg++) {
            const float a = edge_f16_to_f32((uint16_t)h), b = edge_f16_to_f32((uint16_t)(h + 1));
            const float mid = (a + b) * 0.5f, s = neg ? -1.0f : 1.0f;
            const uint16_t sign = neg ? 0x8000u : 0, even = (uint16_t)((h & 1u) ? h + 1 : h);
            const float below = nextafterf(mid, 0.0f), above = nextafterf(mid, 1e9f);
            if (edge_f32_to_f16(s * mid) != (sign | even) || edge_f32_to_f16(s * below) != (sign | h) ||
                edge_f32_to_f16(s * above) != (sign | (h + 1))) {
                printf("f16 rounding near %#x: %#x %#x %#x\n", h, edge_f32_to_f16(s * below),
                       edge_f32_to_f16(s * mid), edge_f32_to_f16(s * above));
                return 1;
            }
        }
    if (edge_f32_to_f16(65519.99f) != 0x7bffu || edge_f32_to_f16(65520.0f) != 0x7c00u ||
        edge_f32_to_f16(-1e30f) != 0xfc00u || edge_f32_to_f16(1e-30f) != 0) {
        printf("f16 overflow or underflow\n");
        return 1;
    }
    enum { N = 1000 };
    float x[N], back[N], want[N];
    uint16_t h[N];
    for (int i = 0; i < N; i++) x[i] = uniform() * (i % 3 == 0 ? 1e-5f : i % 3 == 1 ? 3.0f : 7e4f);
    edge_f32_to_f16_row(x, h, N);
    edge_f16_to_f32_row(h, back, N);
    for (int i = 0; i < N; i++) {
        want[i] = edge_f16_to_f32(edge_f32_to_f16(x[i]));
        if (h[i] != edge_f32_to_f16(x[i]) || back[i] != want[i]) {
            printf("f16 rows i=%d: %#x vs %#x, %g vs %g\n", i, h[i], edge_f32_to_f16(x[i]), back[i], want[i]);
            return 1;
        }
    }
    return 0;
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)p)[i]) * 1099511628211ull;
    return h;
}

/* The distance between two doubles in units in the last place (both finite, of one sign). */
static double ulps(double a, double b) {
    if (a == b) return 0.0;
    const double d = fabs(a - b), u = nextafter(fabs(b), INFINITY) - fabs(b);
    return d / u;
}

/* Sampling's weights, e = exp(z / T - zmax) in double: within an ulp of libm's exp from -708 up,
 * libm's own below (and NaN for NaN), a weight a function of its key alone (where it sits in a
 * row, a partial last eight included).  *digest: the bits of the weights, of the elementwise
 * activations (silu, gelu), of the norms' sums, of a softmax and of an encoder run's attention
 * probabilities with its rows in lanes, which every vector body (AVX2, NEON) computes in the same operations (compiled by
 * gcc): tests/test_simd_arch.py compares the digests of the builds. */
static int check_exps(uint64_t *digest) {
    enum { N = 4101 };             /* N % 8 = 5: a tail longer than NEON's four lanes */
    double *z = malloc(N * sizeof(double)), *e = malloc(N * sizeof(double)), *one = malloc(8 * sizeof(double));
    const double T = 0.7, zmax = 3.0;
    for (int i = 0; i < N; i++) z[i] = -560.0 + 0.1391 * i;         /* z / T - zmax from -803 to about 9 */
    z[17] = NAN;
    edge_exp_keys_f64(z, N, T, zmax, e);
    for (int i = 0; i < N; i++) {
        const double x = z[i] / T - zmax, want = exp(x);
        if (i == 17 ? !isnan(e[i]) : x < -708.0 ? e[i] != want : !(ulps(e[i], want) <= 1.0)) {
            printf("exp_keys i=%d x=%.17g: %.17g vs libm %.17g\n", i, x, e[i], want);
            return 1;
        }
        for (int n = 1; n <= 3; n += 2) {                         /* alone, and first of a row of 3 */
            edge_exp_keys_f64(z + i, i + n <= N ? n : 1, T, zmax, one);
            if (memcmp(one, e + i, sizeof(double)) != 0) {
                printf("exp_keys i=%d: %.17g in a row of %d, %.17g in the whole row\n", i, one[0], n, e[i]);
                return 1;
            }
        }
    }
    /* greedy's argmax and sampling's max: the scalar loops' answers, NaNs skipped (or returned
     * from the first place), ties to the first index, from every start */
    {
        float f[203];
        for (int i = 0; i < 203; i++) f[i] = (float)(i * 61 % 103) - 60.0f;
        f[7] = f[150] = 42.0f;                       /* the largest, twice */
        f[3] = f[120] = NAN;
        for (int from = 0; from < 203; from++) {
            const int len = 203 - from;
            int best = 0;
            for (int i = 1; i < len; i++) best = f[from + i] > f[from + best] ? i : best;
            const int got = edge_argmax_f32(f + from, len);
            if (got != (f[from] != f[from] ? 0 : best)) {
                printf("argmax from %d: %d vs %d\n", from, got, best);
                return 1;
            }
            double dv[203], m;
            for (int i = 0; i < len; i++) dv[i] = f[from + i];
            m = dv[0];
            for (int i = 1; i < len; i++) m = dv[i] > m ? dv[i] : m;
            const double gm = edge_max_f64(dv, len);
            if (!(gm == m || (gm != gm && m != m))) {
                printf("max_f64 from %d: %g vs %g\n", from, gm, m);
                return 1;
            }
        }
    }
    /* top_k's scan: the first key above a threshold from any start (NaNs never above) */
    for (int i = 0; i < 200; i++) z[i] = (i * 37 % 101) / 25.0 - 2.0;
    z[5] = z[77] = NAN;
    for (int from = 0; from <= 200; from++)
        for (int t = 0; t < 5; t++) {
            const double tau = t == 4 ? NAN : t - 2.0;
            int want = from;
            while (want < 200 && !(z[want] > tau)) want++;
            if (edge_first_above_f64(z, from, 200, tau) != want) {
                printf("first_above from %d tau %g: %d vs %d\n", from, tau, edge_first_above_f64(z, from, 200, tau), want);
                return 1;
            }
        }
    /* the digest takes the values the vector bodies compute, not libm's (the keys below -708, and
     * the last n % 8 activations, which every body sends to libm: checked against it here), so
     * that it does not depend on the C library either */
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < N; i++)
        if (z[i] / T - zmax >= -708.0) h = fnv1a(h, e + i, sizeof(double));
    float *g = malloc(N * sizeof(float)), *up = malloc(N * sizeof(float)), *out = malloc(N * sizeof(float));
    for (int i = 0; i < N; i++) {
        g[i] = -95.0f + 0.0453f * (float)i;                        /* past both of exp's clamps */
        up[i] = 1.0f + 0.001f * (float)i;
    }
    const int whole = N - N % 8;
    edge_silu_mul_f32(out, g, up, N);
    h = fnv1a(h, out, whole * sizeof(float));
    for (int i = whole; i < N; i++)
        if (out[i] != g[i] / (1.0f + expf(-g[i])) * up[i]) {
            printf("silu_mul's tail %d: %.9g, not expf's\n", i, out[i]);
            return 1;
        }
    {   /* every length's last n % 8 values through libm, as with AVX2, where exp's last bit shows */
        float a[48], u1[48], r[48];
        for (int n = 1; n <= 48; n++) {
            for (int i = 0; i < n; i++) a[i] = -6.0f + 0.2531f * (float)i, u1[i] = 1.0f;
            edge_silu_mul_f32(r, a, u1, n);
            for (int i = n - n % 8; i < n; i++)
                if (r[i] != a[i] / (1.0f + expf(-a[i])) * u1[i]) {
                    printf("silu_mul n=%d: value %d %.9g, not expf's\n", n, i, r[i]);
                    return 1;
                }
            for (int i = 0; i < n; i++) r[i] = a[i] * 0.5f;
            edge_gelu_erf_f32(r, n);
            for (int i = n - n % 8; i < n; i++)
                if (r[i] != 0.5f * (a[i] * 0.5f) * (1.0f + erff(a[i] * 0.5f * 0.70710678118654752f))) {
                    printf("gelu n=%d: value %d %.9g, not erff's\n", n, i, r[i]);
                    return 1;
                }
        }
    }
    for (int i = 0; i < N; i++) out[i] = g[i] * 0.2f;
    edge_gelu_erf_f32(out, N);
    h = fnv1a(h, out, whole * sizeof(float));
    for (int i = whole; i < N; i++)
        if (out[i] != 0.5f * (g[i] * 0.2f) * (1.0f + erff(g[i] * 0.2f * 0.70710678118654752f))) {
            printf("gelu's tail %d: %.9g, not erff's\n", i, out[i]);
            return 1;
        }
    const double sums[3] = {edge_sum_f64(g, N), edge_sumsq_f64(up, N), edge_sumsq_centered_f64(g, N, -3.25)};
    h = fnv1a(h, sums, sizeof sums);                               /* the norms' statistics */
    for (int i = 0; i < whole; i++) out[i] = g[i] * 0.3f;        /* softmax over a multiple of 8 */
    edge_softmax_f32(out, whole);
    h = fnv1a(h, out, whole * sizeof(float));
    /* an encoder run's probabilities with its rows in lanes: 24 rows (16, then 8), 37 keys */
    {
        enum { HD = 32, RP = 24, NK = 37 };
        float *qt = malloc(HD * RP * sizeof(float)), *keys = malloc(NK * HD * sizeof(float));
        float *probs = malloc(NK * RP * sizeof(float));
        for (int i = 0; i < HD * RP; i++) qt[i] = (float)(i * 29 % 97) / 48.0f - 1.0f;
        for (int i = 0; i < NK * HD; i++) keys[i] = (float)(i * 53 % 89) / 44.0f - 1.0f;
        edge_attention_probs_lanes(qt, RP, keys, HD, NK, HD, 0.17f, probs);
        h = fnv1a(h, probs, NK * RP * sizeof(float));
        free(qt); free(keys); free(probs);
    }
    *digest = h;
    free(z); free(e); free(one); free(g); free(up); free(out);
    return 0;
}

int main(void) {
    if (check_f16()) return 1;
    uint64_t digest;
    if (check_exps(&digest)) return 1;
    static const int sizes[] = {1, 3, 16, 31, 32, 33, 63, 64, 65, 96, 127, 160, 224, 225, 384, 448, 480, 576, 736, 1536, 4097};
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        const int K = sizes[i], G = (K + 31) / 32;
        float *x = malloc(K * sizeof(float)), *y = malloc(K * sizeof(float));
        float *xs = malloc(G * sizeof(float)), *ws = malloc(G * sizeof(float));
        uint16_t *wsh = malloc(G * sizeof(uint16_t)), *ws2h = malloc(G * sizeof(uint16_t));   /* as the file: fp16 */
        int8_t *q = malloc(edge_q8_row_bytes(K)), *w = malloc(K);
        for (int k = 0; k < K; k++) {
            x[k] = uniform() * 3.0f;
            y[k] = uniform();
            w[k] = (int8_t)(uniform() * 127.0f);
        }
        for (int g = 0; g < G; g++) {      /* normal halves between 2^-7 and 2^-5 */
            wsh[g] = (uint16_t)(0x2000 + (37 * g) % 2048);
            ws[g] = edge_f16_to_f32(wsh[g]);
        }
        int8_t *qn = malloc(edge_q8_row_bytes(K)), *wp = malloc(K);   /* q unpacked, w packed */
        edge_quantize_row_q8(x, K, q, xs);
        for (int k = K; k < edge_q8_padded(K); k++)
            if (q[k] != 0) {
                printf("quantize K=%d: padding byte %d is %d\n", K, k, q[k]);
                return 1;
            }
        plain_unpack(q, qn, K);
        plain_pack(w, wp, K);
        for (int g = 0; g * 32 < K; g++) {         /* the plain quantizer's very values and scales */
            const int k1 = g * 32 + 32 < K ? g * 32 + 32 : K;
            float amax = 0.0f;
            for (int k = g * 32; k < k1; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int k = g * 32; k < k1; k++)
                if (qn[k] != (int8_t)lrintf(x[k] * inv)) {
                    printf("quantize K=%d k=%d: %d, plainly %ld\n", K, k, qn[k], lrintf(x[k] * inv));
                    return 1;
                }
            if (xs[g] != amax / 127.0f) {
                printf("quantize K=%d group %d: scale %.9g, plainly %.9g\n", K, g, xs[g], amax / 127.0f);
                return 1;
            }
        }
        for (int k = 0; k < K; k++) {
            if (edge_q8_pack_index(k, K) != plain_pack_index(k, K)) {
                printf("pack_index K=%d k=%d: %d vs %d\n", K, k, edge_q8_pack_index(k, K), plain_pack_index(k, K));
                return 1;
            }
            const float back = (float)qn[k] * xs[k / 32];
            if (fabsf(back - x[k]) > 0.5f * xs[k / 32] * 1.0001f + 1e-7f) {
                printf("quantize K=%d k=%d: %g vs %g\n", K, k, back, x[k]);
                return 1;
            }
        }
        const float got = edge_dot_q8(q, xs, wp, wsh, K), want = plain_dot_q8(qn, xs, w, ws, K);
        if (fabsf(got - want) > 1e-4f * (fabsf(want) + 1.0f)) {
            printf("dot_q8 K=%d: %.7g vs %.7g\n", K, got, want);
            return 1;
        }
        /* the 4 x 2 block: rows of four quantized activations against two weight rows */
        const int Kp = edge_q8_row_bytes(K);   /* an activation row's stride */
        int8_t *q4 = malloc(4 * Kp), *q4n = malloc(4 * Kp), *w2 = malloc(2 * K), *w2p = malloc(2 * K);
        float *xs4 = malloc(4 * G * sizeof(float)), *ws2 = malloc(G * sizeof(float)), block[8], pair[2];
        float strided[4 * 5], biased[4 * 5], pair_biased[2];
        const float bias[2] = {uniform(), uniform()};
        for (int r = 0; r < 4; r++) {
            for (int k = 0; k < K; k++) x[k] = uniform() * (1.0f + r);
            edge_quantize_row_q8(x, K, q4 + r * Kp, xs4 + r * G);
            plain_unpack(q4 + r * Kp, q4n + r * Kp, K);
        }
        for (int k = 0; k < 2 * K; k++) w2[k] = (int8_t)(uniform() * 127.0f);
        for (int c = 0; c < 2; c++) plain_pack(w2 + c * K, w2p + c * K, K);
        for (int g = 0; g < G; g++) {
            ws2h[g] = (uint16_t)(0x2400 + (53 * g) % 1024);
            ws2[g] = edge_f16_to_f32(ws2h[g]);
        }
        edge_dot_q8_4x2(q4, Kp, xs4, G, w2p, w2p + K, wsh, ws2h, K, block, 2, NULL);
        /* into rows of an output of 5 columns (at column 1), without and with a bias */
        for (int i = 0; i < 20; i++) strided[i] = biased[i] = -7.0f;
        edge_dot_q8_4x2(q4, Kp, xs4, G, w2p, w2p + K, wsh, ws2h, K, strided + 1, 5, NULL);
        edge_dot_q8_4x2(q4, Kp, xs4, G, w2p, w2p + K, wsh, ws2h, K, biased + 1, 5, bias);
        for (int i = 0; i < 20; i++) {
            const int r = i / 5, c = i % 5 - 1;
            const float want_s = c == 0 || c == 1 ? block[2 * r + c] : -7.0f;
            const float want_b = c == 0 || c == 1 ? block[2 * r + c] + bias[c] : -7.0f;
            if (strided[i] != want_s || biased[i] != want_b) {
                printf("dot_q8_4x2 into rows K=%d r=%d column %d: %.9g / %.9g vs %.9g / %.9g\n", K, r, c + 1,
                       strided[i], biased[i], want_s, want_b);
                return 1;
            }
        }
        for (int r = 0; r < 4; r++) {
            edge_dot_q8_1x2(q4 + r * Kp, xs4 + r * G, w2p, w2p + K, wsh, ws2h, K, pair, NULL);
            edge_dot_q8_1x2(q4 + r * Kp, xs4 + r * G, w2p, w2p + K, wsh, ws2h, K, pair_biased, bias);
            if (pair_biased[0] != pair[0] + bias[0] || pair_biased[1] != pair[1] + bias[1]) {
                printf("dot_q8_1x2 with a bias K=%d r=%d\n", K, r);
                return 1;
            }
            for (int c = 0; c < 2; c++) {
                const float want2 = plain_dot_q8(q4n + r * Kp, xs4 + r * G, w2 + c * K, c ? ws2 : ws, K);
                if (fabsf(pair[c] - want2) > 1e-4f * (fabsf(want2) + 1.0f)) {
                    printf("dot_q8_1x2 K=%d r=%d c=%d: %.7g vs %.7g\n", K, r, c, pair[c], want2);
                    return 1;
                }
                if (fabsf(block[2 * r + c] - want2) > 1e-4f * (fabsf(want2) + 1.0f)) {
                    printf("dot_q8_4x2 K=%d r=%d c=%d: %.7g vs %.7g\n", K, r, c, block[2 * r + c], want2);
                    return 1;
                }
                /* bit for bit the same in every tile shape: a row's results must not depend on
                 * the rows it is batched with */
                const float single = edge_dot_q8(q4 + r * Kp, xs4 + r * G, w2p + c * K, c ? ws2h : wsh, K);
                if (block[2 * r + c] != pair[c] || single != pair[c]) {
                    printf("tile shapes K=%d r=%d c=%d: 4x2 %.9g, 1x2 %.9g, 1x1 %.9g\n", K, r, c,
                           block[2 * r + c], pair[c], single);
                    return 1;
                }
            }
        }
        free(q4); free(q4n); free(w2); free(w2p); free(xs4); free(ws2); free(wsh); free(ws2h); free(qn); free(wp);
        for (int k = 0; k < K; k++) x[k] = uniform() * 3.0f;

        double ref = 0.0, mag = 0.0;
        for (int k = 0; k < K; k++) {
            ref += (double)x[k] * y[k];
            mag += fabs((double)x[k] * y[k]);
        }
        const float d = edge_dot_f32(x, y, K);
        if (fabs(d - ref) > 1e-5 * (mag + 1.0)) {
            printf("dot_f32 K=%d: %.7g vs %.7g\n", K, d, ref);
            return 1;
        }
        /* attention's inner loops: K rows of width hd (row stride hd + 3) */
        static const int widths[] = {5, 8, 24, 32, 64, 128};
        for (unsigned wi = 0; wi < sizeof widths / sizeof widths[0]; wi++) {
            const int hd = widths[wi], n = K < 300 ? K : 300;
            const size_t stride = (size_t)hd + 3;
            float *rows = malloc((size_t)n * stride * sizeof(float)), *qv = malloc(hd * sizeof(float));
            float *sc = malloc(n * sizeof(float)), *o = malloc(hd * sizeof(float));
            for (size_t e = 0; e < (size_t)n * stride; e++) rows[e] = uniform();
            for (int d = 0; d < hd; d++) { qv[d] = uniform(); o[d] = uniform(); }
            edge_scores_f32(qv, rows, stride, n, hd, 0.125f, sc);
            for (int j = 0; j < n; j++) {
                double want_s = 0.0, mag_s = 0.0;
                for (int d = 0; d < hd; d++) {
                    want_s += (double)qv[d] * rows[j * stride + d];
                    mag_s += fabs((double)qv[d] * rows[j * stride + d]);
                }
                if (fabs(sc[j] - 0.125 * want_s) > 1e-6 * (mag_s + 1.0)) {
                    printf("scores hd=%d n=%d j=%d: %.7g vs %.7g\n", hd, n, j, sc[j], 0.125 * want_s);
                    return 1;
                }
            }
            double *want_o = malloc(hd * sizeof(double));
            for (int d = 0; d < hd; d++) want_o[d] = o[d];
            for (int j = 0; j < n; j++)
                for (int d = 0; d < hd; d++) want_o[d] += (double)sc[j] * rows[j * stride + d];
            edge_weighted_sum_f32(o, sc, rows, stride, n, hd);
            for (int d = 0; d < hd; d++)
                if (fabs(o[d] - want_o[d]) > 1e-5 * (fabs(want_o[d]) + n)) {
                    printf("weighted_sum hd=%d n=%d d=%d: %.7g vs %.7g\n", hd, n, d, o[d], want_o[d]);
                    return 1;
                }
            /* the same over rows stored as halves, three queries: bit for bit the float loops
             * over the rows widened, where the halves are widened in register (F16C) or both run
             * in plain C; with AVX2 but no F16C the halves take the plain loops (attention then
             * widens blocks first), so there only close */
            uint16_t *halves = malloc((size_t)n * stride * sizeof(uint16_t));
            float *widened = malloc((size_t)n * stride * sizeof(float)), *q3 = malloc(3 * hd * sizeof(float));
            float *sc16 = malloc(3 * (size_t)n * sizeof(float)), *sc32 = malloc(3 * (size_t)n * sizeof(float));
            float *o16 = malloc(3 * hd * sizeof(float)), *o32 = malloc(3 * hd * sizeof(float));
            edge_f32_to_f16_row(rows, halves, n * (int)stride);
            edge_f16_to_f32_row(halves, widened, n * (int)stride);
            for (int d = 0; d < 3 * hd; d++) { q3[d] = uniform(); o16[d] = o32[d] = uniform(); }
            edge_scores_f16_queries(q3, 3, hd, halves, stride, n, hd, 0.125f, sc16, n);
            edge_scores_f32_queries(q3, 3, hd, widened, stride, n, hd, 0.125f, sc32, n);
            edge_weighted_sum_f16_queries(o16, 3, hd, sc32, n, halves, stride, n, hd);
            edge_weighted_sum_f32_queries(o32, 3, hd, sc32, n, widened, stride, n, hd);
#if defined(__AVX2__) && defined(__FMA__) && !EDGE_F16C
            for (int e = 0; e < 3 * n; e++)
                if (fabsf(sc16[e] - sc32[e]) > 1e-5f * (fabsf(sc32[e]) + 1.0f)) {
                    printf("scores over halves hd=%d n=%d: %.7g vs %.7g\n", hd, n, sc16[e], sc32[e]);
                    return 1;
                }
            for (int d = 0; d < 3 * hd; d++)
                if (fabsf(o16[d] - o32[d]) > 1e-5f * (fabsf(o32[d]) + n)) {
                    printf("weighted sum over halves hd=%d n=%d: %.7g vs %.7g\n", hd, n, o16[d], o32[d]);
                    return 1;
                }
#else
            if (memcmp(sc16, sc32, 3 * (size_t)n * sizeof(float)) || memcmp(o16, o32, 3 * hd * sizeof(float))) {
                printf("attention over halves hd=%d n=%d: not the float loops' bits\n", hd, n);
                return 1;
            }
#endif
            /* each query's scores and weighted sum bit for bit the same alone as among three (a
             * row's results must not depend on the heads or rows it is grouped with) */
            for (int g = 0; g < 3; g++) {
                float *one_sc = malloc((size_t)n * sizeof(float)), *one_o = calloc(hd, sizeof(float));
                float *three_o = calloc(3 * (size_t)hd, sizeof(float));
                edge_scores_f32_queries(q3 + g * hd, 1, hd, widened, stride, n, hd, 0.125f, one_sc, n);
                edge_weighted_sum_f32_queries(three_o, 3, hd, sc32, n, widened, stride, n, hd);
                edge_weighted_sum_f32_queries(one_o, 1, hd, sc32 + (size_t)g * n, n, widened, stride, n, hd);
                if (memcmp(one_sc, sc32 + (size_t)g * n, (size_t)n * sizeof(float)) ||
                    memcmp(one_o, three_o + g * hd, hd * sizeof(float))) {
                    printf("attention hd=%d n=%d: query %d alone differs from the three together\n", hd, n, g);
                    return 1;
                }
                free(one_sc); free(one_o); free(three_o);
            }
            /* an encoder run's rows in lanes (edge_attention_probs_lanes): the softmax of each row's
             * scores, against doubles, and a row's bits the same alone as in a run of 17 */
            {
                const int R = 17, RP = edge_lanes_rows(R);
                float *qr = malloc((size_t)R * stride * sizeof(float)), *qt = malloc((size_t)hd * RP * sizeof(float));
                float *pr = malloc((size_t)n * RP * sizeof(float)), *p1 = malloc((size_t)n * 8 * sizeof(float));
                double *want_p = malloc(n * sizeof(double));
                for (size_t e = 0; e < (size_t)R * stride; e++) qr[e] = uniform();
                edge_transpose_queries(qr, stride, R, hd, qt, RP);
                for (int d = 0; d < hd; d++)
                    for (int r = 0; r < RP; r++)
                        if (qt[(size_t)d * RP + r] != (r < R ? qr[r * stride + d] : 0.0f)) {
                            printf("transpose_queries hd=%d d=%d r=%d\n", hd, d, r);
                            return 1;
                        }
                edge_attention_probs_lanes(qt, RP, rows, stride, n, hd, 0.125f, pr);
                for (int r = 0; r < R; r++) {
                    double mx = -1e300, sum = 0.0, mag = 0.0;
                    for (int j = 0; j < n; j++) {
                        double s = 0.0, m = 0.0;
                        for (int d = 0; d < hd; d++) {
                            s += (double)qr[r * stride + d] * rows[j * stride + d];
                            m += fabs((double)qr[r * stride + d] * rows[j * stride + d]);
                        }
                        want_p[j] = 0.125 * s;
                        mx = want_p[j] > mx ? want_p[j] : mx;
                        mag = m > mag ? m : mag;
                    }
                    for (int j = 0; j < n; j++) sum += exp(want_p[j] - mx);
                    for (int j = 0; j < n; j++) {
                        const double want = exp(want_p[j] - mx) / sum, got = pr[(size_t)j * RP + r];
                        if (fabs(got - want) > (4e-6 + 1e-6 * mag) * want + 1e-30) {
                            printf("probs_lanes hd=%d n=%d r=%d j=%d: %.9g vs %.9g\n", hd, n, r, j, got, want);
                            return 1;
                        }
                    }
                    edge_transpose_queries(qr + r * stride, stride, 1, hd, qt, 8);
                    edge_attention_probs_lanes(qt, 8, rows, stride, n, hd, 0.125f, p1);
                    for (int j = 0; j < n; j++)
                        if (p1[(size_t)j * 8] != pr[(size_t)j * RP + r]) {
                            printf("probs_lanes hd=%d n=%d r=%d j=%d: alone %.9g, in a run %.9g\n", hd, n, r, j,
                                   p1[(size_t)j * 8], pr[(size_t)j * RP + r]);
                            return 1;
                        }
                    edge_transpose_queries(qr, stride, R, hd, qt, RP);
                }
                free(qr); free(qt); free(pr); free(p1); free(want_p);
            }
            free(halves); free(widened); free(q3); free(sc16); free(sc32); free(o16); free(o32);
            free(rows); free(qv); free(sc); free(o); free(want_o);
        }
        /* softmax over scores spread like attention logits */
        for (int k = 0; k < K; k++) y[k] = uniform() * 40.0f - 10.0f;
        double mx = y[0], sum = 0.0;
        for (int k = 1; k < K; k++) mx = y[k] > mx ? y[k] : mx;
        for (int k = 0; k < K; k++) sum += exp((double)y[k] - mx);
        float *p = malloc(K * sizeof(float));
        for (int k = 0; k < K; k++) p[k] = y[k];
        edge_softmax_f32(p, K);
        for (int k = 0; k < K; k++) {
            const double want_p = exp((double)y[k] - mx) / sum;
            /* float rounding of (x - max) alone costs up to |x - max| * 2^-24 relative */
            if (fabs(p[k] - want_p) > (2e-6 + 1.2e-7 * fabs((double)y[k] - mx)) * want_p + 1e-30) {
                printf("softmax K=%d k=%d: %.9g vs %.9g\n", K, k, p[k], want_p);
                return 1;
            }
        }
        free(p);
        float *silu = malloc(K * sizeof(float));
        edge_silu_mul_f32(silu, y, x, K);
        for (int k = 0; k < K; k++) {
            const double want_s = (double)y[k] / (1.0 + exp(-(double)y[k])) * x[k];
            if (fabs(silu[k] - want_s) > 1e-6 * fabs(want_s) + 1e-30) {
                printf("silu_mul K=%d k=%d: %.9g vs %.9g\n", K, k, silu[k], want_s);
                return 1;
            }
        }
        free(silu);
        float *gelu = malloc(K * sizeof(float));
        for (int k = 0; k < K; k++) gelu[k] = y[k] * 0.4f;       /* [-20, 12] */
        edge_gelu_erf_f32(gelu, K);
        for (int k = 0; k < K; k++) {
            const double v = (double)y[k] * 0.4f, want_g = 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
            if (fabs(gelu[k] - want_g) > 2e-7 * fabs(v) + 1e-6 * fabs(want_g) + 1e-30) {
                printf("gelu_erf K=%d k=%d: %.9g vs %.9g\n", K, k, gelu[k], want_g);
                return 1;
            }
        }
        free(gelu);
        const uint16_t halves[] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x0000, 0x2e66};
        const float values[] = {1.0f, -2.0f, 5.9604644775390625e-8f, 65504.0f, 0.0f, 0.0999755859375f};
        uint16_t many[8];
        for (int h = 0; h < 8; h++) many[h] = halves[h % 6];
        float widened[8];
        for (int h = 0; h < 8; h++) widened[h] = edge_f16_to_f32(many[h]);
#if defined(__AVX2__)
        _mm256_storeu_ps(widened, edge_block_scales_f16(8, many));     /* the tile's in-register widening */
#endif
        for (int h = 0; h < 8; h++)
            if (edge_f16_to_f32(many[h]) != values[h % 6] || widened[h] != values[h % 6]) {
                printf("f16 %#x: %g / %g vs %g\n", many[h], edge_f16_to_f32(many[h]), widened[h], values[h % 6]);
                return 1;
            }
        free(x); free(y); free(xs); free(ws); free(q); free(w);
    }
    printf("%s ok %016llx\n", edge_simd_name(), (unsigned long long)digest);
    return 0;
}
