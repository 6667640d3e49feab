// rows_gemm(x, w): x (m, k) @ w (n, k).T for 1..16 rows m, fp32, AVX-512.
//
// A verify pass multiplies every weight by a few rows (the last committed token and the drafts). A small-batch
// product is memory-bound: the right kernel streams each weight row from memory once and multiplies it by every
// input row while it is in registers (the inputs stay in L1/L2), so 8 rows cost little more than one. BLAS GEMM
// kernels are blocked for large batches and read the weight once per block of rows instead. Parallel over weight
// rows with ATen's thread pool (torch's thread count). Built at first use by knnssd/kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kMaxRows = 16;

template <int R>
void rows_times_weight(const float* __restrict x, const float* __restrict w, float* __restrict out, int64_t n_out,
                       int64_t k) {
  at::parallel_for(0, n_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* wn = w + n * k;
      const char* next = reinterpret_cast<const char*>(wn + k);
      for (int64_t b = 0; b < k * 4; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);  // the next weight row
      __m512 acc[R], acc2[R];  // two chains per row: FMA latency does not bound one-row products
#pragma GCC unroll 16
      for (int m = 0; m < R; ++m) { acc[m] = _mm512_setzero_ps(); acc2[m] = _mm512_setzero_ps(); }
      int64_t j = 0;
      for (; j + 32 <= k; j += 32) {
        const __m512 w0 = _mm512_loadu_ps(wn + j);
        const __m512 w1 = _mm512_loadu_ps(wn + j + 16);
#pragma GCC unroll 16
        for (int m = 0; m < R; ++m) {
          acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * k + j), acc[m]);
          acc2[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * k + j + 16), acc2[m]);
        }
      }
      for (; j + 16 <= k; j += 16) {
        const __m512 w0 = _mm512_loadu_ps(wn + j);
#pragma GCC unroll 16
        for (int m = 0; m < R; ++m) acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * k + j), acc[m]);
      }
#pragma GCC unroll 16
      for (int m = 0; m < R; ++m) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m]));
        for (int64_t t = j; t < k; ++t) sum += wn[t] * x[m * k + t];
        out[m * n_out + n] = sum;
      }
    }
  });
}

template <int R>
void dispatch(int64_t rows, const float* x, const float* w, float* out, int64_t n, int64_t k) {
  if constexpr (R <= kMaxRows) {
    if (rows == R) return rows_times_weight<R>(x, w, out, n, k);
    return dispatch<R + 1>(rows, x, w, out, n, k);
  }
}

}  // namespace

torch::Tensor rows_gemm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_gemm: need x (m, k) and w (n, k)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "rows_gemm: float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "rows_gemm: 1 to 16 rows");
  TORCH_CHECK(w.is_contiguous() && !x.is_cuda() && !w.is_cuda(), "rows_gemm: contiguous CPU weight");
  x = x.contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  dispatch<1>(x.size(0), x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), w.size(0), x.size(1));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rows_gemm", &rows_gemm, "x (m, k) @ w (n, k).T, 1 <= m <= 16"); }
