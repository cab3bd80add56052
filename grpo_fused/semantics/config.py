"""GRPOConfig: every knob of the GRPO-family loss, validated once at construction.

Field names and defaults follow TRL 1.16's ``GRPOConfig`` where TRL has the knob
(``loss_type="dapo"``, ``epsilon_low=0.2``, ``beta=0.0``, ``use_bias_correction_kl=True``,
``sapo_temperature_pos=1.0``, ``sapo_temperature_neg=1.05``); verl-only knobs
(``clip_ratio_c``, ``kl_estimator``, ``loss_agg_mode``, ``dp_size``) default to "off", and the
parameters of verl 0.9.1's further policy losses (``clip_cov_*``, ``kl_cov_ratio``,
``ppo_kl_coef``, ``dro_beta``) take the defaults of verl's ``PolicyLossConfig``.

A config is turned into :class:`~grpo_fused.semantics.LossParams` once, at construction
(``config.params``): the ops read only that, so the float fields are data to them. A new config
that differs in floats alone re-runs no compilation (see :mod:`.params`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .params import LossParams, LossSpec, Option, sampling_options, sampling_slots
from .sampling import SamplingRule
from .table import (
    IS_LEVELS,
    KL_ESTIMATOR_ALIASES,
    KL_ESTIMATOR_NAMES,
    LOSS_AGG_MODES,
    LOSS_TYPE_ALIASES,
    LOSS_TYPES,
    Surrogate,
    loss_type_named,
    normalizer_of,
)

__all__ = ["GRPOConfig"]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of the GRPO-family loss.

    Every field is checked at construction (``TypeError`` for a wrong type, ``ValueError`` for a
    value out of range, naming the field). Ranges follow TRL's and verl's own checks where they
    have them (verl asserts ``clip_ratio_c > 1``; ``temperature > 0`` as both samplers need) and
    otherwise what keeps the loss defined.

    Args:
        loss_type: surrogate and (unless ``loss_agg_mode`` is set) reduction, one of
            ``grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, gmpo, gpg`` (verl aliases
            ``geo_mean`` -> gmpo, ``vanilla`` -> dapo, ``reinforce`` -> gpg) or verl 0.9.1's
            ``dppo_tv, dppo_kl, clip_cov, kl_cov, dro`` (token-mean reduction by default, as verl).
            Default ``"dapo"``.
        epsilon_low: lower clip (>= 0), ratio clipped to ``[1 - epsilon_low, 1 + epsilon_high]``.
            For ``gmpo`` both epsilons bound the *log* ratio, as in verl. For ``dppo_tv`` /
            ``dppo_kl`` they are the trust region's thresholds (probability change, binary KL)
            for tokens with ``A <= 0`` (low) and ``A > 0`` (high). Default 0.2.
        epsilon_high: upper clip (>= 0); ``None`` means ``epsilon_low``. For ``cispo`` it is the
            absolute cap of the ratio (TRL), e.g. 4.0 or 5.0.
        delta: TRL two-sided clipping (> 0): the unclipped ratio is capped at ``delta``. Default off.
        clip_ratio_c: verl dual-clip bound (> 1): for ``A < 0`` the token loss is at most
            ``-A * clip_ratio_c``. Default off. For ``dppo_tv`` / ``dppo_kl`` (> 0): the cap of the
            detached ratio, default 20.0 as in verl.
        beta: KL coefficient (>= 0); ``beta != 0`` needs ``ref_logps``. Default 0.
        kl_estimator: ``k3`` (TRL, default), ``low_var_kl`` (verl's clamped k3), ``k1``, ``k2``, ``abs``
            (verl aliases ``kl`` -> k1, ``mse`` -> k2).
        use_bias_correction_kl: multiply the KL by the importance ratio (TRL, default True).
        temperature: logits are divided by it before the softmax (> 0). Default 1.0.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO). Default ``"token"``.
        sapo_temperature_pos / sapo_temperature_neg: SAPO gate temperatures (> 0; TRL 1.0 / 1.05).
        cispo_two_sided: verl CISPO: clamp the ratio to ``[1-epsilon_low, 1+epsilon_high]``
            instead of TRL's one-sided cap at ``epsilon_high``. Default False.
        entropy_coef: subtract ``entropy_coef * masked-mean entropy`` from the loss. Default 0.
        compute_entropy: compute per-token entropy (for the metric) in the same pass. Default True.
        loss_agg_mode: verl aggregation (``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``, ``token-sum``) instead of the loss_type's
            TRL normalizer. Default None.
        max_completion_length: ``dr_grpo`` normalizer ``B * max_completion_length`` (int >= 1); None
            means the mask's T. Also verl's ``seq-mean-token-sum-norm`` scale factor.
        dp_size: verl's data-parallel factor for ``loss_agg_mode`` reductions (int >= 1). Default 1.
        clip_cov_ratio: ``clip_cov``: fraction of the batch's tokens whose gradient is cut (> 0).
            Default 0.0002.
        clip_cov_lb / clip_cov_ub: ``clip_cov``: the covariance window of the candidate tokens.
            Defaults 1.0 / 5.0.
        kl_cov_ratio: ``kl_cov``: fraction of the batch's tokens penalized by ``|log r|`` (> 0).
            Default 0.0002.
        ppo_kl_coef: ``kl_cov``: coefficient of that penalty. Default 0.1.
        dro_beta: ``dro``: coefficient of the quadratic log-ratio penalty (> 0); required for dro.
        top_k / top_p / min_p / top_k_ties: the sampler's truncation (vLLM's V1 sampler, see
            :class:`~grpo_fused.semantics.SamplingRule`): log-probs and entropy are those of the
            truncated, renormalized ``softmax(logits / temperature)``, gradients reach the kept
            logits only, and a masked-in token outside the support leaves the loss (it cannot come
            from that sampler) and is counted in the ``sampling/outside_support`` metric. None
            (default) means off; ``top_k >= 1``, ``top_p`` in ``(0, 1]``, ``min_p`` in ``[0, 1)``.

    Attributes:
        params: the :class:`~grpo_fused.semantics.LossParams` every op reads (built here).
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
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1
    dro_beta: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    top_k_ties: str = "exact"
    params: LossParams = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_choice("loss_type", self.loss_type, tuple(LOSS_TYPES) + tuple(LOSS_TYPE_ALIASES))
        object.__setattr__(self, "loss_type", loss_type_named(self.loss_type).name)
        _check_choice("kl_estimator", self.kl_estimator, tuple(KL_ESTIMATOR_NAMES) + tuple(KL_ESTIMATOR_ALIASES))
        object.__setattr__(self, "kl_estimator", KL_ESTIMATOR_ALIASES.get(self.kl_estimator, self.kl_estimator))
        _check_choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        if self.loss_agg_mode is not None:
            _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_float("epsilon_low", self.epsilon_low, minimum=0.0)
        _check_float("epsilon_high", self.epsilon_high, minimum=0.0, optional=True)
        _check_float("delta", self.delta, positive=True, optional=True)
        _check_float("clip_ratio_c", self.clip_ratio_c, optional=True)
        surrogate = LOSS_TYPES[self.loss_type].surrogate
        dppo = surrogate in (Surrogate.DPPO_TV, Surrogate.DPPO_KL)
        if dppo:
            if self.clip_ratio_c is not None and self.clip_ratio_c <= 0.0:
                raise ValueError(f"clip_ratio_c must be > 0 (the cap of dppo's ratio), got {self.clip_ratio_c}")
        elif self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (verl dual-clip), got {self.clip_ratio_c}")
        _check_float("clip_cov_ratio", self.clip_cov_ratio, positive=True)
        _check_float("clip_cov_lb", self.clip_cov_lb)
        _check_float("clip_cov_ub", self.clip_cov_ub)
        _check_float("kl_cov_ratio", self.kl_cov_ratio, positive=True)
        _check_float("ppo_kl_coef", self.ppo_kl_coef)
        _check_float("dro_beta", self.dro_beta, positive=True, optional=True)
        if surrogate is Surrogate.DRO and self.dro_beta is None:
            raise ValueError("dro_beta is required (> 0) when loss_type='dro'")
        token_only = surrogate in (Surrogate.DPPO_TV, Surrogate.DPPO_KL, Surrogate.KL_COV, Surrogate.DRO)
        if token_only and self.importance_sampling_level != "token":
            raise ValueError(f"loss_type={self.loss_type!r} has a token-level ratio only (verl), "
                             f"got importance_sampling_level={self.importance_sampling_level!r}")
        if token_only and self.delta is not None:
            raise ValueError(f"delta (TRL two-sided clipping) does not apply to loss_type={self.loss_type!r}")
        _check_float("beta", self.beta, minimum=0.0)
        _check_float("entropy_coef", self.entropy_coef)
        _check_float("temperature", self.temperature, positive=True)
        _check_float("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        _check_float("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        for name in ("use_bias_correction_kl", "cispo_two_sided", "compute_entropy"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_int("max_completion_length", self.max_completion_length, optional=True)
        _check_int("dp_size", self.dp_size)
        self.sampling  # validates top_k, top_p, min_p, top_k_ties
        object.__setattr__(self, "params", self._build_params())

    def _build_params(self) -> LossParams:
        row = LOSS_TYPES[self.loss_type]
        options = Option(0)
        for flag, on in (
            (Option.DELTA, self.delta is not None),
            (Option.DUAL_CLIP, self.clip_ratio_c is not None),
            (Option.CISPO_TWO_SIDED, self.cispo_two_sided),
            (Option.BIAS_CORRECT_KL, self.use_bias_correction_kl and self.beta != 0.0),
            (Option.COMPUTE_ENTROPY, self.compute_entropy),
            (Option.ENTROPY_BONUS, self.compute_entropy and self.entropy_coef != 0.0),
        ):
            if on:
                options |= flag
        options |= sampling_options(self.sampling)
        spec = LossSpec(
            loss_type=row,
            normalizer=normalizer_of(row, self.loss_agg_mode),
            sequence_level=row.sequence_ratio or self.importance_sampling_level == "sequence",
            kl=None if self.beta == 0.0 else KL_ESTIMATOR_NAMES[self.kl_estimator],
            options=options,
            max_completion_length=self.max_completion_length,
            dp_size=self.dp_size,
        )
        eps_high = self.eps_high
        clip_ratio_c = self.clip_ratio_c
        if clip_ratio_c is None:
            # dppo's ratio cap defaults to verl's 20.0; elsewhere 0 means "no dual clip".
            clip_ratio_c = 20.0 if row.surrogate in (Surrogate.DPPO_TV, Surrogate.DPPO_KL) else 0.0
        return LossParams.build(
            spec,
            inv_temperature=1.0 / self.temperature,
            temperature=self.temperature,
            epsilon_low=self.epsilon_low,
            epsilon_high=eps_high,
            clip_low=1.0 - self.epsilon_low,
            clip_high=1.0 + eps_high,
            delta=0.0 if self.delta is None else self.delta,
            clip_ratio_c=clip_ratio_c,
            beta=self.beta,
            sapo_tau_pos=self.sapo_temperature_pos,
            sapo_tau_neg=self.sapo_temperature_neg,
            entropy_coef=self.entropy_coef,
            clip_cov_ratio=self.clip_cov_ratio,
            clip_cov_lb=self.clip_cov_lb,
            clip_cov_ub=self.clip_cov_ub,
            kl_cov_ratio=self.kl_cov_ratio,
            ppo_kl_coef=self.ppo_kl_coef,
            dro_beta=0.0 if self.dro_beta is None else self.dro_beta,
            **{slot.name.lower(): value for slot, value in sampling_slots(self.sampling).items()},
        )

    @property
    def sampling(self) -> SamplingRule:
        """The sampler's truncation rule (every stage off by default)."""
        return SamplingRule(self.top_k, self.top_p, self.min_p, self.top_k_ties)

    @property
    def eps_high(self) -> float:
        """The upper clip in force: ``epsilon_high``, or ``epsilon_low`` when that is None."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def is_sequence_level(self) -> bool:
        """True when the policy term needs per-sequence sums (GSPO ratio or GMPO)."""
        return self.params.spec.sequence_level

    def replace(self, **changes) -> "GRPOConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_float(name, value, minimum=None, positive=False, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float{' or None' if optional else ''}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_int(name, value, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
