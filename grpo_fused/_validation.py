"""Input checks, in one place, for every entry point (the public API and the distributed losses).

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value)
naming the argument, before any kernel runs. Nothing here modifies its inputs, and nothing reads
a config's float fields (a traced graph must not depend on them; see
:mod:`grpo_fused.semantics.params`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .semantics import ExplicitSupport, GRPOConfig, LossBatch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)

# The id range check reads the ids, which on a GPU is one host sync; set
# GRPO_FUSED_CHECK_IDS=0 to skip it once a pipeline is known to be correct.
CHECK_IDS = os.environ.get("GRPO_FUSED_CHECK_IDS", "1") != "0"


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


def check_ids_in_range(name: str, ids: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor] = None):
    """Ids in ``[0, vocab_size)``; with ``mask``, only the masked-in ones (padding such as -100 at
    a masked position is allowed: it is never read). One host sync (skipped when traced)."""
    if not CHECK_IDS or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if mask is not None:
        ids = torch.where(mask != 0, ids, torch.zeros_like(ids))
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = " at a masked-in position" if mask is not None else ""
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocab size){where}, found {bad}")


def check_inplace_target(name: str, t: torch.Tensor):
    """``inplace_backward`` writes the gradient over ``t``: refuse memory where two elements share
    an address (a stride-0 dim, rows closer than their length), which would get a wrong gradient."""
    extent = 1  # elements spanned by the dims walked so far, smallest stride first
    for stride, size in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < extent:
            raise ValueError(
                f"inplace_backward=True needs {name} whose elements do not share memory (an expanded or "
                f"overlapping view would get a wrong gradient), got shape {tuple(t.shape)} strides {t.stride()}; "
                f"pass a contiguous copy or inplace_backward=False"
            )
        extent += stride * (size - 1)


def check_config(config) -> GRPOConfig:
    if config is None:
        return GRPOConfig()
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a grpo_fused.GRPOConfig, got {type(config).__name__}")
    return config


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_positive_int(name: str, value, optional: bool = True):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a positive int, got {value!r}")


def check_normalizer(name: str, value):
    """A Python number must be finite and > 0. A tensor (one element, float or integer) is not read
    (no host sync): ``num_items_in_batch`` is clamped to >= 1 token as TRL clamps it (a value <= 0
    acts as 1), ``global_batch_size`` divides as given (verl's rule; :func:`dp_normalizers` makes it
    fractional); a NaN gives a NaN loss and an infinite one a loss of 0 (README, Semantics)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {_fmt(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a float or integer tensor, got {value.dtype}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_loss_inputs(features_name: str, features: torch.Tensor, batch: LossBatch, config: GRPOConfig):
    """Checks of a loss call's ``(B, T)`` inputs against ``features`` ``(B, T, D)`` (logits or
    hidden states); the id range is checked separately, against the vocabulary size."""
    check_tensor(features_name, features, ndim=(3,), kind="float")
    B, T = features.shape[0], features.shape[1]
    if features_name == "logits" and features.shape[-1] < 1:
        raise ValueError(f"logits must have a vocab dim V >= 1, got shape {_fmt(features.shape)}")
    check_tensor("completion_ids", batch.completion_ids, ndim=(2,), kind="int")
    if tuple(batch.completion_ids.shape) != (B, T):
        raise ValueError(
            f"completion_ids must have shape {_fmt((B, T))} to match {features_name} "
            f"{_fmt(features.shape)}, got {_fmt(batch.completion_ids.shape)}"
        )
    per_sequence = ((B,), (B, 1), (B, T))
    for name in ("advantages", "is_weights"):
        t = getattr(batch, name)
        if t is None and name == "is_weights":
            continue
        check_tensor(name, t, ndim=(1, 2), kind="float")
        if tuple(t.shape) not in per_sequence:
            raise ValueError(f"{name} must have shape ({B},), ({B}, 1) or ({B}, {T}), got {_fmt(t.shape)}")
    if batch.completion_mask is not None:
        check_tensor("completion_mask", batch.completion_mask, ndim=(2,), kind="mask")
        if tuple(batch.completion_mask.shape) != (B, T):
            raise ValueError(f"completion_mask must have shape ({B}, {T}), got {_fmt(batch.completion_mask.shape)}")
    for name in ("old_logps", "ref_logps"):
        t = getattr(batch, name)
        if t is not None:
            check_tensor(name, t, ndim=(2,), kind="float")
            if tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape ({B}, {T}), got {_fmt(t.shape)}")
    if config.params.spec.kl is not None and batch.ref_logps is None:
        raise ValueError(f"ref_logps is required when config.beta != 0 (beta={config.beta})")
    check_same_device(
        features_name,
        features,
        completion_ids=batch.completion_ids,
        advantages=batch.advantages,
        completion_mask=batch.completion_mask,
        old_logps=batch.old_logps,
        ref_logps=batch.ref_logps,
        is_weights=batch.is_weights,
    )
    check_normalizer("num_items_in_batch", batch.num_items_in_batch)
    check_normalizer("global_batch_size", batch.global_batch_size)


def check_vocab_inputs(features_name: str, features, ids, temperature, vocab_name: str = "V"):
    """``features`` ``(..., V)`` float with V >= 1, ``ids`` ``(...)`` integer of the same leading shape."""
    check_tensor(features_name, features, kind="float")
    if features.dim() < 1 or features.shape[-1] < 1:
        raise ValueError(f"{features_name} must be (..., {vocab_name}) with {vocab_name} >= 1, got shape {_fmt(features.shape)}")
    check_tensor("ids", ids, kind="int")
    if tuple(ids.shape) != tuple(features.shape[:-1]):
        raise ValueError(
            f"ids must have shape {_fmt(features.shape[:-1])} ({features_name} without {vocab_name}), got {_fmt(ids.shape)}"
        )
    check_same_device(features_name, features, ids=ids)
    check_temperature(temperature)


def check_linear_weights(hidden: torch.Tensor, weight, bias, weight_name: str = "weight", bias_name: str = "bias"):
    """``weight`` ``(V, H)`` with V >= 1 matching ``hidden`` ``(..., H)``; ``bias`` ``(V,)`` or None."""
    check_tensor(weight_name, weight, ndim=(2,), kind="float")
    if weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(
            f"{weight_name} must have shape (V, {hidden.shape[-1]}) with V >= 1 to match hidden's last dim, "
            f"got {_fmt(weight.shape)}"
        )
    if bias is not None:
        check_tensor(bias_name, bias, ndim=(1,), kind="float")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{bias_name} must have shape ({weight.shape[0]},), got {_fmt(bias.shape)}")
    check_same_device("hidden", hidden, **{weight_name: weight, bias_name: bias})


def check_linear_inputs(hidden, weight, ids, temperature, bias=None, weight_name="weight", bias_name="bias"):
    """:func:`check_vocab_inputs` of ``hidden`` ``(..., H)`` plus :func:`check_linear_weights`."""
    check_vocab_inputs("hidden", hidden, ids, temperature, vocab_name="H")
    check_linear_weights(hidden, weight, bias, weight_name, bias_name)


def check_explicit_support(support, num_positions: int, vocab_size: int, device: torch.device):
    """``support`` is an :class:`ExplicitSupport` of ``num_positions`` CSR rows of distinct ids in
    ``[0, vocab_size)``. Reading offsets and ids is one host sync (skipped when traced)."""
    if not isinstance(support, ExplicitSupport):
        raise TypeError(f"support must be a grpo_fused.ExplicitSupport(offsets, ids), got {type(support).__name__}")
    check_tensor("support.offsets", support.offsets, ndim=(1,), kind="int")
    check_tensor("support.ids", support.ids, ndim=(1,), kind="int")
    if support.offsets.shape[0] != num_positions + 1:
        raise ValueError(f"support.offsets must have shape ({num_positions + 1},) (one row per position, plus one), "
                         f"got {_fmt(support.offsets.shape)}")
    for name, t in (("support.offsets", support.offsets), ("support.ids", support.ids)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the logits are on {device}")
    if torch.compiler.is_compiling():
        return
    offsets = support.offsets.detach().cpu().long()
    nnz = support.ids.numel()
    if offsets[0] != 0 or offsets[-1] != nnz or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"support.offsets must rise from 0 to {nnz} (the number of support.ids)")
    if nnz == 0:
        return
    ids = support.ids.detach().long()
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"support.ids must lie in [0, {vocab_size}) (the vocab size), found {lo if lo < 0 else hi}")
    rows = torch.repeat_interleave(torch.arange(num_positions), offsets[1:] - offsets[:-1]).to(ids.device)
    keys = torch.sort(rows * vocab_size + ids).values
    if bool((keys[1:] == keys[:-1]).any()):
        raise ValueError("support.ids must be distinct within each position")
