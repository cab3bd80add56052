// Schemas of the grpo_fused_cpp operators. CPU kernels are in log_softmax.cpp and advantages.cpp;
// fake (meta) kernels and autograd formulas are registered from Python (grpo_fused/backends/cpp.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu_kernels.h"

TORCH_LIBRARY(grpo_fused_cpp, m) {
  // params: the float64 hyperparameter vector of grpo_fused.semantics.Slot (params.h); the ops read
  // the temperature there, so a new temperature is data, not a new traced graph.
  // logits (N, V) or (B, T, V), unit stride over V; ids (N,) int64. Returns fp32 (fp64 for fp64
  // logits) (logps (N,), lse (N,), entropy (N,) or (0,) when compute_entropy is false).
  m.def("logits_fwd(Tensor logits, Tensor ids, Tensor params, bool compute_entropy)"
        " -> (Tensor logps, Tensor lse, Tensor entropy)");
  // The same under the sampler's truncated distribution (sampling support): the rule's numbers are
  // params' top_k / top_p / log_min_p slots, top_k_all_ties the tie rule (Option.TOP_K_ALL_TIES). Also
  // returns each row's cutoff (N, 2) float64 [tau, tie_end] (cpu_kernels.h), for the backward.
  m.def("logits_fwd_support(Tensor logits, Tensor ids, Tensor params, bool compute_entropy, bool top_k_all_ties)"
        " -> (Tensor logps, Tensor lse, Tensor entropy, Tensor cutoff)");
  // dlogits (shape and dtype of logits). grad_entropy (0,) means no entropy gradient. cutoff: the
  // support forward's (zero gradient at dropped tokens), None for the plain forward.
  m.def("logits_bwd(Tensor grad_logps, Tensor grad_entropy, Tensor logits, Tensor ids, Tensor lse,"
        " Tensor entropy, Tensor params, Tensor? cutoff=None) -> Tensor");
  // The same gradient written over logits.
  m.def("logits_bwd_inplace(Tensor grad_logps, Tensor grad_entropy, Tensor(a!) logits, Tensor ids, Tensor lse,"
        " Tensor entropy, Tensor params, Tensor? cutoff=None) -> ()");
  // hidden (N, H), weight (V, H), bias (V,): logits computed chunk_rows tokens at a time.
  m.def("linear_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor params,"
        " bool compute_entropy, int chunk_rows) -> (Tensor logps, Tensor lse, Tensor entropy)");
  m.def("linear_fwd_support(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor params,"
        " bool compute_entropy, int chunk_rows, bool top_k_all_ties)"
        " -> (Tensor logps, Tensor lse, Tensor entropy, Tensor cutoff)");
  // (dhidden (N, H), dweight (V, H), dbias (V,)); dweight / dbias are (0,) when not asked for.
  m.def("linear_bwd(Tensor grad_logps, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor? bias,"
        " Tensor ids, Tensor lse, Tensor entropy, Tensor params, int chunk_rows, bool compute_dweight,"
        " bool compute_dbias, Tensor? cutoff=None)"
        " -> (Tensor dhidden, Tensor dweight, Tensor dbias)");
  // rewards (B,) combined, group_index (B,) int64, keep_mask (B,) bool or (0,); scale_mode the
  // code of grpo_fused.semantics.AdvantageScale (params.h). Returns (advantages (B,), mean (G,), std (G,), count (G,), zero_std (G,)).
  m.def("group_advantages(Tensor rewards, Tensor group_index, int num_groups, Tensor keep_mask,"
        " int scale_mode, bool unbiased, float eps)"
        " -> (Tensor advantages, Tensor mean, Tensor std, Tensor count, Tensor zero_std)");
  // Which compiled variant of the row kernels the ops run on this CPU now: "baseline", "avx2" or
  // "avx512" (cpu_dispatch.cpp; GRPO_FUSED_CPU_CAPABILITY caps it). No tensors: a catch-all kernel.
  m.def("cpu_capability() -> str", &grpo_fused_cpp::cpu_capability);
}

// Lets a build from setup.py be imported as the Python module grpo_fused._C; importing it
// loads the library and so runs the registrations above.
static struct PyModuleDef grpo_fused_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&grpo_fused_module); }
