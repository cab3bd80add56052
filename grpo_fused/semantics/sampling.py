"""The sampler's truncation rule: which tokens vLLM could have sampled at a position.

vLLM samples with temperature plus top-k / top-p / min-p truncation and renormalizes over the
tokens it keeps (the *support*). A trainer that scores the sampled token under the full softmax
measures another policy than the one that sampled it: with ``top_p = 0.9`` the importance ratio
of an on-policy token settles near the kept mass, not 1. :class:`SamplingRule` states the
truncation so that every vocabulary pass can score tokens under the distribution the sampler
actually used; the dense definition is :func:`grpo_fused.reference.sampling_support`.

The rule is vLLM's V1 sampler (``vllm/v1/sample/sampler.py``, ``ops/topk_topp_sampler.py`` and
the min-p logits processor, commit ``01fa3fe74b058bb604f236341ab2361c7cf3d25b``), applied to
``z = logits / temperature``:

1. min-p: keep ``z`` with ``softmax(z) >= min_p * max softmax(z)``, i.e. ``z - max z >= log(min_p)``;
2. top-k on the survivors: keep the ``k`` largest;
3. top-p on the survivors: renormalize, walk the tokens from the most to the least probable and
   keep each one whose preceding mass is below ``p`` (vLLM's ascending cumulative sum
   ``<= 1 - p`` dropped, written from the top); the most probable token is always kept.

Ties are ordered by token id, lowest first (a stable order by descending ``z``): ``top_k`` keeps
exactly ``k`` tokens as vLLM's Triton top-k/top-p kernel does (its CUDA default), and top-p's
walk meets tied tokens lowest id first. ``top_k_ties="all"`` keeps every token tied with the
``k``-th instead, as vLLM's PyTorch path (``apply_top_k_top_p_pytorch``) does.

Kernels read the numbers as data (the ``TOP_K``, ``TOP_P`` and ``LOG_MIN_P`` slots of
:class:`~grpo_fused.semantics.Slot`, a new ``top_p`` compiles nothing) and specialize on
:attr:`Option.SAMPLING_SUPPORT` and :attr:`Option.TOP_K_ALL_TIES` only.

**Kernel form.** Every stage keeps a prefix of the order (descending ``z``, then ascending id), so
the support of a row is one cutoff ``(tau, ties_kept)``: token ``v`` is kept when ``z[v] > tau``, or
``z[v] == tau`` and fewer than ``ties_kept`` tokens with ``z == tau`` have a lower id (equivalently:
``z[v] == tau`` and ``v`` below the id ``tie_end`` just past the last kept tie, the form the Triton
kernels store, which a vocabulary slice can use without counting earlier columns). A kernel finds
the cutoff with a bounded number of sweeps over the row (no sort, no ``(N, V)`` mask), in the
compute dtype, from ``z`` computed exactly as its vocabulary pass computes it; the top-p mass is
then summed in that dtype, so a token whose preceding mass lies within rounding of ``p`` may fall
on the other side than in the float64 reference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch

Tensor = torch.Tensor

__all__ = ["ExplicitSupport", "SamplingRule", "TOP_K_TIES"]

# "exact": exactly k tokens, tied ones lowest id first (vLLM's Triton kernel); "all": every token
# tied with the k-th (vLLM's PyTorch path).
TOP_K_TIES = ("exact", "all")


@dataclasses.dataclass(frozen=True)
class SamplingRule:
    """vLLM's truncation of ``softmax(logits / temperature)``; None (or ``top_p = 1``, ``min_p = 0``)
    leaves a stage off.

    Args:
        top_k: keep the ``top_k`` most probable tokens (int >= 1).
        top_p: keep the smallest most-probable prefix whose mass reaches ``top_p`` (in ``(0, 1]``).
        min_p: keep tokens at least ``min_p`` times as probable as the most probable (in ``[0, 1)``).
        top_k_ties: ``"exact"`` (default) or ``"all"``, see the module docstring.

    Every argument is checked here: ``TypeError`` for a wrong type, ``ValueError`` out of range,
    naming the argument.
    """

    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    top_k_ties: str = "exact"

    def __post_init__(self):
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                raise TypeError(f"top_k must be an int or None, got {type(self.top_k).__name__}")
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1 (None turns it off), got {self.top_k}")
        _check_probability("top_p", self.top_p, low_open=True, high_open=False)
        _check_probability("min_p", self.min_p, low_open=False, high_open=True)
        if self.top_k_ties not in TOP_K_TIES:
            raise ValueError(f"top_k_ties must be one of {TOP_K_TIES}, got {self.top_k_ties!r}")

    @property
    def active(self) -> bool:
        """True when some stage can drop a token (``top_p = 1`` and ``min_p = 0`` drop none)."""
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0) or bool(self.min_p)

    @property
    def log_min_p(self) -> float:
        """``log(min_p)``; ``-inf`` when min-p is off (every ``z - max z`` passes)."""
        return math.log(self.min_p) if self.min_p else -math.inf

    @property
    def p(self) -> float:
        """The top-p mass (1.0 when off)."""
        return 1.0 if self.top_p is None else float(self.top_p)

    def describe(self) -> str:
        parts = [f"{name}={value}" for name, value in
                 (("top_k", self.top_k), ("top_p", self.top_p), ("min_p", self.min_p)) if value is not None]
        if self.top_k is not None and self.top_k_ties != "exact":
            parts.append(f"top_k_ties={self.top_k_ties!r}")
        return ", ".join(parts) or "no truncation"


def _check_probability(name: str, value, low_open: bool, high_open: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval} (None turns it off), got {value}")


class ExplicitSupport(NamedTuple):
    """The kept token ids of every position, for a sampler whose rule is not :class:`SamplingRule`:
    CSR rows over the positions of ``ids`` in row-major order (``N = ids.numel()`` rows).

    Attributes:
        offsets: ``(N + 1,)`` integer, ``0 = offsets[0] <= ... <= offsets[N] = len(ids)``; position
            ``n`` keeps ``ids[offsets[n]:offsets[n + 1]]``.
        ids: ``(nnz,)`` integer token ids in ``[0, V)``, distinct within a position.
    """

    offsets: Tensor
    ids: Tensor
