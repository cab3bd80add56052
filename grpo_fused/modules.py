"""``nn.Module`` forms of the losses, for trainers that hold a loss object."""

from __future__ import annotations

from typing import Optional

import torch

from . import api
from .semantics import GRPOConfig, GRPOOutput


class GRPOLoss(torch.nn.Module):
    """``GRPOLoss(config)(logits, completion_ids, advantages, completion_mask, old_logps, ref_logps)``.

    Holds a :class:`GRPOConfig` and a backend; ``forward`` takes the arguments of
    :func:`grpo_fused.grpo_loss` and returns its :class:`GRPOOutput`.
    """

    def __init__(self, config: Optional[GRPOConfig] = None, backend: str = "auto"):
        super().__init__()
        self.config = GRPOConfig() if config is None else config
        self.backend = backend

    def forward(
        self, logits, completion_ids, advantages, completion_mask=None, old_logps=None, ref_logps=None,
        *, is_weights=None, num_items_in_batch=None, global_batch_size=None,
    ) -> GRPOOutput:
        return api.grpo_loss(
            logits, completion_ids, advantages, completion_mask, old_logps, ref_logps,
            config=self.config, is_weights=is_weights, num_items_in_batch=num_items_in_batch,
            global_batch_size=global_batch_size, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, backend={self.backend!r}"


class LinearGRPOLoss(torch.nn.Module):
    """``LinearGRPOLoss(config)(hidden, weight, completion_ids, advantages, ...)``: the loss from
    hidden states and the lm_head weight, logits never materialized by the fused backends.

    ``forward`` takes the arguments of :func:`grpo_fused.linear_grpo_loss`.
    """

    def __init__(
        self,
        config: Optional[GRPOConfig] = None,
        strategy: str = "auto",
        backend: str = "auto",
        chunk_size: Optional[int] = None,
        filter_eps: Optional[float] = None,
    ):
        super().__init__()
        self.config = GRPOConfig() if config is None else config
        self.strategy = strategy
        self.backend = backend
        self.chunk_size = chunk_size
        self.filter_eps = filter_eps

    def forward(
        self, hidden, weight, completion_ids, advantages, completion_mask=None, old_logps=None, ref_logps=None,
        *, bias=None, is_weights=None, num_items_in_batch=None, global_batch_size=None,
    ) -> GRPOOutput:
        return api.linear_grpo_loss(
            hidden, weight, completion_ids, advantages, completion_mask, old_logps, ref_logps,
            bias=bias, config=self.config, is_weights=is_weights, num_items_in_batch=num_items_in_batch,
            global_batch_size=global_batch_size, strategy=self.strategy, chunk_size=self.chunk_size,
            filter_eps=self.filter_eps, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, strategy={self.strategy!r}, backend={self.backend!r}"
