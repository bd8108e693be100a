/* Fused selective scan for CPUs: forward and backward of
 *     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,      y_t = C_t h_t
 * (the skip term D u and the gate are applied by the caller).
 *
 * Built at first use by recbole_mm/model/layers/scan_kernel.py with the machine's C compiler
 * (-O3 -march=native) and called through ctypes, one call per slice of the batch, each from its
 * own Python thread (ctypes releases the GIL), so no OpenMP runtime is mixed with torch's.
 *
 * Layout (all float32, C-contiguous): sequences laid end to end, u, delta, y: [N, d]; B, C: [N, n],
 * sequence s holding rows offsets[s] .. offsets[s+1]-1 (a padded batch [b, l, .] is offsets
 * 0, l, 2l, ...; a packed one holds the real positions only, each sequence at its own length);
 * A_t: [n, d] (A transposed, so that every inner loop runs over the contiguous channel axis d and
 * vectorises); the state of one sequence is kept as [n, d] (32 KB at d 512, n 16: it stays in L1/L2).
 *
 * Why a kernel: the work is b*l*d*n multiply-adds and as many exp() calls. A Python loop over
 * time issues several tensor ops per step; a scalar libm exp is slower than torch's vectorised
 * one. Here exp is a Cephes-style polynomial (relative error ~1e-7) written so the compiler
 * vectorises it along d together with the recurrence, fused in one pass over the data.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define RESTRICT __restrict__

/* exp(x) for x in [-87.3, 88.7]; inputs outside are clamped (delta A <= 0 here, and exp below
 * -87.3 is a denormal that the state cannot distinguish from 0 at float32 precision). */
static inline float scan_exp(float x) {
    x = fminf(fmaxf(x, -87.3f), 88.7f);
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Forward over one sequence of `l` steps. `states` (optional, may be NULL) receives every h_t as
 * [l, n, d] for the backward pass. */
static void forward_one(int64_t l, int64_t d, int64_t n,
                        const float *RESTRICT u, const float *RESTRICT delta, const float *RESTRICT A_t,
                        const float *RESTRICT B, const float *RESTRICT C, float *RESTRICT y,
                        float *RESTRICT h, float *RESTRICT states) {
    memset(h, 0, sizeof(float) * n * d);
    for (int64_t t = 0; t < l; ++t) {
        const float *ut = u + t * d, *dt = delta + t * d;
        const float *Bt = B + t * n, *Ct = C + t * n;
        float *yt = y + t * d;
        memset(yt, 0, sizeof(float) * d);
        for (int64_t s = 0; s < n; ++s) {
            float *hs = h + s * d;
            const float *As = A_t + s * d;
            const float bs = Bt[s], cs = Ct[s];
#pragma GCC ivdep
            for (int64_t c = 0; c < d; ++c) {
                float v = scan_exp(dt[c] * As[c]) * hs[c] + dt[c] * ut[c] * bs;
                hs[c] = v;
                yt[c] += v * cs;
            }
        }
        if (states) memcpy(states + t * n * d, h, sizeof(float) * n * d);
    }
}

/* Backward over one sequence of `l` steps given its forward states [l, n, d].
 * Writes d_u, d_delta ([l, d]), d_B, d_C ([l, n]) and adds into d_A_t ([n, d]).
 * `g` and `decay_next` are [n, d] scratch buffers.
 *   g_t  = C_t dy_t + exp(delta_{t+1} A) g_{t+1}                 (dL/dh_t)
 *   dC_t = sum_d dy_t h_t,   dB_t = sum_d g_t delta_t u_t
 *   d(delta u)_t = sum_n g_t B_t
 *   d(delta_t A) = g_t h_{t-1} exp(delta_t A)   (h_{-1} = 0), giving d_delta and d_A. */
static void backward_one(int64_t l, int64_t d, int64_t n,
                         const float *RESTRICT u, const float *RESTRICT delta, const float *RESTRICT A_t,
                         const float *RESTRICT B, const float *RESTRICT C, const float *RESTRICT dy,
                         const float *RESTRICT states, float *RESTRICT d_u, float *RESTRICT d_delta,
                         float *RESTRICT d_A_t, float *RESTRICT d_B, float *RESTRICT d_C,
                         float *RESTRICT g, float *RESTRICT decay_next) {
    memset(g, 0, sizeof(float) * n * d);
    memset(decay_next, 0, sizeof(float) * n * d);
    for (int64_t t = l - 1; t >= 0; --t) {
        const float *ut = u + t * d, *dt = delta + t * d, *dyt = dy + t * d;
        const float *Bt = B + t * n, *Ct = C + t * n;
        const float *ht = states + t * n * d;
        const float *hprev = t > 0 ? states + (t - 1) * n * d : NULL;
        float *dut = d_u + t * d, *ddt = d_delta + t * d;
        memset(dut, 0, sizeof(float) * d);  /* holds d(delta u) until the end of the step */
        memset(ddt, 0, sizeof(float) * d);
        for (int64_t s = 0; s < n; ++s) {
            float *gs = g + s * d, *dns = decay_next + s * d, *dAs = d_A_t + s * d;
            const float *As = A_t + s * d, *hs = ht + s * d;
            const float bs = Bt[s], cs = Ct[s];
            float dc = 0.f, db = 0.f;
#pragma GCC ivdep
            for (int64_t c = 0; c < d; ++c) {
                float gv = cs * dyt[c] + dns[c] * gs[c];
                gs[c] = gv;
                dc += dyt[c] * hs[c];
                db += gv * dt[c] * ut[c];
                dut[c] += gv * bs;
                float decay = scan_exp(dt[c] * As[c]);
                dns[c] = decay;
                float dda = hprev ? gv * hprev[s * d + c] * decay : 0.f;
                ddt[c] += dda * As[c];
                dAs[c] += dda * dt[c];
            }
            d_C[t * n + s] = dc;
            d_B[t * n + s] = db;
        }
#pragma GCC ivdep
        for (int64_t c = 0; c < d; ++c) {
            float dud = dut[c];
            dut[c] = dud * dt[c];
            ddt[c] += dud * ut[c];
        }
    }
}

/* Forward over the `nseq` sequences of `offsets` (nseq + 1 row indices, see the layout above).
 * `h` is an [n, d] scratch buffer. */
void scan_forward(int64_t nseq, const int64_t *RESTRICT offsets, int64_t d, int64_t n,
                  const float *RESTRICT u, const float *RESTRICT delta, const float *RESTRICT A_t,
                  const float *RESTRICT B, const float *RESTRICT C, float *RESTRICT y, float *RESTRICT h) {
    for (int64_t s = 0; s < nseq; ++s) {
        const int64_t o = offsets[s];
        forward_one(offsets[s + 1] - o, d, n, u + o * d, delta + o * d, A_t, B + o * n, C + o * n, y + o * d,
                    h, NULL);
    }
}

/* Gradients of the `nseq` sequences of `offsets`, one sequence at a time: its forward states are
 * recomputed into `states` ([longest l, n, d]: 400 KB at l 50, d 128, n 16), which the backward
 * then reads while they are still in the core's cache; recomputing costs less than keeping states
 * for a whole batch, which falls out of the cache. `h`, `g`, `decay_next` are [n, d] scratch
 * buffers; d_u, d_delta ([N, d]), d_B, d_C ([N, n]) are written, `d_A_t` ([n, d]) accumulated. */
void scan_gradients(int64_t nseq, const int64_t *RESTRICT offsets, int64_t d, int64_t n,
                    const float *RESTRICT u, const float *RESTRICT delta, const float *RESTRICT A_t,
                    const float *RESTRICT B, const float *RESTRICT C, const float *RESTRICT dy,
                    float *RESTRICT d_u, float *RESTRICT d_delta, float *RESTRICT d_A_t,
                    float *RESTRICT d_B, float *RESTRICT d_C, float *RESTRICT h, float *RESTRICT states,
                    float *RESTRICT g, float *RESTRICT decay_next) {
    for (int64_t s = 0; s < nseq; ++s) {
        const int64_t o = offsets[s], l = offsets[s + 1] - o, x = o * d, bc = o * n;
        /* y is not needed: the forward writes it into d_u, which the backward then overwrites */
        forward_one(l, d, n, u + x, delta + x, A_t, B + bc, C + bc, d_u + x, h, states);
        backward_one(l, d, n, u + x, delta + x, A_t, B + bc, C + bc, dy + x, states,
                     d_u + x, d_delta + x, d_A_t, d_B + bc, d_C + bc, g, decay_next);
    }
}
