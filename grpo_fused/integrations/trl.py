"""Make TRL's ``GRPOTrainer`` compute its loss with grpo-fused.

One line, either way::

    from grpo_fused.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=trl.GRPOConfig(...), ...)

    # or, on a trainer that already exists:
    from grpo_fused.integrations import trl as gf_trl
    gf_trl.patch_trainer(trainer)

The patched ``_compute_loss`` honors the trainer's config (``loss_type``, ``epsilon``,
``epsilon_high``, ``delta``, ``beta``, ``importance_sampling_level``, ``temperature``,
``use_bias_correction_kl``, ``sapo_temperature_*``, ``entropy_coef``, ``max_completion_length``),
TRL 1.16's normalizers (gradient accumulation, ``num_items_in_batch`` for dapo / cispo), the vLLM
importance-sampling ratio and the tool mask, and appends the same metric names and values to
``trainer._metrics`` as TRL does. Options outside the spec raise a ``ValueError`` when the trainer is
patched, never a silent difference: ``loss_type="vespo"``, ``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, ``use_adaptive_entropy``, a MoE auxiliary loss, multimodal inputs.

Two ways to reach the loss (``lm_head=``):

- ``"linear"``: run the backbone (``output_hidden_states=True, logits_to_keep=1``, so the model's
  own head projects one position only) and call :func:`grpo_fused.linear_grpo_loss` with
  ``lm_head.weight``: fused backends never materialize the ``(B, T, V)`` logits (the reference
  backend does). A model's ``logit_scale`` folds into the temperature.
- ``"logits"``: the model's forward produces the completion logits (``logits_to_keep=T+1``) and
  :func:`grpo_fused.grpo_loss` consumes them. Needed when the head is not a plain linear map
  (``final_logit_softcapping``).
- ``"auto"`` (default): ``"linear"`` unless the model needs ``"logits"``.
"""

from __future__ import annotations

import dataclasses
import math
import types
from contextlib import nullcontext
from typing import Optional

import torch

from .. import api
from .._dispatch import LINEAR_STRATEGIES
from ..semantics import LOSS_TYPES, GRPOConfig, Normalizer, Surrogate, clip_flags, importance_log_ratio

try:  # TRL is optional for the package, required to use this module's trainer class.
    from trl import GRPOTrainer as _TRLGRPOTrainer
except ImportError:  # pragma: no cover - exercised only without TRL installed
    _TRLGRPOTrainer = None

__all__ = ["FusedGRPOTrainer", "FusedLossSettings", "config_from_trl_args", "fused_compute_loss", "patch_trainer"]

SUPPORTED_LOSS_TYPES = tuple(name for name, row in LOSS_TYPES.items() if row.in_trl)
LM_HEAD_MODES = ("auto", "linear", "logits")
# Input keys that carry images or other model inputs the adapter does not forward.
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


@dataclasses.dataclass(frozen=True)
class FusedLossSettings:
    """How the patched trainer computes its loss.

    Attributes:
        config: the :class:`GRPOConfig` mapped from the trainer's args (``entropy_coef`` is rescaled
            per call for dapo / cispo, see :func:`fused_compute_loss`).
        lm_head: ``"linear"`` or ``"logits"`` (resolved from ``"auto"``).
        temperature: the temperature handed to the op: TRL's temperature divided by the model's
            ``logit_scale`` on the linear path.
        backend: grpo-fused backend (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``).
        strategy: linear-path strategy (``"auto"``, ``"chunked"``, ``"tiled"``).
    """

    config: GRPOConfig
    lm_head: str
    temperature: float
    backend: str = "auto"
    strategy: str = "auto"


def config_from_trl_args(args, max_completion_length: Optional[int] = None) -> GRPOConfig:
    """Map a ``trl.GRPOConfig`` to :class:`grpo_fused.GRPOConfig`; raises on options outside the spec."""
    _check_trl_args(args)
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    return GRPOConfig(
        loss_type=args.loss_type,
        epsilon_low=float(args.epsilon),
        epsilon_high=float(epsilon_high),
        delta=None if args.delta is None else float(args.delta),
        beta=float(args.beta),
        kl_estimator="k3",
        use_bias_correction_kl=bool(args.use_bias_correction_kl),
        temperature=float(args.temperature),
        importance_sampling_level=args.importance_sampling_level,
        sapo_temperature_pos=float(args.sapo_temperature_pos),
        sapo_temperature_neg=float(args.sapo_temperature_neg),
        entropy_coef=float(args.entropy_coef),
        compute_entropy=True,
        max_completion_length=max_completion_length or args.max_completion_length,
    )


def _check_trl_args(args):
    unsupported = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        unsupported.append(f"loss_type={args.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        unsupported.append(f"top_entropy_quantile={args.top_entropy_quantile} (only 1.0)")
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        unsupported.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold} (only None)")
    if getattr(args, "use_adaptive_entropy", False):
        unsupported.append("use_adaptive_entropy=True (only False)")
    if unsupported:
        raise ValueError(
            "grpo_fused cannot reproduce these TRL GRPOConfig options exactly, so it refuses them: "
            + "; ".join(unsupported)
        )


def _resolve_lm_head(model, lm_head: str) -> tuple:
    """``(mode, logit_scale)`` for ``model``; raises when ``"linear"`` cannot be exact."""
    if lm_head not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    # The same lookups TRL's fused head does: a multiplier on the logits before the softmax.
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / scaling
    scale = 1.0 if scale is None else float(scale)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    plain_head = isinstance(head, torch.nn.Linear)
    linear_ok = softcap is None and scale > 0 and plain_head
    if lm_head == "linear" and not linear_ok:
        why = (
            f"final_logit_softcapping={softcap}" if softcap is not None
            else f"logit_scale={scale}" if scale <= 0 else f"the output embedding is a {type(head).__name__}"
        )
        raise ValueError(f"lm_head='linear' cannot reproduce this model's head ({why}); use lm_head='logits'")
    mode = lm_head if lm_head != "auto" else ("linear" if linear_ok else "logits")
    return mode, scale


def patch_trainer(trainer, *, backend: str = "auto", strategy: str = "auto", lm_head: str = "auto"):
    """Make ``trainer`` (a ``trl.GRPOTrainer``) compute its loss with grpo-fused; returns ``trainer``.

    Args:
        trainer: a constructed ``trl.GRPOTrainer`` (TRL 1.16).
        backend: grpo-fused backend, ``"auto"`` (Triton on CUDA, C++ on CPU, else the reference).
        strategy: linear-path strategy, ``"auto"``, ``"chunked"`` or ``"tiled"``.
        lm_head: ``"auto"``, ``"linear"`` (hidden states + lm_head weight, no logits) or ``"logits"``.

    Raises:
        ValueError: for a trainer option grpo-fused does not reproduce exactly.
    """
    trainer._grpo_fused = _settings_for(trainer, backend, strategy, lm_head)
    trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    return trainer


def _settings_for(trainer, backend, strategy, lm_head) -> FusedLossSettings:
    config = config_from_trl_args(trainer.args, max_completion_length=trainer.max_completion_length)
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("grpo_fused does not add the MoE load-balancing loss; set router_aux_loss_coef=0.0")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    mode, scale = _resolve_lm_head(model, lm_head)
    temperature = config.temperature / scale if mode == "linear" else config.temperature
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"strategy must be one of {LINEAR_STRATEGIES}, got {strategy!r}")
    return FusedLossSettings(config, mode, temperature, backend, strategy)


def _completion_features(trainer, model, inputs, settings: FusedLossSettings):
    """``(features, weight, bias)``: hidden ``(B, T, H)`` + lm_head on the linear path, else logits ``(B, T, V)``."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    T = completion_ids.size(1)
    with trainer.accelerator.autocast():
        if settings.lm_head == "linear":
            # logits_to_keep=1: the model's own head projects a single position; the completion
            # positions' logits are left to the loss op. The last entry of hidden_states is the
            # final-normed output the head reads (checked in tests against the model's logits).
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1, use_cache=False)
            hidden = out.hidden_states[-1][:, -T - 1 : -1, :]
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1, use_cache=False)
            return out.logits[:, :-1, :], None, None
    head = trainer.accelerator.unwrap_model(model)
    if hasattr(head, "get_base_model"):
        head = head.get_base_model()
    head = head.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    hidden = hidden.to(weight.device)
    if trainer.args.cast_lm_head_to_fp32:
        hidden = hidden.float()
    return hidden, weight, bias


def fused_compute_loss(self, model, inputs):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` computed by grpo-fused (bound to the trainer as a method)."""
    settings: FusedLossSettings = self._grpo_fused
    present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
    if present:
        raise ValueError(f"grpo_fused's TRL adapter does not forward multimodal inputs ({', '.join(present)})")
    mode = "train" if self.model.training else "eval"
    cfg = settings.config
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = inputs.get("old_per_token_logps")
    ref_logps = inputs["ref_per_token_logps"] if cfg.beta != 0.0 else None
    is_weights = None
    if self.use_vllm and self.vllm_importance_sampling_correction:
        is_weights = inputs["importance_sampling_ratio"]

    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
    # TRL divides the loss by the accumulation steps, except for a token-count normalizer (dapo,
    # cispo), which folds the accumulation into num_items_in_batch instead.
    if cfg.params.spec.normalizer is Normalizer.GLOBAL_TOKENS:
        # TRL: num_items_in_batch spans the generation batch; rescale it to one accumulation window.
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss_divisor = 1
        # TRL's entropy bonus is divided by the accumulation steps whatever the loss type.
        entropy_coef = cfg.entropy_coef / accumulation
    else:
        num_items = None
        loss_divisor = accumulation
        entropy_coef = cfg.entropy_coef
    call_cfg = cfg.replace(entropy_coef=entropy_coef, temperature=settings.temperature)

    features, weight, bias = _completion_features(self, model, inputs, settings)
    # The op computes in fp32 itself; autocast would push the reference's matmul back to bf16.
    no_autocast = torch.autocast(features.device.type, enabled=False) if features.device.type in ("cuda", "cpu") else nullcontext()
    with no_autocast:
        if settings.lm_head == "linear":
            out = api.linear_grpo_loss(
                features, weight, completion_ids, advantages, mask, old_logps, ref_logps, bias=bias,
                config=call_cfg, is_weights=is_weights, num_items_in_batch=num_items,
                strategy=settings.strategy, backend=settings.backend,
            )
        else:
            out = api.grpo_loss(
                features, completion_ids, advantages, mask, old_logps, ref_logps,
                config=call_cfg, is_weights=is_weights, num_items_in_batch=num_items, backend=settings.backend,
            )
    loss = out.loss / loss_divisor
    _log_metrics(self, mode, out, mask, advantages, old_logps, call_cfg)
    return loss


def _log_metrics(self, mode, out, mask, advantages, old_logps, cfg: GRPOConfig):
    """Append TRL's metric names and values (global over processes, as TRL reduces them)."""
    metrics = self._metrics[mode]
    mask_f = mask.to(out.logps.dtype)
    sequence_shaped = cfg.importance_sampling_level == "sequence" and advantages.shape[1] == 1

    def global_mean(local_mean, per_sequence):
        count = torch.tensor(float(mask.shape[0]), device=mask.device) if per_sequence else mask_f.sum()
        # The op returns sum / max(count, 1); times count gives back the sum (0 when count is 0).
        local_sum = local_mean.to(count.dtype) * count
        totals = self.accelerator.reduce(torch.stack([local_sum, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if self._entropy_bonus_enabled:
        # TRL's policy_loss excludes the entropy bonus and the accumulation divisor.
        policy_loss = (out.loss + cfg.entropy_coef * out.metrics["entropy"]).detach()
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            metrics["entropy_coef"].append(self.entropy_coef)
    if cfg.beta != 0.0:
        metrics["kl"].append(global_mean(out.metrics["kl"], per_sequence=False))
    metrics["entropy"].append(global_mean(out.metrics["entropy"], per_sequence=False))
    surrogate = cfg.params.spec.loss_type.surrogate
    if surrogate is Surrogate.CLIP:
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            metrics[name].append(global_mean(out.metrics[name], per_sequence=sequence_shaped))
        low, high = _clip_flags(out.logps, old_logps, mask_f, advantages, cfg)
        metrics["clip_ratio/low_min"].append(_nan_extreme(self.accelerator.gather(_seq_mean(low, mask_f)), "min"))
        metrics["clip_ratio/high_max"].append(_nan_extreme(self.accelerator.gather(_seq_mean(high, mask_f)), "max"))
    elif surrogate is Surrogate.CISPO:
        metrics["cispo_clip_ratio"].append(global_mean(out.metrics["cispo_clip_ratio"], per_sequence=sequence_shaped))


@torch.no_grad()
def _clip_flags(logps, old_logps, mask, advantages, cfg: GRPOConfig):
    # The per-sequence extremes TRL logs need the clip flags per token; (B, T) work, no vocab pass.
    old = logps if old_logps is None else old_logps.to(logps.dtype)
    ratio = torch.exp(importance_log_ratio(logps, old, mask, cfg.params.spec.sequence_level))
    return clip_flags(ratio, advantages.to(logps.dtype), cfg.params)


def _seq_mean(x, mask):
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)  # NaN for an empty sequence, skipped by the nan-min / max, as TRL


def _nan_extreme(x, kind):
    finite = x[~torch.isnan(x)]
    if finite.numel() == 0:
        return math.nan
    return (finite.min() if kind == "min" else finite.max()).item()


if _TRLGRPOTrainer is not None:

    class FusedGRPOTrainer(_TRLGRPOTrainer):
        """``trl.GRPOTrainer`` whose loss is computed by grpo-fused.

        Takes every argument of ``trl.GRPOTrainer`` plus, keyword-only, ``fused_backend``
        (default ``"auto"``), ``fused_strategy`` (``"auto"``) and ``fused_lm_head`` (``"auto"``);
        see :func:`patch_trainer`. Raises ``ValueError`` at construction for options it cannot
        reproduce exactly.
        """

        def __init__(self, *args, fused_backend: str = "auto", fused_strategy: str = "auto",
                     fused_lm_head: str = "auto", **kwargs):
            # Refuse unsupported options before TRL spends time loading models.
            trl_args = kwargs.get("args", args[2] if len(args) > 2 else None)
            if trl_args is not None:
                _check_trl_args(trl_args)
            super().__init__(*args, **kwargs)
            self._grpo_fused = _settings_for(self, fused_backend, fused_strategy, fused_lm_head)

        def _compute_loss(self, model, inputs):
            return fused_compute_loss(self, model, inputs)

else:  # pragma: no cover

    class FusedGRPOTrainer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("FusedGRPOTrainer needs TRL: pip install 'trl>=1.16'")
