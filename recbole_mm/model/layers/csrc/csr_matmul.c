/* Products of a constant CSR matrix A with a dense float32 matrix, for CPU training
 * (recbole_mm/model/layers/graph.py, sparse_matmul).
 *
 * torch's CSR product allocates a zero matrix, copies it into the result and then accumulates,
 * two extra passes over a freshly allocated output; these write each output row once. Both take
 * an optional list of A's rows (`rows`, NULL for all of them), so a product whose result is only
 * read at a few rows (a batch's users) touches only those rows' entries. */
#include <stdint.h>

/* out[r, :] = sum_p values[p] * x[indices[p], :] over the entries p of row rows[r] (row r when rows
 * is NULL); x and out have d columns. */
void csr_matmul_rows(int64_t n_rows, const int64_t *rows, const int64_t *indptr, const int64_t *indices,
                     const float *values, int64_t d, const float *x, float *out) {
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t row = rows ? rows[r] : r;
        float *o = out + r * d;
        for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
        for (int64_t p = indptr[row]; p < indptr[row + 1]; p++) {
            const float *xs = x + indices[p] * d;
            const float v = values[p];
            for (int64_t c = 0; c < d; c++) o[c] += v * xs[c];
        }
    }
}

/* The transpose of csr_matmul_rows: grad_x[indices[p], :] += values[p] * grad[r, :] over the same
 * entries; grad_x comes zeroed (or holding what it should add to). */
void csr_matmul_rows_t(int64_t n_rows, const int64_t *rows, const int64_t *indptr, const int64_t *indices,
                       const float *values, int64_t d, const float *grad, float *grad_x) {
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t row = rows ? rows[r] : r;
        const float *g = grad + r * d;
        for (int64_t p = indptr[row]; p < indptr[row + 1]; p++) {
            float *o = grad_x + indices[p] * d;
            const float v = values[p];
            for (int64_t c = 0; c < d; c++) o[c] += v * g[c];
        }
    }
}
