// rows_gemm(x, w): x (m, k) @ w (n, k).T for 1..16 rows m, fp32, AVX-512.
//
// A verify pass multiplies every weight by a few rows (the last committed token and the drafts). A small-batch
// product is memory-bound: the right kernel streams each weight row from memory once and multiplies it by every
// input row while it is in registers (the inputs stay in L1/L2), so 8 rows cost little more than one. BLAS GEMM
// kernels are blocked for large batches and read the weight once per block of rows instead.
//
// Two things make the kernel's compute hide under the weight stream (BENCHMARKS.md section 11):
// - a block of B weight rows at a time (4 up to 8 input rows, 2 above; B * m accumulators in registers), so each
//   input vector loaded serves B multiply-adds;
// - a software prefetch kPrefetch floats (8 KB) ahead of every weight row being read, issued as the loop consumes
//   each cache line: memory requests stay in flight while the core multiplies. Prefetching a whole row at once, or
//   only the next row, left the multiply-adds and the memory reads in series (8 rows: +40% over one row).
// Parallel over weight-row blocks with ATen's thread pool (torch's thread count), with the GIL released. Built at
// first use by knnssd/engine/kernels.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kMaxRows = 16;
constexpr int64_t kPrefetch = 2048;  // floats ahead of each weight row read (8 KB)

// out[m, n0 + i] = x[m] . w[n0 + i] for i < B, m < R. The last k % 16 elements by masked loads.
template <int R, int B>
inline void weight_block(const float* __restrict x, const float* __restrict w, float* __restrict out, int64_t n0,
                         int64_t n_out, int64_t k, const float* w_end) {
  const float* wn = w + n0 * k;
  __m512 acc[B][R];
#pragma GCC unroll 4
  for (int i = 0; i < B; ++i)
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m) acc[i][m] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    __m512 wv[B];
#pragma GCC unroll 4
    for (int i = 0; i < B; ++i) {
      const float* ahead = wn + i * k + j + kPrefetch;
      if (ahead < w_end) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      wv[i] = _mm512_loadu_ps(wn + i * k + j);
    }
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * k + j);
#pragma GCC unroll 4
      for (int i = 0; i < B; ++i) acc[i][m] = _mm512_fmadd_ps(wv[i], xv, acc[i][m]);
    }
  }
  if (j < k) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (k - j)) - 1);
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * k + j);
#pragma GCC unroll 4
      for (int i = 0; i < B; ++i)
        acc[i][m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wn + i * k + j), xv, acc[i][m]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < B; ++i)
#pragma GCC unroll 16
    for (int m = 0; m < R; ++m) out[m * n_out + n0 + i] = _mm512_reduce_add_ps(acc[i][m]);
}

template <int R>
void rows_times_weight(const float* __restrict x, const float* __restrict w, float* __restrict out, int64_t n_out,
                       int64_t k) {
  constexpr int B = R <= 8 ? 4 : 2;  // B * R accumulators: past 8 rows a 4-row block spills registers
  const float* w_end = w + n_out * k;
  const int64_t blocks = n_out / B;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) weight_block<R, B>(x, w, out, b * B, n_out, k, w_end);
  });
  for (int64_t n = blocks * B; n < n_out; ++n) weight_block<R, 1>(x, w, out, n, n_out, k, w_end);
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
  TORCH_CHECK(x.is_cpu() && w.is_cpu(), "rows_gemm: CPU tensors only");
  TORCH_CHECK(w.is_contiguous(), "rows_gemm: contiguous weight");
  x = x.contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  const int64_t rows = x.size(0), n = w.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  {
    // Only raw pointers and integers past this point: no Python object is touched while the GIL is released,
    // so other Python threads (a server's other requests) run during the product. x, w and out stay alive:
    // this frame holds their tensors.
    pybind11::gil_scoped_release no_gil;
    dispatch<1>(rows, xp, wp, op, n, k);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("rows_gemm", &rows_gemm, "x (m, k) @ w (n, k).T, 1 <= m <= 16"); }
