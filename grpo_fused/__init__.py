"""grpo-fused: fused GRPO-family losses for LLM RL training.

Quick use::

    import grpo_fused as gf
    cfg = gf.GRPOConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04)
    out = gf.grpo_loss(logits, completion_ids, advantages, completion_mask,
                       old_logps=old, ref_logps=ref, config=cfg)
    out.loss.backward()
"""

from .api import (
    group_advantages,
    grpo_loss,
    linear_grpo_loss,
    linear_log_softmax,
    selective_log_softmax,
)
from . import distributed
from .modules import GRPOLoss, LinearGRPOLoss
from .semantics import ExplicitSupport, GRPOConfig, GroupStats, GRPOOutput, SamplingRule

__version__ = "0.1.0"

__all__ = [
    "ExplicitSupport",
    "GRPOConfig",
    "GRPOLoss",
    "GRPOOutput",
    "GroupStats",
    "LinearGRPOLoss",
    "SamplingRule",
    "distributed",
    "group_advantages",
    "grpo_loss",
    "linear_grpo_loss",
    "linear_log_softmax",
    "selective_log_softmax",
]
