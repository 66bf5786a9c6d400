// Fused CPU kernels for "convolution, (BatchNorm,) ReLU, 2x2 max-pool" blocks computed from
// pooling-phase columns (moe_dist/models/layers.py: pool_phase_columns). The columns are
// [K, 4, M] floats: row k, phase p, window m at ((k * 4) + p) * M + m.
//
// Why native: in PyTorch each step of these blocks (the product, centring, scaling, the phase
// comparison, the scatter of the gradient) is one pass over a [C, 4, M] tensor that does not
// fit in cache, and those passes, not arithmetic, took about a third of a Fashion-MNIST
// training step on a 2-core CPU. Here the product is recomputed from the columns (9 values
// per output: cheap) block by block while the block is in cache, so no [C, 4, M] tensor is
// ever written. Sums that feed BatchNorm's statistics and the weight gradients are float
// within a block and double across blocks (BatchNorm's: blocks centred, merged by Chan's
// update). Functions take raw pointers (called through ctypes, which releases the GIL) and
// run on OpenMP's pool: every thread works on a contiguous range of windows and keeps its
// own partial sums, added in thread order afterwards (the same result for the same thread
// count).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kBlock = 512;  // windows per block: its columns (K * 4 * 512 floats, 72 KB at K = 9) stay in L2
constexpr int64_t V = 16;        // floats per vector: one AVX-512 register (GCC splits it elsewhere)
typedef float vf __attribute__((vector_size(V * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(V * sizeof(int32_t))));

inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// fn(t, begin, end) on the threads of OpenMP's pool over [0, n), ranges aligned to kBlock.
// The pool is PyTorch's own (the library is loaded into a process whose libgomp is torch's),
// so its threads, still spinning after PyTorch's last parallel operation, take this work
// instead of competing with threads of ours for the same cores.
template <class F>
void parallel(int64_t n, const F& fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  if (blocks == 0) return;
#ifdef _OPENMP
#pragma omp parallel if (blocks > 1)
  {
    const int64_t t_count = std::min<int64_t>(omp_get_num_threads(), blocks);
    const int64_t t = omp_get_thread_num();
    const int64_t per = (blocks + t_count - 1) / t_count * kBlock;
    if (t < t_count) fn(t, std::min(n, t * per), std::min(n, (t + 1) * per));
  }
#else
  fn(0, 0, n);
#endif
}

// z[p][i] = sum_k w[k] * cols[k, p, m0 + i] for the 4 phases of windows m0 .. m0 + len (the
// sum over k in a register: the block's columns come from L1/L2, z goes out once).
inline void phase_products(const float* cols, const float* w, int64_t K, int64_t M, int64_t m0,
                           int64_t len, float* z) {
  for (int64_t p = 0; p < 4; ++p) {
    float* zp = z + p * kBlock;
    const float* base = cols + p * M + m0;
    int64_t i = 0;
    for (; i + V <= len; i += V) {
      vf a = {};
      for (int64_t k = 0; k < K; ++k) a += w[k] * load(base + k * 4 * M + i);
      store(zp + i, a);
    }
    for (; i < len; ++i) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) a += w[k] * base[k * 4 * M + i];
      zp[i] = a;
    }
  }
}

// The first phase with the largest s * z (s = +1 or -1: the largest or the smallest z), its
// z, and NaN with phase 3 where a phase is NaN (as torch.amax and first_max_phase give).
inline void first_max(const float* z, float s, int64_t len, float* best, uint8_t* phase) {
  int64_t i = 0;
  for (; i + V <= len; i += V) {
    vf z0 = load(z + i), b = s * z0;
    vi ph = {}, nan = z0 != z0;
    for (int p = 1; p < 4; ++p) {
      const vf zp = load(z + p * kBlock + i), v = s * zp;
      nan |= zp != zp;
      const vi gt = v > b;
      b = gt ? v : b;
      ph = gt ? p : ph;
    }
    store(best + i, nan ? std::numeric_limits<float>::quiet_NaN() : s * b);
    ph = nan ? 3 : ph;
    for (int64_t j = 0; j < V; ++j) phase[i + j] = static_cast<uint8_t>(ph[j]);
  }
  for (; i < len; ++i) {
    float b = s * z[i];
    int ph = 0;
    bool nan = z[i] != z[i];
    for (int p = 1; p < 4; ++p) {
      const float v = s * z[p * kBlock + i];
      nan = nan || v != v;
      if (v > b) { b = v; ph = p; }
    }
    best[i] = nan ? std::numeric_limits<float>::quiet_NaN() : s * b;
    phase[i] = static_cast<uint8_t>(nan ? 3 : ph);
  }
}

// Block sums, kept per vector lane: float within a block (at most kBlock / V terms per lane),
// then added in double across blocks (vd accumulators) and across lanes and threads at the
// end. As accurate as the two-pass float32 statistics of nn.BatchNorm2d (see
// layers.sum_of_squares), with one horizontal sum per run instead of one per block.
typedef double vd __attribute__((vector_size(V * sizeof(double))));

inline vf tail(const float* a, int64_t n) { vf t = {}; for (int64_t j = 0; j < n; ++j) t[j] = a[j]; return t; }

inline void add_dot(vd& acc, const float* a, const float* b, int64_t len) {
  vf s = {};
  int64_t i = 0;
  for (; i + V <= len; i += V) s += load(a + i) * load(b + i);
  if (i < len) s += tail(a + i, len - i) * tail(b + i, len - i);
  acc += __builtin_convertvector(s, vd);
}

inline void add_total(vd& acc, const float* a, int64_t len) {
  vf s = {};
  int64_t i = 0;
  for (; i + V <= len; i += V) s += load(a + i);
  if (i < len) s += tail(a + i, len - i);
  acc += __builtin_convertvector(s, vd);
}

// Per-thread accumulators, `width` of them per thread; their sums over lanes and threads.
struct Sums {
  int64_t width;
  std::vector<vd> parts;
  explicit Sums(int64_t w) : width(w), parts(static_cast<size_t>(max_threads()) * w, vd{}) {}
  vd* of(int64_t t) { return parts.data() + t * width; }
  double operator[](int64_t j) const {
    double v = 0.0;
    for (size_t t = 0; t < parts.size() / width; ++t)
      for (int64_t l = 0; l < V; ++l) v += parts[t * width + j][l];
    return v;
  }
};

// g = 0 where out <= 0, else grad: the ReLU's backward as torch's threshold_backward computes
// it (a NaN output passes its gradient), for a block
inline void relu_grad(const float* grad, const float* out, int64_t len, float* g) {
  int64_t i = 0;
  for (; i + V <= len; i += V) {
    const vf o = load(out + i), zero = {};
    store(g + i, o <= zero ? zero : load(grad + i));
  }
  for (; i < len; ++i) g[i] = out[i] <= 0.f ? 0.f : grad[i];
}

// gp[p][i] = g[i] where phase[i] == p, else 0, for the 4 phases of a block
inline void split_by_phase(const float* g, const uint8_t* phase, int64_t len, float* gp) {
  typedef uint8_t vb __attribute__((vector_size(V)));
  int64_t i = 0;
  for (; i + V <= len; i += V) {
    vb raw;
    __builtin_memcpy(&raw, phase + i, sizeof raw);
    const vi ph = __builtin_convertvector(raw, vi);
    const vf gi = load(g + i), zero = {};
    for (int p = 0; p < 4; ++p) store(gp + p * kBlock + i, ph == p ? gi : zero);
  }
  for (; i < len; ++i)
    for (int p = 0; p < 4; ++p) gp[p * kBlock + i] = phase[i] == p ? g[i] : 0.f;
}

// Count, means and centred second moments of a set of rows (Chan et al.'s pairwise update):
// blocks are centred on their own mean (in float, in cache), then merged in double, so the
// variance has the accuracy of a two-pass computation without a second pass over memory
// (a one-pass sum of squares loses the digits that BatchNorm's shift-invariance needs).
struct Moments {
  int64_t rows;
  double n = 0.0;
  std::vector<double> mean, m2;  // m2[i * rows + j]: sum of (x_i - mean_i)(x_j - mean_j); only the diagonal
  bool full;                     // when !full
  Moments(int64_t r, bool f) : rows(r), mean(r, 0.0), m2(f ? r * r : r, 0.0), full(f) {}
  void merge(double nb, const double* mb, const double* m2b) {
    const double total = n + nb, f = n * nb / total;
    std::vector<double> d(rows);
    for (int64_t i = 0; i < rows; ++i) d[i] = mb[i] - mean[i];
    for (int64_t i = 0; i < rows; ++i) {
      if (full) for (int64_t j = 0; j < rows; ++j) m2[i * rows + j] += m2b[i * rows + j] + d[i] * d[j] * f;
      else m2[i] += m2b[i] + d[i] * d[i] * f;
      mean[i] += d[i] * nb / total;
    }
    n = total;
  }
};

inline double lanes(const vd& acc) {
  double sum = 0.0;
  for (int64_t l = 0; l < V; ++l) sum += acc[l];
  return sum;
}

inline double dot4(const float* a, const float* b, int64_t len, int64_t stride) {
  vd acc = {};
  for (int64_t p = 0; p < 4; ++p) add_dot(acc, a + p * stride, b + p * stride, len);
  return lanes(acc);
}

// Centre a block of 4 phase rows of len values in place on (a float near) their mean; its
// exact mean and centred sum of squares, from the centred values.
inline void block_centre(float* x, int64_t len, int64_t stride, double& mean, double& m2) {
  vd acc = {};
  for (int64_t p = 0; p < 4; ++p) add_total(acc, x + p * stride, len);
  const double n = 4.0 * len;
  const float offset = static_cast<float>(lanes(acc) / n);
  for (int64_t p = 0; p < 4; ++p)
    for (int64_t i = 0; i < len; ++i) x[p * stride + i] -= offset;
  acc = vd{};
  for (int64_t p = 0; p < 4; ++p) add_total(acc, x + p * stride, len);
  const double rest = lanes(acc) / n;  // what rounding left of the mean
  mean = offset + rest;
  m2 = dot4(x, x, len, stride) - n * rest * rest;
}

// The winning phase of each window and z there: the first phase with the largest
// sign(gamma) z, which is the one with the largest normalised value whatever the statistics
// turn out to be (phase 0 where gamma = 0: y is flat, max_pool2d keeps the first).
inline void gate_phases(const float* z, float gamma, int64_t len, float* best, uint8_t* phase) {
  first_max(z, gamma < 0 ? -1.f : 1.f, len, best, phase);
  if (gamma == 0.f) {
    std::copy(z, z + len, best);
    std::fill(phase, phase + len, 0);
  }
}

// One block: per channel, z = W cols, its winning phases (best z, phase) and moments (mean,
// centred sum of squares); the columns' moments (mean, centred cross products); the moments
// merged into the thread's running ones.
inline void block_moments(const float* cols, const float* w, const float* gamma, int64_t C, int64_t K,
                          int64_t M, int64_t m0, int64_t len, float* z, float* xc, Moments& zm, Moments& cm,
                          float* best, uint8_t* phase) {
  std::vector<double> mean(std::max(C, K)), m2(std::max(C, K * K));
  for (int64_t c = 0; c < C; ++c) {
    phase_products(cols, w + c * K, K, M, m0, len, z);
    gate_phases(z, gamma[c], len, best + c * M + m0, phase + c * M + m0);
    block_centre(z, len, kBlock, mean[c], m2[c]);
  }
  zm.merge(4.0 * len, mean.data(), m2.data());
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t p = 0; p < 4; ++p) std::copy(cols + (k * 4 + p) * M + m0, cols + (k * 4 + p) * M + m0 + len, xc + (k * 4 + p) * kBlock);
    double unused;
    block_centre(xc + k * 4 * kBlock, len, kBlock, mean[k], unused);
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t l = 0; l <= k; ++l)
      m2[k * K + l] = m2[l * K + k] = dot4(xc + k * 4 * kBlock, xc + l * 4 * kBlock, len, kBlock);
  cm.merge(4.0 * len, mean.data(), m2.data());
}

// One row's share of a block in backward: g = the ReLU's gradient of grad (in g), and into
// acc_total the sum of g, into acc_cols[k] the sum of g * cols[k, phase, m] (g at each
// window's winning phase). gp is scratch for the 4 phases.
inline void row_backward_sums(const float* grad, const float* out, const uint8_t* phase, const float* cols,
                              int64_t K, int64_t M, int64_t m0, int64_t len, float* g, float* gp,
                              vd& acc_total, vd* acc_cols) {
  relu_grad(grad + m0, out + m0, len, g);
  add_total(acc_total, g, len);
  split_by_phase(g, phase + m0, len, gp);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < 4; ++p) add_dot(acc_cols[k], gp + p * kBlock, cols + (k * 4 + p) * M + m0, len);
}

}  // namespace

extern "C" {


// The gate block's pass over the columns: for each channel c and window m the winning phase
// and z there (best, phase: see gate_phases); BatchNorm's statistics of z = W cols over all
// 4M positions (zmean[c] and the biased variance zvar[c] of the float32 product); and what
// its weight gradient needs, the columns' means colmean[k] and centred cross products
// comoment[k * K + l] = sum (cols_k - mean_k)(cols_l - mean_l).
void gate_forward(const float* cols, const float* w, const float* gamma, int64_t C, int64_t K, int64_t M,
                  double* zmean, double* zvar, double* colmean, double* comoment, float* best, uint8_t* phase) {
  const int threads = max_threads();
  std::vector<Moments> zms(threads, Moments(C, false)), cms(threads, Moments(K, true));
  parallel(M, [&](int64_t t, int64_t begin, int64_t end) {
    std::vector<float> z(4 * kBlock), xc(K * 4 * kBlock);
    for (int64_t m0 = begin; m0 < end; m0 += kBlock)
      block_moments(cols, w, gamma, C, K, M, m0, std::min(kBlock, end - m0), z.data(), xc.data(),
                    zms[t], cms[t], best, phase);
  });
  Moments zm(C, false), cm(K, true);
  for (int t = 0; t < threads; ++t) {
    if (zms[t].n == 0.0) continue;
    zm.merge(zms[t].n, zms[t].mean.data(), zms[t].m2.data());
    cm.merge(cms[t].n, cms[t].mean.data(), cms[t].m2.data());
  }
  for (int64_t c = 0; c < C; ++c) { zmean[c] = zm.mean[c]; zvar[c] = zm.m2[c] / zm.n; }
  std::copy(cm.mean.begin(), cm.mean.end(), colmean);
  std::copy(cm.m2.begin(), cm.m2.end(), comoment);
}

// The pooled output from the winning z: u = sign_c (best - mean_c) invstd_c replaces best
// (backward reads it), out = relu(|gamma_c| u + beta_c).
void gate_output(const float* mean, const float* invstd, const float* gamma, const float* beta,
                 int64_t C, int64_t M, float* best, float* out) {
  parallel(M, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t c = 0; c < C; ++c) {
      const float scale = (gamma[c] < 0 ? -1.f : 1.f) * invstd[c], mu = mean[c];
      const float g = std::fabs(gamma[c]), b = beta[c];
      float* bc = best + c * M;
      float* oc = out + c * M;
      for (int64_t i = begin; i < end; ++i) {
        const float u = (bc[i] - mu) * scale;
        bc[i] = u;
        oc[i] = std::max(u * g + b, 0.f);  // std::max(NaN, 0) is NaN, as torch's clamp
      }
    }
  });
}

// Backward's sums over the windows, where g = 0 where out <= 0, else grad_out (the ReLU), dy is g
// at each window's winning phase: gsum[c] = sum g, gxhat[c] = sum g * sign_c * best,
// gcols[c * K + k] = sum g * cols[k, phase, m].
void gate_backward_sums(const float* grad, const float* out, const float* best, const uint8_t* phase,
                        const float* cols, const float* sign, int64_t C, int64_t K, int64_t M,
                        double* gsum, double* gxhat, double* gcols) {
  Sums sums(2 * C + C * K);
  parallel(M, [&](int64_t t, int64_t begin, int64_t end) {
    vd* acc = sums.of(t);
    std::vector<float> g(kBlock), gp(4 * kBlock);
    for (int64_t m0 = begin; m0 < end; m0 += kBlock) {
      const int64_t len = std::min(kBlock, end - m0);
      for (int64_t c = 0; c < C; ++c) {
        row_backward_sums(grad + c * M, out + c * M, phase + c * M, cols, K, M, m0, len, g.data(), gp.data(),
                          acc[c], acc + 2 * C + c * K);
        add_dot(acc[C + c], g.data(), best + c * M + m0, len);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) { gsum[c] = sums[c]; gxhat[c] = sign[c] * sums[C + c]; }
  for (int64_t j = 0; j < C * K; ++j) gcols[j] = sums[2 * C + j];
}

// Stacked experts' first block, max_pool2d(relu(conv2d(x) + bias)): R = E * O rows of
// weights [R, K]; row r reads the columns at cols + (r / rows_per_cols) * cols_stride
// (stride 0: every expert reads the same, shared columns; K * 4 * M: each expert its own
// inputs, as under top-k routing); out[r, m] and the winning phase (the first on ties).
void experts_pool(const float* cols, int64_t cols_stride, int64_t rows_per_cols, const float* w,
                  const float* bias, int64_t R, int64_t K, int64_t M, float* out, uint8_t* phase) {
  parallel(M, [&](int64_t, int64_t begin, int64_t end) {
    std::vector<float> z(4 * kBlock);
    for (int64_t m0 = begin; m0 < end; m0 += kBlock) {
      const int64_t len = std::min(kBlock, end - m0);
      for (int64_t r = 0; r < R; ++r) {
        float* o = out + r * M + m0;
        phase_products(cols + (r / rows_per_cols) * cols_stride, w + r * K, K, M, m0, len, z.data());
        first_max(z.data(), 1.f, len, o, phase + r * M + m0);
        const float b = bias[r];
        for (int64_t i = 0; i < len; ++i) o[i] = std::max(o[i] + b, 0.f);
      }
    }
  });
}

// Its backward: g = 0 where out <= 0, else grad_out; gbias[r] = sum g, gw[r * K + k] = sum g * cols[k, phase, m]
// (row r's columns, as in experts_pool).
void experts_pool_backward(const float* grad, const float* out, const uint8_t* phase, const float* cols,
                           int64_t cols_stride, int64_t rows_per_cols, int64_t R, int64_t K, int64_t M,
                           double* gbias, double* gw) {
  Sums sums(R + R * K);
  parallel(M, [&](int64_t t, int64_t begin, int64_t end) {
    vd* acc = sums.of(t);
    std::vector<float> g(kBlock), gp(4 * kBlock);
    for (int64_t m0 = begin; m0 < end; m0 += kBlock) {
      const int64_t len = std::min(kBlock, end - m0);
      for (int64_t r = 0; r < R; ++r)
        row_backward_sums(grad + r * M, out + r * M, phase + r * M, cols + (r / rows_per_cols) * cols_stride,
                          K, M, m0, len, g.data(), gp.data(), acc[r], acc + R + r * K);
    }
  });
  for (int64_t r = 0; r < R; ++r) gbias[r] = sums[r];
  for (int64_t j = 0; j < R * K; ++j) gw[j] = sums[R + j];
}

}  // extern "C"
