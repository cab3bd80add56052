"""The neutral semantics layer: what the loss *is*, independent of how any backend computes it.

Only torch is imported here, and nothing of the package above. Every other layer reads its
definitions from here, once:

* :mod:`.config`: :class:`GRPOConfig`, the user's description of a loss (TRL's names), validated.
* :mod:`.table`: the loss-type table (surrogate family, ratio level, normalizer, TRL / verl
  names, metrics) and the closed sets of names (KL estimators, ``loss_agg_mode``, advantage
  scales) with the integer codes the kernels specialize on.
* :mod:`.params`: :class:`LossParams`, the one object that carries a loss's hyperparameters from
  the API to every op: a :class:`LossSpec` that selects code and a float64 tensor of values.
* :mod:`.sampling`: :class:`SamplingRule`, the sampler's truncation (top-k, top-p, min-p).
* :mod:`.reduction`: the reduction as per-token weights.
* :mod:`.terms`: ratio, surrogates, KL estimators, clip flags and metrics on ``(B, T)`` tensors.
* :mod:`.tail`: :class:`LossBatch` (a call's per-token inputs) and the ``(B, T)`` tail of the loss.
* :mod:`.advantages`: :class:`AdvantageRequest` (a group-advantages call's inputs).
* :mod:`.outputs`: :class:`GRPOOutput`, :class:`GroupStats`.

``compute_dtype`` is the one rule for the accumulation dtype: fp64 stays fp64 (``gradcheck``),
everything else is computed in fp32.
"""

import torch

from .advantages import AdvantageRequest
from .config import GRPOConfig
from .outputs import GroupStats, GRPOOutput
from .params import (Hyper, LossParams, LossSpec, NUM_SLOTS, NUM_TAIL_SLOTS, Option, Slot, TailSlot, sampling_options,
                     vocab_values)
from .sampling import TOP_K_TIES, ExplicitSupport, SamplingRule
from .reduction import entropy_weights, reduce_loss, reduce_tokens, token_weights
from .table import *  # noqa: F401,F403  (the table's names, listed in its __all__)
from .tail import LossBatch, grpo_loss_from_logps, grpo_output, shown
from .terms import (clip_flags, importance_log_ratio, kl_estimate, masked, masked_rows, masked_sequence_mean, metric_mean,
                    policy_token_loss, token_metrics)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of all token math for inputs of ``dtype``: fp64 stays fp64, the rest is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = [
    "ADVANTAGE_SCALES", "AdvantageRequest", "AdvantageScale", "CLIP_METRICS", "ExplicitSupport", "GRPOConfig", "GRPOOutput",
    "GroupStats", "Hyper", "IS_LEVELS", "KLEstimator", "KL_ESTIMATOR_ALIASES", "KL_ESTIMATOR_NAMES",
    "LOSS_AGG_MODES", "LOSS_TYPES", "LOSS_TYPE_ALIASES", "LossBatch", "LossParams", "LossSpec", "LossType",
    "NUM_SLOTS", "NUM_TAIL_SLOTS", "Normalizer", "Option", "SamplingRule", "Slot", "Surrogate", "TOP_K_TIES", "TailSlot", "clip_flags", "compute_dtype", "entropy_weights",
    "grpo_loss_from_logps", "grpo_output", "importance_log_ratio", "kl_estimate", "loss_type_named", "masked",
    "masked_rows", "masked_sequence_mean", "metric_mean", "normalizer_of", "policy_token_loss", "reduce_loss",
    "reduce_tokens", "sampling_options", "shown", "token_metrics", "token_weights", "vocab_values",
]
