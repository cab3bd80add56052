"""How the vocabulary work is split, and how the pieces are put back together (plain torch).

* :func:`chunk_rows`: the one chunk policy, for every path that holds a slice of logits at a time
  (the Triton and C++ chunked linear paths, the vocab-parallel losses): as many rows as fit a
  byte budget of logit state.
* :func:`rescale_partials` / :func:`finish_partials`: the merge of per-split softmax statistics
  (running max, sum of exponentials, and the entropy partial ``sum exp(z - m) (z - m)``) into the
  row's ``lse`` and entropy: the tiled linear kernel merges its vocab splits with it, the
  vocab-parallel losses merge the ranks' shards with it around their all-reduces.

No Triton here: the C++ backend and ``grpo_fused.distributed`` import this module too.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "chunk_rows", "finish_partials", "logit_bytes", "rescale_partials"]

# Upper bound of the logit state held at once (a token chunk or a vocab slice). At V = 151936
# with bf16 operands (fp32 logits + bf16 dlogits = 6 bytes a logit) this is 576 tokens a chunk;
# at N = 16384 tokens, 5456 vocab columns a slice.
DEFAULT_MAX_CHUNK_BYTES = 512 * 2**20


def logit_bytes(dtype: torch.dtype, gradient_copy: bool = True) -> int:
    """Bytes held per logit of a chunk: the fp32 (fp64) logits, plus for bf16 / fp16 operands (when
    ``gradient_copy``) the operand-dtype copy of their gradient that tensor-core GEMMs read."""
    if dtype in (torch.float32, torch.float64):
        return torch.empty((), dtype=dtype).element_size()
    return 4 + (torch.empty((), dtype=dtype).element_size() if gradient_copy else 0)


def chunk_rows(n_tokens: int, vocab: int, bytes_per_logit: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    """Tokens per chunk (or, called with ``(V, N, ...)``, vocab columns per slice): as many as fit
    ``max_chunk_bytes`` of logit state (``bytes_per_logit``, see :func:`logit_bytes`), a multiple
    of 16 (GEMM-friendly), at least 16, at most ``n_tokens`` (and at least 1)."""
    rows = max(1, max_chunk_bytes // max(1, vocab * bytes_per_logit))
    rows = max(16, rows // 16 * 16)
    return max(1, min(rows, n_tokens))


def rescale_partials(part_max: Tensor, part_sum: Tensor, part_pz: Optional[Tensor], row_max: Tensor
                     ) -> Tuple[Tensor, Optional[Tensor]]:
    """One split's ``(sum exp(z - m_s), sum exp(z - m_s)(z - m_s))`` moved to the row's max ``M``.

    ``part_*`` and ``row_max`` broadcast (``(S, N)`` against ``(N,)``, or ``(N,)`` each). A split
    with nothing (sum 0, max -inf) adds 0, and an all -inf row never forms ``-inf - -inf``.
    """
    split_shift = torch.where(torch.isfinite(part_max), part_max, torch.zeros_like(part_max))
    delta = torch.where(part_sum > 0, split_shift - row_max, torch.zeros_like(part_sum))
    scale = torch.exp(delta)
    pz = None if part_pz is None else scale * (part_pz + delta * part_sum)
    return part_sum * scale, pz


def finish_partials(row_max: Tensor, total_sum: Tensor, total_pz: Optional[Tensor]
                    ) -> Tuple[Tensor, Optional[Tensor]]:
    """``(lse, entropy)`` from the merged sums: ``lse = M + log S``, ``H = log S - PZ / S``
    (no cancellation of two numbers the size of the logits)."""
    log_total = torch.log(total_sum)
    lse = row_max + log_total
    entropy = None if total_pz is None else log_total - total_pz / total_sum
    return lse, entropy
