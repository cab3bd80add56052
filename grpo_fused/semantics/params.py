"""Loss hyperparameters as data: the one object that travels from the API to every op.

:class:`LossParams` has two halves:

* ``spec`` (:class:`LossSpec`): everything that changes *which code runs*: the loss-type row,
  the normalizer, token- or sequence-level ratio, the KL estimator (None when ``beta == 0``) and
  on/off options. Kernels specialize on these (``tl.constexpr``, Python branches), so a new value
  may compile new code.
* ``values``: every float hyperparameter a kernel reads, in one ``(NUM_SLOTS,)`` float64 tensor
  at the fixed slots of :class:`Slot`. Kernels read it from memory and the ``(B, T)`` math
  indexes it, so a new ``beta`` or temperature is new data: ``torch.compile(fullgraph=True)`` of
  a training step that receives a new :class:`~grpo_fused.GRPOConfig` reuses its graph (Dynamo
  guards on a tensor's metadata, not its contents), and no Triton kernel recompiles.
* ``tail_values``: the float hyperparameters that only the ``(B, T)`` tail reads (those of
  surrogates without a fused epilogue: clip-cov, kl-cov, DRO), ``(NUM_TAIL_SLOTS,)`` float64 at
  the slots of :class:`TailSlot`. They are data in the same way; they live in their own tensor so
  that adding one leaves the kernels' ``values`` layout (their ABI; the C++ ops check its
  length) unchanged.

float64 keeps every value exactly as the caller wrote it; each consumer rounds it once to its
compute dtype, as a Python float argument would have been rounded.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .sampling import SamplingRule
from .table import KLEstimator, LossType, Normalizer

Tensor = torch.Tensor

__all__ = ["Hyper", "LossParams", "LossSpec", "NUM_SLOTS", "NUM_TAIL_SLOTS", "Option", "Slot", "TailSlot",
           "sampling_options", "sampling_slots", "vocab_values"]


class Slot(enum.IntEnum):
    """Index of each float hyperparameter in :attr:`LossParams.values` (kernels load these slots)."""

    INV_TEMPERATURE = 0  # 1 / temperature: the vocab pass multiplies the logits by it
    TEMPERATURE = 1
    EPSILON_LOW = 2
    EPSILON_HIGH = 3  # epsilon_high, or epsilon_low when that is None; cispo's cap
    CLIP_LOW = 4  # 1 - epsilon_low, rounded once from float64
    CLIP_HIGH = 5  # 1 + epsilon_high
    DELTA = 6  # TRL two-sided clipping cap (0 when off)
    CLIP_RATIO_C = 7  # verl dual-clip bound (0 when off); dppo's cap of the detached ratio (default 20)
    BETA = 8
    SAPO_TAU_POS = 9
    SAPO_TAU_NEG = 10
    ENTROPY_COEF = 11
    TOP_K = 12  # sampling support: tokens top-k keeps (0 when off)
    TOP_P = 13  # sampling support: top-p mass (1 when off)
    LOG_MIN_P = 14  # sampling support: log(min_p) (-inf when off)


NUM_SLOTS = len(Slot)


class TailSlot(enum.IntEnum):
    """Index of each tail-only float hyperparameter in :attr:`LossParams.tail_values` (no kernel reads these)."""

    CLIP_COV_RATIO = 0  # clip_cov: fraction of the batch's tokens whose gradient is cut
    CLIP_COV_LB = 1  # clip_cov: covariance window (lb, ub) of the candidates
    CLIP_COV_UB = 2
    KL_COV_RATIO = 3  # kl_cov: fraction of the batch's tokens that get the |log r| penalty
    PPO_KL_COEF = 4  # kl_cov: coefficient of that penalty
    DRO_BETA = 5  # dro: coefficient of the quadratic log-ratio penalty


NUM_TAIL_SLOTS = len(TailSlot)


class Option(enum.IntFlag):
    """On/off choices that select code paths; the fused kernels receive them as one int."""

    DELTA = 1  # TRL two-sided clipping
    DUAL_CLIP = 2  # verl dual-clip
    CISPO_TWO_SIDED = 4  # verl's [1 - eps_low, 1 + eps_high] clamp instead of TRL's cap
    BIAS_CORRECT_KL = 8  # KL times the importance ratio (TRL use_bias_correction_kl)
    COMPUTE_ENTROPY = 16  # per-token entropy in the vocab pass
    ENTROPY_BONUS = 32  # subtract entropy_coef * masked-mean entropy
    SAMPLING_SUPPORT = 64  # score tokens under the sampler's truncated distribution (SamplingRule)
    TOP_K_ALL_TIES = 128  # top-k keeps every token tied with the k-th (vLLM's PyTorch path)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What selects code: compared by value, so equal specs share compiled code.

    Attributes:
        loss_type: the row of the loss-type table.
        normalizer: the reduction (the row's own, or verl's ``loss_agg_mode``).
        sequence_level: the ratio is the masked geometric mean over the sequence (GSPO, GMPO).
        kl: the KL estimator, None when ``beta == 0`` (no KL term, no ``ref_logps`` needed).
        options: :class:`Option` flags.
        max_completion_length: ``dr_grpo``'s and ``seq-mean-token-sum-norm``'s length; None = T.
        dp_size: verl's data-parallel factor of the ``loss_agg_mode`` reductions.
    """

    loss_type: LossType
    normalizer: Normalizer
    sequence_level: bool = False
    kl: Optional[KLEstimator] = None
    options: Option = Option(0)
    max_completion_length: Optional[int] = None
    dp_size: int = 1

    def has(self, option: Option) -> bool:
        return bool(self.options & option)

    @property
    def compute_entropy(self) -> bool:
        return self.has(Option.COMPUTE_ENTROPY)

    @property
    def entropy_bonus(self) -> bool:
        return self.has(Option.ENTROPY_BONUS)


class Hyper(NamedTuple):
    """The float hyperparameters as 0-dim tensors of one dtype and device (field = lower-case slot)."""

    inv_temperature: Tensor
    temperature: Tensor
    epsilon_low: Tensor
    epsilon_high: Tensor
    clip_low: Tensor
    clip_high: Tensor
    delta: Tensor
    clip_ratio_c: Tensor
    beta: Tensor
    sapo_tau_pos: Tensor
    sapo_tau_neg: Tensor
    entropy_coef: Tensor
    top_k: Tensor
    top_p: Tensor
    log_min_p: Tensor
    clip_cov_ratio: Tensor
    clip_cov_lb: Tensor
    clip_cov_ub: Tensor
    kl_cov_ratio: Tensor
    ppo_kl_coef: Tensor
    dro_beta: Tensor


assert Hyper._fields == tuple(s.name.lower() for s in Slot) + tuple(s.name.lower() for s in TailSlot), (
    "Hyper must list the slots, then the tail slots, in order")


def _zero_tail_values() -> Tensor:
    return torch.zeros(NUM_TAIL_SLOTS, dtype=torch.float64, device="cpu")


@dataclasses.dataclass(frozen=True, eq=False)
class LossParams:
    """``spec`` (code selection) plus ``values`` (``(NUM_SLOTS,)`` float64 CPU tensor: the floats
    kernels read) and ``tail_values`` (``(NUM_TAIL_SLOTS,)`` float64 CPU tensor: the floats only
    the ``(B, T)`` tail reads)."""

    spec: LossSpec
    values: Tensor
    tail_values: Tensor = dataclasses.field(default_factory=_zero_tail_values)
    _device_values: Dict[Tuple[str, torch.device], Tensor] = dataclasses.field(default_factory=dict, repr=False)

    @staticmethod
    def build(spec: LossSpec, **floats: float) -> "LossParams":
        """``LossParams`` with the given slots (lower-case :class:`Slot` or :class:`TailSlot` names)
        set, the sampling-support slots off and the others 0."""
        values = torch.zeros(NUM_SLOTS, dtype=torch.float64, device="cpu")
        for slot, value in sampling_slots(None).items():
            values[slot] = value
        tail_values = _zero_tail_values()
        for name, value in floats.items():
            if name.upper() in TailSlot.__members__:
                tail_values[TailSlot[name.upper()]] = float(value)
            else:
                values[Slot[name.upper()]] = float(value)
        return LossParams(spec, values, tail_values)

    def _on(self, name: str, device: torch.device) -> Tensor:
        host = getattr(self, name)
        device = torch.device(device)
        if device.type == "cpu":
            return host
        if torch.compiler.is_compiling():
            return host.to(device, non_blocking=True)
        key = (name, device)
        if key not in self._device_values:
            self._device_values[key] = host.to(device, non_blocking=True)
        return self._device_values[key]

    def values_on(self, device: torch.device) -> Tensor:
        """``values`` on ``device`` (float64). Eagerly the copy is made once per device and kept;
        a traced graph copies (a tiny host-to-device transfer that waits for nothing)."""
        return self._on("values", device)

    def hyper(self, dtype: torch.dtype, device: torch.device) -> Hyper:
        """Every float hyperparameter (kernel and tail slots) as a 0-dim ``dtype`` tensor on
        ``device`` (one cast, one unbind per tensor)."""
        return Hyper(*self.values_on(device).to(dtype).unbind(),
                     *self._on("tail_values", device).to(dtype).unbind())


def vocab_values(temperature: float, sampling: Optional[SamplingRule] = None) -> Tensor:
    """The ``values`` of a bare vocabulary pass (``selective_log_softmax``): the temperature and
    sampling-support slots."""
    values = torch.zeros(NUM_SLOTS, dtype=torch.float64, device="cpu")
    values[Slot.TEMPERATURE] = float(temperature)
    values[Slot.INV_TEMPERATURE] = 1.0 / float(temperature)
    for slot, value in sampling_slots(sampling).items():
        values[slot] = value
    return values


def sampling_slots(sampling: Optional[SamplingRule]) -> Dict[Slot, float]:
    """The sampling-support slots of ``sampling`` (every stage off for None)."""
    rule = sampling or SamplingRule()
    return {Slot.TOP_K: float(rule.top_k or 0), Slot.TOP_P: rule.p, Slot.LOG_MIN_P: rule.log_min_p}


def sampling_options(sampling: Optional[SamplingRule]) -> Option:
    """The :class:`Option` flags of ``sampling``: none unless some stage can drop a token."""
    if sampling is None or not sampling.active:
        return Option(0)
    options = Option.SAMPLING_SUPPORT
    if sampling.top_k is not None and sampling.top_k_ties == "all":
        options |= Option.TOP_K_ALL_TIES
    return options
