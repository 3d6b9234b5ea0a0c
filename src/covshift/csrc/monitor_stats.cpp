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
//   rows(sample (R, K), valid (R,) int64, edges (B+1,) float64, threshold) ->
//       (moments (R, 6) float64, hist (R, B+2) int64, flags (R, 2) int64, compact (R, K))
//       per row, over its first valid[r] entries: the same six moments; the histogram of the finite
//       values on the fixed edges [underflow x < e_0, bins [e_k, e_{k+1}) (last closed), overflow
//       x > e_B]; flags = [#{|x| > threshold}, #{x <= 0}] over the finite values; compact holds the
//       finite values first (in their order), then NaN.
//   percentiles_(compact (R, K), n (R,) int64, qs float[]) -> (R, P) float64
//       NumPy's linear-interpolation percentiles of the first n[r] values of each row (all finite),
//       by selection (nth_element), not sorting; the rows are permuted in place.
//
// Everything is exact in the input type except the moments, which accumulate in double.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
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
// mean. The fast path is vectorized in the input type (at most kChunk values per partial sum, so
// rounding does not grow with the tensor); a chunk holding a non-finite value takes the scalar path.
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

template <typename T>
Moments chunk_moments(const T* x, int64_t len) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  if (len < 4 * W) return chunk_moments_scalar(x, len);
  V s0(0), s1(0), z(0), lo(std::numeric_limits<T>::infinity()), hi(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const V a = V::loadu(x + i), b = V::loadu(x + i + W);
    s0 = s0 + a;
    s1 = s1 + b;
    z = z + (a - a) + (b - b);  // NaN as soon as one value is NaN or infinite
    lo = at::vec::minimum(lo, at::vec::minimum(a, b));
    hi = at::vec::maximum(hi, at::vec::maximum(a, b));
  }
  T buf[W];
  (s0 + s1).store(buf);
  double sum = 0;
  for (int64_t j = 0; j < W; ++j) sum += buf[j];
  z.store(buf);
  T zt = 0;
  for (int64_t j = 0; j < W; ++j) zt += buf[j];
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  lo.store(buf);
  for (int64_t j = 0; j < W; ++j) mn = std::min(mn, buf[j]);
  hi.store(buf);
  for (int64_t j = 0; j < W; ++j) mx = std::max(mx, buf[j]);
  for (int64_t j = i; j < len; ++j) {
    const T v = x[j];
    sum += v;
    zt += v - v;
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  if (!(zt == 0)) return chunk_moments_scalar(x, len);
  Moments m;
  m.n = static_cast<double>(len);
  m.mean = sum / m.n;
  m.mn = mn;
  m.mx = mx;
  const V mean(static_cast<T>(m.mean));
  V q0(0), q1(0);
  i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const V a = V::loadu(x + i) - mean, b = V::loadu(x + i + W) - mean;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  }
  (q0 + q1).store(buf);
  double m2 = 0;
  for (int64_t j = 0; j < W; ++j) m2 += buf[j];
  // the partial sums above are around the mean rounded to T; shift them to the exact mean
  const double shift = static_cast<double>(static_cast<T>(m.mean)) - m.mean;
  double tail_sum = 0;
  for (int64_t j = i; j < len; ++j) {
    const double d = static_cast<double>(x[j]) - m.mean;
    m2 += d * d;
    tail_sum += d;
  }
  // sum over the vector part of (x - mean_T)^2 = sum (x - mean)^2 - 2 shift sum (x - mean) + i shift^2,
  // and sum over all of (x - mean) = 0, so sum over the vector part of (x - mean) = -tail_sum
  m2 = m2 + 2 * shift * (-tail_sum) - static_cast<double>(i) * shift * shift;
  m.m2 = std::max(m2, 0.0);
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
  k = std::min(std::max<int64_t>(k, 0), B - 1);
  while (k > 0 && v < e[k]) --k;
  while (k < B - 1 && v >= e[k + 1]) ++k;
  return 1 + k;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rows(const Tensor& sample_in, const Tensor& valid_in, const Tensor& edges_in,
                                                double threshold) {
  TORCH_CHECK(sample_in.dim() == 2, "covshift monitor rows: expected (R, K) samples, got ", sample_in.dim(), "D");
  TORCH_CHECK(sample_in.scalar_type() == at::kFloat || sample_in.scalar_type() == at::kDouble,
              "covshift monitor rows: expected float32 or float64, got ", sample_in.scalar_type());
  const Tensor sample = sample_in.contiguous();
  const Tensor valid = valid_in.to(at::kLong).contiguous();
  const Tensor edges = edges_in.to(at::kDouble).contiguous();
  const int64_t R = sample.size(0), K = sample.size(1), B = edges.numel() - 1;
  TORCH_CHECK(B >= 1, "covshift monitor rows: expected at least 2 edges");
  TORCH_CHECK(valid.numel() == R, "covshift monitor rows: expected one valid count per row");
  Tensor mom = at::empty({R, 6}, sample.options().dtype(at::kDouble));
  Tensor hist = at::zeros({R, B + 2}, sample.options().dtype(at::kLong));
  Tensor flags = at::zeros({R, 2}, sample.options().dtype(at::kLong));
  Tensor compact = at::empty({R, K}, sample.options());
  const double* e = edges.data_ptr<double>();
  const double e0 = e[0];
  const double inv_w = B / (e[B] - e[0]);
  const int64_t* pv = valid.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(sample.scalar_type(), "covshift_monitor_rows", [&] {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
      for (int64_t r = b; r < end; ++r) {
        const int64_t n = std::min(std::max<int64_t>(pv[r], 0), K);
        const scalar_t* x = sample.data_ptr<scalar_t>() + r * K;
        scalar_t* out = compact.data_ptr<scalar_t>() + r * K;
        int64_t* h = hist.data_ptr<int64_t>() + r * (B + 2);
        int64_t sat = 0, nonpos = 0, m = 0;
        const scalar_t t = static_cast<scalar_t>(threshold);
        const bool t_exact = static_cast<double>(t) == threshold;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t v = x[i];
          if (!finite(v)) continue;
          out[m++] = v;
          ++h[bin_of(static_cast<double>(v), e, B, e0, inv_w)];
          sat += t_exact ? (std::abs(v) > t) : (std::abs(static_cast<double>(v)) > threshold);
          nonpos += v <= 0;
        }
        std::fill(out + m, out + K, std::numeric_limits<scalar_t>::quiet_NaN());
        Moments mo;
        for (int64_t c = 0; c < m; c += kChunk) mo.merge(chunk_moments(out + c, std::min(kChunk, m - c)));
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

Tensor percentiles_(Tensor& compact, const Tensor& n_in, at::ArrayRef<double> qs) {
  TORCH_CHECK(compact.dim() == 2 && compact.is_contiguous(), "covshift monitor percentiles_: expected contiguous (R, K)");
  const Tensor nv = n_in.to(at::kLong).contiguous();
  const int64_t R = compact.size(0), K = compact.size(1), P = static_cast<int64_t>(qs.size());
  Tensor out = at::empty({R, P}, compact.options().dtype(at::kDouble));
  const int64_t* pn = nv.data_ptr<int64_t>();
  std::vector<double> q(qs.begin(), qs.end());
  AT_DISPATCH_FLOATING_TYPES(compact.scalar_type(), "covshift_monitor_percentiles", [&] {
    at::parallel_for(0, R, 1, [&](int64_t b, int64_t end) {
      std::vector<int64_t> lo(P), hi(P), targets;
      std::vector<double> frac(P);
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
        select(x, 0, n, targets.data(), static_cast<int64_t>(targets.size()));
        for (int64_t j = 0; j < P; ++j) {
          const double a = x[lo[j]], c = x[hi[j]];
          o[j] = a + (c - a) * frac[j];
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace covshift_monitor

TORCH_LIBRARY(covshift_monitor, m) {
  m.def("moments(Tensor x, Tensor? positions) -> (Tensor, Tensor?)");
  m.def("rows(Tensor sample, Tensor valid, Tensor edges, float threshold) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("percentiles_(Tensor(a!) compact, Tensor n, float[] qs) -> Tensor");
}

TORCH_LIBRARY_IMPL(covshift_monitor, CPU, m) {
  m.impl("moments", &covshift_monitor::moments);
  m.impl("rows", &covshift_monitor::rows);
  m.impl("percentiles_", &covshift_monitor::percentiles_);
}
