// covshift's fused CPU kernels for the activation monitor (covshift/monitor/stats.py holds the
// readable pure-torch reference of each op, and the tests check that both give the same numbers).
//
// Non-finite values (NaN, +inf, -inf) are counted and left out of every other statistic:
//
//   moments(x, positions?) -> (stats (6,) float64, sample?)
//       stats = [n, mean, M2, min, max, n_nonfinite] over the n finite values of x, with
//       M2 = sum (x - mean)^2 (two-pass within fixed chunks of kChunk values, chunks merged in order
//       with Chan et al.'s formula, so the result does not depend on the thread count);
//       sample = x.flatten()[positions] (a copy) when positions are given.
//   rows(sample (R, K), valid (R,) int64 or None (all K), edges (B+1,) float64, threshold) ->
//       (moments (R, 6) float64, hist (R, B+2) int64, flags (R, 2) int64, compact (R, K))
//       per row, over its first valid[r] entries: the same six moments; the histogram of the finite
//       values on the fixed edges [underflow x < e_0, bins [e_k, e_{k+1}) (last closed), overflow
//       x > e_B]; flags = [#{|x| > threshold}, #{x <= 0}] over the finite values; compact holds the
//       finite values first (in their order), then NaN.
//   percentiles_(compact (R, K), n (R,) int64, qs float[]) -> (R, P) float64
//       NumPy's linear-interpolation percentiles of the first n[r] values of each row (all finite),
//       by selection, not sorting: float32 rows by a bucket pass over the values' order-preserving
//       bit keys, then selection inside the few buckets that hold the wanted ranks (the row is only
//       read); float64 rows by nth_element (the row is permuted in place).
//
//   record(x, positions?, edges, threshold, qs) -> (9 + B + 2 + P,) float64
//       all of the above for one activation in one call, from the hook, without copying it: the
//       path for keys whose histogram edges are already fixed (see record() below).
//
// Everything is exact in the input type except the moments, which accumulate in double.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace covshift_monitor {
namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kChunk = 4096;  // values per partial result (fixed, so results are thread-count independent)

struct Moments {
  double n = 0, mean = 0, m2 = 0;
  double mn = std::numeric_limits<double>::infinity(), mx = -std::numeric_limits<double>::infinity();
  double nonfinite = 0;

  void merge(const Moments& b) {  // Chan et al. 1979
    if (b.n > 0) {
      const double n = this->n + b.n;
      const double delta = b.mean - mean;
      mean += delta * (b.n / n);
      m2 += b.m2 + delta * delta * (this->n * b.n / n);
      this->n = n;
      mn = std::min(mn, b.mn);
      mx = std::max(mx, b.mx);
    }
    nonfinite += b.nonfinite;
  }
};

template <typename T>
inline bool finite(T v) {
  return std::isfinite(v);
}

// Two passes over one chunk held in cache: sum and range, then squared deviations from the chunk's
// mean. The fast path is vectorized in the input type, each lane summing at most 16 values before
// the partial sums are folded into double (so rounding does not grow with the tensor, nor cancel
// when |mean| >> std); a chunk holding a non-finite value takes the scalar path.
template <typename T>
Moments chunk_moments_scalar(const T* x, int64_t len) {
  Moments m;
  double sum = 0;
  int64_t n = 0;
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < len; ++i) {
    const T v = x[i];
    if (finite(v)) {
      sum += v;
      ++n;
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
  }
  m.n = static_cast<double>(n);
  m.nonfinite = static_cast<double>(len - n);
  if (n == 0) return m;
  m.mean = sum / m.n;
  m.mn = mn;
  m.mx = mx;
  double m2 = 0;
  for (int64_t i = 0; i < len; ++i) {
    const T v = x[i];
    if (finite(v)) {
      const double d = static_cast<double>(v) - m.mean;
      m2 += d * d;
    }
  }
  m.m2 = m2;
  return m;
}

// acc[j] += buf[j] for the W lanes: independent per lane, so the compiler vectorizes it and no
// serial chain of double additions forms (the order of every sum is fixed: thread-count independent).
template <typename T, int64_t W>
inline void fold(double* acc, const T* buf) {
  for (int64_t j = 0; j < W; ++j) acc[j] += static_cast<double>(buf[j]);
}

template <int64_t W>
inline double lanes_sum(const double* acc) {
  double s = 0;
  for (int64_t j = 0; j < W; ++j) s += acc[j];
  return s;
}

// Lane-wise min (Max = false) or max (Max = true) without NaN propagation (at::vec::minimum
// propagates NaN, at three instructions a call): the callers detect a NaN by the non-finite sum and
// redo the chunk exactly.
template <typename T, bool Max>
inline Vec<T> extreme_nonan(const Vec<T>& a, const Vec<T>& b) {
  constexpr bool f32 = std::is_same_v<T, float>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (Max) { if constexpr (f32) return Vec<T>(_mm512_max_ps(a, b)); else return Vec<T>(_mm512_max_pd(a, b)); }
  else { if constexpr (f32) return Vec<T>(_mm512_min_ps(a, b)); else return Vec<T>(_mm512_min_pd(a, b)); }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (Max) { if constexpr (f32) return Vec<T>(_mm256_max_ps(a, b)); else return Vec<T>(_mm256_max_pd(a, b)); }
  else { if constexpr (f32) return Vec<T>(_mm256_min_ps(a, b)); else return Vec<T>(_mm256_min_pd(a, b)); }
#else
  if constexpr (Max) return at::vec::maximum(a, b); else return at::vec::minimum(a, b);
#endif
}

template <typename T>
Moments chunk_moments(const T* x, int64_t len) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  if (len < 4 * W) return chunk_moments_scalar(x, len);
  V lo(std::numeric_limits<T>::infinity()), hi(-std::numeric_limits<T>::infinity());
  alignas(64) T buf[W];
  alignas(64) double acc[W] = {};
  int64_t i = 0;
  // partial sums in T over blocks of kFold vector pairs (2 kFold values per lane), then per lane in
  // double. A NaN or infinite value makes the sum non-finite: then the chunk takes the scalar path.
  constexpr int64_t kFold = 8;
  while (i + 2 * W <= len) {
    V s0(0), s1(0);
    for (int64_t f = 0; f < kFold && i + 2 * W <= len; ++f, i += 2 * W) {
      const V a = V::loadu(x + i), b = V::loadu(x + i + W);
      s0 = s0 + a;
      s1 = s1 + b;
      lo = extreme_nonan<T, false>(lo, extreme_nonan<T, false>(a, b));
      hi = extreme_nonan<T, true>(hi, extreme_nonan<T, true>(a, b));
    }
    (s0 + s1).store(buf);
    fold<T, W>(acc, buf);
  }
  double sum = lanes_sum<W>(acc);
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  lo.store(buf);
  for (int64_t j = 0; j < W; ++j) mn = std::min(mn, buf[j]);
  hi.store(buf);
  for (int64_t j = 0; j < W; ++j) mx = std::max(mx, buf[j]);
  for (int64_t j = i; j < len; ++j) {
    const T v = x[j];
    sum += v;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  // (a float partial that overflows on finite values also lands here: the scalar path is exact)
  if (!std::isfinite(sum)) return chunk_moments_scalar(x, len);
  Moments m;
  m.n = static_cast<double>(len);
  m.mean = sum / m.n;
  m.mn = mn;
  m.mx = mx;
  // Second pass on the data shifted by the first-pass mean rounded to T, c: with d = x - c,
  // sum (x - mean)^2 = S2 - S1^2 / n and mean = c + S1 / n exactly, whatever error the first pass's
  // sum had (d is small, so both sums are accurate).
  const T c = static_cast<T>(m.mean);
  const V vc(c);
  alignas(64) double a1[W] = {}, a2[W] = {};
  i = 0;
  while (i + 2 * W <= len) {
    V q0(0), q1(0), l0(0), l1(0);
    for (int64_t f = 0; f < kFold && i + 2 * W <= len; ++f, i += 2 * W) {
      const V a = V::loadu(x + i) - vc, b = V::loadu(x + i + W) - vc;
      l0 = l0 + a;
      l1 = l1 + b;
      q0 = at::vec::fmadd(a, a, q0);
      q1 = at::vec::fmadd(b, b, q1);
    }
    (q0 + q1).store(buf);
    fold<T, W>(a2, buf);
    (l0 + l1).store(buf);
    fold<T, W>(a1, buf);
  }
  double s1 = lanes_sum<W>(a1), s2 = lanes_sum<W>(a2);
  for (int64_t j = i; j < len; ++j) {
    const double d = static_cast<double>(x[j]) - static_cast<double>(c);
    s1 += d;
    s2 += d * d;
  }
  m.mean = static_cast<double>(c) + s1 / m.n;
  m.m2 = std::max(s2 - s1 * s1 / m.n, 0.0);
  return m;
}

template <typename T>
Moments all_moments(const T* x, int64_t numel) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<Moments> part(static_cast<size_t>(std::max<int64_t>(chunks, 1)));
  at::parallel_for(0, chunks, 256, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t lo = c * kChunk;
      part[c] = chunk_moments(x + lo, std::min(kChunk, numel - lo));
    }
  });
  Moments total;
  for (int64_t c = 0; c < chunks; ++c) total.merge(part[c]);
  return total;
}

void store(double* out, const Moments& m) {
  out[0] = m.n;
  out[1] = m.mean;
  out[2] = m.m2;
  out[3] = m.mn;
  out[4] = m.mx;
  out[5] = m.nonfinite;
}

std::tuple<Tensor, std::optional<Tensor>> moments(const Tensor& x_in, const std::optional<Tensor>& positions) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "covshift monitor moments: expected float32 or float64, got ", x_in.scalar_type());
  const Tensor x = x_in.contiguous();
  Tensor stats = at::empty({6}, x.options().dtype(at::kDouble));
  std::optional<Tensor> sample;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "covshift_monitor_moments", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    store(stats.data_ptr<double>(), all_moments(px, x.numel()));
    if (positions.has_value()) {
      const Tensor pos = positions->contiguous();
      TORCH_CHECK(pos.scalar_type() == at::kLong, "covshift monitor moments: positions must be int64");
      const int64_t k = pos.numel();
      Tensor s = at::empty({k}, x.options());
      const int64_t* pp = pos.data_ptr<int64_t>();
      scalar_t* ps = s.data_ptr<scalar_t>();
      const int64_t numel = x.numel();
      for (int64_t i = 0; i < k; ++i) {
        TORCH_CHECK(pp[i] >= 0 && pp[i] < numel, "covshift monitor moments: position out of range");
        ps[i] = px[pp[i]];
      }
      sample = s;
    }
  });
  return {stats, sample};
}

// Bin of a finite v on edges e[0..B]: 0 underflow, 1 + k for [e_k, e_{k+1}) (last closed), B + 1 overflow.
inline int64_t bin_of(double v, const double* e, int64_t B, double e0, double inv_w) {
  if (v < e0) return 0;
  if (v > e[B]) return B + 1;
  int64_t k = static_cast<int64_t>((v - e0) * inv_w);  // a guess for nearly uniform edges, then exact
  k = k < B - 1 ? k : B - 1;
  while (k > 0 && v < e[k]) --k;
  while (k < B - 1 && v >= e[k + 1]) ++k;
  return 1 + k;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rows(const Tensor& sample_in, const std::optional<Tensor>& valid_in,
                                                const Tensor& edges_in, double threshold) {
  TORCH_CHECK(sample_in.dim() == 2, "covshift monitor rows: expected (R, K) samples, got ", sample_in.dim(), "D");
  TORCH_CHECK(sample_in.scalar_type() == at::kFloat || sample_in.scalar_type() == at::kDouble,
              "covshift monitor rows: expected float32 or float64, got ", sample_in.scalar_type());
  const Tensor sample = sample_in.contiguous();
  const Tensor valid = valid_in.has_value() ? valid_in->to(at::kLong).contiguous() : Tensor();
  const Tensor edges = edges_in.to(at::kDouble).contiguous();
  const int64_t R = sample.size(0), K = sample.size(1), B = edges.numel() - 1;
  TORCH_CHECK(B >= 1, "covshift monitor rows: expected at least 2 edges");
  TORCH_CHECK(!valid.defined() || valid.numel() == R, "covshift monitor rows: expected one valid count per row");
  Tensor mom = at::empty({R, 6}, sample.options().dtype(at::kDouble));
  Tensor hist = at::zeros({R, B + 2}, sample.options().dtype(at::kLong));
  Tensor flags = at::zeros({R, 2}, sample.options().dtype(at::kLong));
  Tensor compact = at::empty({R, K}, sample.options());
  const double* e = edges.data_ptr<double>();
  const double e0 = e[0];
  const double inv_w = B / (e[B] - e[0]);
  const int64_t* pv = valid.defined() ? valid.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(sample.scalar_type(), "covshift_monitor_rows", [&] {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
      std::vector<int64_t> scratch;
      for (int64_t r = b; r < end; ++r) {
        const int64_t n = pv == nullptr ? K : std::min(std::max<int64_t>(pv[r], 0), K);
        const scalar_t* x = sample.data_ptr<scalar_t>() + r * K;
        scalar_t* out = compact.data_ptr<scalar_t>() + r * K;
        int64_t* h = hist.data_ptr<int64_t>() + r * (B + 2);
        // moments of the row as it is (vectorized); when every value is finite (the usual case)
        // the row is its own compaction and the histogram loop needs no finiteness test
        Moments mo;
        for (int64_t c = 0; c < n; c += kChunk) mo.merge(chunk_moments(x + c, std::min(kChunk, n - c)));
        const bool all_finite = mo.nonfinite == 0;
        int64_t m = n;
        if (all_finite) {
          std::copy(x, x + n, out);
        } else {
          m = 0;
          for (int64_t i = 0; i < n; ++i)
            if (finite(x[i])) out[m++] = x[i];
        }
        std::fill(out + m, out + K, std::numeric_limits<scalar_t>::quiet_NaN());
        // four partial histograms, so that runs of equal bins (a ReLU's zeros) do not serialize
        // on one counter; sums over the finite values only (they are out[0..m))
        std::vector<int64_t>& hh = scratch;
        hh.assign(4 * (B + 2), 0);
        int64_t sat = 0, nonpos = 0;
        const scalar_t t = static_cast<scalar_t>(threshold);
        const bool t_exact = static_cast<double>(t) == threshold;
        for (int64_t i = 0; i < m; ++i) {
          const scalar_t v = out[i];
          ++hh[(i & 3) * (B + 2) + bin_of(static_cast<double>(v), e, B, e0, inv_w)];
          sat += t_exact ? (std::abs(v) > t) : (std::abs(static_cast<double>(v)) > threshold);
          nonpos += v <= 0;
        }
        for (int64_t k = 0; k < B + 2; ++k) h[k] = hh[k] + hh[(B + 2) + k] + hh[2 * (B + 2) + k] + hh[3 * (B + 2) + k];
        mo.nonfinite = static_cast<double>(n - m);
        store(mom.data_ptr<double>() + r * 6, mo);
        flags.data_ptr<int64_t>()[r * 2] = sat;
        flags.data_ptr<int64_t>()[r * 2 + 1] = nonpos;
      }
    });
  });
  return {mom, hist, flags, compact};
}

// nth_element for each target index (sorted, distinct) within [lo, hi): divide and conquer, so each
// selection works only on the part of the row that can hold its order statistic.
template <typename T>
void select(T* x, int64_t lo, int64_t hi, const int64_t* t, int64_t nt) {
  if (nt == 0 || hi - lo <= 1) return;
  const int64_t mid = nt / 2;
  const int64_t k = t[mid];
  std::nth_element(x + lo, x + k, x + hi);
  select(x, lo, k, t, mid);
  select(x, k + 1, hi, t + mid + 1, nt - mid - 1);
}

// Order statistics of float32 values by a bucket pass: float bits mapped to an order-preserving
// uint32 key, whose top kBucketBits bits (sign, exponent, 3 mantissa bits: an eighth of an
// octave) form a histogram; each wanted rank then lies in a known bucket, whose few values are
// gathered and selected. Two streaming passes instead of a sort; exact.
constexpr int kBucketBits = 12;
constexpr int kBuckets = 1 << kBucketBits;

inline uint32_t order_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// out[j] = the targets[j]-th smallest of x[0..n) (targets sorted, distinct).
void order_stats_f32(const float* x, int64_t n, const std::vector<int64_t>& targets, std::vector<double>& out,
                     std::vector<int64_t>& counts, std::vector<float>& scratch) {
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t i = 0; i < n; ++i) ++counts[order_key(x[i]) >> (32 - kBucketBits)];
  // bucket of each target, and the buckets needed (increasing, as the targets are)
  std::vector<int64_t> tb(targets.size()), start;  // start: first rank of each needed bucket
  std::vector<int32_t> need;                        // needed bucket ids
  std::vector<int32_t> slot(kBuckets, -1);
  int64_t cum = 0;
  size_t j = 0;
  for (int b = 0; b < kBuckets && j < targets.size(); ++b) {
    const int64_t c = counts[b];
    if (targets[j] < cum + c) {
      slot[b] = static_cast<int32_t>(need.size());
      need.push_back(b);
      start.push_back(cum);
      while (j < targets.size() && targets[j] < cum + c) tb[j++] = slot[b];
    }
    cum += c;
  }
  std::vector<int64_t> offset(need.size() + 1, 0), fill(need.size());
  for (size_t k = 0; k < need.size(); ++k) offset[k + 1] = offset[k] + counts[need[k]];
  scratch.resize(static_cast<size_t>(offset.back()));
  for (size_t k = 0; k < need.size(); ++k) fill[k] = offset[k];
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = slot[order_key(x[i]) >> (32 - kBucketBits)];
    if (s >= 0) scratch[fill[s]++] = x[i];
  }
  // select within each needed bucket, all of its targets at once
  size_t t0 = 0;
  std::vector<int64_t> local;
  for (size_t k = 0; k < need.size(); ++k) {
    local.clear();
    size_t t1 = t0;
    while (t1 < targets.size() && tb[t1] == static_cast<int64_t>(k)) local.push_back(targets[t1++] - start[k] + offset[k]);
    select(scratch.data(), offset[k], offset[k + 1], local.data(), static_cast<int64_t>(local.size()));
    for (size_t q = t0; q < t1; ++q) out[q] = scratch[local[q - t0]];
    t0 = t1;
  }
}

Tensor percentiles_(Tensor& compact, const Tensor& n_in, at::ArrayRef<double> qs) {
  TORCH_CHECK(compact.dim() == 2 && compact.is_contiguous(), "covshift monitor percentiles_: expected contiguous (R, K)");
  const Tensor nv = n_in.to(at::kLong).contiguous();
  const int64_t R = compact.size(0), K = compact.size(1), P = static_cast<int64_t>(qs.size());
  Tensor out = at::empty({R, P}, compact.options().dtype(at::kDouble));
  const int64_t* pn = nv.data_ptr<int64_t>();
  std::vector<double> q(qs.begin(), qs.end());
  AT_DISPATCH_FLOATING_TYPES(compact.scalar_type(), "covshift_monitor_percentiles", [&] {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
      std::vector<int64_t> lo(P), hi(P), targets, counts(kBuckets);
      std::vector<double> frac(P), value;
      std::vector<float> scratch;
      for (int64_t r = b; r < end; ++r) {
        const int64_t n = std::min(std::max<int64_t>(pn[r], 0), K);
        double* o = out.data_ptr<double>() + r * P;
        if (n == 0) {
          std::fill(o, o + P, std::numeric_limits<double>::quiet_NaN());
          continue;
        }
        scalar_t* x = compact.data_ptr<scalar_t>() + r * K;
        targets.clear();
        for (int64_t j = 0; j < P; ++j) {
          const double h = static_cast<double>(n - 1) * q[j] / 100.0;
          lo[j] = static_cast<int64_t>(std::floor(h));
          hi[j] = std::min(lo[j] + 1, n - 1);
          frac[j] = h - static_cast<double>(lo[j]);
          targets.push_back(lo[j]);
          targets.push_back(hi[j]);
        }
        std::sort(targets.begin(), targets.end());
        targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
        value.assign(targets.size(), 0.0);
        if constexpr (std::is_same_v<scalar_t, float>) {
          order_stats_f32(reinterpret_cast<const float*>(x), n, targets, value, counts, scratch);  // reads x only
        } else {
          select(x, 0, n, targets.data(), static_cast<int64_t>(targets.size()));  // permutes x
          for (size_t j = 0; j < targets.size(); ++j) value[j] = x[targets[j]];
        }
        auto at = [&](int64_t rank) {
          return value[std::lower_bound(targets.begin(), targets.end(), rank) - targets.begin()];
        };
        for (int64_t j = 0; j < P; ++j) {
          const double a = at(lo[j]), c = at(hi[j]);
          o[j] = a + (c - a) * frac[j];
        }
      }
    });
  });
  return out;
}

// Bin index (0 underflow, 1 + k for [e_k, e_{k+1}) with the last bin closed, B + 1 overflow) of each
// of n finite float32 values, with the saturated and non-positive counts. Vectorized with AVX2 when
// the edges are exact in float32 (they are made so for float32 activations): a guess from the
// (nearly uniform) edge spacing, corrected by one step down and one up against the gathered edges,
// then verified; a group of 8 that fails the check (edges far from uniform) takes bin_of.
void bin_f32(const float* x, int64_t n, const double* e, int64_t B, double threshold, int32_t* idx, int64_t& sat,
             int64_t& nonpos) {
  const double e0 = e[0], inv_w = B / (e[B] - e[0]);
  thread_local std::vector<float> ef;
  ef.resize(static_cast<size_t>(B + 1));
  bool exact = static_cast<double>(static_cast<float>(threshold)) == threshold;
  for (int64_t k = 0; k <= B; ++k) {
    ef[k] = static_cast<float>(e[k]);
    exact = exact && static_cast<double>(ef[k]) == e[k];
  }
  int64_t i = 0, s_acc = 0, z_acc = 0;
#if defined(__AVX2__)
  if (exact && B < (1 << 30)) {
    const __m256 v_e0 = _mm256_set1_ps(ef[0]), v_eB = _mm256_set1_ps(ef[B]);
    const __m256 v_inv = _mm256_set1_ps(static_cast<float>(inv_w)), v_zero = _mm256_setzero_ps();
    const __m256 v_top = _mm256_set1_ps(static_cast<float>(B - 1));
    const __m256 v_t = _mm256_set1_ps(static_cast<float>(threshold));
    const __m256 v_abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i one = _mm256_set1_epi32(1), last = _mm256_set1_epi32(static_cast<int>(B - 1));
    const __m256i over = _mm256_set1_epi32(static_cast<int>(B + 1)), under = _mm256_setzero_si256();
    __m256i sat_v = _mm256_setzero_si256(), z_v = _mm256_setzero_si256();  // int32 lanes: n <= 2**24
    // Most values need no edge at all. With the ideal edges u_k = e_0 + k w (w = (e_B - e_0) / B),
    // D = max_k |e_k - u_k| and tau = (v - e_0) / w, the computed t = fl(fl(v - e_0) fl(1 / w)) is
    // within 3.01 2^-24 |tau| of tau (three roundings). So if 0 <= t < B and the fraction of t is
    // more than delta = D / w + 4 2^-24 (B + 1) from an integer, e_k < v < e_{k+1} for k = floor(t);
    // t < 0 means v < e_0 (rounding keeps the sign of v - e_0); t > B + delta means v > e_B. A group
    // of 8 in which every value is so decided skips the gathers below (values on or next to an
    // edge, a ReLU's zeros on an edge, take them).
    double dev = 0;
    for (int64_t k = 0; k <= B; ++k) dev = std::max(dev, std::abs(e[k] - (e0 + (e[B] - e0) * (static_cast<double>(k) / B))));
    const double w = (e[B] - e0) / B, amax = std::max(std::abs(e0), std::abs(e[B]));
    const double delta = (dev + 1e-12 * amax) / w + 4.0 * std::ldexp(1.0, -24) * static_cast<double>(B + 1);
    const bool quick = delta < 0.25;
    const __m256 v_lo = _mm256_set1_ps(static_cast<float>(delta)), v_hi = _mm256_set1_ps(static_cast<float>(1.0 - delta));
    const __m256 v_B = _mm256_set1_ps(static_cast<float>(B)), v_Bd = _mm256_set1_ps(static_cast<float>(B + delta));
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      __m256 g = _mm256_mul_ps(_mm256_sub_ps(v, v_e0), v_inv);
      if (quick) {
        const __m256 fl = _mm256_floor_ps(g), fr = _mm256_sub_ps(g, fl);
        const __m256 below = _mm256_cmp_ps(g, v_zero, _CMP_LT_OQ), above = _mm256_cmp_ps(g, v_Bd, _CMP_GT_OQ);
        const __m256 mid = _mm256_and_ps(
            _mm256_and_ps(_mm256_cmp_ps(g, v_zero, _CMP_GE_OQ), _mm256_cmp_ps(g, v_B, _CMP_LT_OQ)),
            _mm256_and_ps(_mm256_cmp_ps(fr, v_lo, _CMP_GT_OQ), _mm256_cmp_ps(fr, v_hi, _CMP_LT_OQ)));
        if (_mm256_movemask_ps(_mm256_or_ps(mid, _mm256_or_ps(below, above))) == 0xFF) {
          // cvtt of the floor where mid (in [0, B-1]); the other lanes are blended over
          __m256i b = _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_and_ps(fl, mid)), one);
          b = _mm256_blendv_epi8(b, under, _mm256_castps_si256(below));
          b = _mm256_blendv_epi8(b, over, _mm256_castps_si256(above));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + i), b);
          sat_v = _mm256_sub_epi32(sat_v, _mm256_castps_si256(_mm256_cmp_ps(_mm256_and_ps(v, v_abs), v_t, _CMP_GT_OQ)));
          z_v = _mm256_sub_epi32(z_v, _mm256_castps_si256(_mm256_cmp_ps(v, v_zero, _CMP_LE_OQ)));
          continue;
        }
      }
      g = _mm256_min_ps(_mm256_max_ps(g, v_zero), v_top);
      __m256i k = _mm256_cvttps_epi32(g);  // in [0, B-1]
      // one step down where v < e_k (k > 0), one up where v >= e_{k+1} (k < B - 1)
      __m256 ek = _mm256_i32gather_ps(ef.data(), k, 4);
      __m256i down = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, ek, _CMP_LT_OQ)), _mm256_cmpgt_epi32(k, under));
      k = _mm256_add_epi32(k, down);  // down is -1 where true
      __m256 ek1 = _mm256_i32gather_ps(ef.data(), _mm256_add_epi32(k, one), 4);
      __m256i up = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, ek1, _CMP_GE_OQ)), _mm256_cmpgt_epi32(last, k));
      k = _mm256_sub_epi32(k, up);
      // Where neither step fired, e_k <= v < e_{k+1} is already known (or k == B - 1 and v <= e_B
      // is checked by the overflow blend). Where one fired, verify e_k <= v and (v < e_{k+1}, or
      // k == B - 1 and v <= e_B), for v inside [e_0, e_B].
      bool fallback = false;
      if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(down, up))) != 0) {
        ek = _mm256_i32gather_ps(ef.data(), k, 4);
        ek1 = _mm256_i32gather_ps(ef.data(), _mm256_add_epi32(k, one), 4);
        const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(v, v_e0, _CMP_GE_OQ), _mm256_cmp_ps(v, v_eB, _CMP_LE_OQ));
        const __m256 hi_ok = _mm256_or_ps(
            _mm256_cmp_ps(v, ek1, _CMP_LT_OQ),
            _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, last)), _mm256_cmp_ps(v, v_eB, _CMP_LE_OQ)));
        const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(v, ek, _CMP_GE_OQ), hi_ok);
        fallback = _mm256_movemask_ps(_mm256_andnot_ps(ok, inside)) != 0;
      }
      if (fallback) {  // rare: scalar for these 8
        for (int j = 0; j < 8; ++j) idx[i + j] = static_cast<int32_t>(bin_of(x[i + j], e, B, e0, inv_w));
      } else {
        __m256i b = _mm256_add_epi32(k, one);
        b = _mm256_blendv_epi8(b, under, _mm256_castps_si256(_mm256_cmp_ps(v, v_e0, _CMP_LT_OQ)));
        b = _mm256_blendv_epi8(b, over, _mm256_castps_si256(_mm256_cmp_ps(v, v_eB, _CMP_GT_OQ)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + i), b);
      }
      sat_v = _mm256_sub_epi32(sat_v, _mm256_castps_si256(_mm256_cmp_ps(_mm256_and_ps(v, v_abs), v_t, _CMP_GT_OQ)));
      z_v = _mm256_sub_epi32(z_v, _mm256_castps_si256(_mm256_cmp_ps(v, v_zero, _CMP_LE_OQ)));
    }
    int32_t a[8], c[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), sat_v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), z_v);
    for (int j = 0; j < 8; ++j) s_acc += a[j], z_acc += c[j];
  }
#endif
  for (; i < n; ++i) {
    const float v = x[i];
    idx[i] = static_cast<int32_t>(bin_of(static_cast<double>(v), e, B, e0, inv_w));
    s_acc += std::abs(static_cast<double>(v)) > threshold;
    z_acc += v <= 0;
  }
  sat = s_acc;
  nonpos = z_acc;
}

// out[q] = the r[q]-th smallest of v[0..m) (r sorted, distinct; v is permuted). Quickselect's
// partitions branch on every comparison, and on fresh data (every training step's activation)
// about half of those branches are mispredicted. So a range of more than kRefineMin values is first
// split by a counting pass into kSub sub-ranges by a map that never decreases in v,
//   s(v) = min(kSub - 1, floor((v - lo) * kSub / (hi - lo)))   (in double; lo, hi the min and max),
// so every value of sub-range s is <= every value of sub-range s + 1: a rank's sub-range is known
// from the counts, and the values of the sub-ranges that hold a wanted rank, compacted in their
// input order, hold those ranks shifted by the count of the skipped values below them. Exact: the
// values themselves are selected, the map only decides where to look. Every pass is branch-free
// (the compaction advances one write position by a 0/1 flag, so nothing waits on memory).
constexpr int64_t kRefineMin = 128;
constexpr int64_t kSub = 256;

template <typename T>
void select_refined(T* v, int64_t m, const int64_t* r, int64_t nt, double* out, int depth = 0) {
  if (m <= kRefineMin || depth >= 3) {
    std::vector<int64_t> t(r, r + nt);
    select(v, 0, m, t.data(), nt);
    for (int64_t q = 0; q < nt; ++q) out[q] = static_cast<double>(v[r[q]]);
    return;
  }
  T lo = v[0], hi = v[0];
  for (int64_t i = 1; i < m; ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  if (!(lo < hi)) {  // all equal
    for (int64_t q = 0; q < nt; ++q) out[q] = static_cast<double>(lo);
    return;
  }
  const double dlo = static_cast<double>(lo), scale = static_cast<double>(kSub) / (static_cast<double>(hi) - dlo);
  std::vector<uint8_t> sidx(static_cast<size_t>(m));  // kSub == 256: one byte per value
  int64_t count[kSub] = {};
  for (int64_t i = 0; i < m; ++i) {
    const int64_t sb = std::min<int64_t>(kSub - 1, static_cast<int64_t>((static_cast<double>(v[i]) - dlo) * scale));
    sidx[i] = static_cast<uint8_t>(sb);
    ++count[sb];
  }
  uint8_t need[kSub] = {};
  std::vector<int64_t> shifted(static_cast<size_t>(nt));
  int64_t cum = 0, skipped = 0, total = 0, q = 0;
  for (int64_t b = 0; b < kSub && q < nt; ++b) {
    const int64_t c = count[b];
    if (r[q] < cum + c) {
      need[b] = 1;
      total += c;
      while (q < nt && r[q] < cum + c) shifted[q] = r[q] - skipped, ++q;
    } else {
      skipped += c;
    }
    cum += c;
  }
  std::vector<T> g(static_cast<size_t>(total + 1));  // + 1: the cell the last skipped value lands in
  int64_t pos = 0;
  for (int64_t i = 0; i < m; ++i) {
    g[pos] = v[i];
    pos += need[sidx[i]];
  }
  select_refined(g.data(), total, shifted.data(), nt, out, depth + 1);
}

// The targets-th order statistics of n values whose bins idx (and bin counts h, B + 2) are known:
// the values of the bins that hold a wanted rank are compacted (branch-free, in input order) and
// their order statistics, the targets shifted by the count of the skipped bins below, selected by
// select_refined (the bins are ordered, so the skipped values below a target are all smaller).
template <typename T>
void order_stats_binned(const T* x, int64_t n, const int32_t* idx, const int64_t* h, int64_t B,
                        const std::vector<int64_t>& targets, std::vector<double>& out) {
  thread_local std::vector<uint8_t> need;
  thread_local std::vector<T> scratch;
  need.assign(static_cast<size_t>(B + 2), 0);
  std::vector<int64_t> shifted(targets.size());
  int64_t cum = 0, skipped = 0, total = 0;
  size_t j = 0;
  for (int64_t b = 0; b < B + 2 && j < targets.size(); ++b) {
    const int64_t c = h[b];
    if (targets[j] < cum + c) {
      need[b] = 1;
      total += c;
      while (j < targets.size() && targets[j] < cum + c) shifted[j] = targets[j] - skipped, ++j;
    } else {
      skipped += c;
    }
    cum += c;
  }
  scratch.resize(static_cast<size_t>(total + 1));
  int64_t pos = 0;
  for (int64_t i = 0; i < n; ++i) {
    scratch[pos] = x[i];
    pos += need[idx[i]];
  }
  select_refined(scratch.data(), total, shifted.data(), static_cast<int64_t>(shifted.size()), out.data());
}

// Histogram with tails, saturated and non-positive counts of n finite values.
template <typename T>
void histogram(const T* x, int64_t n, const double* e, int64_t B, double threshold, int64_t* h, int64_t& sat,
               int64_t& nonpos, std::vector<int64_t>& scratch) {
  const double e0 = e[0], inv_w = B / (e[B] - e[0]);
  scratch.assign(4 * (B + 2), 0);  // four partial histograms: runs of one bin do not serialize
  int64_t s = 0, z = 0;
  const T t = static_cast<T>(threshold);
  const bool t_exact = static_cast<double>(t) == threshold;
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    ++scratch[(i & 3) * (B + 2) + bin_of(static_cast<double>(v), e, B, e0, inv_w)];
    s += t_exact ? (std::abs(v) > t) : (std::abs(static_cast<double>(v)) > threshold);
    z += v <= 0;
  }
  for (int64_t k = 0; k < B + 2; ++k)
    h[k] = scratch[k] + scratch[(B + 2) + k] + scratch[2 * (B + 2) + k] + scratch[3 * (B + 2) + k];
  sat = s;
  nonpos = z;
}

// record(x, positions?, edges, threshold, qs) -> (9 + B + 2 + P,) float64: everything the flush
// computes for one record, straight from the activation (for keys whose edges are known):
//   [n, mean, M2, min, max, n_nonfinite]   over every value of x (finite ones)
//   [n_saturated, n_nonpositive, k]        over the k finite values of the sample
//   hist (B + 2)                           of the finite sample values
//   percentiles (P)                        of the finite sample values (NaN when k == 0)
// The sample is x.flatten()[positions], or every value. x is only read.
Tensor record(const Tensor& x_in, const std::optional<Tensor>& positions, const Tensor& edges_in, double threshold,
              at::ArrayRef<double> qs) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "covshift monitor record: expected float32 or float64, got ", x_in.scalar_type());
  const Tensor x = x_in.contiguous();
  const Tensor edges = edges_in.to(at::kDouble).contiguous();
  const int64_t B = edges.numel() - 1, P = static_cast<int64_t>(qs.size());
  TORCH_CHECK(B >= 1, "covshift monitor record: expected at least 2 edges");
  Tensor out = at::empty({9 + B + 2 + P}, x.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const double* e = edges.data_ptr<double>();
  std::vector<double> q(qs.begin(), qs.end());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "covshift_monitor_record", [&] {
    thread_local std::vector<scalar_t> buf;
    thread_local std::vector<int64_t> hscratch;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const int64_t numel = x.numel();
    const Moments whole = all_moments(px, numel);
    store(o, whole);
    const scalar_t* s = px;
    int64_t k = numel;
    bool maybe_nonfinite = whole.nonfinite > 0;
    if (positions.has_value()) {
      const Tensor pos = positions->contiguous();
      TORCH_CHECK(pos.scalar_type() == at::kLong, "covshift monitor record: positions must be int64");
      k = pos.numel();
      const int64_t* pp = pos.data_ptr<int64_t>();
      buf.resize(static_cast<size_t>(k));
      for (int64_t i = 0; i < k; ++i) {
        TORCH_CHECK(pp[i] >= 0 && pp[i] < numel, "covshift monitor record: position out of range");
        buf[i] = px[pp[i]];
      }
      s = buf.data();
    }
    if (maybe_nonfinite) {  // keep the finite values only
      std::vector<scalar_t> fin;
      fin.reserve(static_cast<size_t>(k));
      for (int64_t i = 0; i < k; ++i)
        if (finite(s[i])) fin.push_back(s[i]);
      buf.swap(fin);
      s = buf.data();
      k = static_cast<int64_t>(buf.size());
    }
    int64_t sat = 0, nonpos = 0;
    thread_local std::vector<int32_t> idx;
    thread_local std::vector<int64_t> h;
    h.assign(static_cast<size_t>(B + 2), 0);
    const bool f32 = std::is_same_v<scalar_t, float>;
    if (f32) {
      idx.resize(static_cast<size_t>(k));
      bin_f32(reinterpret_cast<const float*>(s), k, e, B, threshold, idx.data(), sat, nonpos);
      // four partial histograms, so that runs of one bin (a ReLU's zeros) do not serialize
      hscratch.assign(static_cast<size_t>(4 * (B + 2)), 0);
      int64_t i = 0;
      for (; i + 4 <= k; i += 4) {
        ++hscratch[idx[i]];
        ++hscratch[(B + 2) + idx[i + 1]];
        ++hscratch[2 * (B + 2) + idx[i + 2]];
        ++hscratch[3 * (B + 2) + idx[i + 3]];
      }
      for (; i < k; ++i) ++hscratch[idx[i]];
      for (int64_t j = 0; j < B + 2; ++j)
        h[j] = hscratch[j] + hscratch[(B + 2) + j] + hscratch[2 * (B + 2) + j] + hscratch[3 * (B + 2) + j];
    } else {
      histogram(s, k, e, B, threshold, h.data(), sat, nonpos, hscratch);
    }
    for (int64_t j = 0; j < B + 2; ++j) o[9 + j] = static_cast<double>(h[j]);
    o[6] = static_cast<double>(sat);
    o[7] = static_cast<double>(nonpos);
    o[8] = static_cast<double>(k);
    double* op = o + 9 + B + 2;
    if (k == 0) {
      std::fill(op, op + P, std::numeric_limits<double>::quiet_NaN());
      return;
    }
    std::vector<int64_t> lo(P), hi2(P), targets;
    std::vector<double> frac(P), value;
    for (int64_t j = 0; j < P; ++j) {
      const double hh = static_cast<double>(k - 1) * q[j] / 100.0;
      lo[j] = static_cast<int64_t>(std::floor(hh));
      hi2[j] = std::min(lo[j] + 1, k - 1);
      frac[j] = hh - static_cast<double>(lo[j]);
      targets.push_back(lo[j]);
      targets.push_back(hi2[j]);
    }
    std::sort(targets.begin(), targets.end());
    targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
    value.assign(targets.size(), 0.0);
    if (f32) {
      order_stats_binned(s, k, idx.data(), h.data(), B, targets, value);  // reads s only
    } else {
      std::vector<scalar_t> work(s, s + k);  // never permute the activation
      select(work.data(), 0, k, targets.data(), static_cast<int64_t>(targets.size()));
      for (size_t j = 0; j < targets.size(); ++j) value[j] = work[targets[j]];
    }
    auto at = [&](int64_t rank) { return value[std::lower_bound(targets.begin(), targets.end(), rank) - targets.begin()]; };
    for (int64_t j = 0; j < P; ++j) {
      const double a = at(lo[j]), c = at(hi2[j]);
      op[j] = a + (c - a) * frac[j];
    }
  });
  return out;
}

}  // namespace
}  // namespace covshift_monitor

TORCH_LIBRARY(covshift_monitor, m) {
  m.def("moments(Tensor x, Tensor? positions) -> (Tensor, Tensor?)");
  m.def("rows(Tensor sample, Tensor? valid, Tensor edges, float threshold) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("percentiles_(Tensor(a!) compact, Tensor n, float[] qs) -> Tensor");
  m.def("record(Tensor x, Tensor? positions, Tensor edges, float threshold, float[] qs) -> Tensor");
}

TORCH_LIBRARY_IMPL(covshift_monitor, CPU, m) {
  m.impl("moments", &covshift_monitor::moments);
  m.impl("rows", &covshift_monitor::rows);
  m.impl("percentiles_", &covshift_monitor::percentiles_);
  m.impl("record", &covshift_monitor::record);
}
