"""GRPOConfig: every knob of the GRPO-family loss, validated once at construction.

Field names and defaults follow TRL 1.16's ``GRPOConfig`` where TRL has the knob
(``loss_type="dapo"``, ``epsilon_low=0.2``, ``beta=0.0``, ``use_bias_correction_kl=True``,
``sapo_temperature_pos=1.0``, ``sapo_temperature_neg=1.05``); verl-only knobs
(``clip_ratio_c``, ``kl_estimator``, ``loss_agg_mode``, ``dp_size``) default to "off".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

# TRL 1.16 names, plus the verl surrogates the spec adds (gmpo = verl "geo_mean", gpg).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "gmpo", "gpg")
# verl policy-loss names accepted as aliases.
LOSS_TYPE_ALIASES = {"geo_mean": "gmpo", "vanilla": "dapo", "reinforce": "gpg"}
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IS_LEVELS = ("token", "sequence")
# k3 is TRL's estimator verbatim; low_var_kl is verl's clamped k3; k1/k2/abs as verl's kl_penalty.
KL_ESTIMATORS = ("k3", "low_var_kl", "k1", "k2", "abs")
KL_ESTIMATOR_ALIASES = {"kl": "k1", "mse": "k2"}
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of the GRPO-family loss.

    Args:
        loss_type: surrogate and (unless ``loss_agg_mode`` is set) reduction, one of
            ``grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, gmpo, gpg`` (verl aliases
            ``geo_mean`` -> gmpo, ``vanilla`` -> dapo, ``reinforce`` -> gpg). Default ``"dapo"``.
        epsilon_low: lower clip, ratio clipped to ``[1 - epsilon_low, 1 + epsilon_high]``.
            For ``gmpo`` both epsilons bound the *log* ratio, as in verl. Default 0.2.
        epsilon_high: upper clip; ``None`` means ``epsilon_low``. For ``cispo`` it is the
            absolute cap of the ratio (TRL), e.g. 4.0 or 5.0.
        delta: TRL two-sided clipping: the unclipped ratio is capped at ``delta``. Default off.
        clip_ratio_c: verl dual-clip bound (> 1): for ``A < 0`` the token loss is at most
            ``-A * clip_ratio_c``. Default off.
        beta: KL coefficient; ``beta != 0`` needs ``ref_logps``. Default 0.
        kl_estimator: ``k3`` (TRL, default), ``low_var_kl`` (verl's clamped k3), ``k1``, ``k2``, ``abs``.
        use_bias_correction_kl: multiply the KL by the importance ratio (TRL, default True).
        temperature: logits are divided by it before the softmax. Default 1.0.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO). Default ``"token"``.
        sapo_temperature_pos / sapo_temperature_neg: SAPO gate temperatures (TRL 1.0 / 1.05).
        cispo_two_sided: verl CISPO: clamp the ratio to ``[1-epsilon_low, 1+epsilon_high]``
            instead of TRL's one-sided cap at ``epsilon_high``. Default False.
        entropy_coef: subtract ``entropy_coef * masked-mean entropy`` from the loss. Default 0.
        compute_entropy: compute per-token entropy (for the metric) in the same pass. Default True.
        loss_agg_mode: verl aggregation (``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``) instead of the loss_type's
            TRL normalizer. Default None.
        max_completion_length: ``dr_grpo`` normalizer ``B * max_completion_length``; None means
            the mask's T. Also verl's ``seq-mean-token-sum-norm`` scale factor.
        dp_size: verl's data-parallel factor for ``loss_agg_mode`` reductions. Default 1.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = True
    temperature: float = 1.0
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    cispo_two_sided: bool = False
    entropy_coef: float = 0.0
    compute_entropy: bool = True
    loss_agg_mode: Optional[str] = None
    max_completion_length: Optional[int] = None
    dp_size: int = 1

    def __post_init__(self):
        loss_type = LOSS_TYPE_ALIASES.get(self.loss_type, self.loss_type)
        if loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} (or a verl alias {tuple(LOSS_TYPE_ALIASES)}), "
                f"got {self.loss_type!r}"
            )
        object.__setattr__(self, "loss_type", loss_type)
        kl = KL_ESTIMATOR_ALIASES.get(self.kl_estimator, self.kl_estimator)
        if kl not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        object.__setattr__(self, "kl_estimator", kl)
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )
        if self.loss_agg_mode is not None and self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be None or one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        _check_finite("epsilon_low", self.epsilon_low, minimum=0.0)
        if self.epsilon_high is not None:
            _check_finite("epsilon_high", self.epsilon_high, minimum=0.0)
        _check_finite("beta", self.beta)
        _check_finite("entropy_coef", self.entropy_coef)
        _check_finite("temperature", self.temperature, positive=True)
        _check_finite("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        _check_finite("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        if self.delta is not None:
            _check_finite("delta", self.delta, positive=True)
        if self.clip_ratio_c is not None:
            _check_finite("clip_ratio_c", self.clip_ratio_c)
            if self.clip_ratio_c <= 1.0:
                raise ValueError(f"clip_ratio_c must be > 1 (verl dual-clip), got {self.clip_ratio_c}")
        if self.max_completion_length is not None and (
            not isinstance(self.max_completion_length, int) or self.max_completion_length < 1
        ):
            raise ValueError(f"max_completion_length must be a positive int, got {self.max_completion_length!r}")
        if not isinstance(self.dp_size, int) or self.dp_size < 1:
            raise ValueError(f"dp_size must be a positive int, got {self.dp_size!r}")

    @property
    def eps_high(self) -> float:
        """The upper clip in force: ``epsilon_high``, or ``epsilon_low`` when that is None."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def is_sequence_level(self) -> bool:
        """True when the policy term needs per-sequence sums (GSPO ratio or GMPO)."""
        return self.importance_sampling_level == "sequence" or self.loss_type == "gmpo"

    def replace(self, **changes) -> "GRPOConfig":
        return dataclasses.replace(self, **changes)


def _check_finite(name, value, minimum=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
