"""The loss-type table and the other closed sets of names the loss is built from.

One row per loss type says everything the rest of the package needs to know about it: the
surrogate family (which epilogue a fused kernel runs, or that none does), whether its ratio is
always a sequence ratio, the normalizer of its reduction (TRL 1.16's, exactly), the names TRL and
verl give it and the metrics it reports. Adding a loss type is one row here, its surrogate in
:mod:`grpo_fused.semantics.terms` and, where ``fused_epilogue`` is set, its epilogue in each fused
backend; the config, the reduction weights, the data-parallel normalizers and the TRL / verl
adapters read the row.

The enums' integer values are the codes the kernels specialize on (``tl.constexpr``); nothing
else may depend on them.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, Optional, Tuple

__all__ = [
    "ADVANTAGE_SCALES",
    "AdvantageScale",
    "CLIP_METRICS",
    "DPPO_METRICS",
    "IS_LEVELS",
    "KLEstimator",
    "KL_ESTIMATOR_ALIASES",
    "KL_ESTIMATOR_NAMES",
    "LOSS_AGG_MODES",
    "LOSS_TYPES",
    "LOSS_TYPE_ALIASES",
    "LossType",
    "Normalizer",
    "Surrogate",
    "loss_type_named",
    "normalizer_of",
]


class Surrogate(enum.IntEnum):
    """The policy term's family; the value is the fused epilogue's ``LOSS`` code."""

    CLIP = 0  # PPO clipped ratio, TRL two-sided delta, verl dual-clip
    CISPO = 1  # -sg(clipped ratio) * A * logp
    SAPO = 2  # soft gate sigmoid(tau (r - 1)) * 4 / tau
    GPG = 3  # REINFORCE: -A * logp, no ratio
    GEO_MEAN = 4  # GMPO: sequence geometric mean of sign-aware clipped token ratios
    # verl 0.9.1's further policy losses; no fused epilogue implements these (they run the tail).
    DPPO_TV = 5  # -A * sg(min(r, c)) * logp on tokens whose probability moved less than eps (TV)
    DPPO_KL = 6  # the same with the binary-KL trust region
    CLIP_COV = 7  # PPO clip, gradient cut on a random few high-covariance tokens of the batch
    KL_COV = 8  # -A * r, plus coef * |log r| on the batch's highest-covariance tokens
    DRO = 9  # -(A * logp - beta/2 * (logp - old)^2)


class KLEstimator(enum.IntEnum):
    """Per-token KL estimators; the value is the fused epilogue's ``KL`` code."""

    K3 = 0  # exp(ref - logp) - (ref - logp) - 1 (TRL)
    LOW_VAR_KL = 1  # k3 with verl's clamps
    K1 = 2  # logp - ref
    K2 = 3  # 0.5 (logp - ref)^2
    ABS = 4  # |logp - ref|


KL_ESTIMATOR_NAMES: Dict[str, KLEstimator] = {
    "k3": KLEstimator.K3,
    "low_var_kl": KLEstimator.LOW_VAR_KL,
    "k1": KLEstimator.K1,
    "k2": KLEstimator.K2,
    "abs": KLEstimator.ABS,
}
KL_ESTIMATOR_ALIASES = {"kl": "k1", "mse": "k2"}


class Normalizer(enum.Enum):
    """How the per-token losses are reduced to one number (see :mod:`grpo_fused.semantics.reduction`).

    TRL 1.16's normalizers, then verl's ``loss_agg_mode`` (value = verl's name).
    """

    SEQUENCE_MEAN = "sequence-mean"  # mean over sequences of sum_t l*m / max(sum_t m, 1)
    LOCAL_TOKEN_MEAN = "local-token-mean"  # sum l*m / max(sum m, 1)
    FIXED_LENGTH = "fixed-length"  # sum l*m / (B * max_completion_length)
    GLOBAL_TOKENS = "global-tokens"  # sum l*m / num_items_in_batch (default sum m)
    SEQUENCE_SUM_MEAN = "sequence-sum-mean"  # mean over sequences of sum_t l*m
    # verl agg_loss (global normalizers times dp_size).
    VERL_TOKEN_MEAN = "token-mean"
    VERL_TOKEN_SUM = "token-sum"  # sum l*m * dp_size (verl 0.9.1)
    VERL_SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    VERL_SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    VERL_SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"


LOSS_AGG_MODES: Tuple[str, ...] = tuple(n.value for n in Normalizer if n.name.startswith("VERL_"))

# TRL's clip metrics; the extremes are over sequences of the per-sequence clipped fraction.
CLIP_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)
# dppo_tv / dppo_kl: fraction of tokens outside the trust region (their gradient is 0) and of
# tokens inside it whose ratio the cap truncated.
DPPO_METRICS = ("dppo/masked_mean", "dppo/truncated_mean")


@dataclasses.dataclass(frozen=True)
class LossType:
    """One row of the loss-type table.

    Attributes:
        name: the TRL 1.16 ``loss_type`` (or this package's name where TRL has none).
        surrogate: the policy term's family.
        normalizer: the reduction when no verl ``loss_agg_mode`` is given.
        sequence_ratio: the ratio is a sequence quantity whatever ``importance_sampling_level``.
        in_trl: TRL 1.16's ``GRPOTrainer`` accepts this name.
        verl_names: verl policy-loss names that mean this loss type.
        metrics: metric names beyond ``kl`` / ``entropy`` / ``ratio`` that this loss reports.
        fused_epilogue: the fused token-level kernel (``kernels/grpo_logits.py``) implements this
            surrogate in its epilogue. When False, every backend runs the vocab pass and then the
            ``(B, T)`` tail (:func:`grpo_fused.semantics.grpo_output`), as for sequence-level ratios.
        batch_coupled: a token's loss depends on the other tokens of the batch (clip_cov and kl_cov
            choose tokens by a covariance over the batch): the loss of a batch split into
            micro-batches or data-parallel ranks is not the sum of the parts' losses, and the
            choice costs a host sync.
    """

    name: str
    surrogate: Surrogate
    normalizer: Normalizer
    sequence_ratio: bool = False
    in_trl: bool = True
    verl_names: Tuple[str, ...] = ()
    metrics: Tuple[str, ...] = ()
    fused_epilogue: bool = True
    batch_coupled: bool = False


_ROWS = (
    LossType("grpo", Surrogate.CLIP, Normalizer.SEQUENCE_MEAN, metrics=CLIP_METRICS),
    LossType("bnpo", Surrogate.CLIP, Normalizer.LOCAL_TOKEN_MEAN, metrics=CLIP_METRICS),
    LossType("dr_grpo", Surrogate.CLIP, Normalizer.FIXED_LENGTH, metrics=CLIP_METRICS),
    LossType("dapo", Surrogate.CLIP, Normalizer.GLOBAL_TOKENS, verl_names=("vanilla",), metrics=CLIP_METRICS),
    LossType("luspo", Surrogate.CLIP, Normalizer.SEQUENCE_SUM_MEAN, metrics=CLIP_METRICS),
    LossType("cispo", Surrogate.CISPO, Normalizer.GLOBAL_TOKENS, metrics=("cispo_clip_ratio",)),
    LossType("sapo", Surrogate.SAPO, Normalizer.SEQUENCE_MEAN),
    LossType("gmpo", Surrogate.GEO_MEAN, Normalizer.SEQUENCE_MEAN, sequence_ratio=True, in_trl=False,
             verl_names=("geo_mean",), fused_epilogue=False),
    LossType("gpg", Surrogate.GPG, Normalizer.GLOBAL_TOKENS, in_trl=False, verl_names=("reinforce",)),
    # verl 0.9.1 policy losses (verl's own names; verl's default aggregation is token-mean).
    LossType("dppo_tv", Surrogate.DPPO_TV, Normalizer.GLOBAL_TOKENS, in_trl=False, metrics=DPPO_METRICS,
             fused_epilogue=False),
    LossType("dppo_kl", Surrogate.DPPO_KL, Normalizer.GLOBAL_TOKENS, in_trl=False, metrics=DPPO_METRICS,
             fused_epilogue=False),
    LossType("clip_cov", Surrogate.CLIP_COV, Normalizer.GLOBAL_TOKENS, in_trl=False,
             metrics=CLIP_METRICS + ("clip_cov/cut_mean",), fused_epilogue=False, batch_coupled=True),
    LossType("kl_cov", Surrogate.KL_COV, Normalizer.GLOBAL_TOKENS, in_trl=False,
             metrics=("kl_cov/penalized_mean", "abs_log_ratio"), fused_epilogue=False, batch_coupled=True),
    LossType("dro", Surrogate.DRO, Normalizer.GLOBAL_TOKENS, in_trl=False, fused_epilogue=False),
)

LOSS_TYPES: Dict[str, LossType] = {row.name: row for row in _ROWS}
LOSS_TYPE_ALIASES: Dict[str, str] = {alias: row.name for row in _ROWS for alias in row.verl_names}

IS_LEVELS = ("token", "sequence")


def loss_type_named(name: str) -> Optional[LossType]:
    """The row for a TRL name or a verl alias; None when the name is unknown."""
    return LOSS_TYPES.get(LOSS_TYPE_ALIASES.get(name, name))


def normalizer_of(loss_type: LossType, loss_agg_mode: Optional[str]) -> Normalizer:
    """The loss type's own normalizer, or verl's ``loss_agg_mode`` when one is given."""
    return loss_type.normalizer if loss_agg_mode is None else Normalizer(loss_agg_mode)


class AdvantageScale(enum.IntEnum):
    """What the group-centred reward is divided by; the value is the kernels' ``SCALE`` code."""

    GROUP = 0  # the group's std + eps (GRPO)
    BATCH = 1  # the std of every valid reward + eps (LitePPO)
    NONE = 2  # nothing (Dr. GRPO)


ADVANTAGE_SCALES: Dict[str, AdvantageScale] = {s.name.lower(): s for s in AdvantageScale}
