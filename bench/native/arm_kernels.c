/* One call of one kernel of core/kernels/simd.h on fixed data, chosen by argv[1] ("none": no call),
 * for bench/bench_arm_instructions.py, which counts the instructions it executes under qemu.  The
 * result goes to a volatile, not to printf, whose cost would depend on the value. */
#include <stdio.h>
#include <string.h>

#include "simd.h"

int main(int argc, char **argv) {
    const char *which = argc > 1 ? argv[1] : "none";
    static float gate[1536], up[1536], out[1536], probs[512], x[576], logits[49152], scales[32];
    static float qv[3 * 64], keys[256 * 64], scores[3 * 256], o[3 * 64], qt[32 * 16], lanes[128 * 16];
    static int8_t q[1024];
    static double z[4096], e[4096];
    for (int i = 0; i < 1536; i++) gate[i] = (float)(i % 97) * 0.1f - 5.0f, up[i] = 1.0f;
    for (int i = 0; i < 512; i++) probs[i] = (float)(i % 37) * 0.3f - 4.0f;
    for (int i = 0; i < 576; i++) x[i] = (float)(i % 29) * 0.07f - 1.0f;
    for (int i = 0; i < 4096; i++) z[i] = (double)(i % 1000) * 0.01 - 5.0;
    for (int i = 0; i < 49152; i++) logits[i] = (float)(i * 7 % 1013) * 0.01f;
    for (int i = 0; i < 3 * 64; i++) qv[i] = (float)(i % 11) * 0.1f;
    for (int i = 0; i < 256 * 64; i++) keys[i] = (float)(i % 17) * 0.05f;
    for (int i = 0; i < 3 * 256; i++) scores[i] = 0.001f * (float)(i % 7);
    for (int i = 0; i < 32 * 16; i++) qt[i] = (float)(i % 5) * 0.1f;
    volatile float result = 0.0f;
    if (!strcmp(which, "silu_mul")) {               /* a row of SmolLM2's feed-forward */
        edge_silu_mul_f32(out, gate, up, 1536);
        result = out[5];
    } else if (!strcmp(which, "gelu")) {            /* a row of MiniLM's */
        edge_gelu_erf_f32(gate, 1536);
        result = gate[3];
    } else if (!strcmp(which, "softmax")) {         /* a row of 512 attention scores */
        edge_softmax_f32(probs, 512);
        result = probs[3];
    } else if (!strcmp(which, "quantize")) {        /* a row of 576 activations */
        edge_quantize_row_q8(x, 576, q, scales);
        result = q[7];
    } else if (!strcmp(which, "norm_sums")) {       /* rmsnorm's sum of squares over a row of 576 */
        result = (float)edge_sumsq_f64(x, 576);
    } else if (!strcmp(which, "sampling_exp")) {    /* 4096 of sampling's weights */
        edge_exp_keys_f64(z, 4096, 0.7, 3.0, e);
        result = (float)e[9];
    } else if (!strcmp(which, "argmax")) {          /* greedy over SmolLM2's vocabulary */
        result = (float)edge_argmax_f32(logits, 49152);
    } else if (!strcmp(which, "scores")) {          /* 3 query heads over 256 keys of 64 */
        edge_scores_f32_queries(qv, 3, 64, keys, 64, 256, 64, 0.125f, scores, 256);
        result = scores[9];
    } else if (!strcmp(which, "weighted_sum")) {    /* and their weighted sum of 256 values */
        edge_weighted_sum_f32_queries(o, 3, 64, scores, 256, keys, 64, 256, 64);
        result = o[9];
    } else if (!strcmp(which, "encoder_probs")) {   /* 16 encoder rows over 128 keys of 32, rows in lanes */
        const int RP = edge_lanes_rows(16);
        edge_transpose_queries(keys, 32, 16, 32, qt, RP);
        edge_attention_probs_lanes(qt, RP, keys, 32, 128, 32, 0.17f, lanes);
        result = lanes[9];
    } else if (strcmp(which, "none")) {
        fprintf(stderr, "unknown kernel %s\n", which);
        return 2;
    }
    (void)result;
    return 0;
}
