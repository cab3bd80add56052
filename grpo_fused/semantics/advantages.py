"""The inputs of a group-advantages call, bundled the way :class:`~.tail.LossBatch` bundles a loss's."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

Tensor = torch.Tensor

__all__ = ["AdvantageRequest"]


@dataclasses.dataclass(frozen=True)
class AdvantageRequest:
    """How rewards become advantages (validated by :func:`grpo_fused.group_advantages`).

    Attributes:
        group_size / group_ids / group_offsets: exactly one group description (contiguous runs of
            a size; ``(B,)`` integer labels in any order; ``(G+1,)`` run boundaries).
        reward_weights: ``(K,)`` weights of the reward functions of ``(B, K)`` rewards, or None.
        keep_mask: ``(B,)``; a reward whose entry is 0 / False is left out of the statistics.
        scale: ``"group"``, ``"batch"`` or ``"none"`` (:data:`~.table.ADVANTAGE_SCALES`).
        unbiased: Bessel's correction. eps: added to the std.
    """

    group_size: Optional[int] = None
    group_ids: Optional[Tensor] = None
    group_offsets: Optional[Tensor] = None
    reward_weights: Optional[Tensor] = None
    keep_mask: Optional[Tensor] = None
    scale: str = "group"
    unbiased: bool = True
    eps: float = 1e-4

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments of :func:`grpo_fused.reference.group_advantages`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
