// Fused hashtag softmax cross-entropy on the CPU: the loss and the gradient of a row in one visit, the
// gradient optionally written into the logits' own buffer, ATen's vectorized exp, rows spread over threads
// with at::parallel_for.
//
// Row i's target spreads its labels' weights (1 each when there are none) normalized to sum 1:
//   loss_i = logsumexp(z_i) - sum_j t_ij z_ij,   grad_i = (softmax(z_i) - t_i) * grad_scale.
// A row whose labels weigh 0 in total has loss 0 and gradient 0.
//
// Floor: one read of the logits from memory, one write of the gradient, one exp per element. A row
// (17,000 floats = 68 KB) fits in L2, so its passes (max; exp and sum, storing the exps; targets; scale)
// touch memory once for the logits and once for the gradient. Storing the exps and rescaling them beat
// recomputing the exps in the last pass (measured on 2 cores, single-threaded: 3.1 vs 3.6 ms in place at
// 256 x 17000). Reduced types (bf16, fp16) are widened into a float32 scratch row, reused row after row,
// so that each gradient element is rounded to its dtype once.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

// Sleef's exp (1 ulp) costs about twice ATen's polynomial exp_u20 (20 ulp, 1.2e-6 relative): the contract
// allows 1e-5 relative error in float32, so float takes the fast one. Double keeps the accurate one: it
// exists for gradcheck, which needs double precision.
inline Vectorized<float> vec_exp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vec_exp(const Vectorized<double>& x) { return x.exp(); }

// Sums of up to this many elements accumulate in one vector register (at most 2048 / lanes additions per
// lane), then go into a double: the summation error stays near float32's epsilon even at C = 262,144.
constexpr int64_t kSumBlock = 2048;

// One row's labels: labels[begin:end] with their weights (nullptr: each label weighs 1).
template <typename acc_t>
struct RowTargets {
  const int64_t* labels;
  const acc_t* weights;
  int64_t begin;
  int64_t end;

  acc_t weight(int64_t j) const { return weights == nullptr ? acc_t(1) : weights[j]; }
};

// Widens a reduced-precision row into float32 scratch (vectorized); float and double rows are used as-is.
template <typename scalar_t, typename acc_t>
void widen(const scalar_t* src, acc_t* dst, int64_t n) {
  using bVec = Vectorized<scalar_t>;
  using fVec = Vectorized<acc_t>;
  int64_t d = 0;
  for (; d + bVec::size() <= n; d += bVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + d));
    lo.store(dst + d);
    hi.store(dst + d + fVec::size());
  }
  for (; d < n; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

// dst = src * factor, rounded once to dst's dtype (in place when dst and src are the same float row).
template <typename scalar_t, typename acc_t>
void scale_into(const acc_t* src, acc_t factor, scalar_t* dst, int64_t n) {
  using fVec = Vectorized<acc_t>;
  const fVec f(factor);
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; d + fVec::size() <= n; d += fVec::size()) (fVec::loadu(src + d) * f).store(dst + d);
  } else {
    using bVec = Vectorized<scalar_t>;
    for (; d + bVec::size() <= n; d += bVec::size()) {
      auto lo = fVec::loadu(src + d) * f;
      auto hi = fVec::loadu(src + d + fVec::size()) * f;
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst + d);
    }
  }
  for (; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d] * factor);
}

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  using fVec = Vectorized<acc_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t d = 0;
  if (n >= fVec::size()) {
    fVec vm(m);
    for (; d + fVec::size() <= n; d += fVec::size()) vm = at::vec::maximum(vm, fVec::loadu(x + d));
    m = at::vec::vec_reduce_all<acc_t>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; d < n; ++d) m = std::max(m, x[d]);
  return m;
}

// Returns sum_d exp(x[d] - shift); stores the exps into out when out is not null (out may alias x).
template <typename acc_t>
double exp_sum(const acc_t* x, acc_t shift, acc_t* out, int64_t n) {
  using fVec = Vectorized<acc_t>;
  const fVec vshift(shift);
  double total = 0.0;
  int64_t d = 0;
  while (d + fVec::size() <= n) {
    const int64_t block_end = std::min(n, d + kSumBlock);
    fVec acc(acc_t(0));
    for (; d + fVec::size() <= block_end; d += fVec::size()) {
      fVec e = vec_exp(fVec::loadu(x + d) - vshift);
      if (out != nullptr) e.store(out + d);
      acc = acc + e;
    }
    total += at::vec::vec_reduce_all<acc_t>([](fVec& a, fVec& b) { return a + b; }, acc);
  }
  for (; d < n; ++d) {
    const acc_t e = std::exp(x[d] - shift);
    if (out != nullptr) out[d] = e;
    total += e;
  }
  return total;
}

// One row: returns its loss and, when grad is not null, writes (softmax - target) * grad_scale into it.
// grad may alias x_in (the in-place mode); scratch holds C floats when scalar_t is a reduced type.
template <typename scalar_t, typename acc_t>
acc_t xent_row(const scalar_t* x_in, scalar_t* grad, acc_t* scratch, int64_t C,
               const RowTargets<acc_t>& row, acc_t grad_scale) {
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;

  // Target logits first: in the in-place mode the exps below overwrite them.
  // A zero weight is skipped so that a -inf logit it points at cannot make 0 * -inf.
  acc_t total_weight = 0;
  acc_t weighted_logits = 0;
  for (int64_t j = row.begin; j < row.end; ++j) {
    const int64_t label = row.labels[j];
    TORCH_CHECK(label >= 0 && label < C, "hashtag_xent: label ", label, " outside [0, ", C, ")");
    const acc_t w = row.weight(j);
    if (w > 0) {
      total_weight += w;
      weighted_logits += w * static_cast<acc_t>(x_in[label]);
    }
  }
  if (!(total_weight > 0)) {
    if (grad != nullptr) std::fill(grad, grad + C, scalar_t(0));
    return acc_t(0);
  }

  const acc_t* x;
  if constexpr (kWide) {
    x = x_in;
  } else {
    widen(x_in, scratch, C);
    x = scratch;
  }
  // Clamped to the finite range so that a row of -inf never computes -inf - -inf.
  const acc_t max = std::max(row_max(x, C), std::numeric_limits<acc_t>::lowest());

  // Exps land where the gradient is assembled: the gradient row itself when it is wide, else scratch.
  acc_t* exps = nullptr;
  if (grad != nullptr) {
    if constexpr (kWide) {
      exps = grad;
    } else {
      exps = scratch;
    }
  }
  const acc_t sum = static_cast<acc_t>(exp_sum(x, max, exps, C));
  // (max - target logit) + log-sum: at large logits, max + log-sum would round the log-sum away.
  const acc_t loss = (max - weighted_logits / total_weight) + std::log(sum);

  if (grad != nullptr) {
    // softmax - t = (exp - t * sum) / sum: subtract the targets in the exp domain, then scale once.
    for (int64_t j = row.begin; j < row.end; ++j) {
      const acc_t w = row.weight(j);
      if (w > 0) exps[row.labels[j]] -= w / total_weight * sum;
    }
    scale_into(exps, grad_scale / sum, grad, C);
  }
  return loss;
}

template <typename scalar_t>
void forward_typed(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& offsets,
                   const std::optional<at::Tensor>& weights, double grad_scale, at::Tensor& row_loss,
                   const std::optional<at::Tensor>& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  const int64_t nnz = labels.numel();

  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* g = grad.has_value() ? grad->data_ptr<scalar_t>() : nullptr;
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  const int64_t* offset_ptr = offsets.const_data_ptr<int64_t>();
  const acc_t* weight_ptr = weights.has_value() ? weights->const_data_ptr<acc_t>() : nullptr;
  acc_t* loss_ptr = row_loss.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(grad_scale);

  // About 32K elements per task: enough work to pay for a task, small enough to balance 2..64 threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, B, grain, [&](int64_t first, int64_t last) {
    std::vector<acc_t> scratch(kWide ? 0 : C);
    for (int64_t i = first; i < last; ++i) {
      const int64_t begin = offset_ptr[i];
      const int64_t end = offset_ptr[i + 1];
      TORCH_CHECK(0 <= begin && begin <= end && end <= nnz, "hashtag_xent: offsets are not a valid CSR at row ", i);
      const RowTargets<acc_t> row{label_ptr, weight_ptr, begin, end};
      loss_ptr[i] = xent_row<scalar_t, acc_t>(x + i * C, g == nullptr ? nullptr : g + i * C, scratch.data(), C,
                                             row, scale);
    }
  });
}

// Python entry point. logits: (B, C) contiguous float32/float64/bf16/fp16; labels: (nnz,) int64;
// offsets: (B + 1,) int64; weights: (nnz,) in the accumulation dtype (float32, or float64 for float64
// logits) or None; row_loss: (B,) accumulation dtype, written; grad: (B, C) like logits (may be logits
// itself) or None for a forward without gradient.
void hashtag_xent_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& offsets,
                          const std::optional<at::Tensor>& weights, double grad_scale, at::Tensor row_loss,
                          const std::optional<at::Tensor>& grad) {
  TORCH_CHECK(logits.device().is_cpu(), "hashtag_xent_forward: this build runs on CPU tensors only");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "hashtag_xent_forward: logits must be (B, C) contiguous");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous(), "hashtag_xent_forward: labels must be contiguous int64");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == logits.size(0) + 1,
              "hashtag_xent_forward: offsets must be contiguous int64 of length B + 1");
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(row_loss.scalar_type() == acc_type && row_loss.is_contiguous() && row_loss.numel() == logits.size(0),
              "hashtag_xent_forward: row_loss must be (B,) contiguous in the accumulation dtype");
  if (weights.has_value()) {
    TORCH_CHECK(weights->scalar_type() == acc_type && weights->is_contiguous() && weights->numel() == labels.numel(),
                "hashtag_xent_forward: weights must be (nnz,) contiguous in the accumulation dtype");
  }
  if (grad.has_value()) {
    TORCH_CHECK(grad->scalar_type() == logits.scalar_type() && grad->is_contiguous() && grad->sizes() == logits.sizes(),
                "hashtag_xent_forward: grad must be contiguous, of the logits' shape and dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "hashtag_xent_forward", [&] {
    forward_typed<scalar_t>(logits, labels, offsets, weights, grad_scale, row_loss, grad);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused hashtag softmax cross-entropy (CPU)";
  m.def("hashtag_xent_forward", &hashtag_xent_forward, "Per-row loss, and the scaled gradient when grad is given",
        py::arg("logits"), py::arg("labels"), py::arg("offsets"), py::arg("weights"), py::arg("grad_scale"),
        py::arg("row_loss"), py::arg("grad"));
}
