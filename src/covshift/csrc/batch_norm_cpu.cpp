// covshift's fast CPU path: training and inference Batch Normalization, forward and backward.
//
// The same formulas as covshift/functional/batchnorm.py (the readable reference), in kernels that
// visit each channel once and do all of that channel's passes while its data is still in cache:
//
//   forward (training), per channel c over its m = N * prod(spatial) values:
//     mean = sum(x) / m;  var = sum((x - mean)^2) / m;  invstd = 1 / sqrt(var + eps)
//     y = (x - mean) * (invstd * gamma) + beta
//     running_mean = (1 - momentum) * running_mean + momentum * mean          (when given)
//     running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)
//   (the same update as covshift.functional.update_running_stats, fused here so that a training step
//   pays no extra operator calls for it; tests hold the two to each other and to torch)
//   backward, per channel:
//     sum_dy = sum(dy);  sum_dy_xmu = sum(dy * (x - mean))
//     dx = k * dy - k * sum_dy / m - k * invstd^2 * sum_dy_xmu / m * (x - mean),  k = gamma * invstd
//     (inference: dx = k * dy);  dgamma = sum_dy_xmu * invstd;  dbeta = sum_dy
//
// Two memory layouts, chosen from the input's strides:
//   channels-outer: (N, C, S) contiguous, S = prod(spatial) > 1 (NCL, NCHW, NCDHW). Channel c is N
//     runs of S values; one thread owns whole channels and does the channel's passes back to back,
//     so only the first pass of each direction comes from memory: forward reads x once and writes y,
//     backward reads x and dy once and writes dx (ATen: x three times, then x and dy twice).
//   channels-inner: (R, C) with C innermost, R = N * prod(spatial) ((N, C), channels_last,
//     channels_last_3d). Whole rows are streamed, four at a time, vectorized over channels; the
//     statistics of each block of rows are merged with Chan et al.'s formulas (see below), so the
//     forward reads x twice (statistics, then y) and the backward reads x and dy twice.
//
// Numerics: partial sums run in the input type over at most kChunk values (or kMaxBlockRows rows)
// and are folded into double, so rounding error does not grow with m; the variance is never
// E[x^2] - E[x]^2 (two-pass, or sums of deviations from a shift near the mean); (x - mean) is formed
// before scaling, as in the reference. Results agree with the reference to ~1e-6 in float32.
//
// No ATen batch-norm kernel is called. The kernels use only ATen's allocator, parallel_for and SIMD
// wrappers; the double-backward formula (differentiable_backward) is written with ATen's elementwise ops.

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <array>
#include <cstdint>
#include <immintrin.h>
#include <type_traits>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace covshift_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kChunk = 2048;           // values per partial sum (in the input type) before folding into double
constexpr int64_t kMinTaskWork = 1 << 15;  // values a thread must get before a loop is split across threads

struct Geometry {
  int64_t N = 0, C = 0, S = 0;   // (N, C, S): values per channel m = N * S
  bool channels_inner = false;   // element (r, c) at r * C + c, r < N * S; else (n, c, s) at (n * C + c) * S + s
  int64_t m() const { return N * S; }
};

Geometry geometry_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "covshift fast batch norm: expected (N, C, *) input, got ", x.dim(), "D");
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  if (x.is_contiguous()) {
    g.channels_inner = g.S == 1;
  } else if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    g.channels_inner = true;
  } else {
    TORCH_CHECK(false, "covshift fast batch norm: input must be contiguous, channels_last or channels_last_3d; got strides ",
                x.strides());
  }
  return g;
}

// A (C,) parameter as a pointer (nullptr when absent), after checking its size and dtype.
template <typename T>
const T* param_ptr(const OptTensor& t, const Geometry& g, at::ScalarType st, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == g.C && t->scalar_type() == st && t->is_contiguous(), "covshift fast batch norm: ", name,
              " must be a contiguous (C,) tensor of the input's dtype");
  return t->const_data_ptr<T>();
}

// (C,) parameters of any strides: a contiguous copy only when needed (views such as w[::2]).
OptTensor dense(const OptTensor& t) { return t.has_value() && t->defined() ? OptTensor(t->contiguous()) : t; }

template <typename T>
double hsum(const Vec<T>& v) {
  T buf[Vec<T>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t j = 0; j < Vec<T>::size(); ++j) s += buf[j];
  return s;
}

// s0 += sum_i f0(i), s1 += sum_i f1(i) over i < n. body(i, a, b) adds lanes i..i+L to the vector
// accumulators a, b; tail(i, a, b) adds element i to scalar accumulators. Four independent
// accumulator pairs hide the latency of the adds; each kChunk-long chunk is folded into double.
template <typename T, typename Body, typename Tail>
inline void reduce_run(int64_t n, double& s0, double& s1, const Body& body, const Tail& tail) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0)), b0(T(0)), b1(T(0)), b2(T(0)), b3(T(0));
    int64_t i = c0;
    for (; i + 4 * L <= c1; i += 4 * L) {
      body(i, a0, b0);
      body(i + L, a1, b1);
      body(i + 2 * L, a2, b2);
      body(i + 3 * L, a3, b3);
    }
    for (; i + L <= c1; i += L) body(i, a0, b0);
    T t0 = 0, t1 = 0;
    for (; i < c1; ++i) tail(i, t0, t1);
    s0 += hsum<T>((a0 + a1) + (a2 + a3)) + t0;
    s1 += hsum<T>((b0 + b1) + (b2 + b3)) + t1;
  }
}

// Streaming (non-temporal) stores for training outputs (y, dx) of 4 MiB or more, in both layouts:
// they skip the read-for-ownership of each output line and leave the cache to the inputs. A training
// step holds x, dy, y and dx at once, so from there the four fill half of a 32 MB L3 shared with the
// neighbouring layers' tensors, and the outputs would be evicted before they are read. Measured
// (benchmarks/bn_speed.py regime, forward+backward): 19% faster on (32, 256, 14, 14) channels_last
// (6.4 MB), 13% on (32, 64, 56, 56) channels_last (25.7 MB); NCHW 19% on (32, 64, 56, 56), 24% on
// (8, 64, 8, 28, 28), 5% on (32, 256, 14, 14). Smaller outputs stay cached, for the
// next layer to read; the cost above the threshold is that the next layer reads y from memory.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

template <typename T>
inline void store_vec(const Vec<T>& v, T* p, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) {  // p is aligned to the vector (checked by the caller)
    if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v); else _mm512_stream_pd(p, v);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v); else _mm256_stream_pd(p, v);
    return;
  }
#endif
  (void)stream;
  v.store(p);
}

// Whether the rows of out (C values each) can take streaming stores: large, and every row starts on a
// vector boundary.
template <typename T>
bool stream_rows(const T* out, int64_t R, int64_t C) {
  return R * C * int64_t(sizeof(T)) >= kStreamBytes && C % Vec<T>::size() == 0 &&
         reinterpret_cast<uintptr_t>(out) % sizeof(Vec<T>) == 0;
}

inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before the thread ends
#endif
  (void)stream;
}

// Elementwise map over a contiguous run: out[i] = f(i) (vector body(i, stream), scalar tail(i)). With
// stream, the body's stores are streaming: the first values, up to out's next vector boundary, go
// through the scalar tail, so that every vector store is aligned.
template <typename T, typename Body, typename Tail>
inline void map_run(int64_t n, const Body& body, const Tail& tail, const T* out = nullptr, bool stream = false) {
  constexpr int64_t L = Vec<T>::size();
  int64_t i = 0;
  if (stream) {
    const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(out) / sizeof(T)) % L;
    if (misaligned != 0) {
      for (const int64_t head = std::min(n, L - misaligned); i < head; ++i) tail(i);
    }
  }
  for (; i + L <= n; i += L) body(i, stream);
  for (; i < n; ++i) tail(i);
}

int64_t grain_for(int64_t work_per_unit) { return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_unit)); }

// ---------------------------------------------------------------------------------------------
// Forward, training: statistics, running update and normalization in one sweep per channel.
// ---------------------------------------------------------------------------------------------

template <typename T>
void update_running(T* rm, T* rv, int64_t c, T mean, double var, int64_t m, double momentum) {
  // running + momentum * (stat - running): lerp, as update_running_stats does it
  if (rm) rm[c] = rm[c] + T(momentum) * (mean - rm[c]);
  if (rv) {
    const T unbiased = m > 1 ? T(var * (double(m) / double(m - 1))) : T(var);
    rv[c] = rv[c] + T(momentum) * (unbiased - rv[c]);
  }
}

template <typename T>
void forward_train_outer(const Geometry& g, const T* x, T* y, const T* w, const T* b, T* rm, T* rv, T* mean_out,
                         T* invstd_out, double momentum, double eps) {
  using V = Vec<T>;
  const int64_t N = g.N, C = g.C, S = g.S, m = g.m();
  const bool stream = N * C * S * int64_t(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, C, grain_for(m), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      // Pass 1: the mean, as pivot + sum(x - pivot) / m with the channel's first value as pivot, so
      // that float partial sums hold deviations rather than multiples of a large mean.
      const T pivot = x[c * S];
      const V pivot_v(pivot);
      double sum = 0, unused = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* xn = x + (n * C + c) * S;
        reduce_run<T>(
            S, sum, unused, [&](int64_t i, V& a, V&) { a += V::loadu(xn + i) - pivot_v; },
            [&](int64_t i, T& a, T&) { a += xn[i] - pivot; });
      }
      const T mu = T(double(pivot) + sum / double(m));
      // Pass 2, from cache: the biased variance about mu. Pass 3, from cache: y.
      const V mu_v(mu);
      double ssd = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* xn = x + (n * C + c) * S;
        reduce_run<T>(
            S, ssd, unused,
            [&](int64_t i, V& a, V&) {
              const V d = V::loadu(xn + i) - mu_v;
              a = at::vec::fmadd(d, d, a);
            },
            [&](int64_t i, T& a, T&) {
              const T d = xn[i] - mu;
              a += d * d;
            });
      }
      const double var = ssd / double(m);
      const T invstd = T(1.0 / std::sqrt(var + eps));
      const T scale = w ? invstd * w[c] : invstd;
      const T shift = b ? b[c] : T(0);
      const V scale_v(scale), shift_v(shift);
      for (int64_t n = 0; n < N; ++n) {
        const T* xn = x + (n * C + c) * S;
        T* yn = y + (n * C + c) * S;
        map_run<T>(
            S, [&](int64_t i, bool s) { store_vec(at::vec::fmadd(V::loadu(xn + i) - mu_v, scale_v, shift_v), yn + i, s); },
            [&](int64_t i) { yn[i] = (xn[i] - mu) * scale + shift; }, yn, stream);
      }
      mean_out[c] = mu;
      invstd_out[c] = invstd;
      update_running(rm, rv, c, mu, var, m, momentum);
    }
    stream_fence(stream);
  });
}

// Channels innermost: x[r * C + c], r < R. The rows are split into one contiguous chunk per thread
// and each chunk is streamed in blocks of rows; the loops vectorize over channels, take four rows
// at a time, and keep per-channel partial sums in small arrays. (Owning a group of channels across
// all rows would read the input once, but rows C * 4 bytes apart map to few cache sets when C is a
// power of two, so the group does not stay in cache; streaming whole rows is faster.)
//
// Statistics, per block of rows: s1 = sum(x - K), s2 = sum((x - K)^2) about a shift K near the mean,
// so that M2 = s2 - s1^2 / n loses nothing to cancellation; K is the running mean of the chunk's
// earlier blocks (for the first block, its own mean from one extra pass over it, from cache). Blocks
// and chunks are merged with Chan et al.'s pairwise formulas, in double.

constexpr int64_t kBlockBytes = 1 << 18;  // input bytes per block of rows (half of a 512 KB L2)
constexpr int64_t kMaxBlockRows = 256;    // rows per partial sum in the input type

struct RowSplit {
  int64_t chunks, rows_per_chunk, block_rows;
};

RowSplit split_rows(int64_t R, int64_t C, int64_t elem_size) {
  const int64_t by_work = std::max<int64_t>(1, (R * C) / kMinTaskWork);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()), by_work, R}));
  const int64_t per = (R + chunks - 1) / chunks;
  const int64_t block = std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(1, C * elem_size), 4, kMaxBlockRows);
  return {(R + per - 1) / per, per, block};
}

// Row kernels. Every pointer is a parameter, so it stays in a register: the SIMD stores go through
// may-alias types, which would make the compiler reload pointers held in memory after each store.

// For rows [0, rows) of x (row stride C): s1[c] = sum(x - K[c]) and, if kSquares, s2[c] = sum((x - K[c])^2).
// Four rows per step, so the accumulators are loaded and stored once per four rows.
template <typename T, bool kSquares>
void block_shifted_sums(const T* x, int64_t C, int64_t rows, const T* K, T* s1, T* s2) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  std::fill(s1, s1 + C, T(0));
  if (kSquares) std::fill(s2, s2 + C, T(0));
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* p0 = x + r * C;
    const T* p1 = p0 + C;
    const T* p2 = p1 + C;
    const T* p3 = p2 + C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V k = V::loadu(K + c);
      const V d0 = V::loadu(p0 + c) - k, d1 = V::loadu(p1 + c) - k, d2 = V::loadu(p2 + c) - k, d3 = V::loadu(p3 + c) - k;
      (V::loadu(s1 + c) + ((d0 + d1) + (d2 + d3))).store(s1 + c);
      if (kSquares) (V::loadu(s2 + c) + (at::vec::fmadd(d0, d0, d1 * d1) + at::vec::fmadd(d2, d2, d3 * d3))).store(s2 + c);
    }
    for (; c < C; ++c) {
      const T d0 = p0[c] - K[c], d1 = p1[c] - K[c], d2 = p2[c] - K[c], d3 = p3[c] - K[c];
      s1[c] += (d0 + d1) + (d2 + d3);
      if (kSquares) s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < rows; ++r) {
    const T* p = x + r * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V d = V::loadu(p + c) - V::loadu(K + c);
      (V::loadu(s1 + c) + d).store(s1 + c);
      if (kSquares) at::vec::fmadd(d, d, V::loadu(s2 + c)).store(s2 + c);
    }
    for (; c < C; ++c) {
      const T d = p[c] - K[c];
      s1[c] += d;
      if (kSquares) s2[c] += d * d;
    }
  }
}

// For rows [0, rows) of x and dy: s_dy[c] = sum(dy), s_dy_xmu[c] = sum(dy * (x - mean[c])).
template <typename T>
void block_grad_sums(const T* x, const T* dy, int64_t C, int64_t rows, const T* mean, T* s_dy, T* s_dy_xmu) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  std::fill(s_dy, s_dy + C, T(0));
  std::fill(s_dy_xmu, s_dy_xmu + C, T(0));
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const T* x0 = x + r * C;
    const T* g0 = dy + r * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V mu = V::loadu(mean + c);
      const V a0 = V::loadu(g0 + c), a1 = V::loadu(g0 + C + c), a2 = V::loadu(g0 + 2 * C + c), a3 = V::loadu(g0 + 3 * C + c);
      (V::loadu(s_dy + c) + ((a0 + a1) + (a2 + a3))).store(s_dy + c);
      const V q = at::vec::fmadd(a0, V::loadu(x0 + c) - mu, a1 * (V::loadu(x0 + C + c) - mu)) +
                  at::vec::fmadd(a2, V::loadu(x0 + 2 * C + c) - mu, a3 * (V::loadu(x0 + 3 * C + c) - mu));
      (V::loadu(s_dy_xmu + c) + q).store(s_dy_xmu + c);
    }
    for (; c < C; ++c) {
      for (int64_t i = 0; i < 4; ++i) {
        s_dy[c] += g0[i * C + c];
        s_dy_xmu[c] += g0[i * C + c] * (x0[i * C + c] - mean[c]);
      }
    }
  }
  for (; r < rows; ++r) {
    const T* xr = x + r * C;
    const T* gr = dy + r * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V a = V::loadu(gr + c);
      (V::loadu(s_dy + c) + a).store(s_dy + c);
      at::vec::fmadd(a, V::loadu(xr + c) - V::loadu(mean + c), V::loadu(s_dy_xmu + c)).store(s_dy_xmu + c);
    }
    for (; c < C; ++c) {
      s_dy[c] += gr[c];
      s_dy_xmu[c] += gr[c] * (xr[c] - mean[c]);
    }
  }
}

// One row: y = (x - mean) * scale + shift, per channel.
template <typename T>
inline void affine_row(const T* x, T* y, int64_t C, const T* mean, const T* scale, const T* shift, bool stream) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  int64_t c = 0;
  for (; c + L <= C; c += L)
    store_vec(at::vec::fmadd(V::loadu(x + c) - V::loadu(mean + c), V::loadu(scale + c), V::loadu(shift + c)), y + c,
              stream);
  for (; c < C; ++c) y[c] = (x[c] - mean[c]) * scale[c] + shift[c];
}

// One row of the training input gradient: dx = (x - mean) * slope + (dy * k + shift), per channel.
template <typename T>
inline void grad_row(const T* x, const T* dy, T* dx, int64_t C, const T* mean, const T* slope, const T* k, const T* shift,
                     bool stream) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  int64_t c = 0;
  for (; c + L <= C; c += L)
    store_vec(at::vec::fmadd(V::loadu(x + c) - V::loadu(mean + c), V::loadu(slope + c),
                             at::vec::fmadd(V::loadu(dy + c), V::loadu(k + c), V::loadu(shift + c))),
              dx + c, stream);
  for (; c < C; ++c) dx[c] = (x[c] - mean[c]) * slope[c] + (dy[c] * k[c] + shift[c]);
}

// One row of the inference input gradient: dx = dy * k, per channel.
template <typename T>
inline void scale_row(const T* dy, T* dx, int64_t C, const T* k) {
  using V = Vec<T>;
  constexpr int64_t L = V::size();
  int64_t c = 0;
  for (; c + L <= C; c += L) (V::loadu(dy + c) * V::loadu(k + c)).store(dx + c);
  for (; c < C; ++c) dx[c] = dy[c] * k[c];
}

// Elementwise over every row, parallel over rows.
template <typename Body>
void for_each_row(int64_t R, int64_t C, const Body& row_body, bool stream = false) {
  at::parallel_for(0, R, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_body(r);
    stream_fence(stream);
  });
}

template <typename T>
void forward_train_inner(const Geometry& g, const T* x, T* y, const T* w, const T* b, T* rm, T* rv, T* mean_out,
                         T* invstd_out, double momentum, double eps) {
  const int64_t C = g.C, R = g.m(), m = g.m();
  const RowSplit split = split_rows(R, C, sizeof(T));
  // Per chunk and channel: (count, mean, M2) of the chunk's rows, merged block by block.
  std::vector<double> chunk_mean(split.chunks * C, 0.0), chunk_m2(split.chunks * C, 0.0);
  std::vector<int64_t> chunk_n(split.chunks, 0);
  at::parallel_for(0, split.chunks, 1, [&](int64_t k_begin, int64_t k_end) {
    std::vector<T> shift(C), s1(C), s2(C);
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int64_t r_begin = k * split.rows_per_chunk, r_end = std::min(R, r_begin + split.rows_per_chunk);
      double* mean_acc = chunk_mean.data() + k * C;
      double* m2_acc = chunk_m2.data() + k * C;
      int64_t n_acc = 0;
      for (int64_t r0 = r_begin; r0 < r_end; r0 += split.block_rows) {
        const int64_t r1 = std::min(r_end, r0 + split.block_rows), nb = r1 - r0;
        const double inv_nb = 1.0 / double(nb);
        if (n_acc == 0) {  // first block: its own mean (shifted by its first row) as the shift
          std::copy(x + r0 * C, x + r0 * C + C, shift.begin());
          block_shifted_sums<T, false>(x + r0 * C, C, nb, shift.data(), s1.data(), nullptr);
          for (int64_t c = 0; c < C; ++c) shift[c] = T(double(shift[c]) + double(s1[c]) * inv_nb);
        } else {
          for (int64_t c = 0; c < C; ++c) shift[c] = T(mean_acc[c]);
        }
        block_shifted_sums<T, true>(x + r0 * C, C, nb, shift.data(), s1.data(), s2.data());
        const double n_new = double(n_acc + nb), w_b = double(nb) / n_new, w_ab = double(n_acc) * double(nb) / n_new;
        for (int64_t c = 0; c < C; ++c) {
          const double d1 = double(s1[c]);
          const double block_mean = double(shift[c]) + d1 * inv_nb;
          const double block_m2 = std::max(0.0, double(s2[c]) - d1 * d1 * inv_nb);
          const double delta = block_mean - mean_acc[c];
          mean_acc[c] += delta * w_b;
          m2_acc[c] += block_m2 + delta * delta * w_ab;
        }
        n_acc += nb;
      }
      chunk_n[k] = n_acc;
    }
  });
  std::vector<T> mean_t(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    double n_acc = 0, mean = 0, m2 = 0;
    for (int64_t k = 0; k < split.chunks; ++k) {
      const double nk = double(chunk_n[k]);
      if (nk == 0) continue;
      const double n_new = n_acc + nk, delta = chunk_mean[k * C + c] - mean;
      mean += delta * nk / n_new;
      m2 += chunk_m2[k * C + c] + delta * delta * n_acc * nk / n_new;
      n_acc = n_new;
    }
    const double var = m2 / double(m);
    const T invstd = T(1.0 / std::sqrt(var + eps));
    mean_t[c] = T(mean);
    scale[c] = w ? invstd * w[c] : invstd;
    shift[c] = b ? b[c] : T(0);
    mean_out[c] = mean_t[c];
    invstd_out[c] = invstd;
    update_running(rm, rv, c, mean_t[c], var, m, momentum);
  }
  const T *mp = mean_t.data(), *sp = scale.data(), *hp = shift.data();
  const bool stream = stream_rows(y, R, C);
  for_each_row(R, C, [&](int64_t r) { affine_row<T>(x + r * C, y + r * C, C, mp, sp, hp, stream); }, stream);
}

// ---------------------------------------------------------------------------------------------
// Forward with given statistics (inference): y = (x - mean) * (invstd * gamma) + beta.
// ---------------------------------------------------------------------------------------------

template <typename T>
void normalize_kernel(const Geometry& g, const T* x, T* y, const T* mean, const T* invstd, const T* w, const T* b) {
  using V = Vec<T>;
  const int64_t N = g.N, C = g.C, S = g.S;
  std::vector<T> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = w ? invstd[c] * w[c] : invstd[c];
    shift[c] = b ? b[c] : T(0);
  }
  if (!g.channels_inner) {
    at::parallel_for(0, N * C, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % C;
        const T mu = mean[c], sc = scale[c], sh = shift[c];
        const V mu_v(mu), sc_v(sc), sh_v(sh);
        const T* xn = x + nc * S;
        T* yn = y + nc * S;
        map_run<T>(
            S, [&](int64_t i, bool) { at::vec::fmadd(V::loadu(xn + i) - mu_v, sc_v, sh_v).store(yn + i); },
            [&](int64_t i) { yn[i] = (xn[i] - mu) * sc + sh; });
      }
    });
  } else {
    const T *sp = scale.data(), *hp = shift.data();
    for_each_row(g.m(), C, [&](int64_t r) { affine_row<T>(x + r * C, y + r * C, C, mean, sp, hp, false); });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: both reductions, then dx, in one sweep per channel.
// ---------------------------------------------------------------------------------------------

struct BackwardCoefs {
  double k, slope, shift;  // dx = k * dy + slope * (x - mean) + shift
};

BackwardCoefs backward_coefs(double sum_dy, double sum_dy_xmu, double invstd, double gamma, int64_t m, bool training) {
  const double k = gamma * invstd;
  if (!training) return {k, 0.0, 0.0};
  return {k, -k * invstd * invstd * sum_dy_xmu / double(m), -k * sum_dy / double(m)};
}

template <typename T>
void backward_outer(const Geometry& g, const T* dy, const T* x, const T* mean, const T* invstd, const T* w, T* dx,
                    T* dgamma, T* dbeta, bool training, bool need_sums) {
  using V = Vec<T>;
  const int64_t N = g.N, C = g.C, S = g.S, m = g.m();
  const bool stream = training && dx && N * C * S * int64_t(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, C, grain_for(m), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const T mu = mean[c];
      const V mu_v(mu);
      double sum_dy = 0, sum_dy_xmu = 0;
      if (need_sums) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * S;
          const T *xn = x + off, *dyn = dy + off;
          reduce_run<T>(
              S, sum_dy, sum_dy_xmu,
              [&](int64_t i, V& a, V& b) {
                const V d = V::loadu(dyn + i);
                a += d;
                b = at::vec::fmadd(d, V::loadu(xn + i) - mu_v, b);
              },
              [&](int64_t i, T& a, T& b) {
                a += dyn[i];
                b += dyn[i] * (xn[i] - mu);
              });
        }
        if (dgamma) dgamma[c] = T(sum_dy_xmu * double(invstd[c]));
        if (dbeta) dbeta[c] = T(sum_dy);
      }
      if (!dx) continue;
      const BackwardCoefs k = backward_coefs(sum_dy, sum_dy_xmu, invstd[c], w ? double(w[c]) : 1.0, m, training);
      const T kk = T(k.k), slope = T(k.slope), shift = T(k.shift);
      const V k_v(kk), slope_v(slope), shift_v(shift);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t off = (n * C + c) * S;
        const T *xn = x + off, *dyn = dy + off;
        T* dxn = dx + off;
        if (training) {
          map_run<T>(
              S,
              [&](int64_t i, bool s) {
                store_vec(
                    at::vec::fmadd(V::loadu(xn + i) - mu_v, slope_v, at::vec::fmadd(V::loadu(dyn + i), k_v, shift_v)),
                    dxn + i, s);
              },
              [&](int64_t i) { dxn[i] = (xn[i] - mu) * slope + (dyn[i] * kk + shift); }, dxn, stream);
        } else {
          map_run<T>(
              S, [&](int64_t i, bool) { (V::loadu(dyn + i) * k_v).store(dxn + i); }, [&](int64_t i) { dxn[i] = dyn[i] * kk; });
        }
      }
    }
    stream_fence(stream);
  });
}

template <typename T>
void backward_inner(const Geometry& g, const T* dy, const T* x, const T* mean, const T* invstd, const T* w, T* dx,
                    T* dgamma, T* dbeta, bool training, bool need_sums) {
  const int64_t C = g.C, R = g.m(), m = g.m();
  const RowSplit split = split_rows(R, C, sizeof(T));
  std::vector<double> part_dy(split.chunks * C, 0.0), part_dy_xmu(split.chunks * C, 0.0);
  if (need_sums) {
    at::parallel_for(0, split.chunks, 1, [&](int64_t k_begin, int64_t k_end) {
      std::vector<T> s_dy(C), s_dy_xmu(C);
      for (int64_t k = k_begin; k < k_end; ++k) {
        const int64_t r_begin = k * split.rows_per_chunk, r_end = std::min(R, r_begin + split.rows_per_chunk);
        for (int64_t r0 = r_begin; r0 < r_end; r0 += split.block_rows) {
          const int64_t r1 = std::min(r_end, r0 + split.block_rows);
          block_grad_sums<T>(x + r0 * C, dy + r0 * C, C, r1 - r0, mean, s_dy.data(), s_dy_xmu.data());
          for (int64_t c = 0; c < C; ++c) {
            part_dy[k * C + c] += s_dy[c];
            part_dy_xmu[k * C + c] += s_dy_xmu[c];
          }
        }
      }
    });
  }
  std::vector<T> kk(C), slope(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    double sum_dy = 0, sum_dy_xmu = 0;
    for (int64_t k = 0; k < split.chunks; ++k) {
      sum_dy += part_dy[k * C + c];
      sum_dy_xmu += part_dy_xmu[k * C + c];
    }
    if (dgamma) dgamma[c] = T(sum_dy_xmu * double(invstd[c]));
    if (dbeta) dbeta[c] = T(sum_dy);
    const BackwardCoefs co = backward_coefs(sum_dy, sum_dy_xmu, invstd[c], w ? double(w[c]) : 1.0, m, training);
    kk[c] = T(co.k);
    slope[c] = T(co.slope);
    shift[c] = T(co.shift);
  }
  if (!dx) return;
  const T *kp = kk.data(), *lp = slope.data(), *hp = shift.data();
  if (training) {
    const bool stream = stream_rows(dx, R, C);
    for_each_row(R, C, [&](int64_t r) { grad_row<T>(x + r * C, dy + r * C, dx + r * C, C, mean, lp, kp, hp, stream); },
                 stream);
  } else {
    for_each_row(R, C, [&](int64_t r) { scale_row<T>(dy + r * C, dx + r * C, C, kp); });
  }
}

// ---------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------

// Calls f(T{}) with T = float or double, the input's dtype (checked by check_input).
template <typename F>
void dispatch_float(at::ScalarType st, const F& f) {
  if (st == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

void check_input(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "covshift fast batch norm runs on CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "covshift fast batch norm supports float32 and float64, got ", x.scalar_type());
}

Tensor stats_like(const Tensor& x, int64_t C) { return at::empty({C}, x.options()); }

// The operator covshift::batch_norm, below autograd (CPU): (y, mean, invstd), like aten::native_batch_norm.
//   training: the batch's mean and invstd = 1/sqrt(var + eps); the running statistics, when given, are
//     updated in place (see the rule at the top);
//   inference: normalizes with the running statistics; returns them as (a copy of) mean and invstd.
std::tuple<Tensor, Tensor, Tensor> batch_norm_cpu(const Tensor& x, const OptTensor& weight_, const OptTensor& bias_,
                                                  const OptTensor& running_mean, const OptTensor& running_var,
                                                  bool training, double momentum, double eps) {
  check_input(x);
  const OptTensor weight = dense(weight_), bias = dense(bias_);
  const Geometry g = geometry_of(x);
  Tensor y = at::empty_like(x);  // same memory format (contiguous or channels_last)
  Tensor mean = stats_like(x, g.C), invstd = stats_like(x, g.C);
  if (!training) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value() && running_mean->defined() &&
                    running_var->defined(),
                "covshift::batch_norm: inference needs running_mean and running_var");
  }
  TORCH_CHECK(!training || g.m() > 0, "covshift::batch_norm: training needs a non-empty batch");
  for (const OptTensor* t : {&running_mean, &running_var}) {
    TORCH_CHECK(!t->has_value() || !(*t)->defined() || (*t)->is_contiguous(),
                "covshift::batch_norm: running statistics must be contiguous (they are updated in place)");
  }
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto st = x.scalar_type();
    const scalar_t* w = param_ptr<scalar_t>(weight, g, st, "weight");
    const scalar_t* b = param_ptr<scalar_t>(bias, g, st, "bias");
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* ip = invstd.mutable_data_ptr<scalar_t>();
    if (training) {
      scalar_t* rm = const_cast<scalar_t*>(param_ptr<scalar_t>(running_mean, g, st, "running_mean"));
      scalar_t* rv = const_cast<scalar_t*>(param_ptr<scalar_t>(running_var, g, st, "running_var"));
      auto kernel = g.channels_inner ? forward_train_inner<scalar_t> : forward_train_outer<scalar_t>;
      kernel(g, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), w, b, rm, rv, mp, ip, momentum, eps);
      return;
    }
    const scalar_t* m_in = param_ptr<scalar_t>(running_mean, g, st, "running_mean");
    const scalar_t* v_in = param_ptr<scalar_t>(running_var, g, st, "running_var");
    for (int64_t c = 0; c < g.C; ++c) {
      mp[c] = m_in[c];
      ip[c] = scalar_t(1.0 / std::sqrt(double(v_in[c]) + eps));
    }
    if (x.numel() == 0) return;
    normalize_kernel<scalar_t>(g, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), mp, ip, w, b);
  });
  return {y, mean, invstd};
}

// covshift::batch_norm_backward (CPU): (dx, dgamma, dbeta); a gradient not asked for in output_mask
// is an empty (0,) tensor. grad_out must have the input's strides and dtype (the autograd kernel makes it so).
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const Tensor& grad_out, const Tensor& x,
                                                           const OptTensor& weight_, const Tensor& mean_,
                                                           const Tensor& invstd_, bool training,
                                                           std::array<bool, 3> output_mask) {
  check_input(x);
  const OptTensor weight = dense(weight_);
  const Tensor mean = mean_.contiguous(), invstd = invstd_.contiguous();
  const Geometry g = geometry_of(x);
  // (an empty tensor's strides are not read: autograd may hand back any layout for it)
  TORCH_CHECK(grad_out.sizes() == x.sizes() && (x.numel() == 0 || grad_out.strides() == x.strides()) &&
                  grad_out.scalar_type() == x.scalar_type(),
              "covshift::batch_norm_backward: grad_output must have the input's shape, strides and dtype");
  const bool need_input = output_mask[0], need_params = output_mask[1] || output_mask[2];
  Tensor dx = need_input ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor dgamma = output_mask[1] ? stats_like(x, g.C) : at::empty({0}, x.options());
  Tensor dbeta = output_mask[2] ? stats_like(x, g.C) : at::empty({0}, x.options());
  if (x.numel() == 0 || !(need_input || need_params)) {
    if (output_mask[1]) dgamma.zero_();
    if (output_mask[2]) dbeta.zero_();
    if (need_input) dx.zero_();
    return {dx, dgamma, dbeta};
  }
  // The kernels write both parameter gradients or neither.
  Tensor dg = need_params ? (output_mask[1] ? dgamma : stats_like(x, g.C)) : dgamma;
  Tensor db = need_params ? (output_mask[2] ? dbeta : stats_like(x, g.C)) : dbeta;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto st = x.scalar_type();
    const bool need_sums = need_params || training;
    auto kernel = g.channels_inner ? backward_inner<scalar_t> : backward_outer<scalar_t>;
    kernel(g, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
           param_ptr<scalar_t>(mean, g, st, "mean"), param_ptr<scalar_t>(invstd, g, st, "invstd"),
           param_ptr<scalar_t>(weight, g, st, "weight"), need_input ? dx.mutable_data_ptr<scalar_t>() : nullptr,
           need_params ? dg.mutable_data_ptr<scalar_t>() : nullptr,
           need_params ? db.mutable_data_ptr<scalar_t>() : nullptr, training, need_sums);
  });
  return {dx, dgamma, dbeta};
}

// ---------------------------------------------------------------------------------------------
// Autograd: the analytic backward in C++, so that an eager training step pays no Python per call.
// ---------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  return shape;
}

// The backward written with differentiable ATen ops, for double backward (create_graph=True): in
// training the statistics are recomputed from x with a graph, so every term stays differentiable.
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& dy, const Tensor& x, const Tensor& w,
                                                           const Tensor& mean, const Tensor& invstd, bool training,
                                                           double eps, std::array<bool, 3> mask) {
  const auto dims = reduce_dims(x);
  const auto shape = channel_shape(x);
  const int64_t m = x.size(1) > 0 ? x.numel() / x.size(1) : 0;
  Tensor mu = mean.view(shape), is = invstd.view(shape);
  if (training) {
    mu = x.mean(dims, /*keepdim=*/true);
    is = ((x - mu).pow(2).mean(dims, /*keepdim=*/true) + eps).rsqrt();
  }
  const Tensor xhat = (x - mu) * is;
  const Tensor sum_dy = dy.sum(dims), sum_dy_xhat = (dy * xhat).sum(dims);
  const Tensor k = w.defined() ? is * w.view(shape) : is;
  Tensor dx, dw, db;
  if (mask[0]) {
    dx = training ? k * (dy - sum_dy.view(shape) / double(m) - xhat * sum_dy_xhat.view(shape) / double(m)) : k * dy;
  }
  if (mask[1]) dw = sum_dy_xhat;
  if (mask[2]) db = sum_dy;
  return {dx, dw, db};
}

bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

class BatchNormAutograd : public torch::autograd::Function<BatchNormAutograd> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var, bool training,
                               double momentum, double eps) {
    const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
    TORCH_CHECK(!(has_tangent(x) || has_tangent(w) || has_tangent(b)),
                "covshift::batch_norm has no forward-mode AD formula; covshift.functional.batch_norm runs dual "
                "tensors on its reference path, which has one. Call it instead of the operator.");
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("covshift::batch_norm", "")
                         .typed<decltype(batch_norm_cpu)>();
    auto [y, mean, invstd] = op.call(x, weight, bias, running_mean, running_var, training, momentum, eps);
    ctx->save_for_backward({x, w, mean, invstd});
    // One small int of flags (saved_data is a string-keyed map: each entry costs a hash per step).
    // needs_input_grad counts only the tensors that were passed (an absent optional has no edge).
    ctx->saved_data["flags"] = int64_t(training) | int64_t(weight.has_value()) << 1 | int64_t(bias.has_value()) << 2;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, invstd});
    // mean and invstd never get a gradient: without this, every backward would allocate two (C,) zero
    // tensors for them. An undefined grad of y is handled in backward.
    ctx->set_materialize_grads(false);
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &mean = saved[2], &invstd = saved[3];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool training = flags & 1, has_w = flags & 2, has_b = flags & 4;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(1),
                                   has_b && ctx->needs_input_grad(has_w ? 2 : 1)};
    Tensor dy = grads[0];
    Tensor dx, dw, db;
    if (!dy.defined()) {
      dy = at::zeros_like(x);
    }
    if (at::GradMode::is_enabled()) {
      std::tie(dx, dw, db) =
          differentiable_backward(dy, x, w, mean, invstd, training, ctx->saved_data["eps"].toDouble(), mask);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("covshift::batch_norm_backward", "")
                           .typed<decltype(batch_norm_backward_cpu)>();
      const auto fmt = x.is_contiguous() ? at::MemoryFormat::Contiguous
                       : x.dim() == 5    ? at::MemoryFormat::ChannelsLast3d
                                         : at::MemoryFormat::ChannelsLast;
      if (dy.scalar_type() != x.scalar_type() || !dy.is_contiguous(fmt) || dy.strides() != x.strides()) {
        dy = dy.to(x.scalar_type()).contiguous(fmt);
      }
      // Below autograd, as in forward: grad mode is off here, so the autograd fallback of the backward
      // operator would only walk its arguments before passing the call on.
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dw, db) = op.call(dy, x, w.defined() ? OptTensor(w) : OptTensor(), mean, invstd, training, mask);
      if (!mask[0]) dx = Tensor();
      if (!mask[1]) dw = Tensor();
      if (!mask[2]) db = Tensor();
    }
    return {dx, dw, db, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_autograd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                       const OptTensor& running_mean, const OptTensor& running_var,
                                                       bool training, double momentum, double eps) {
  auto out = BatchNormAutograd::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
  if (training) {  // the buffers were written below autograd: say so to autograd's version counters
    for (const OptTensor* t : {&running_mean, &running_var}) {
      if (t->has_value() && (*t)->defined()) torch::autograd::impl::bump_version(**t);
    }
  }
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace covshift_fast

TORCH_LIBRARY(covshift, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, bool training, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(covshift, CPU, m) {
  m.impl("batch_norm", &covshift_fast::batch_norm_cpu);
  m.impl("batch_norm_backward", &covshift_fast::batch_norm_backward_cpu);
}

TORCH_LIBRARY_IMPL(covshift, Autograd, m) { m.impl("batch_norm", &covshift_fast::batch_norm_autograd); }
