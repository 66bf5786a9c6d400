// Segment sums of rows: dst[m] = sum of (w_j *) src[idx_j] for j in [ptr[m], ptr[m + 1]), the
// combine steps of expert-parallel top-k dispatch (moe_dist/parallel/segments.py).
//
// Why native: in PyTorch a weighted segment sum is a multiplication, a zero fill and an
// index_add forward, and a gather, two multiplications and a sum backward: six passes over
// [N, C] rows that do not fit in cache (8 MB at 8192 x 256), about 8 ms of a 220 ms dispatch
// step on one core (benchmarks/bench_segments.py). Here each output row is written once, from its segment's rows, in one
// pass each way. The terms are the same float32 products added in the same order (the
// segment's rows in ascending source position, starting from zero: PyTorch's index_add into
// zeros), so the sums equal PyTorch's bit for bit; the weights' gradient (a dot product
// per row) is added in double. Segments are independent, so the rows split over OpenMP's pool
// (PyTorch's own libgomp, as in pool_blocks.cpp) with no atomics.
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kParallelFloats = 1 << 16;  // below this, one thread: the pool costs more
constexpr int64_t kLanes = 16;                // double partial sums per dot product

// dst = 0 + src * w (first term) or dst += src * w: the product rounded to float before the
// add, as PyTorch's separate mul and index_add, so no fused multiply-add may join them; the
// first term is added to a zero as index_add adds it to its zero fill (a -0.0 becomes +0.0;
// without -ffast-math the compiler keeps the addition). Kept out of line (noinline), so that
// no caller's flags replace the attribute.
#if defined(__clang__)
void add_scaled(float* __restrict dst, const float* __restrict src, float w, int64_t C, bool first) {
#pragma clang fp contract(off)
  if (first) {
    for (int64_t c = 0; c < C; ++c) dst[c] = 0.0f + src[c] * w;
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] += src[c] * w;
  }
}
#else
__attribute__((noinline, optimize("fp-contract=off")))
void add_scaled(float* __restrict dst, const float* __restrict src, float w, int64_t C, bool first) {
  if (first) {
    for (int64_t c = 0; c < C; ++c) dst[c] = 0.0f + src[c] * w;
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] += src[c] * w;
  }
}
#endif

inline void add_row(float* __restrict dst, const float* __restrict src, int64_t C, bool first) {
  if (first) {
    for (int64_t c = 0; c < C; ++c) dst[c] = 0.0f + src[c];
  } else {
    for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
  }
}

// <g, s> over C floats, products and sums in double (kLanes partial sums: vectorisable).
inline double dot(const float* __restrict g, const float* __restrict s, int64_t C) {
  double lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(g[c + l]) * s[c + l];
  double total = 0.0;
  for (; c < C; ++c) total += static_cast<double>(g[c]) * s[c];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

}  // namespace

extern "C" {

// dst[m] = sum over j in [ptr[m], ptr[m + 1]) of w[widx[j]] * src[idx[j]] (w null: weight 1),
// added in j order to a zero; an empty segment gives zeros. src [*, C], dst [M, C].
void segment_sum(const float* src, int64_t C, const int64_t* ptr, const int64_t* idx, const int64_t* widx,
                 const float* w, int64_t M, float* dst) {
#pragma omp parallel for schedule(static) if (M * C > kParallelFloats)
  for (int64_t m = 0; m < M; ++m) {
    float* out = dst + m * C;
    const int64_t begin = ptr[m], end = ptr[m + 1];
    if (begin == end) std::memset(out, 0, C * sizeof(float));
    for (int64_t j = begin; j < end; ++j) {
      const float* row = src + idx[j] * C;
      if (w != nullptr) {
        add_scaled(out, row, w[widx[j]], C, j == begin);
      } else {
        add_row(out, row, C, j == begin);
      }
    }
  }
}

// The weighted segment_sum's backward, for grad [M, C] of dst: grad_src[idx[j]] = w[widx[j]] *
// grad[m] and grad_w[widx[j]] += <grad[m], src[idx[j]]> (each product summed in double, rounded
// once). Every row of src is in exactly one segment (segments come from a group index), so each
// grad_src row is written once; the rows that name one entry of w must lie in one segment (in
// dispatch, entry u * K + k belongs to unit u), so no two threads add to one entry. grad_w
// comes zeroed.
void segment_sum_backward(const float* grad, const float* src, int64_t C, const int64_t* ptr, const int64_t* idx,
                          const int64_t* widx, const float* w, int64_t M, float* grad_src, float* grad_w) {
#pragma omp parallel for schedule(static) if (M * C > kParallelFloats)
  for (int64_t m = 0; m < M; ++m) {
    const float* g = grad + m * C;
    for (int64_t j = ptr[m]; j < ptr[m + 1]; ++j) {
      const float wj = w[widx[j]];
      float* gs = grad_src + idx[j] * C;
      for (int64_t c = 0; c < C; ++c) gs[c] = g[c] * wj;
      grad_w[widx[j]] += static_cast<float>(dot(g, src + idx[j] * C, C));
    }
  }
}

}  // extern "C"
