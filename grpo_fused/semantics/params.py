"""Loss hyperparameters as data: the one object that travels from the API to every op.

:class:`LossParams` has two halves:

* ``spec`` (:class:`LossSpec`): everything that changes *which code runs*: the loss-type row,
  the normalizer, token- or sequence-level ratio, the KL estimator (None when ``beta == 0``) and
  on/off options. Kernels specialize on these (``tl.constexpr``, Python branches), so a new value
  may compile new code.
* ``values``: every float hyperparameter in one ``(NUM_SLOTS,)`` float64 tensor, at the fixed
  slots of :class:`Slot`. Kernels read it from memory and the ``(B, T)`` math indexes it, so a
  new ``beta`` or temperature is new data: ``torch.compile(fullgraph=True)`` of a training step
  that receives a new :class:`~grpo_fused.GRPOConfig` reuses its graph (Dynamo guards on a
  tensor's metadata, not its contents), and no Triton kernel recompiles.

float64 keeps every value exactly as the caller wrote it; each consumer rounds it once to its
compute dtype, as a Python float argument would have been rounded.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Dict, NamedTuple, Optional

import torch

from .table import KLEstimator, LossType, Normalizer

Tensor = torch.Tensor

__all__ = ["Hyper", "LossParams", "LossSpec", "NUM_SLOTS", "Option", "Slot", "vocab_values"]


class Slot(enum.IntEnum):
    """Index of each float hyperparameter in :attr:`LossParams.values` (kernels load these slots)."""

    INV_TEMPERATURE = 0  # 1 / temperature: the vocab pass multiplies the logits by it
    TEMPERATURE = 1
    EPSILON_LOW = 2
    EPSILON_HIGH = 3  # epsilon_high, or epsilon_low when that is None; cispo's cap
    CLIP_LOW = 4  # 1 - epsilon_low, rounded once from float64
    CLIP_HIGH = 5  # 1 + epsilon_high
    DELTA = 6  # TRL two-sided clipping cap (0 when off)
    CLIP_RATIO_C = 7  # verl dual-clip bound (0 when off)
    BETA = 8
    SAPO_TAU_POS = 9
    SAPO_TAU_NEG = 10
    ENTROPY_COEF = 11


NUM_SLOTS = len(Slot)


class Option(enum.IntFlag):
    """On/off choices that select code paths; the fused kernels receive them as one int."""

    DELTA = 1  # TRL two-sided clipping
    DUAL_CLIP = 2  # verl dual-clip
    CISPO_TWO_SIDED = 4  # verl's [1 - eps_low, 1 + eps_high] clamp instead of TRL's cap
    BIAS_CORRECT_KL = 8  # KL times the importance ratio (TRL use_bias_correction_kl)
    COMPUTE_ENTROPY = 16  # per-token entropy in the vocab pass
    ENTROPY_BONUS = 32  # subtract entropy_coef * masked-mean entropy


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


assert Hyper._fields == tuple(s.name.lower() for s in Slot), "Hyper must list the slots in order"


@dataclasses.dataclass(frozen=True, eq=False)
class LossParams:
    """``spec`` (code selection) plus ``values`` (``(NUM_SLOTS,)`` float64 CPU tensor of floats)."""

    spec: LossSpec
    values: Tensor
    _device_values: Dict[torch.device, Tensor] = dataclasses.field(default_factory=dict, repr=False)

    @staticmethod
    def build(spec: LossSpec, **floats: float) -> "LossParams":
        """``LossParams`` with the given slots (lower-case slot names) set and the others 0."""
        values = torch.zeros(NUM_SLOTS, dtype=torch.float64, device="cpu")
        for name, value in floats.items():
            values[Slot[name.upper()]] = float(value)
        return LossParams(spec, values)

    def values_on(self, device: torch.device) -> Tensor:
        """``values`` on ``device`` (float64). Eagerly the copy is made once per device and kept;
        a traced graph copies (a tiny host-to-device transfer that waits for nothing)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.values
        if torch.compiler.is_compiling():
            return self.values.to(device, non_blocking=True)
        if device not in self._device_values:
            self._device_values[device] = self.values.to(device, non_blocking=True)
        return self._device_values[device]

    def hyper(self, dtype: torch.dtype, device: torch.device) -> Hyper:
        """Every float hyperparameter as a 0-dim ``dtype`` tensor on ``device`` (one cast, one unbind)."""
        return Hyper(*self.values_on(device).to(dtype).unbind())


def vocab_values(temperature: float) -> Tensor:
    """The ``values`` of a bare vocabulary pass (``selective_log_softmax``): the temperature slots."""
    values = torch.zeros(NUM_SLOTS, dtype=torch.float64, device="cpu")
    values[Slot.TEMPERATURE] = float(temperature)
    values[Slot.INV_TEMPERATURE] = 1.0 / float(temperature)
    return values
