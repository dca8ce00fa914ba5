// Fused hashtag softmax cross-entropy on the CPU: the loss and the gradient of a row in one visit, the
// gradient optionally written into the logits' own buffer, a vectorized exp, rows spread over threads.
//
// Row i's target spreads its labels' weights (1 each when there are none) normalized to sum 1:
//   loss_i = logsumexp(z_i) - sum_j t_ij z_ij,   grad_i = (softmax(z_i) - t_i) * grad_scale.
// A row whose labels weigh 0 in total has loss 0 and gradient 0.
//
// A row (17,000 floats = 68 KB) fits in L2, so its passes (max, taken while the previous row's exps are
// computed; exp and sum, storing the exps; targets; scale) touch memory once for the logits and once for
// the gradient. Storing the exps and rescaling them beats recomputing them in the last pass. Reduced types
// (bf16, fp16) are widened in registers as they are read; their exps go to a float32 scratch row, reused row
// after row, so that each gradient element is rounded to its dtype once.
//
// The floor is one read and one write of the logits, and one exp per element: a (256, 17000) batch stays in
// the last-level cache between calls and is bound by the exps (hence vec_exp below, 12 vector instructions
// instead of ATen's 21); a (1024, 32768) float32 batch comes from DRAM and is bound by that copy. The kernel
// reaches the copy there (bench/test_bench_loss.py measures both against a copy, eager and torch.compile).
// Why the rest is the way it is:
// - at::parallel_for, a header template, runs serially unless the extension is compiled with OpenMP
//   (cpp_extension.py passes -fopenmp);
// - the max pass, stalled on the first read of each row, cost as much as the exps until each row's max was
//   taken during the previous row's exps, whose arithmetic hides the loads;
// - AVX512-BF16's one-instruction rounding instead of ATen's emulation changed nothing (tried, not kept);
// - both cores are shared with other jobs on these machines, and a busy second core makes a statically split
//   region wait for it, hence rows are handed out dynamically.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

// exp of x <= 0 (a logit minus its row's max), the kernel's inner cost. Sleef's exp (1 ulp) costs about
// twice ATen's polynomial exp_u20 (20 ulp, 21 vector instructions on AVX-512); on AVX-512 the version
// below takes 12: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-5 minimax polynomial for
// e^r (fitted in float64, relative error 7.5e-8), and vscalefps for 2^n, which also underflows gradually
// to 0 (x = -inf gives exactly 0). Measured in float32 against float64 over [-104, 0]: relative error
// at most 2.0e-7 above FLT_MIN, within the contract's 1e-5. Double keeps Sleef's exp: it exists for
// gradcheck, which needs double precision.
inline Vectorized<float> vec_exp(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // Below -150 ln2 the result rounds to 0 anyway; the clamp keeps -inf out of the polynomial. Constant
  // first: _mm512_max_ps returns its second operand when either is NaN, so a NaN stays NaN.
  const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-103.97208f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269502f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so that n * ln2_hi is exact: r keeps its accuracy for |n| up to 150.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.00829765480f), r, _mm512_set1_ps(0.0419153832f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166675746f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.499988943f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.999999702f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.00000012f));
  return _mm512_scalef_ps(p, n);
#else
  return x.exp_u20();
#endif
}
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

// Calls body(d, v, w) for each whole vector of a[begin:end) and b[begin:end) widened to acc_t (v holds
// a[d : d + lanes], w the same of b) and returns where the scalar tail starts. Reduced types are widened
// in registers: a float32 copy of the row would cost one more pass over it.
template <typename scalar_t, typename acc_t, typename Body>
int64_t for_each_vector_pair(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end, Body&& body) {
  using fVec = Vectorized<acc_t>;
  int64_t d = begin;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; d + fVec::size() <= end; d += fVec::size()) body(d, fVec::loadu(a + d), fVec::loadu(b + d));
  } else {
    using bVec = Vectorized<scalar_t>;
    for (; d + bVec::size() <= end; d += bVec::size()) {
      auto [a_lo, a_hi] = at::vec::convert_to_float<scalar_t>(bVec::loadu(a + d));
      auto [b_lo, b_hi] = at::vec::convert_to_float<scalar_t>(bVec::loadu(b + d));
      body(d, a_lo, b_lo);
      body(d + fVec::size(), a_hi, b_hi);
    }
  }
  return d;
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
acc_t reduce_max(const Vectorized<acc_t>& v) {
  using fVec = Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, v);
}

template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* x, int64_t n) {
  using fVec = Vectorized<acc_t>;
  fVec vm(-std::numeric_limits<acc_t>::infinity());
  // Rare (a chunk's first row, a row after an unlabeled one): the second operand, unused, costs little.
  int64_t d = for_each_vector_pair<scalar_t, acc_t>(x, x, 0, n, [&](int64_t, const fVec& v, const fVec&) {
    vm = at::vec::maximum(vm, v);
  });
  acc_t m = reduce_max(vm);
  for (; d < n; ++d) m = std::max(m, static_cast<acc_t>(x[d]));
  return m;
}

// Returns sum_d exp(x[d] - shift); stores the exps into out when out is not null (out may alias x).
// Meanwhile takes the max of next[0:n), the row this thread works on next, into *next_max: its loads
// then overlap the exps' arithmetic. As a pass of its own, stalled on memory, the max cost as much as
// the exps (single-threaded, 256 x 17000: 0.5 ms of 1.5 in float32, 0.6 of 1.7 in bf16).
template <typename scalar_t, typename acc_t>
double exp_sum(const scalar_t* x, acc_t shift, acc_t* out, int64_t n, const scalar_t* next, acc_t* next_max) {
  using fVec = Vectorized<acc_t>;
  const fVec vshift(shift);
  fVec vmax(-std::numeric_limits<acc_t>::infinity());
  double total = 0.0;
  int64_t d = 0;
  // Blocks are whole vectors (kSumBlock is a multiple of every vector width): only the last has a tail.
  for (int64_t block = 0; block < n && d == block; block += kSumBlock) {
    fVec acc(acc_t(0));
    d = for_each_vector_pair<scalar_t, acc_t>(x, next, block, std::min(n, block + kSumBlock),
                                              [&](int64_t at, const fVec& v, const fVec& w) {
      vmax = at::vec::maximum(vmax, w);
      const fVec e = vec_exp(v - vshift);
      if (out != nullptr) e.store(out + at);
      acc = acc + e;
    });
    total += at::vec::vec_reduce_all<acc_t>([](fVec& a, fVec& b) { return a + b; }, acc);
  }
  acc_t m = reduce_max(vmax);
  for (; d < n; ++d) {
    const acc_t e = std::exp(static_cast<acc_t>(x[d]) - shift);
    if (out != nullptr) out[d] = e;
    total += e;
    m = std::max(m, static_cast<acc_t>(next[d]));
  }
  *next_max = m;
  return total;
}

// One row: returns its loss and, when grad is not null, writes (softmax - target) * grad_scale into it.
// grad may alias x_in (the in-place mode); scratch holds C floats when scalar_t is a reduced type.
// own_max is this row's max when the previous row took it; next_max receives next_row's (when next_row
// is not null and this row has labels), for the row after.
template <typename scalar_t, typename acc_t>
acc_t xent_row(const scalar_t* x_in, scalar_t* grad, acc_t* scratch, int64_t C, const RowTargets<acc_t>& row,
               acc_t grad_scale, std::optional<acc_t> own_max, const scalar_t* next_row,
               std::optional<acc_t>& next_max) {
  constexpr bool kWide = std::is_same_v<scalar_t, acc_t>;

  // Target logits first: in the in-place mode the exps below overwrite them. Summed as t_j * z_j with the
  // weights normalized first, so that no partial sum leaves the logits' range (k logits of the dtype's max
  // summed before dividing by k would overflow). A zero weight is skipped so that a -inf logit it points at
  // cannot make 0 * -inf.
  acc_t total_weight = 0;
  for (int64_t j = row.begin; j < row.end; ++j) {
    const int64_t label = row.labels[j];
    TORCH_CHECK(label >= 0 && label < C, "hashtag_xent: label ", label, " outside [0, ", C, ")");
    const acc_t w = row.weight(j);
    if (w > 0) total_weight += w;
  }
  next_max.reset();
  if (!(total_weight > 0)) {
    if (grad != nullptr) std::fill(grad, grad + C, scalar_t(0));
    return acc_t(0);
  }
  acc_t target_logit = 0;
  for (int64_t j = row.begin; j < row.end; ++j) {
    const acc_t w = row.weight(j);
    if (w > 0) target_logit += w / total_weight * static_cast<acc_t>(x_in[row.labels[j]]);
  }

  // Clamped to the finite range so that a row of -inf never computes -inf - -inf.
  const acc_t max = std::max(own_max.has_value() ? *own_max : row_max<scalar_t, acc_t>(x_in, C),
                             std::numeric_limits<acc_t>::lowest());

  // Exps land where the gradient is assembled: the gradient row itself when it is wide, else scratch.
  acc_t* exps = nullptr;
  if (grad != nullptr) {
    if constexpr (kWide) {
      exps = grad;
    } else {
      exps = scratch;
    }
  }
  acc_t max_of_next;
  // Without a row to come, the row's own max again: a few wasted loads, no branch in the inner loop.
  const acc_t sum = static_cast<acc_t>(
      exp_sum<scalar_t, acc_t>(x_in, max, exps, C, next_row == nullptr ? x_in : next_row, &max_of_next));
  if (next_row != nullptr) next_max = max_of_next;
  // (max - target logit) + log-sum: at large logits, max + log-sum would round the log-sum away.
  const acc_t loss = (max - target_logit) + std::log(sum);

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

// A fresh gradient buffer of many MiB faults in 4 KiB page by page on its first write: at 1024 x 32768
// float32, 32,768 faults, about as long as the kernel itself. Advised to transparent huge pages before that
// write, it faults 512 times fewer. Only its 2 MiB-aligned interior (what huge pages can back) is advised;
// the advice belongs to the buffer's own mapping and dies with it. torch's THP_MEM_ALLOC_ENABLE=1 does the
// same for every allocation of the process.
constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t first = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (first + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (first + bytes) & ~(kHugePage - 1);
  // Advice only: where the kernel refuses it (THP disabled), the pages stay small and nothing else changes.
  if (end >= begin + 2 * kHugePage) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
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

  // About 32K elements per chunk of rows: enough work to pay for taking it, small enough to balance threads.
  const int64_t chunk = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  const int64_t n_chunks = (B + chunk - 1) / chunk;
  // Threads take chunks from a shared counter instead of one fixed half each: on a shared machine one
  // core is often slowed by another process, and a fixed split waits for that core's whole half.
  std::atomic<int64_t> next_chunk{0};
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), n_chunks);
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scratch(kWide || g == nullptr ? 0 : C);
    std::optional<acc_t> max_of_next;  // the max of the row this thread takes next, when already known
    for (int64_t c = next_chunk++; c < n_chunks;) {
      // Claimed one chunk ahead, so that its first row's max can be taken during this chunk's last row.
      const int64_t following = next_chunk++;
      const int64_t last = std::min(B, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < last; ++i) {
        const int64_t begin = offset_ptr[i];
        const int64_t end = offset_ptr[i + 1];
        TORCH_CHECK(0 <= begin && begin <= end && end <= nnz, "hashtag_xent: offsets are not a valid CSR at row ", i);
        const RowTargets<acc_t> row{label_ptr, weight_ptr, begin, end};
        const int64_t next = i + 1 < last ? i + 1 : (following < n_chunks ? following * chunk : -1);
        const std::optional<acc_t> own_max = max_of_next;
        loss_ptr[i] = xent_row<scalar_t, acc_t>(x + i * C, g == nullptr ? nullptr : g + i * C, scratch.data(), C,
                                               row, scale, own_max, next < 0 ? nullptr : x + next * C, max_of_next);
      }
      c = following;
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
  if (grad.has_value() && grad->data_ptr() != logits.data_ptr()) {
    advise_huge_pages(grad->data_ptr(), grad->nbytes());
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
