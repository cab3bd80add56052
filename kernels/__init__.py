"""Triton kernels of grpo-fused, installed as ``grpo_fused.kernels``: one file per op.

================================  ============================================================
``common``                        codes, row layout, launch config, the row softmax pass, op
                                  registration (shared by every kernel file)
``selective_log_softmax``         vocab pass forward / backward (``logps``, ``lse``, entropy)
``grpo_logits``                   the token-level loss: vocab pass + GRPO epilogue
``linear_chunked``                hidden states -> log-probs by token chunks (GEMM + row kernels)
``linear_tiled``                  hidden states -> log-probs with logit tiles on chip
``group_advantages``              segmented group statistics and advantages
``sampling_support``              per-row cutoff of a sampling rule (top-k / top-p / min-p)
``splits``                        chunk policy and split merge (plain torch, no Triton)
================================  ============================================================

The kernel files need Triton; importing this package does not. The kernels run on CUDA
tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slowly; the test suite uses small
shapes there). Nothing here imports the spec (:mod:`grpo_fused.reference`) or a layer above it;
the loss-type table and the parameter slots come from :mod:`grpo_fused.semantics`.
"""
