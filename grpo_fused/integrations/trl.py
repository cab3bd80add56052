"""Make TRL's ``GRPOTrainer`` compute its log-probs and its loss with grpo-fused.

One line, either way::

    from grpo_fused.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=trl.GRPOConfig(...), ...)

    # or, on a trainer that already exists:
    from grpo_fused.integrations import trl as gf_trl
    gf_trl.patch_trainer(trainer)

Two things change, and every option of TRL 1.16's ``GRPOConfig`` keeps TRL's numbers:

1. **The LM head.** TRL 1.16 computes every per-token log-prob (the loss's, and the no-grad old and
   reference passes) through a fused head, ``model(..., labels=labels, fused_lm_head=True)``. The
   patch replaces that head on the policy and reference models with
   :func:`grpo_fused.linear_log_softmax` over the scored positions: hidden states times
   ``lm_head.weight``, the logits never whole in memory, in fp32 whatever the autocast (TRL's own head
   multiplies in bf16 under ``bf16=True``). The loss and the old / reference passes then run the same
   code on the same positions, so on-policy the ratio is exactly 1 and the KL exactly 0 in any dtype.
   Multimodal inputs, the MoE router loss and PEFT go through TRL's own plumbing unchanged. A head
   that is not a plain linear map (``final_logit_softcapping``, a non-positive ``logit_scale``) keeps
   TRL's head (``lm_head="trl"``); a model's ``logit_scale`` folds into the temperature.
2. **The loss.** When :func:`config_from_trl_args` can state the trainer's options as a
   :class:`grpo_fused.GRPOConfig` (every ``loss_type`` but ``vespo``, no token-entropy mask, no
   off-policy mask, no adaptive entropy controller), the ``(B, T)`` tail of grpo-fused computes the loss
   and the metrics from the head's log-probs, with TRL 1.16's normalizers (gradient accumulation,
   ``num_items_in_batch``), the vLLM importance-sampling ratio, the tool mask, the entropy bonus and the
   router loss. The other options (``loss_type="vespo"``, ``top_entropy_quantile < 1``,
   ``off_policy_mask_threshold``, ``use_adaptive_entropy``) run TRL's own ``_compute_loss`` on the
   grpo-fused head: TRL's numbers by construction, still without the ``(B, T, V)`` logits.

Opt-in, ``sampling_support=True`` (``fused_sampling_support=True`` on :class:`FusedGRPOTrainer`) scores
the policy's tokens under the distribution the sampler used: TRL's ``top_k`` / ``top_p`` / ``min_p``
(and their ``generation_kwargs`` overrides) truncate the softmax of the current and old log-probs
(:class:`grpo_fused.SamplingRule`; vLLM's rule with ``use_vllm=True``, transformers' with every token
tied with the k-th kept otherwise). The on-policy ratio is then 1 where the full softmax gives the kept
mass, and the vLLM importance-sampling ratio compares like with like (TRL asks vLLM for processed
log-probs). The reference model's log-probs stay those of its full softmax (a KL against a truncated
reference is infinite wherever the two supports differ). A token outside the support leaves the loss
and is logged as ``sampling/outside_support``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Optional

import torch

from .. import api
from .._dispatch import BACKENDS, LINEAR_STRATEGIES
from ..semantics import (LOSS_TYPES, GRPOConfig, LossBatch, Normalizer, SamplingRule, Surrogate, clip_flags,
                         grpo_output, importance_log_ratio)

try:  # TRL is optional for the package, required to use this module's trainer class.
    from trl import GRPOTrainer as _TRLGRPOTrainer
except ImportError:  # pragma: no cover - exercised only without TRL installed
    _TRLGRPOTrainer = None

__all__ = ["FusedGRPOTrainer", "FusedLossSettings", "config_from_trl_args", "fused_compute_loss", "install_fused_head",
           "patch_trainer", "sampling_rule_from_trl_args", "using_trl_head"]

LM_HEAD_MODES = ("auto", "grpo_fused", "trl")
# Inputs TRL hands its log-prob function for vision-language models (forwarded to the model as they are).
MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
# Generation arguments that change the sampled distribution in ways a sampling rule cannot replay
# (they depend on the tokens generated so far, or on lists the loss never sees).
UNREPLAYABLE_GENERATION_KWARGS = (
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "bad_words", "bad_words_ids",
    "sequence_bias", "no_repeat_ngram_size", "typical_p", "epsilon_cutoff", "eta_cutoff", "allowed_token_ids",
    "suppress_tokens", "begin_suppress_tokens", "min_tokens", "min_new_tokens", "temperature",
)


@dataclasses.dataclass(frozen=True)
class FusedLossSettings:
    """How the patched trainer computes its log-probs and its loss.

    Attributes:
        config: the :class:`GRPOConfig` of the trainer's args, or None when the options need TRL's own
            loss code (see the module docstring).
        lm_head: ``"grpo_fused"`` (the head is replaced) or ``"trl"`` (TRL's head is kept).
        temperature: the head's temperature: TRL's divided by the model's ``logit_scale``.
        backend: grpo-fused backend (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``).
        strategy: linear-path strategy (``"auto"``, ``"chunked"``, ``"tiled"``).
        sampling: the sampler's truncation the policy's log-probs replay, or None (full softmax).
    """

    config: Optional[GRPOConfig]
    lm_head: str
    temperature: float
    backend: str = "auto"
    strategy: str = "auto"
    sampling: Optional[SamplingRule] = None


def trl_only_options(args) -> list:
    """The trainer's options that grpo-fused's loss does not state (TRL's own loss code runs them)."""
    options = []
    if args.loss_type not in LOSS_TYPES or not LOSS_TYPES[args.loss_type].in_trl:
        options.append(f"loss_type={args.loss_type!r}")
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        options.append(f"top_entropy_quantile={args.top_entropy_quantile}")
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        options.append(f"off_policy_mask_threshold={args.off_policy_mask_threshold}")
    if getattr(args, "use_adaptive_entropy", False):
        options.append("use_adaptive_entropy=True")
    return options


def sampling_rule_from_trl_args(args) -> SamplingRule:
    """The truncation TRL's generation applies: ``top_k`` (0 or -1 off), ``top_p`` (1 off), ``min_p``
    (None or 0 off), overridden by ``generation_kwargs``. vLLM (``use_vllm=True``) keeps exactly ``k``
    tokens; transformers' top-k keeps every token tied with the k-th.

    ``ValueError`` where no rule reproduces the sampler: a ``repetition_penalty`` other than 1, a
    generation argument of :data:`UNREPLAYABLE_GENERATION_KWARGS`, or transformers' top-p with min-p
    (transformers applies min-p after top-p, vLLM before)."""
    extra = dict(getattr(args, "generation_kwargs", None) or {})
    if float(extra.get("repetition_penalty", getattr(args, "repetition_penalty", 1.0))) != 1.0:
        raise ValueError("sampling_support=True cannot replay repetition_penalty != 1 (the penalty depends on the "
                         "tokens generated so far)")
    unreplayable = sorted(k for k in extra if k in UNREPLAYABLE_GENERATION_KWARGS and k != "repetition_penalty")
    if unreplayable:
        raise ValueError(f"sampling_support=True cannot replay generation_kwargs {unreplayable}")
    top_k = extra.get("top_k", args.top_k)
    top_p = extra.get("top_p", args.top_p)
    min_p = extra.get("min_p", args.min_p)
    rule = SamplingRule(
        top_k=int(top_k) if top_k is not None and int(top_k) > 0 else None,
        top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
        min_p=float(min_p) if min_p else None,
        top_k_ties="exact" if args.use_vllm else "all",
    )
    if not args.use_vllm and rule.top_p is not None and rule.min_p is not None:
        raise ValueError("sampling_support=True cannot replay transformers' top_p with min_p (it applies min-p "
                         "after top-p; the rule is vLLM's, min-p first); generate with vLLM or drop one of them")
    return rule


def config_from_trl_args(args, max_completion_length: Optional[int] = None,
                         sampling_support: bool = False) -> GRPOConfig:
    """Map a ``trl.GRPOConfig`` to :class:`grpo_fused.GRPOConfig`; ``ValueError`` for the options of
    :func:`trl_only_options`, which the patched trainer leaves to TRL's loss code. With
    ``sampling_support``, the config carries :func:`sampling_rule_from_trl_args`."""
    only_trl = trl_only_options(args)
    if only_trl:
        raise ValueError(f"grpo_fused.GRPOConfig does not state {', '.join(only_trl)}; the patched trainer runs "
                         "TRL's loss code for them")
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
        **(dataclasses.asdict(sampling_rule_from_trl_args(args)) if sampling_support else {}),
    )


# --------------------------------------------------------------------------------------
# The LM head.
# --------------------------------------------------------------------------------------


def _logit_scale(text_config) -> float:
    """The multiplier a model applies to its logits before the softmax (1.0 when none)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _resolve_lm_head(model, lm_head: str) -> tuple:
    """``(mode, logit_scale)``: ``"grpo_fused"`` when the head is a plain linear map grpo-fused can
    reproduce exactly, else ``"trl"``; ``lm_head="grpo_fused"`` on any other head raises."""
    if lm_head not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    text_config = _text_config(model)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = _logit_scale(text_config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # PEFT's modules_to_save wraps the head; its weight / bias resolve to the active copy (the
    # original one with the adapters disabled, as for the reference pass).
    plain = isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear)
    exact = softcap is None and scale > 0 and plain
    if lm_head == "grpo_fused" and not exact:
        why = (f"final_logit_softcapping={softcap}" if softcap is not None
               else f"logit_scale={scale}" if scale <= 0 else f"the output embedding is a {type(head).__name__}")
        raise ValueError(f"lm_head='grpo_fused' cannot reproduce this model's head ({why}); use lm_head='trl'")
    return (lm_head if lm_head != "auto" else ("grpo_fused" if exact else "trl")), scale


def install_fused_head(model, temperature: float, backend: str = "auto", strategy: str = "auto",
                       sampling: Optional[SamplingRule] = None) -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` compute its log-probs and entropy with
    :func:`grpo_fused.linear_log_softmax` (``model`` is the Hugging Face causal LM, PEFT unwrapped).

    ``sampling`` truncates the softmax of the policy's passes; a pass with the PEFT adapters disabled
    or switched to TRL's ``"ref"`` adapter is the reference's, scored under the full softmax.

    Only positions whose next-token label is not -100 are scored, from the backbone's last hidden
    state and ``lm_head.weight`` / ``bias``, in fp32 outside autocast; the result has TRL 1.16's
    ``FusedCausalLMOutput`` fields (``log_probs``, ``entropy`` zero at ignored positions, ``aux_loss``
    for MoE models asked for router logits). Any other call goes to the forward it had before.
    """
    import transformers

    previous = model.forward
    text_config = _text_config(model)
    sampling_kwargs = {}
    if sampling is not None and sampling.active:
        sampling_kwargs = dict(top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                               top_k_ties=sampling.top_k_ties)
    # A PEFT tuner layer: TRL's reference pass disables them (or activates the "ref" adapter).
    tuners = [m for m in model.modules() if _is_tuner_layer(m)][:1]
    # A vision-language model under transformers < 5 exposes its language backbone as `model`.
    backbone_attr = "base_model"
    if text_config is not model.config and int(transformers.__version__.split(".")[0]) < 5:
        backbone_attr = "model"

    # The model's own signature: generate() validates its keyword arguments against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or not getattr(self, "_grpo_fused_head", True):
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        outputs = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = outputs.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = outputs.last_hidden_state, shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        from trl.trainer.utils import maybe_gather_lm_head_ctx  # ZeRO-3 shards the head: gather it here

        # grpo-fused computes in fp32 itself; autocast would turn its chunk GEMMs back to bf16.
        with torch.autocast(hidden.device.type, enabled=False), maybe_gather_lm_head_ctx(weight, bias):
            reference_pass = any(t.disable_adapters or "ref" in t.active_adapters for t in tuners)
            logps, entropy = api.linear_log_softmax(
                hidden[mask], weight, labels[mask], temperature, bias=bias, compute_entropy=True, strategy=strategy,
                backend=backend, **({} if reference_pass else sampling_kwargs),
            )
        # masked_scatter keeps an all-ignored micro-batch connected to the graph (a zero, not an error).
        log_probs = logps.new_zeros(mask.shape).masked_scatter(mask, logps)
        entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        aux_loss = _router_loss(outputs, text_config, kwargs) if kwargs.get("output_router_logits") else None
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return types.SimpleNamespace(loss=loss, log_probs=log_probs, entropy=entropy, aux_loss=aux_loss,
                                     label_mask=mask, log_sum_sq_probs=None, mean_logits=None, is_top1=None)

    model.forward = types.MethodType(forward, model)
    model._grpo_fused_head = True


def _is_tuner_layer(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def _router_loss(outputs, text_config, kwargs):
    """The MoE load-balancing loss of the backbone's router logits, as the model's own forward computes it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts")
    return load_balancing_loss_func(outputs.router_logits, num_experts, text_config.num_experts_per_tok,
                                    kwargs.get("attention_mask"))


def _head_models(trainer):
    """The Hugging Face models whose head the trainer calls: the policy (PEFT unwrapped) and the reference."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    models = [model.get_base_model() if hasattr(model, "get_base_model") else model]
    if getattr(trainer, "ref_model", None) is not None:
        models.append(trainer.accelerator.unwrap_model(trainer.ref_model))
    return models


class using_trl_head:
    """``with using_trl_head(trainer): ...`` routes the fused-head calls to TRL's own head (for comparisons)."""

    def __init__(self, trainer):
        self.models = [m for m in _head_models(trainer) if hasattr(m, "_grpo_fused_head")]

    def __enter__(self):
        for m in self.models:
            m._grpo_fused_head = False
        return self

    def __exit__(self, *exc):
        for m in self.models:
            m._grpo_fused_head = True


# --------------------------------------------------------------------------------------
# Patching.
# --------------------------------------------------------------------------------------


def patch_trainer(trainer, *, backend: str = "auto", strategy: str = "auto", lm_head: str = "auto",
                  sampling_support: bool = False):
    """Make ``trainer`` (a ``trl.GRPOTrainer``, TRL 1.16) use grpo-fused; returns ``trainer``.

    Args:
        trainer: a constructed ``trl.GRPOTrainer``.
        backend: grpo-fused backend, ``"auto"`` (Triton on CUDA, C++ on CPU, else the reference).
        strategy: linear-path strategy, ``"auto"``, ``"chunked"`` or ``"tiled"``.
        lm_head: ``"auto"`` (grpo-fused's head wherever it is exact), ``"grpo_fused"`` or ``"trl"``.
        sampling_support: score the policy's tokens under the sampler's truncated distribution (see
            the module docstring); needs grpo-fused's head and loss.
    """
    _install(trainer, backend, strategy, lm_head, sampling_support)
    trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    return trainer


def _install(trainer, backend, strategy, lm_head, sampling_support=False) -> None:
    """The head on the trainer's models and the settings on the trainer (the loss is wired by the caller)."""
    settings = _settings_for(trainer, backend, strategy, lm_head, sampling_support)
    if settings.lm_head == "grpo_fused":
        policy, *reference = _head_models(trainer)
        install_fused_head(policy, settings.temperature, backend, strategy, settings.sampling)
        for model in reference:
            install_fused_head(model, settings.temperature, backend, strategy)
    trainer._grpo_fused = settings


def _settings_for(trainer, backend, strategy, lm_head, sampling_support=False) -> FusedLossSettings:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"strategy must be one of {LINEAR_STRATEGIES}, got {strategy!r}")
    if not isinstance(sampling_support, bool):
        raise TypeError(f"sampling_support must be a bool, got {type(sampling_support).__name__}")
    config = None
    only_trl = trl_only_options(trainer.args)
    if not only_trl:
        config = config_from_trl_args(trainer.args, trainer.max_completion_length, sampling_support)
    mode, scale = _resolve_lm_head(_head_models(trainer)[0], lm_head)
    sampling = None
    if sampling_support:
        if only_trl:
            raise ValueError(f"sampling_support=True needs grpo-fused's loss, and {', '.join(only_trl)} runs TRL's "
                             "(a token outside the support would reach TRL's loss with log-prob -inf)")
        if mode != "grpo_fused":
            raise ValueError("sampling_support=True needs grpo-fused's LM head; this model keeps TRL's (lm_head='trl')")
        sampling = config.sampling if config.sampling.active else None
    return FusedLossSettings(config, mode, float(trainer.args.temperature) / scale, backend, strategy, sampling)


# --------------------------------------------------------------------------------------
# The loss.
# --------------------------------------------------------------------------------------


def fused_compute_loss(self, model, inputs):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` computed by grpo-fused (bound to the trainer as a method)."""
    settings: FusedLossSettings = self._grpo_fused
    if settings.config is None:
        # Options only TRL's loss code states: run it, on the patched head's log-probs.
        return _TRLGRPOTrainer._compute_loss(self, model, inputs)
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
    call_cfg = cfg.replace(entropy_coef=entropy_coef)

    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([prompt_mask, completion_mask], dim=1),
        completion_ids.size(1),
        compute_entropy=True,
        compute_aux_loss=self.aux_loss_enabled,
        **{key: inputs.get(key) for key in MULTIMODAL_KEYS},
    )
    batch = LossBatch(completion_ids, advantages, mask, old_logps, ref_logps, is_weights, num_items)
    out = grpo_output(logps.float(), entropies.float(), batch, call_cfg.params)
    loss = out.loss / loss_divisor
    if self.aux_loss_enabled:
        # TRL scales the router loss for gradient accumulation, as the policy loss.
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
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
    if "sampling/outside_support" in out.metrics:
        metrics["sampling/outside_support"].append(global_mean(out.metrics["sampling/outside_support"], False))
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
        """``trl.GRPOTrainer`` whose log-probs and loss are computed by grpo-fused.

        Takes every argument of ``trl.GRPOTrainer`` plus, keyword-only, ``fused_backend``
        (default ``"auto"``), ``fused_strategy`` (``"auto"``), ``fused_lm_head`` (``"auto"``) and
        ``fused_sampling_support`` (False); see :func:`patch_trainer`.
        """

        def __init__(self, *args, fused_backend: str = "auto", fused_strategy: str = "auto",
                     fused_lm_head: str = "auto", fused_sampling_support: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            _install(self, fused_backend, fused_strategy, fused_lm_head, fused_sampling_support)

        def _compute_loss(self, model, inputs):
            return fused_compute_loss(self, model, inputs)

else:  # pragma: no cover

    class FusedGRPOTrainer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("FusedGRPOTrainer needs TRL: pip install 'trl>=1.16'")
