// Every operator schema of smtc_fast in one place: this file is the C++ API (house style rule 1).
// Kernels register per backend in csrc/<op>/<op>_cpu.cpp and <op>_cuda.cpp; the Python side
// (smtc_fast/ops/) adds the fake kernels, autograd and the pure-PyTorch references.
//
// The same schemas are defined a second time in the namespace smtc_fast_cuda_emu when the CPU execution tier of the
// CUDA kernels is built (SMTC_WITH_CUDA_EMU, setup.py): torch.ops.smtc_fast_cuda_emu.<op> runs the CUDA wrapper and
// its .cu launchers on CPU tensors (common/cuda_emu.h).
#include <torch/library.h>

namespace {

void define_schemas(torch::Library& m) {
  // C[b, n, m] = <a[b, n], b[b, m]>: a (B, N, D), b (B, M, D) -> (B, N, M).
  m.def("correlation(Tensor a, Tensor b) -> Tensor");
  m.def("_correlation_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)");

  // One slot-attention step for both SMTC stages: logits (B, G, P, N) (softmax over P), values (B, N, D),
  // mask (B, G, N) or None, eps -> updates (B, G, P, D), attn (B, G, P, N). Stage 1 is G = 1, P = S.
  // residual (B, G, P, D) or None: updates = residual + attn @ values (the slot attention's s + attn.v, one pass).
  m.def("slot_aggregate(Tensor logits, Tensor values, Tensor? mask, float eps, Tensor? residual=None) -> "
        "(Tensor, Tensor)");
  m.def(
      "_slot_aggregate_backward(Tensor grad_updates, Tensor? grad_attn, Tensor logits, Tensor values, "
      "Tensor? mask, Tensor attn, float eps) -> (Tensor, Tensor)");

  // Log-domain Sinkhorn: cost (B, N, M), log_mu (B, N), log_nu (B, M) -> plan (B, N, M), f (B, N), g (B, M).
  m.def("sinkhorn(Tensor cost, Tensor log_mu, Tensor log_nu, float eps, int iters, float? tol) "
        "-> (Tensor, Tensor, Tensor)");
  m.def(
      "_sinkhorn_backward(Tensor grad_plan, Tensor grad_f, Tensor grad_g, Tensor cost, Tensor log_mu, "
      "Tensor log_nu, float eps, int iters, float? tol) -> Tensor");

  // Fused L_sem (spec §2.1, csrc/transport_loss/transport_loss.h): student_logits, teacher_logits (B, T, S, n),
  // teacher_keys (B, T, n, D) -> loss (), targets (B, T, S, n) (sum over j != i of plan_ij @ p_t_j^T, saved for
  // the backward). The Sinkhorn plans and costs are never materialised; only student_logits gets a gradient.
  m.def("transport_loss(Tensor student_logits, Tensor teacher_logits, Tensor teacher_keys, float eps, int iters, "
        "str marginals, str cost) -> (Tensor, Tensor)");
  m.def("_transport_loss_backward(Tensor grad_loss, Tensor student_logits, Tensor targets) -> Tensor");

  // Fused label propagation (CRW / SMTC protocol, csrc/propagate/propagate.h): query (N, D), first_feats (N0, D),
  // first_labels (N0, K), ctx_feats (n, N, D), ctx_labels (n, N, K), grid (h, w) with h*w = N -> labels (N, K).
  // Top-k over frame 0 (all tokens) and the context frames (disc dist < radius on the grid), softmax(logit / T).
  m.def("propagate_labels(Tensor query, Tensor first_feats, Tensor first_labels, Tensor ctx_feats, "
        "Tensor ctx_labels, int[] grid, int topk, float radius, float temperature) -> Tensor");
}

// CPU-only operators: no CUDA kernel, so no twin in the CUDA execution tier's namespace.
void define_cpu_only_schemas(torch::Library& m) {
  // DAVIS semi-supervised J and F counts of the pairs (k, k) (csrc/jf_counts/jf_counts.h; the evaluator's scorer):
  // pred, gt (T, H, W) uint8/int32/int64 label maps, objects 1..n_objects, radius in pixels -> (T, n_objects, 6)
  // int64 = inter, union, fg_match, gt_match, n_fg, n_gt.
  m.def("jf_counts(Tensor pred, Tensor gt, int n_objects, int radius) -> Tensor");
}

}  // namespace

TORCH_LIBRARY(smtc_fast, m) {
  define_schemas(m);
  define_cpu_only_schemas(m);
}

#if defined(SMTC_WITH_CUDA_EMU)
TORCH_LIBRARY(smtc_fast_cuda_emu, m) { define_schemas(m); }
#endif
