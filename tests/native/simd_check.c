/* Cross-architecture check of core/kernels/simd.h: every SIMD body against plain C on random data.
 *
 * Built and run by tests/test_simd_arch.py for the host and, where a cross compiler and qemu are
 * installed, for aarch64 (NEON with and without the dot-product extension).  Prints the
 * instruction set and "ok", or the first mismatch and exits 1.
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

int main(void) {
    static const int sizes[] = {1, 3, 16, 31, 32, 33, 63, 64, 65, 96, 127, 576, 1536, 4097};
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        const int K = sizes[i], G = (K + 31) / 32;
        float *x = malloc(K * sizeof(float)), *y = malloc(K * sizeof(float));
        float *xs = malloc(G * sizeof(float)), *ws = malloc(G * sizeof(float));
        int8_t *q = malloc(edge_q8_padded(K)), *w = malloc(K);
        for (int k = 0; k < K; k++) {
            x[k] = uniform() * 3.0f;
            y[k] = uniform();
            w[k] = (int8_t)(uniform() * 127.0f);
        }
        for (int g = 0; g < G; g++) ws[g] = 0.01f + 0.001f * (float)g;
        edge_quantize_row_q8(x, K, q, xs);
        for (int k = 0; k < K; k++) {
            const float back = (float)q[k] * xs[k / 32];
            if (fabsf(back - x[k]) > 0.5f * xs[k / 32] * 1.0001f + 1e-7f) {
                printf("quantize K=%d k=%d: %g vs %g\n", K, k, back, x[k]);
                return 1;
            }
        }
        const float got = edge_dot_q8(q, xs, w, ws, K), want = plain_dot_q8(q, xs, w, ws, K);
        if (fabsf(got - want) > 1e-4f * (fabsf(want) + 1.0f)) {
            printf("dot_q8 K=%d: %.7g vs %.7g\n", K, got, want);
            return 1;
        }
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
        const uint16_t halves[] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x0000, 0x2e66};
        const float values[] = {1.0f, -2.0f, 5.9604644775390625e-8f, 65504.0f, 0.0f, 0.0999755859375f};
        for (int h = 0; h < 6; h++)
            if (edge_f16_to_f32(halves[h]) != values[h]) {
                printf("f16 %#x: %g vs %g\n", halves[h], edge_f16_to_f32(halves[h]), values[h]);
                return 1;
            }
        free(x); free(y); free(xs); free(ws); free(q); free(w);
    }
    printf("%s ok\n", edge_simd_name());
    return 0;
}
