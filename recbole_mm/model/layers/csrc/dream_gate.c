/* DREAM's gate (eq. 6, recbole_mm/model/layers/dream.py, _GatedMerge) for CPU float32 blocks: the
 * element-wise passes between the block's matrix products, one pass over the block instead of a
 * torch op each (the gate, its product with F, the gradient's split between the two attentions and
 * their sums).
 *
 * A block is `rows` items; F and G are [rows, P, K] (P positions of K channels), the channel gate
 * mc is [rows, K] and the spatial gate ms is [rows, P]; the gate of (p, k) is max(mc[k], ms[p]). */
#include <stdint.h>

/* out = F * gate (out may be F itself) */
void dream_gate_forward(int64_t rows, int64_t P, int64_t K, const float *mc, const float *ms, const float *F,
                        float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *c = mc + r * K;
        for (int64_t p = 0; p < P; p++) {
            float s = ms[r * P + p];
            const float *f = F + (r * P + p) * K;
            float *o = out + (r * P + p) * K;
            for (int64_t k = 0; k < K; k++) o[k] = f[k] * (c[k] > s ? c[k] : s);
        }
    }
}

/* G holds dL/d(F * gate) and F holds F. The gate's gradient G * F goes to ms[p] where ms[p] > mc[k]
 * and to mc[k] elsewhere (ties to mc), summed into grad_ms [rows, P] and grad_mc [rows, K]; then
 * gated = F * gate (gated may be F itself) and G *= gate (the gradient at F), in place. */
void dream_gate_backward(int64_t rows, int64_t P, int64_t K, const float *mc, const float *ms, const float *F,
                         float *gated, float *G, float *grad_mc, float *grad_ms) {
    for (int64_t r = 0; r < rows; r++) {
        const float *c = mc + r * K;
        float *gc = grad_mc + r * K;
        for (int64_t k = 0; k < K; k++) gc[k] = 0.f;
        for (int64_t p = 0; p < P; p++) {
            float s = ms[r * P + p], to_s = 0.f;
            const float *f = F + (r * P + p) * K;
            float *o = gated + (r * P + p) * K, *g = G + (r * P + p) * K;
            for (int64_t k = 0; k < K; k++) {
                float from_s = s > c[k] ? 1.f : 0.f;
                float gate = from_s * s + (1.f - from_s) * c[k];
                float grad_gate = g[k] * f[k];
                to_s += from_s * grad_gate;
                gc[k] += grad_gate - from_s * grad_gate;
                o[k] = f[k] * gate;
                g[k] *= gate;
            }
            grad_ms[r * P + p] = to_s;
        }
    }
}
