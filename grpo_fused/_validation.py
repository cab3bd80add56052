"""Input checks shared by every entry point.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value)
naming the argument, before any kernel runs. Nothing here modifies its inputs.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .config import GRPOConfig

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)

# The id range check reads the ids, which on a GPU is one host sync; set
# GRPO_FUSED_CHECK_IDS=0 to skip it once a pipeline is known to be correct.
_CHECK_IDS = os.environ.get("GRPO_FUSED_CHECK_IDS", "1") != "0"


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(name: str, t, *, ndim: Optional[Sequence[int]] = None, kind: Optional[str] = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {_fmt(t.shape)}")
    if kind == "float" and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if kind == "int" and t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")
    if kind == "mask" and not (t.dtype == torch.bool or t.dtype in INT_DTYPES or t.dtype in FLOAT_DTYPES):
        raise TypeError(f"{name} must be bool, integer or float, got {t.dtype}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others):
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_ids_in_range(name: str, ids: torch.Tensor, vocab_size: int):
    if not _CHECK_IDS or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocab size), found {bad}")


def check_config(config) -> GRPOConfig:
    if config is None:
        return GRPOConfig()
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a grpo_fused.GRPOConfig, got {type(config).__name__}")
    return config


def check_loss_inputs(
    *,
    features_name: str,
    features: torch.Tensor,
    completion_ids,
    advantages,
    completion_mask,
    old_logps,
    ref_logps,
    is_weights,
    config: GRPOConfig,
    vocab_size: int,
):
    """Checks for grpo_loss / linear_grpo_loss; ``features`` is the logits or the hidden states."""
    check_tensor(features_name, features, ndim=(3,), kind="float")
    B, T = features.shape[0], features.shape[1]
    check_tensor("completion_ids", completion_ids, ndim=(2,), kind="int")
    if tuple(completion_ids.shape) != (B, T):
        raise ValueError(
            f"completion_ids must have shape {_fmt((B, T))} to match {features_name} "
            f"{_fmt(features.shape)}, got {_fmt(completion_ids.shape)}"
        )
    check_tensor("advantages", advantages, ndim=(1, 2), kind="float")
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"advantages must have shape ({B},), ({B}, 1) or ({B}, {T}), got {_fmt(advantages.shape)}")
    if completion_mask is not None:
        check_tensor("completion_mask", completion_mask, ndim=(2,), kind="mask")
        if tuple(completion_mask.shape) != (B, T):
            raise ValueError(f"completion_mask must have shape ({B}, {T}), got {_fmt(completion_mask.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None:
            check_tensor(name, t, ndim=(2,), kind="float")
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape ({B}, {T}), got {_fmt(t.shape)}")
    if is_weights is not None:
        check_tensor("is_weights", is_weights, ndim=(1, 2), kind="float")
        if tuple(is_weights.shape) not in ((B,), (B, 1), (B, T)):
            raise ValueError(f"is_weights must have shape ({B},), ({B}, 1) or ({B}, {T}), got {_fmt(is_weights.shape)}")
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when config.beta != 0 (beta={config.beta})")
    check_same_device(
        features_name,
        features,
        completion_ids=completion_ids,
        advantages=advantages,
        completion_mask=completion_mask,
        old_logps=old_logps,
        ref_logps=ref_logps,
        is_weights=is_weights,
    )
    check_ids_in_range("completion_ids", completion_ids, vocab_size)


def check_normalizer(name: str, value):
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {_fmt(value.shape)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_linear_weights(hidden: torch.Tensor, weight, bias):
    check_tensor("weight", weight, ndim=(2,), kind="float")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last dim, got {_fmt(weight.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,), kind="float")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {_fmt(bias.shape)}")
    check_same_device("hidden", hidden, weight=weight, bias=bias)


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
