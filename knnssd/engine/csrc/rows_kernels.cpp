// The engine's CPU kernels for every decoding width (1 to 32 rows), fp32, AVX-512 or AVX2 with FMA:
//
//   rows_gemm(x, w)                 x (m, k) @ w (n, k).T, 1 <= m <= 256 (past 32: a batch of requests' passes)
//   rows_attention(q, k, v, mask)   attention of T <= 32 query rows over a KV cache, grouped-query heads
//   rows_rms_norm(x, w, eps)        RMSNorm of each row (Llama's form: w * (x * 1 / sqrt(mean(x^2) + eps)))
//   rows_rope_kv(q, k, v, cos, sin, key_buffer, value_buffer, start)
//                                   rotary positions on a step's queries and keys, keys and values written
//                                   into a preallocated KV cache (knnssd/engine/kvcache.py)
//   LayerStep(...).step(x, ...)     a Llama-shaped decoder layer's step made of the calls above, in one call
//
// The kernels are batch-invariant: every output element is computed by the same sequence of floating-point operations
// whatever the number of rows, so a row of a 16-token verify pass has the bits the 1-token plain step at that
// position has. That makes speculative greedy output plain decoding's exactly, by construction:
// - rows_gemm: out[m, n] is one sequential LANES-wide fused multiply-add reduction over k (the tail by a masked
//   load into the same accumulator), then the same horizontal sum. Rows are grouped into register tiles of up to
//   kGroup rows over a block of B weight rows while the block sits in L1, but the tiling only changes which
//   outputs are computed together, never an output's own operations. Threads split weight rows, never k.
// - rows_attention: query row t attends to the keys its mask row marks, in cache order. Masked keys are skipped,
//   not added as zeros, so a tree node's row sees exactly the keys (prefix, then its ancestors) that plain
//   decoding's row for the same token sees, in the same order. Each score is a dot product over the head
//   dimension with the same reduction tree for every key; the softmax's exponentials use one vector routine for
//   every element; its sum and the weighted sum of values run over the visible keys in order. The query heads
//   that share a key/value head and a position (so a mask row) are taken together, up to 4, each key and value
//   row read once for all of them; that changes which rows are computed together, never a row's operations.
// - rows_rope_kv: element for element transformers' q * cos + rotate_half(q) * sin, each product and the sum
//   rounded on its own (no fused multiply-add), so its bits are the library's; the copies are exact.
// - rows_rms_norm: each row's sum of squares is one sequential LANES-wide reduction, then the same horizontal
//   sum; one call replaces the dozen small tensor ops of transformers' RMSNorm.
//
// A small-batch product is memory-bound: each weight row is streamed from memory once and multiplied by every
// input row. One input row takes one weight row at a time, so each thread's share of the weights is read as one
// sequential stream. From 2 rows on, while a panel of weight blocks (8 from 13 rows on, else 1) is
// multiplied (by every group of input rows in turn), the next panel is prefetched into L2, spread over all the
// groups' iterations, so memory stays busy while the later groups compute (when only the first group prefetched,
// a 16-row pass waited on memory, then on the cores). Parallel over weight-row blocks (gemm) and over (key/value
// head, positions, query heads) items (attention) with ATen's thread pool, the GIL released. Built at first use
// with -march=native by knnssd/engine/kernel_build.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline void vstore_tail(float* p, vec a, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
// Lanes summed as a fixed tree: halves added (8 + 8, 4 + 4, 2 + 2, 1 + 1).
inline __m128 vquarter(vec a) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline float vsum(vec a) {
  __m128 q = vquarter(a);
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int LANES = 8;
using vec = __m256;
inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload_tail(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline void vstore_tail(float* p, vec a, int n) { _mm256_maskstore_ps(p, tail_mask(n), a); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
// Lanes summed as a fixed tree: halves added (4 + 4, 2 + 2, 1 + 1).
inline __m128 vquarter(vec a) { return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); }
inline float vsum(vec a) {
  __m128 q = vquarter(a);
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
#else
#error "knnssd's kernels need AVX-512 or AVX2 with FMA"
#endif

constexpr int kMaxRows = 32;        // query rows of one attention call (one request's verify pass)
constexpr int kMaxGemmRows = 256;   // input rows of one product (a batch of requests' passes)
constexpr int kGroup = 6;                        // input rows per register tile, at most
constexpr int kBlock = LANES == 16 ? 4 : 2;     // weight rows per register tile (kBlock * kGroup accumulators)
constexpr int64_t kLine = 16;                   // floats per cache line (64 bytes)
// Weight blocks a row group goes over before the next group starts (and how far ahead they are prefetched), where there
// are more than two groups (13 or more rows; fewer go one block at a time, prefetching one block ahead): 8 blocks of 4
// rows, 74 KB of SmolLM2's 576-column weights, held in L2 while the groups take turns. In a microbenchmark of SmolLM2's
// products, 16 rows took 25.0 ms in panels of 8 blocks against 28.0 a block at a time (4 blocks 25.5, 16 25.5, 32
// 27.0); in the kernel 16 rows 0.93 of the time, while 3 and 8 rows were slower in panels (1.04, 1.01) and 24 and 32 no
// faster, so fewer rows keep one block at a time (BENCHMARKS 44).
constexpr int64_t kPanel = 8;
// In a tile of 5 or more input rows, each input row's vector is loaded into a register once and used by the B
// fused multiply-adds. Left to itself GCC folds the load into every one of them (B loads instead of one), and the
// tile waits on the load ports (a microbenchmark of SmolLM2's products, 16 rows, prefetching into L2: 31 ms, 27
// with the rows held; BENCHMARKS 44). The empty asm only pins the value in a register; the arithmetic, so the
// bits, are the same.
// Tiles of 4 rows or fewer were no faster held, and AVX2's 16 registers have no room to spare.
constexpr bool kHoldRows = LANES == 16;

// ---------------------------------------------------------------------------------------------------- gemm

// out[m, n0 + i] = x[m] . w[n0 + i] for m < G, i < B (kBlock * kGroup + kBlock + 1 vector registers at most).
// With kPrefetch (the blocks of 2 or more input rows), each of the loop's iterations also prefetches `per` cache
// lines of w at offsets pf, pf + kLine, ... below pf_end (offsets from w, never a pointer past the array), into
// L2, not L1: L1 holds the tile's input rows and the current block, and prefetches into it evicted them (the
// microbenchmark: 16 rows 36 ms into L1, 31 into L2; 4 rows 26 and 19 ms; BENCHMARKS 44).
template <int G, int B, bool kPrefetch>
inline void tile(const float* __restrict x, const float* __restrict wn, float* __restrict out, int64_t n0,
                 int64_t n_out, int64_t k, const float* w, int64_t pf, int64_t pf_end, int per) {
  vec acc[B][G];
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i)
#pragma GCC unroll 8
    for (int m = 0; m < G; ++m) acc[i][m] = vzero();
  int64_t j = 0;
  for (; j + LANES <= k; j += LANES) {
    vec wv[B];
#pragma GCC unroll 8
    for (int i = 0; i < B; ++i) wv[i] = vload(wn + i * k + j);
    if constexpr (kPrefetch)
      for (int u = 0; u < per; ++u, pf += kLine)
        if (pf < pf_end) _mm_prefetch(reinterpret_cast<const char*>(w + pf), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int m = 0; m < G; ++m) {
      vec xv = vload(x + m * k + j);
      if constexpr (kHoldRows && G >= 5) asm("" : "+v"(xv));  // see kHoldRows
#pragma GCC unroll 8
      for (int i = 0; i < B; ++i) acc[i][m] = vfma(wv[i], xv, acc[i][m]);
    }
  }
  if (j < k) {
    const int rest = static_cast<int>(k - j);
#pragma GCC unroll 8
    for (int m = 0; m < G; ++m) {
      const vec xv = vload_tail(x + m * k + j, rest);
#pragma GCC unroll 8
      for (int i = 0; i < B; ++i) acc[i][m] = vfma(vload_tail(wn + i * k + j, rest), xv, acc[i][m]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < B; ++i)
#pragma GCC unroll 8
    for (int m = 0; m < G; ++m) out[m * n_out + n0 + i] = vsum(acc[i][m]);
}

// A tile of `rows` input rows (1 to kMost) by B weight rows.
template <int B, int kMost, int G = 1>
inline void rest_group(int rows, const float* x, const float* wn, float* out, int64_t n0, int64_t n_out, int64_t k,
                       const float* w, int64_t pf, int64_t pf_end, int per) {
  if constexpr (G <= kMost) {
    if (rows == G) return tile<G, B, true>(x, wn, out, n0, n_out, k, w, pf, pf_end, per);
    return rest_group<B, kMost, G + 1>(rows, x, wn, out, n0, n_out, k, w, pf, pf_end, per);
  }
}

// Every input row times the weight blocks [b0, b1) of w (n_out, k), block b being weight rows [b * B, b * B + B):
// groups of at most kMost input rows, each group over every block of the panel before the next group starts, so
// a group's rows stay in L1 while the panel's blocks come from L2 (from memory, through the prefetches, for the
// first group). The blocks `ahead` blocks on are prefetched meanwhile, each group its share of each block's
// lines, spread over the group's iterations, so memory stays busy while the later groups compute. Panels of one
// block, one block ahead, are one block at a time, as every wide product ran until 2026-12-05 (BENCHMARKS 44).
template <int B, int kMost>
inline void weight_panel(int rows, const float* x, const float* w, float* out, int64_t b0, int64_t b1,
                         int64_t ahead, int64_t n_out, int64_t k) {
  const int groups = (rows + kMost - 1) / kMost;  // as even as possible: 16 rows as 5 + 5 + 6, not 6 + 6 + 4
  const int64_t lines = (B * k + kLine - 1) / kLine, iters = std::max<int64_t>(1, k / LANES);  // full iterations
  const int64_t slice = (lines + groups - 1) / groups;
  const int per = k >= LANES ? static_cast<int>((slice + iters - 1) / iters) : 0;
  for (int g = 0, m0 = 0; g < groups; ++g) {
    const int size = (rows - m0) / (groups - g);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * B;
      const int64_t next = (n0 + ahead * B) * k, end = std::min(next + B * k, n_out * k);
      const int64_t pf = next + g * slice * kLine;
      rest_group<B, kMost>(size, x + m0 * k, w + n0 * k, out + m0 * n_out, n0, n_out, k, w, pf,
                           std::min(pf + slice * kLine, end), per);
    }
    m0 += size;
  }
}

// B weight rows a block; kMost input rows a tile at most. Threads take runs of blocks of about 64 weight rows.
// More than two row groups go over a run kPanel blocks at a time, fewer one block at a time (weight_panel).
template <int B, int kMost>
void rows_times_weight(int rows, const float* x, const float* w, float* out, int64_t n_out, int64_t k) {
  const int64_t blocks = n_out / B;
  const int64_t panel = rows > 2 * kMost ? kPanel : 1;  // blocks a panel, and the prefetches' distance in blocks
  at::parallel_for(0, blocks, std::max(1, 64 / B), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += panel)
      weight_panel<B, kMost>(rows, x, w, out, b, std::min(end, b + panel), panel, n_out, k);
  });
  for (int64_t n = blocks * B; n < n_out; ++n) weight_panel<1, kMost>(rows, x, w, out, n, n + 1, 1, n_out, k);
}

// One input row times every weight row, one weight row at a time with nothing else done per row, so each thread's
// share of w is one sequential stream. The same tile as above, so the same bits. Through the block path, a row at a
// time, its per-block arithmetic (group sizes and prefetch slices, four divisions) held SmolLM2's 1-row products to
// 41 GB/s where this reads 48, in one process (BENCHMARKS 43).
void rows_stream(const float* x, const float* w, float* out, int64_t n_out, int64_t k) {
  at::parallel_for(0, n_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) tile<1, 1, false>(x, w + n * k, out, n, n_out, k, w, 0, 0, 0);
  });
}

// ----------------------------------------------------------------------------------------------- attention

// exp(x) for x <= 0 (scores minus their maximum), Cephes' polynomial on a range reduction by ln 2: the same
// vector routine for every element (tails are padded, never computed by a scalar exp).
inline vec vexp(vec x) {
  const vec one = vset1(1.0f);
  x = vmax(x, vset1(-87.3f));  // exp below this is 0 to float precision; keeps 2^n representable
  vec fx = vfma(x, vset1(1.44269504088896341f), vset1(0.5f));
#if defined(__AVX512F__)
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  fx = _mm256_floor_ps(fx);
#endif
  x = vsub(x, vmul(fx, vset1(0.693359375f)));
  x = vsub(x, vmul(fx, vset1(-2.12194440e-4f)));
  vec y = vset1(1.9875691500e-4f);
  y = vfma(y, x, vset1(1.3981999507e-3f));
  y = vfma(y, x, vset1(8.3334519073e-3f));
  y = vfma(y, x, vset1(4.1665795894e-2f));
  y = vfma(y, x, vset1(1.6666665459e-1f));
  y = vfma(y, x, vset1(5.0000001201e-1f));
  y = vfma(y, vmul(x, x), vadd(x, one));
#if defined(__AVX512F__)
  __m512i n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
#else
  __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
#endif
}

inline float dot(const float* a, const float* b, int64_t d) {
  vec acc = vzero();
  int64_t j = 0;
  for (; j + LANES <= d; j += LANES) acc = vfma(vload(a + j), vload(b + j), acc);
  if (j < d) acc = vfma(vload_tail(a + j, static_cast<int>(d - j)), vload_tail(b + j, static_cast<int>(d - j)), acc);
  return vsum(acc);
}

// Four dot products at once, each summed by vsum's tree: after the quarter sums [x0, x1, x2, x3], vsum adds
// (x0 + x2) + (x1 + x3); a 4 x 4 transpose lets one vector do that for four keys.
inline void dot4(const float* a, const float* b0, const float* b1, const float* b2, const float* b3, int64_t d,
                 float* out) {
  vec c0 = vzero(), c1 = vzero(), c2 = vzero(), c3 = vzero();
  int64_t j = 0;
  for (; j + LANES <= d; j += LANES) {
    const vec av = vload(a + j);
    c0 = vfma(av, vload(b0 + j), c0);
    c1 = vfma(av, vload(b1 + j), c1);
    c2 = vfma(av, vload(b2 + j), c2);
    c3 = vfma(av, vload(b3 + j), c3);
  }
  if (j < d) {
    const int rest = static_cast<int>(d - j);
    const vec av = vload_tail(a + j, rest);
    c0 = vfma(av, vload_tail(b0 + j, rest), c0);
    c1 = vfma(av, vload_tail(b1 + j, rest), c1);
    c2 = vfma(av, vload_tail(b2 + j, rest), c2);
    c3 = vfma(av, vload_tail(b3 + j, rest), c3);
  }
  __m128 r0 = vquarter(c0), r1 = vquarter(c1), r2 = vquarter(c2), r3 = vquarter(c3);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_i = lane i of each key's quarter sums
  _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(r0, r2), _mm_add_ps(r1, r3)));
}

struct Attention {
  const float* q;      // (T, H, D) contiguous
  const float* k;      // key j of kv head h at k + h * kh + j * kj
  const float* v;
  const bool* mask;    // (T, L) contiguous, true: attend; nullptr: causal (row t sees keys 0 .. L - T + t)
  float* out;          // (T, H, D) contiguous
  int64_t T, H, Hkv, L, D, kh, kj, vh, vj;
  float scale;
};

// acc (C * LANES) = sum over m < n of p[m] * v[keys[m]], in key order, the accumulators in registers.
template <int C>
inline void weigh_values(const float* p, const int64_t* keys, int64_t n, const float* v, int64_t vj, float* acc) {
  vec sum[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) sum[c] = vzero();
  for (int64_t m = 0; m < n; ++m) {
    const vec pm = vset1(p[m]);
    const float* vr = v + keys[m] * vj;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) sum[c] = vfma(pm, vload(vr + c * LANES), sum[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) vstore(acc + c * LANES, sum[c]);
}

// The same for any head dimension, the accumulators in memory (a masked tail past the last full vector).
inline void weigh_values_any(const float* p, const int64_t* keys, int64_t n, const float* v, int64_t vj, int64_t D,
                             float* acc) {
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  for (int64_t m = 0; m < n; ++m) {
    const vec pm = vset1(p[m]);
    const float* vr = v + keys[m] * vj;
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) vstore(acc + d, vfma(pm, vload(vr + d), vload(acc + d)));
    if (d < D) {
      const int rest = static_cast<int>(D - d);
      vstore_tail(acc + d, vfma(pm, vload_tail(vr + d, rest), vload_tail(acc + d, rest)), rest);
    }
  }
}

// Scores of S query rows (qs[s], the query heads of one position that share key/value head) against keys
// keys[0 .. n): scores[s * stride + i] = q_s . key_i, each one with the operations dot() and dot4() use (one
// LANES-wide fused multiply-add chain over the head dimension, then vsum's tree), so a score's bits do not depend
// on S. Each key vector is loaded once for the S rows.
template <int S>
inline void scores_heads(const float* const* qs, const float* kb, int64_t kj, const int64_t* keys, int64_t n,
                         int64_t D, float* scores, int64_t stride) {
  int64_t i4 = 0;
  for (; i4 + 4 <= n; i4 += 4) {
    const float* b[4] = {kb + keys[i4] * kj, kb + keys[i4 + 1] * kj, kb + keys[i4 + 2] * kj, kb + keys[i4 + 3] * kj};
    vec c[S][4];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) c[s][i] = vzero();
    int64_t j = 0;
    for (; j + LANES <= D; j += LANES) {
      vec kv[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) kv[i] = vload(b[i] + j);
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        const vec av = vload(qs[s] + j);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) c[s][i] = vfma(av, kv[i], c[s][i]);
      }
    }
    if (j < D) {
      const int rest = static_cast<int>(D - j);
      vec kv[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) kv[i] = vload_tail(b[i] + j, rest);
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        const vec av = vload_tail(qs[s] + j, rest);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) c[s][i] = vfma(av, kv[i], c[s][i]);
      }
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      __m128 r0 = vquarter(c[s][0]), r1 = vquarter(c[s][1]), r2 = vquarter(c[s][2]), r3 = vquarter(c[s][3]);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // as dot4: r_i = lane i of each key's quarter sums
      _mm_storeu_ps(scores + s * stride + i4, _mm_add_ps(_mm_add_ps(r0, r2), _mm_add_ps(r1, r3)));
    }
  }
  for (; i4 < n; ++i4)
    for (int s = 0; s < S; ++s) scores[s * stride + i4] = dot(qs[s], kb + keys[i4] * kj, D);
}

// acc[s * C * LANES ...] = sum over m < n of p[s * stride + m] * v[keys[m]] for S rows at once, in key order, as
// weigh_values computes each row (each value row loaded once for the S rows).
template <int S, int C>
inline void weigh_values_heads(const float* p, int64_t stride, const int64_t* keys, int64_t n, const float* v,
                               int64_t vj, float* acc) {
  vec sum[S][C];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) sum[s][c] = vzero();
  for (int64_t m = 0; m < n; ++m) {
    const float* vr = v + keys[m] * vj;
    vec vv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vv[c] = vload(vr + c * LANES);
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const vec pm = vset1(p[s * stride + m]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) sum[s][c] = vfma(pm, vv[c], sum[s][c]);
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vstore(acc + (s * C + c) * LANES, sum[s][c]);
}

// Softmax of one row's n scores in place (exponentials of score * scale - max); returns 1 / their sum. The sum runs
// as LANES running sums over the visible keys in order, then a fixed tree.
inline float softmax_row(float* scores, int64_t n, float scale) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    scores[i] *= scale;
    top = scores[i] > top ? scores[i] : top;
  }
  const vec vtop = vset1(top);
  vec sum = vzero();
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    const vec e = vexp(vsub(vload(scores + i), vtop));
    vstore(scores + i, e);
    sum = vadd(sum, e);
  }
  if (i < n) {
    const int rest = static_cast<int>(n - i);
    vec e = vexp(vsub(vload_tail(scores + i, rest), vtop));
    vstore_tail(scores + i, e, rest);
    sum = vadd(sum, vload_tail(scores + i, rest));
  }
  return 1.0f / vsum(sum);
}

// Query heads [g0, g0 + S) of kv head h at position t (they share its mask row, so the same keys): scores, softmax
// and the weighted sum of values, each key and value row read once for the S heads. scores holds S * stride
// floats, acc S * D.
template <int S>
void attend_heads(const Attention& a, int64_t h, int64_t t, int64_t g0, const int64_t* keys, int64_t n,
                  float* scores, int64_t stride, float* acc) {
  const int64_t G = a.H / a.Hkv, D = a.D;
  const float* kb = a.k + h * a.kh;
  const float* vb = a.v + h * a.vh;
  const float* qs[S];
  float* outs[S];
  for (int s = 0; s < S; ++s) {
    const int64_t head = h * G + g0 + s;
    qs[s] = a.q + (t * a.H + head) * D;
    outs[s] = a.out + (t * a.H + head) * D;
  }
  if (n == 0) {  // a row that sees no key: zeros, as no probability mass lands anywhere
    for (int s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) outs[s][d] = 0.0f;
    return;
  }
  scores_heads<S>(qs, kb, a.kj, keys, n, D, scores, stride);
  float inv[S];
  for (int s = 0; s < S; ++s) inv[s] = softmax_row(scores + s * stride, n, a.scale);
  // weighted sum of values over the visible keys in order, vectorised over the head dimension: in registers for
  // head dimensions of 1, 2, 4 or 8 vectors (SmolLM2's 64), else in memory; the same operations either way
  switch (D % LANES == 0 ? D / LANES : 0) {
    case 1: weigh_values_heads<S, 1>(scores, stride, keys, n, vb, a.vj, acc); break;
    case 2: weigh_values_heads<S, 2>(scores, stride, keys, n, vb, a.vj, acc); break;
    case 4: weigh_values_heads<S, 4>(scores, stride, keys, n, vb, a.vj, acc); break;
    case 8:
      for (int s = 0; s < S; ++s) weigh_values<8>(scores + s * stride, keys, n, vb, a.vj, acc + s * D);
      break;
    default:
      for (int s = 0; s < S; ++s) weigh_values_any(scores + s * stride, keys, n, vb, a.vj, D, acc + s * D);
  }
  for (int s = 0; s < S; ++s)
    for (int64_t d = 0; d < D; ++d) outs[s][d] = acc[s * D + d] * inv[s];
}

// Positions [t0, t1) of kv head h, query heads [g0, g0 + S) of its group (S from 1 to 4) taken together.
void attend(const Attention& a, int64_t h, int64_t t0, int64_t t1, int64_t g0, int S, std::vector<float>& scores,
            std::vector<int64_t>& keys, std::vector<float>& acc) {
  const int64_t stride = a.L + LANES;
  for (int64_t t = t0; t < t1; ++t) {
    int64_t n = 0;
    if (a.mask) {
      const bool* row = a.mask + t * a.L;
      for (int64_t j = 0; j < a.L; ++j)
        if (row[j]) keys[n++] = j;
    } else {
      for (int64_t j = 0; j <= a.L - a.T + t; ++j) keys[n++] = j;
    }
    switch (S) {
      case 4: attend_heads<4>(a, h, t, g0, keys.data(), n, scores.data(), stride, acc.data()); break;
      case 3: attend_heads<3>(a, h, t, g0, keys.data(), n, scores.data(), stride, acc.data()); break;
      case 2: attend_heads<2>(a, h, t, g0, keys.data(), n, scores.data(), stride, acc.data()); break;
      default: attend_heads<1>(a, h, t, g0, keys.data(), n, scores.data(), stride, acc.data());
    }
  }
}

}  // namespace

torch::Tensor rows_gemm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_gemm: need x (m, k) and w (n, k)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "rows_gemm: float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxGemmRows, "rows_gemm: 1 to 256 rows");
  TORCH_CHECK(x.is_cpu() && w.is_cpu(), "rows_gemm: CPU tensors only");
  TORCH_CHECK(w.is_contiguous(), "rows_gemm: contiguous weight");
  x = x.contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  const int rows = static_cast<int>(x.size(0));
  const int64_t n = w.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  {
    // Only raw pointers and integers past this point: no Python object is touched while the GIL is released,
    // so other Python threads (a server's other requests) run during the product. x, w and out stay alive:
    // this frame holds their tensors.
    pybind11::gil_scoped_release no_gil;
    // 1 row: one weight row at a time, so each thread reads its share of w as one sequential stream (the
    // hardware prefetcher's best case; tiles of 8 rows read 8 short streams at once and stay well below the
    // memory's speed, BENCHMARKS 41). 2 rows went that way too until whole 2-token passes were timed both ways:
    // through the blocks they took 0.85-0.94 of the time, at contexts 200 and 1500, in two runs (BENCHMARKS 45).
    // Each output's operations are the tiles' own, so the bits do not change.
    if (rows == 1) rows_stream(xp, wp, op, n, k);
    else rows_times_weight<kBlock, kGroup>(rows, xp, wp, op, n, k);
  }
  return out;
}

torch::Tensor rows_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                             double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "rows_attention: q (T, H, D), k and v (Hkv, L, D)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat &&
              v.scalar_type() == torch::kFloat, "rows_attention: float32 only");
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), "rows_attention: CPU tensors only");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(0), L = k.size(1);
  TORCH_CHECK(T >= 1 && T <= kMaxRows && T <= L, "rows_attention: 1 to 32 query rows, at most the keys");
  TORCH_CHECK(v.size(0) == Hkv && v.size(1) == L && k.size(2) == D && v.size(2) == D && H % Hkv == 0,
              "rows_attention: shapes of q, k and v do not agree");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "rows_attention: keys and values contiguous per head dimension");
  q = q.contiguous();
  torch::Tensor m;
  if (mask.has_value()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 2 && m.size(0) == T && m.size(1) == L,
                "rows_attention: mask must be bool (T, L)");
  }
  auto out = torch::empty({T, H, D}, q.options());
  Attention a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
              mask.has_value() ? m.data_ptr<bool>() : nullptr, out.data_ptr<float>(),
              T, H, Hkv, L, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1), static_cast<float>(scale)};
  // Work items: (kv head, block of positions, group of query heads). The query heads of a position share its keys
  // and are taken together: up to 4 with AVX-512's 32 vector registers, 2 with AVX2's 16 (their score
  // accumulators, 4 keys a head, must fit; weighted sums of 8 or more vectors a head run one head at a time).
  // Even where that leaves fewer items than twice the threads (a plain step over 3 key/value heads: 3 items on 2
  // threads), reading each key and value once beats balancing: 1 query row, 30 SmolLM2 layers over 1500 cached
  // keys took 2.86 ms so against 5.23 ms with each head alone, 0.31 against 0.38 over 200 (BENCHMARKS 41).
  const int64_t G = H / Hkv;
  const int64_t heads = std::min<int64_t>(G, LANES == 16 ? 4 : 2);
  const int64_t groups = (G + heads - 1) / heads;
  const int64_t per = T <= 8 ? 1 : (T + 7) / 8;  // positions per work item: at most 8 blocks per kv head
  const int64_t chunks = (T + per - 1) / per;
  {
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, Hkv * chunks * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(heads * (L + LANES)), acc(heads * D);
      std::vector<int64_t> keys(L);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t h = item / (chunks * groups), c = item / groups % chunks, g0 = item % groups * heads;
        attend(a, h, c * per, std::min(T, (c + 1) * per), g0, static_cast<int>(std::min(heads, G - g0)), scores,
               keys, acc);
      }
    });
  }
  return out;
}

torch::Tensor rows_rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), "rows_rms_norm: need x (m, n) and w (n)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "rows_rms_norm: float32 only");
  TORCH_CHECK(x.is_cpu() && w.is_cpu(), "rows_rms_norm: CPU tensors only");
  x = x.contiguous();
  w = w.contiguous();
  auto out = torch::empty_like(x);
  const int64_t m = x.size(0), n = x.size(1);
  const int64_t full = n - n % LANES;
  const int tail = static_cast<int>(n - full);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = xp + r * n;
    float* orow = op + r * n;
    vec acc = vzero();
    for (int64_t j = 0; j < full; j += LANES) {
      const vec v = vload(xr + j);
      acc = vfma(v, v, acc);
    }
    if (tail) {
      const vec v = vload_tail(xr + full, tail);
      acc = vfma(v, v, acc);
    }
    const float scale = 1.0f / std::sqrt(vsum(acc) / static_cast<float>(n) + epsilon);
    const vec s = vset1(scale);
    for (int64_t j = 0; j < full; j += LANES) vstore(orow + j, vmul(vload(wp + j), vmul(vload(xr + j), s)));
    if (tail) vstore_tail(orow + full, vmul(vload_tail(wp + full, tail), vmul(vload_tail(xr + full, tail), s)), tail);
  }
  return out;
}

namespace {

// out = x * c + rotate_half(x) * s over one head's D values; fp-contract off: two roundings and a sum, as the
// library's three tensor ops round them (a fused multiply-add would round once and change the bits).
__attribute__((optimize("fp-contract=off")))
void rope_head(const float* x, const float* c, const float* s, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d] * c[d];
    const float b = -x[d + half] * s[d];
    out[d] = a + b;
  }
  for (int64_t d = half; d < D; ++d) {
    const float a = x[d] * c[d];
    const float b = x[d - half] * s[d];
    out[d] = a + b;
  }
}

}  // namespace

torch::Tensor rows_rope_kv(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor key_buffer, torch::Tensor value_buffer, int64_t start) {
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes(), "rows_rope_kv: cos and sin (T, D)");
  const int64_t T = cos.size(0), D = cos.size(1);
  TORCH_CHECK(D % 2 == 0 && q.dim() == 2 && k.dim() == 2 && v.sizes() == k.sizes() && q.size(0) == T &&
              k.size(0) == T && q.size(1) % D == 0 && k.size(1) % D == 0, "rows_rope_kv: q (T, H*D), k, v (T, Hkv*D)");
  TORCH_CHECK(key_buffer.dim() == 4 && key_buffer.size(0) == 1 && key_buffer.size(3) == D &&
              key_buffer.size(1) * D == k.size(1) && value_buffer.sizes() == key_buffer.sizes() &&
              key_buffer.is_contiguous() && value_buffer.is_contiguous(),
              "rows_rope_kv: buffers (1, Hkv, capacity, D), contiguous");
  TORCH_CHECK(start >= 0 && start + T <= key_buffer.size(2), "rows_rope_kv: the rows do not fit the buffers");
  for (const auto& t : {q, k, v, cos, sin, key_buffer, value_buffer}) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_cpu(), "rows_rope_kv: float32 CPU tensors only");
  }
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  const int64_t H = q.size(1) / D, Hkv = k.size(1) / D, C = key_buffer.size(2);
  auto out = torch::empty({T, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *op = out.data_ptr<float>(), *kb = key_buffer.data_ptr<float>(), *vb = value_buffer.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cp + t * D;
    const float* s = sp + t * D;
    for (int64_t h = 0; h < H; ++h) rope_head(qp + (t * H + h) * D, c, s, op + (t * H + h) * D, D);
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t slot = (h * C + start + t) * D;
      rope_head(kp + (t * Hkv + h) * D, c, s, kb + slot, D);
      std::copy(vp + (t * Hkv + h) * D, vp + (t * Hkv + h + 1) * D, vb + slot);
    }
  }
  return out;
}

namespace {

torch::Tensor with_bias(torch::Tensor out, const c10::optional<torch::Tensor>& bias) {
  return bias.has_value() ? out + *bias : out;
}

}  // namespace

// One decoder layer's step of Llama's form, T = 1 to 32 rows, from one Python call: the calls
// knnssd/engine/fastlayer.py's fast_step makes one by one, in the same order on the same tensors (the same kernels,
// and ATen's own add, SiLU and multiply), so every output bit is that path's. The layer's weights are held from
// install on; fastlayer checks before each step that they are still the layer's (`LayerKernels.layer_step_usable`).
//
//   x (T, hidden) -> rms_norm -> [q | k | v] = h @ qkv.T (+ biases) -> rotary, keys and values into the buffers at
//   start -> attention over the buffers' first start + T entries -> x + (o product) -> rms_norm ->
//   [gate | up] = h @ gate_up.T (+ biases) -> x + down(silu(gate) * up)
class LayerStep {
 public:
  using Bias = c10::optional<torch::Tensor>;

  LayerStep(torch::Tensor input_norm, double input_eps, torch::Tensor qkv, std::vector<int64_t> qkv_sizes,
            std::vector<Bias> qkv_biases, double scale, torch::Tensor o, Bias o_bias, torch::Tensor post_norm,
            double post_eps, torch::Tensor gate_up, std::vector<int64_t> gate_up_sizes,
            std::vector<Bias> gate_up_biases, torch::Tensor down, Bias down_bias)
      : input_norm(std::move(input_norm)), input_eps(input_eps), qkv(std::move(qkv)),
        qkv_sizes(std::move(qkv_sizes)), qkv_biases(std::move(qkv_biases)), scale(scale), o(std::move(o)),
        o_bias(std::move(o_bias)), post_norm(std::move(post_norm)), post_eps(post_eps),
        gate_up(std::move(gate_up)), gate_up_sizes(std::move(gate_up_sizes)),
        gate_up_biases(std::move(gate_up_biases)), down(std::move(down)), down_bias(std::move(down_bias)) {
    const int64_t hidden = this->input_norm.numel();
    TORCH_CHECK(this->input_norm.dim() == 1 && this->post_norm.sizes() == this->input_norm.sizes(),
                "LayerStep: two norm weights (hidden)");
    TORCH_CHECK(this->qkv_sizes.size() == 3 && this->qkv_biases.size() == 3,
                "LayerStep: q, k and v: 3 sizes, 3 biases");
    TORCH_CHECK(this->gate_up_sizes.size() == 2 && this->gate_up_biases.size() == 2,
                "LayerStep: gate and up: 2 sizes, 2 biases");
    TORCH_CHECK(this->gate_up_sizes[0] == this->gate_up_sizes[1], "LayerStep: gate and up of one size");
    TORCH_CHECK(this->qkv.dim() == 2 && this->qkv.size(1) == hidden &&
                this->qkv.size(0) == this->qkv_sizes[0] + this->qkv_sizes[1] + this->qkv_sizes[2],
                "LayerStep: qkv (nq + nk + nv, hidden)");
    TORCH_CHECK(this->o.dim() == 2 && this->o.size(0) == hidden && this->o.size(1) == this->qkv_sizes[0],
                "LayerStep: o (hidden, nq)");
    TORCH_CHECK(this->gate_up.dim() == 2 && this->gate_up.size(1) == hidden &&
                this->gate_up.size(0) == 2 * this->gate_up_sizes[0], "LayerStep: gate_up (2 * intermediate, hidden)");
    TORCH_CHECK(this->down.dim() == 2 && this->down.size(0) == hidden && this->down.size(1) == this->gate_up_sizes[0],
                "LayerStep: down (hidden, intermediate)");
    auto bias_fits = [](const Bias& bias, int64_t n) {
      return !bias.has_value() || (bias->dim() == 1 && bias->size(0) == n);
    };
    for (int i = 0; i < 3; ++i)
      TORCH_CHECK(bias_fits(this->qkv_biases[i], this->qkv_sizes[i]), "LayerStep: a q, k or v bias of the wrong size");
    for (int i = 0; i < 2; ++i)
      TORCH_CHECK(bias_fits(this->gate_up_biases[i], this->gate_up_sizes[i]),
                  "LayerStep: a gate or up bias of the wrong size");
    TORCH_CHECK(bias_fits(this->o_bias, hidden) && bias_fits(this->down_bias, hidden),
                "LayerStep: an o or down bias of the wrong size");
  }

  // x (T, hidden), cos and sin (T, D), key_buffer and value_buffer (1, Hkv, capacity, D) with room for start + T
  // entries, mask (T, start + T) bool or None (causal) -> (T, hidden).
  torch::Tensor step(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor key_buffer,
                     torch::Tensor value_buffer, int64_t start, c10::optional<torch::Tensor> mask) const {
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows && x.size(1) == input_norm.numel(),
                "LayerStep.step: x (T, hidden), 1 <= T <= 32");
    const int64_t T = x.size(0), end = start + T;
    auto h = rows_rms_norm(x, input_norm, input_eps);
    auto qkv_parts = rows_gemm(h, qkv).split_with_sizes(qkv_sizes, 1);
    auto query = rows_rope_kv(with_bias(qkv_parts[0], qkv_biases[0]), with_bias(qkv_parts[1], qkv_biases[1]),
                              with_bias(qkv_parts[2], qkv_biases[2]), cos, sin, key_buffer, value_buffer, start);
    auto attended = rows_attention(query, key_buffer.select(0, 0).narrow(1, 0, end),
                                   value_buffer.select(0, 0).narrow(1, 0, end), mask, scale);
    x = x + with_bias(rows_gemm(attended.reshape({T, -1}), o), o_bias);
    h = rows_rms_norm(x, post_norm, post_eps);
    auto gate_up_parts = rows_gemm(h, gate_up).split_with_sizes(gate_up_sizes, 1);
    auto act = at::silu(with_bias(gate_up_parts[0], gate_up_biases[0])) * with_bias(gate_up_parts[1],
                                                                                      gate_up_biases[1]);
    return x + with_bias(rows_gemm(act, down), down_bias);
  }

  const torch::Tensor input_norm;
  const double input_eps;
  const torch::Tensor qkv;  // (nq + nk + nv, hidden): q, k and v weights adjacent
  const std::vector<int64_t> qkv_sizes;
  const std::vector<Bias> qkv_biases;
  const double scale;
  const torch::Tensor o;
  const Bias o_bias;
  const torch::Tensor post_norm;
  const double post_eps;
  const torch::Tensor gate_up;  // (2 * intermediate, hidden): gate and up weights adjacent
  const std::vector<int64_t> gate_up_sizes;
  const std::vector<Bias> gate_up_biases;
  const torch::Tensor down;
  const Bias down_bias;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_rope_kv", &rows_rope_kv, "rotary queries and keys of T rows; keys and values into a KV buffer");
  m.def("rows_rms_norm", &rows_rms_norm, "RMSNorm of each row of x (m, n) with weight w (n)");
  m.def("rows_gemm", &rows_gemm, "x (m, k) @ w (n, k).T, 1 <= m <= 256");
  m.def("rows_attention", &rows_attention, "attention of 1-32 query rows (T, H, D) over k, v (Hkv, L, D)");
  m.attr("lanes") = LANES;
  using pybind11::arg;
  // Module-local: two builds of this file in one process (benchmarks/kernel_ab.py) each keep their own class.
  pybind11::class_<LayerStep>(m, "LayerStep", pybind11::module_local())
      .def(pybind11::init<torch::Tensor, double, torch::Tensor, std::vector<int64_t>, std::vector<LayerStep::Bias>,
                          double, torch::Tensor, LayerStep::Bias, torch::Tensor, double, torch::Tensor,
                          std::vector<int64_t>, std::vector<LayerStep::Bias>, torch::Tensor, LayerStep::Bias>(),
           arg("input_norm"), arg("input_eps"), arg("qkv"), arg("qkv_sizes"), arg("qkv_biases"), arg("scale"),
           arg("o"), arg("o_bias"), arg("post_norm"), arg("post_eps"), arg("gate_up"), arg("gate_up_sizes"),
           arg("gate_up_biases"), arg("down"), arg("down_bias"))
      .def_readonly("scale", &LayerStep::scale)
      .def_readonly("input_eps", &LayerStep::input_eps)
      .def_readonly("post_eps", &LayerStep::post_eps)
      .def("step", &LayerStep::step, "one decoder layer's step: x (T, hidden) -> (T, hidden)");
}
