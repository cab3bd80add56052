"""A thin GRPO trainer on top of the fused ops, and ``grpo-fused train``.

One step: sample ``prompts_per_step`` prompts -> ``num_generations`` completions each with Hugging
Face ``generate`` -> reward function -> :func:`grpo_fused.group_advantages` -> old / reference
log-probs from hidden states (:func:`grpo_fused.linear_log_softmax`) -> ``num_iterations`` optimizer
updates, each over ``grad_accum`` micro-batches of :func:`grpo_fused.linear_grpo_loss`, with a
frozen reference model when ``beta != 0``. Every step appends one JSON line to
``<output_dir>/metrics.jsonl``; the run ends with ``reward_curve.png`` and a checkpoint
(``save_pretrained``) under ``<output_dir>/checkpoint-final``.

Without ``--model`` it trains the embedded default of :mod:`grpo_fused.trainer.demo_task`: a tiny
Qwen2 causal LM built from a config (random init, no download), a character tokenizer and a
verifiable copy task (prompt ``"cab="``, answer ``"cab"``, reward = fraction of characters right,
1.0 for an exact answer), on which the reward rises from ~0.05 to well above 0.5 within a few
minutes on a CPU.

Command line::

    grpo-fused train --steps 150 --output-dir runs/copy
    grpo-fused train --model ./my-hf-model --prompts prompts.jsonl --reward mymod:score --beta 0.04

A reward function has TRL's signature: ``fn(prompts, completions, **columns) -> list[float]``,
where ``columns`` are the prompts file's other JSONL fields, one list entry per completion.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import api
from .._dispatch import BACKENDS, LINEAR_STRATEGIES
from ..cli import OneLineParser, UsageError, resolve_device, writable_dir
from ..semantics import ADVANTAGE_SCALES, GRPOConfig, Normalizer
from .demo_task import COPY_LETTERS, build_char_tokenizer, build_tiny_model, copy_reward, copy_task

RewardFn = Callable[..., List[float]]


# --------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainArgs:
    """Everything ``grpo-fused train`` takes; field names match the command-line flags.

    Attributes:
        model: local Hugging Face model directory; None builds the embedded tiny model.
        reward: ``"module:function"`` reward; None uses the copy task's reward.
        prompts: JSONL file, one ``{"prompt": str, ...}`` object a line; None uses the copy task.
        output_dir: where metrics.jsonl, reward_curve.png and checkpoints go.
        steps: generation rounds (each followed by ``num_iterations`` optimizer updates).
        prompts_per_step / num_generations: B prompts x G completions per step.
        max_new_tokens: completion length cap. temperature: sampling and loss temperature.
        num_iterations: optimizer updates per generation round (> 1 uses old log-probs).
        grad_accum: micro-batches per optimizer update.
        lr / max_grad_norm / weight_decay: AdamW settings.
        loss_type / epsilon / epsilon_high / beta / delta / importance_sampling_level: the loss (see GRPOConfig).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` (group_advantages ``scale``).
        backend / strategy: grpo-fused backend and linear strategy.
        hidden_size / num_layers: size of the embedded model.
        task_length / task_letters: the embedded copy task's word length and alphabet.
        save_every: also checkpoint every this many steps (0: only at the end).
        seed: seeds Python, torch and the embedded model's init. device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        threads: torch intra-op CPU threads (0: torch's default). 1 is fastest for the embedded model.
        progress: show a progress bar.
    """

    model: Optional[str] = None
    reward: Optional[str] = None
    prompts: Optional[str] = None
    output_dir: str = "grpo_fused_run"
    steps: int = 150
    prompts_per_step: int = 8
    num_generations: int = 16
    max_new_tokens: int = 4
    temperature: float = 1.0
    num_iterations: int = 1
    grad_accum: int = 1
    lr: float = 5e-3
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = 0.28
    beta: float = 0.0
    delta: Optional[float] = None
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    backend: str = "auto"
    strategy: str = "auto"
    hidden_size: int = 64
    num_layers: int = 2
    task_length: int = 3
    task_letters: str = COPY_LETTERS
    save_every: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    progress: bool = True

    def loss_config(self) -> GRPOConfig:
        return GRPOConfig(
            loss_type=self.loss_type,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            delta=self.delta,
            temperature=self.temperature,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_new_tokens,
        )

    def validate(self):
        """Check every field before any work (``ValueError`` / ``TypeError`` naming the field and its
        command-line flag): counts, choices, numbers, that the model folder, prompts file and reward
        function exist, that the device is there and the output folder is writable."""
        for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "num_iterations", "grad_accum",
                     "hidden_size", "num_layers", "task_length"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("save_every", "seed", "threads"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.num_generations < 2:
            raise ValueError(f"{_flag('num_generations')} must be >= 2: group advantages need two completions")
        if (self.prompts_per_step * self.num_generations) % self.grad_accum != 0:
            raise ValueError(f"{_flag('grad_accum')}={self.grad_accum} must divide prompts_per_step * num_generations "
                             f"= {self.prompts_per_step * self.num_generations}")
        for name, choices in (("scale_rewards", tuple(ADVANTAGE_SCALES)), ("backend", BACKENDS),
                              ("strategy", LINEAR_STRATEGIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_flag(name)} must be one of {choices}, got {getattr(self, name)!r}")
        for name, minimum in (("lr", None), ("max_grad_norm", None), ("weight_decay", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    value < minimum if minimum is not None else value <= 0):
                raise ValueError(f"{_flag(name)} must be a finite number {'>= 0' if minimum is not None else '> 0'}, "
                                 f"got {value!r}")
        if not isinstance(self.task_letters, str) or not self.task_letters:
            raise ValueError(f"{_flag('task_letters')} must be a non-empty string")
        try:
            self.loss_config()
        except (TypeError, ValueError) as exc:
            # GRPOConfig names its own fields; say the trainer's option instead.
            field, _, rest = str(exc).partition(" ")
            option = {"epsilon_low": "epsilon", "max_completion_length": "max_new_tokens"}.get(field, field)
            raise type(exc)(f"{_flag(option)} {rest}" if hasattr(self, option) else str(exc)) from None
        if self.model is not None and not os.path.isdir(self.model):
            raise ValueError(f"{_flag('model')} must be a local Hugging Face model folder, got {self.model!r}")
        if self.prompts is not None and not os.path.isfile(self.prompts):
            raise ValueError(f"{_flag('prompts')} must be a JSONL file, {self.prompts!r} does not exist")
        if self.reward is not None:
            load_reward(self.reward)
        _resolve_device(self.device)
        _writable_dir(self.output_dir)


# --------------------------------------------------------------------------------------
# Pieces of a step.
# --------------------------------------------------------------------------------------


def load_reward(spec: str) -> RewardFn:
    """``"package.module:function"`` -> the function; ``ValueError`` naming ``--reward`` otherwise."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"{_flag('reward')} must be 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{_flag('reward')} {spec!r}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{_flag('reward')} {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _flag(name: str) -> str:
    """A field as both of its names: ``grad_accum (--grad-accum)``."""
    return f"{name} (--{name.replace('_', '-')})"


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_flag(name)} must be an int >= {minimum}, got {value!r}")


def _writable_dir(path: str) -> None:
    try:
        writable_dir("output_dir (--output-dir)", path)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def load_prompts(path: str) -> List[Dict]:
    """Rows of a JSONL file; each must hold a string ``"prompt"``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{line_no}: each line must be a JSON object with a string 'prompt'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def completion_mask_from(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(N, T)`` int mask: 1 up to and including the first EOS, 0 after it (all 1 without EOS)."""
    is_eos = completion_ids == eos_token_id
    # Positions strictly after the first EOS have at least one EOS before them.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (eos_before == 0).int()


def completion_hidden(model, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
    """Final hidden states ``(N, T, H)`` of the positions that predict the completion tokens.

    ``logits_to_keep=1`` keeps the model's own head to one position; the loss projects the rest.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1][:, -completion_len - 1 : -1, :]


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, head.bias


@torch.no_grad()
def sequence_logps(model, input_ids, attention_mask, completion_ids, temperature, backend, strategy) -> torch.Tensor:
    """``(N, T)`` fp32 log-probs of the completion tokens, from hidden states (no logits tensor kept)."""
    hidden = completion_hidden(model, input_ids, attention_mask, completion_ids.shape[1])
    weight, bias = _head(model)
    logps, _ = api.linear_log_softmax(hidden, weight, completion_ids, temperature, bias=bias,
                                      strategy=strategy, backend=backend)
    return logps


def plot_reward_curves(log_paths: Sequence[str], png_path: str, labels: Optional[Sequence[str]] = None,
                       title: str = "GRPO reward") -> str:
    """Reward mean per step from one or more metrics.jsonl files into one PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for i, path in enumerate(log_paths):
        rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        steps = [r["step"] for r in rows]
        rewards = [r["reward_mean"] for r in rows]
        label = labels[i] if labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
        ax.plot(steps, rewards, alpha=0.35, lw=1)
        window = max(1, len(rewards) // 15)
        smooth = [sum(rewards[max(0, j - window + 1) : j + 1]) / len(rewards[max(0, j - window + 1) : j + 1])
                  for j in range(len(rewards))]
        ax.plot(steps, smooth, lw=2, color=ax.lines[-1].get_color(), label=f"{label} (moving mean {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


# --------------------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    try:
        return resolve_device(device, _flag("device"))
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _load_model_and_tokenizer(args: TrainArgs, device):
    if args.model is None:
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(len(tokenizer), args.hidden_size, args.num_layers, seed=args.seed,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(args.model):
            raise ValueError(f"model must be a local Hugging Face model directory, got {args.model!r}")
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        text_config = model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
            if getattr(text_config, name, None) not in (None, 1, 1.0):
                # The loss projects hidden states with the plain lm_head weight.
                raise ValueError(f"model {args.model!r} transforms its logits ({name}={getattr(text_config, name)}); "
                                 "the trainer's hidden-state loss path supports plain linear heads only")
    return model.to(device), tokenizer


def train(args: TrainArgs, reward_fn: Optional[RewardFn] = None, prompts: Optional[List[Dict]] = None) -> Dict:
    """Run GRPO as :class:`TrainArgs` says; returns a summary dict (paths, first / last rewards).

    ``reward_fn`` / ``prompts`` override ``args.reward`` / ``args.prompts`` (for use from Python).
    """
    args.validate()
    os.makedirs(args.output_dir, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load_model_and_tokenizer(args, device)
    if prompts is None:
        prompts = load_prompts(args.prompts) if args.prompts else copy_task(
            length=args.task_length, letters=args.task_letters, seed=args.seed)
    if reward_fn is None:
        reward_fn = load_reward(args.reward) if args.reward else copy_reward
    ref_model = None
    if args.beta != 0.0:
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = args.loss_config()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log_path = os.path.join(args.output_dir, "metrics.jsonl")
    open(log_path, "w").close()
    rng = random.Random(args.seed)
    G, B = args.num_generations, args.prompts_per_step

    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc="grpo-fused train", unit="step")
    history = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        rows = [rng.choice(prompts) for _ in range(B)]
        batch = _rollout(model, tokenizer, rows, G, args, device)
        rewards = torch.tensor(
            reward_fn(prompts=batch["prompts"], completions=batch["completions"], **batch["columns"]),
            dtype=torch.float32, device=device,
        )
        if rewards.shape != (B * G,):
            raise ValueError(f"the reward function returned {tuple(rewards.shape)} values, expected {B * G}")
        advantages, stats = api.group_advantages(rewards, group_size=G, scale=args.scale_rewards)
        metrics = _update(model, ref_model, optimizer, batch, advantages, cfg, args)
        record = {
            "step": step,
            "reward_mean": rewards.nanmean().item(),
            "reward_std": rewards[~torch.isnan(rewards)].std().item() if rewards.numel() > 1 else 0.0,
            "frac_reward_zero_std": stats.frac_zero_std.item(),
            "completion_length": batch["completion_mask"].sum(1).float().mean().item(),
            **metrics,
            "step_time": time.perf_counter() - t0,
        }
        history.append(record)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", loss=f"{record['loss']:.4f}")
            bar.update(1)
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            _save(model, tokenizer, os.path.join(args.output_dir, f"checkpoint-{step}"))
    if bar is not None:
        bar.close()
    png = plot_reward_curves([log_path], os.path.join(args.output_dir, "reward_curve.png"), labels=[args.loss_type])
    checkpoint = _save(model, tokenizer, os.path.join(args.output_dir, "checkpoint-final"))
    head = history[: max(1, len(history) // 10)]
    tail = history[-max(1, len(history) // 10) :]
    return {
        "metrics": log_path,
        "reward_curve": png,
        "checkpoint": checkpoint,
        "reward_first": sum(r["reward_mean"] for r in head) / len(head),
        "reward_last": sum(r["reward_mean"] for r in tail) / len(tail),
    }


@torch.no_grad()
def _rollout(model, tokenizer, rows, G, args: TrainArgs, device) -> Dict:
    """Sample G completions per prompt; returns ids, masks, decoded texts and the reward columns."""
    model.eval()
    texts = [row["prompt"] for row in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids = enc["input_ids"].to(device).repeat_interleave(G, dim=0)
    prompt_mask = enc["attention_mask"].to(device).repeat_interleave(G, dim=0)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completion_ids = out[:, prompt_ids.shape[1] :]
    completion_mask = completion_mask_from(completion_ids, tokenizer.eos_token_id)
    completions = [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(completion_ids, completion_mask)
    ]
    columns = {}
    for key in rows[0]:
        if key != "prompt":
            columns[key] = [row.get(key) for row in rows for _ in range(G)]
    model.train()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "prompts": [t for t in texts for _ in range(G)],
        "completions": completions,
        "columns": columns,
    }


def _update(model, ref_model, optimizer, batch, advantages, cfg: GRPOConfig, args: TrainArgs) -> Dict:
    """``num_iterations`` optimizer updates on one rollout; returns the averaged metrics."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    completion_ids, mask = batch["completion_ids"], batch["completion_mask"]
    logps_args = (input_ids, attention_mask, completion_ids, cfg.temperature, args.backend, args.strategy)
    # Old log-probs only matter when the policy moves between updates on the same rollout.
    old_logps = sequence_logps(model, *logps_args) if args.num_iterations > 1 else None
    ref_logps = sequence_logps(ref_model, *logps_args) if ref_model is not None else None
    # A token-count normalizer (dapo, cispo, gpg): the micro-batches share the step's token total.
    token_normalized = cfg.params.spec.normalizer is Normalizer.GLOBAL_TOKENS
    num_items = mask.sum().clamp(min=1) if token_normalized else None
    N = completion_ids.shape[0]
    chunk = N // args.grad_accum
    sums: Dict[str, float] = {}
    weight, bias = _head(model)
    for _ in range(args.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, N, chunk):
            sl = slice(start, start + chunk)
            hidden = completion_hidden(model, input_ids[sl], attention_mask[sl], completion_ids.shape[1])
            out = api.linear_grpo_loss(
                hidden, weight, completion_ids[sl], advantages[sl], mask[sl],
                None if old_logps is None else old_logps[sl],
                None if ref_logps is None else ref_logps[sl],
                bias=bias, config=cfg, num_items_in_batch=num_items,
                strategy=args.strategy, backend=args.backend,
            )
            # Token-normalized losses already divide by the whole step's token count.
            loss = out.loss if token_normalized else out.loss / args.grad_accum
            loss.backward()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + value.item() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.item()
        optimizer.step()
    return {name: value / args.num_iterations for name, value in sums.items()}


def _save(model, tokenizer, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainArgs()
    parser = OneLineParser(
        prog="grpo-fused train",
        description="GRPO with the fused loss: sample, reward, group advantages, fused-loss updates.",
    )

    def opt(name, kind, help_text, **kw):
        field = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=kind, default=getattr(defaults, field), help=f"{help_text} (default: %(default)s)", **kw)

    def optional_float(text):
        return None if text.lower() == "none" else float(text)

    opt("model", str, "local Hugging Face model directory; omitted: the embedded tiny model")
    opt("reward", str, "reward function as module:function, fn(prompts, completions, **columns) -> list[float]")
    opt("prompts", str, "JSONL file of {\"prompt\": ..., other columns}; omitted: the embedded copy task")
    opt("output-dir", str, "where metrics.jsonl, reward_curve.png and checkpoints go")
    opt("steps", int, "generation rounds")
    opt("prompts-per-step", int, "prompts per step")
    opt("num-generations", int, "completions per prompt (group size G)")
    opt("max-new-tokens", int, "completion length cap")
    opt("temperature", float, "sampling and loss temperature")
    opt("num-iterations", int, "optimizer updates per rollout")
    opt("grad-accum", int, "micro-batches per optimizer update")
    opt("lr", float, "AdamW learning rate")
    opt("max-grad-norm", float, "gradient clipping norm")
    opt("weight-decay", float, "AdamW weight decay")
    opt("loss-type", str, "grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, gmpo, gpg")
    opt("epsilon", float, "lower clip")
    opt("epsilon-high", optional_float, "upper clip ('none': same as epsilon)")
    opt("beta", float, "KL coefficient to the frozen initial model")
    opt("delta", optional_float, "two-sided clipping cap ('none': off)")
    opt("importance-sampling-level", str, "token or sequence")
    opt("scale-rewards", str, "group, batch or none")
    opt("backend", str, "auto, triton, cpp or reference")
    opt("strategy", str, "auto, chunked or tiled (linear path)")
    opt("hidden-size", int, "embedded model hidden size")
    opt("num-layers", int, "embedded model layers")
    opt("task-length", int, "embedded copy task: word length")
    opt("task-letters", str, "embedded copy task: alphabet")
    opt("save-every", int, "checkpoint every N steps (0: only at the end)")
    opt("seed", int, "random seed")
    opt("device", str, "auto, cpu or cuda")
    opt("threads", int, "torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``grpo-fused train [flags]``; returns the exit status."""
    ns = build_parser().parse_args(argv)
    args = TrainArgs(**vars(ns))
    try:
        args.validate()
    except (TypeError, ValueError) as exc:
        print(f"grpo-fused train: error: {exc}", file=sys.stderr)
        return 2
    summary = train(args)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
