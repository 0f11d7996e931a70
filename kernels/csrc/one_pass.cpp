// The one attention pass of a prefill on the CPU: causal attention output and
// the accumulated attention (H2O, arXiv 2306.14048 §3: s[h, j] = sum_i
// softmax_i(q_i K^T / sqrt(d))[j]) from the same softmax rows, one tile of
// logits at a time, sized to stay in the core's L2 cache.
//
// Pure-torch reference: kvpolicy.exec.reference.attention.attention_with_column_sums
// (same tiles, same arithmetic: one QK^T, one softmax, one PV per tile).
// Python wrapper and build: kernels/cpu.py.
//
// A task is one KV head and `block` queries of all its n_rep query heads
// (R = n_rep * block rows): R x visible logits from one sgemm, the causal
// softmax of each row in place, its probabilities added to the thread's own
// column sums, then R x d_v outputs from a second sgemm. Tasks run in
// parallel over the intra-op threads (at::parallel_for); BLAS inside a
// parallel region runs on the calling thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

// MKL's (or any BLAS's) Fortran sgemm, column-major, 32-bit ints; libtorch_cpu exports it.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Row-major C[M x N] = A[M x K] * op(B), written as the column-major product
// C^T = op(B)^T * A^T that Fortran BLAS computes.
void gemm_row_major(bool b_transposed, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float* C, int64_t ldc) {
  const char ta = b_transposed ? 'T' : 'N', tb = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
}

// Softmax of row[0, len) in place (len >= 1), the rest of row[0, width) zeroed
// so that the PV product reads zeros there; the probabilities added to acc.
inline void causal_softmax_row(float* row, int64_t len, int64_t width, float* acc) {
  float m = row[0];
  for (int64_t j = 1; j < len; ++j) m = std::max(m, row[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) {
    const float e = std::exp(row[j] - m);
    row[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < len; ++j) {
    const float p = row[j] * inv;
    row[j] = p;
    acc[j] += p;
  }
  std::fill(row + len, row + width, 0.f);
}

}  // namespace

// q [H_kv, n_rep, T, d] fp32 contiguous, already scaled; k [H_kv, N, d];
// v [H_kv, N, d_v] or an empty tensor (column sums only). The query at row i
// sits at position N - T + i. Returns (out [H_kv, n_rep, T, d_v] or empty,
// acc [H_kv, n_rep, N]).
std::vector<at::Tensor> attention_with_column_sums(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3, "q [H_kv, n_rep, T, d], k [H_kv, N, d]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat, "fp32 q and k");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "contiguous q and k");
  const int64_t H_kv = q.size(0), n_rep = q.size(1), T = q.size(2), d = q.size(3), N = k.size(1);
  TORCH_CHECK(k.size(0) == H_kv && k.size(2) == d && T <= N, "k does not match q");
  const bool has_v = v.numel() > 0;
  if (has_v) {
    TORCH_CHECK(v.dim() == 3 && v.size(0) == H_kv && v.size(1) == N && v.scalar_type() == at::kFloat &&
                v.is_contiguous(), "v [H_kv, N, d_v] fp32 contiguous");
  }
  TORCH_CHECK(block >= 1, "block >= 1");
  const int64_t d_v = has_v ? v.size(2) : 0, offset = N - T;
  at::Tensor out = has_v ? at::empty({H_kv, n_rep, T, d_v}, q.options()) : at::empty({0}, q.options());
  const int64_t nb = (T + block - 1) / block;
  const int threads = at::get_num_threads();
  at::Tensor acc_per_thread = at::zeros({threads, H_kv, n_rep, N}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = has_v ? v.data_ptr<float>() : nullptr;
  float* op = has_v ? out.data_ptr<float>() : nullptr;
  float* accp = acc_per_thread.data_ptr<float>();
  at::parallel_for(0, H_kv * nb, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    std::vector<float> qbuf(n_rep * block * d), logits(n_rep * block * N), obuf(has_v ? n_rep * block * d_v : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / nb, t = task % nb;
      // tiles in the order first, last, second, second last, ...: a thread's
      // contiguous range of tasks then holds as many short causal rows as long ones
      const int64_t tile = (t % 2 == 0) ? t / 2 : nb - 1 - t / 2;
      const int64_t s = tile * block, rows = std::min(block, T - s), visible = offset + s + rows;
      for (int64_t r = 0; r < n_rep; ++r) {
        const float* src = qp + ((h * n_rep + r) * T + s) * d;
        std::copy(src, src + rows * d, qbuf.data() + r * rows * d);
      }
      float* L = logits.data();
      gemm_row_major(true, n_rep * rows, visible, d, qbuf.data(), d, kp + h * N * d, d, L, visible);
      for (int64_t r = 0; r < n_rep; ++r) {
        float* acc = accp + ((tid * H_kv + h) * n_rep + r) * N;
        for (int64_t i = 0; i < rows; ++i)
          causal_softmax_row(L + (r * rows + i) * visible, offset + s + i + 1, visible, acc);
      }
      if (has_v) {
        gemm_row_major(false, n_rep * rows, d_v, visible, L, visible, vp + h * N * d_v, d_v, obuf.data(), d_v);
        for (int64_t r = 0; r < n_rep; ++r)
          std::copy(obuf.data() + r * rows * d_v, obuf.data() + (r + 1) * rows * d_v,
                    op + ((h * n_rep + r) * T + s) * d_v);
      }
    }
  });
  return {out, acc_per_thread.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_with_column_sums", &attention_with_column_sums,
        "causal attention output and accumulated attention from one pass (kernels/cpu.py)");
}
