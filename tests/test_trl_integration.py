"""grpo-fused inside a real TRL 1.16 GRPOTrainer: same loss, same gradients, same metrics.

Each case runs ``trainer.train()`` on a tiny Qwen2 (hidden 32, 2 layers, vocab 27) built from a
config and a character tokenizer built locally (no hub access), on CPU in fp32. A "twin" trainer
computes, at every micro-step, TRL's own ``_compute_loss`` and grpo-fused's on the same inputs and
the same weights, and records both losses, both gradients and both sets of appended metrics; the
fused loss drives the optimizer. Settings are chosen so every branch that matters is hit:
gradient accumulation 2 (TRL's per-loss-type normalizers), ``num_iterations=2`` with a large
learning rate (old log-probs present and ratios far from 1, so clipping happens), beta != 0
(reference model, bias-corrected KL), sequence-level IS, delta, the entropy bonus, both lm_head paths.
"""

import os

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import trl  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import grpo_fused as gf  # noqa: E402
import grpo_fused.reference  # noqa: E402,F401
from grpo_fused.integrations import trl as gf_trl  # noqa: E402
from grpo_fused.trainer.demo_task import build_char_tokenizer, build_tiny_model  # noqa: E402

def _backend_ready(name):
    from grpo_fused import _dispatch

    return _dispatch._unavailable_reason(name, "linear_grpo_loss", torch.device("cpu")) is None


# The fused CPU backend when it is built, else the eager reference (same code path in the adapter).
FUSED_BACKEND = "cpp" if _backend_ready("cpp") else "reference"

PROMPTS = ["abc=", "ba=", "cab=", "a=", "bca=", "cc=", "acb=", "b="]


def _reward(prompts, completions, **kwargs):
    # Varies within every group (length and letter counts), so advantages are nonzero.
    return [float(len(c)) * 0.1 + c.count("a") - 0.5 * c.count("b") for c in completions]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # TRL builds its reference model from the policy's name or path, so the policy lives on disk.
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_char_tokenizer("abc=")
    model = build_tiny_model(len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_completion_length=6,
        max_steps=2,
        learning_rate=2e-2,
        temperature=0.9,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    kwargs.update(overrides)
    return trl.GRPOConfig(**kwargs)


class TwinTrainer(gf_trl.FusedGRPOTrainer):
    """Computes TRL's loss and the fused loss on every micro-batch and keeps both."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    # TRL's adaptive entropy controller updates these on every loss call in train mode.
    CONTROLLER = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        params = [p for p in model.parameters() if p.requires_grad]
        before = {k: len(v) for k, v in self._metrics[mode].items()}
        controller = {k: getattr(self, k, None) for k in self.CONTROLLER}
        with gf_trl.using_trl_head(self):  # TRL's own head and loss, on the same micro-batch
            trl_loss = GRPOTrainer._compute_loss(self, model, inputs)
        trl_controller = {k: getattr(self, k, None) for k in self.CONTROLLER}
        for k, value in controller.items():  # the fused call starts from the same controller state
            setattr(self, k, value)
        # Take TRL's appended values out, so the fused ones are what the trainer logs.
        trl_metrics = self._new_metrics(mode, before, remove=True)
        trl_grads = torch.autograd.grad(trl_loss, params, allow_unused=True)
        fused_loss = gf_trl.fused_compute_loss(self, model, inputs)
        for k, value in trl_controller.items():
            mine = getattr(self, k, None)
            assert (mine is None) == (value is None), k
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(mine, value, rtol=1e-5, atol=1e-6, msg=k)
            elif value is not None:
                assert mine == value or abs(mine - value) <= 1e-6 * max(1.0, abs(value)), k
        fused_metrics = self._new_metrics(mode, before, remove=False)
        fused_grads = torch.autograd.grad(fused_loss, params, retain_graph=True, allow_unused=True)
        self.records.append(dict(
            trl_loss=trl_loss.detach(), fused_loss=fused_loss.detach(), trl_grads=trl_grads,
            fused_grads=fused_grads, trl_metrics=trl_metrics, fused_metrics=fused_metrics,
            has_old=inputs.get("old_per_token_logps") is not None,
        ))
        return fused_loss

    def _new_metrics(self, mode, before, remove):
        new = {}
        for key, values in self._metrics[mode].items():
            n = before.get(key, 0)
            if len(values) > n:
                new[key] = list(values[n:])
                if remove:
                    del values[n:]
        return new


def _run_twin(model_dir, tmp_path, lm_head="auto", backend=None, **overrides):
    tokenizer = build_char_tokenizer("abc=")
    trainer = TwinTrainer(
        model=model_dir,
        reward_funcs=_reward,
        args=_args(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        fused_backend=backend or FUSED_BACKEND,
        fused_lm_head=lm_head,
    )
    trainer.train()
    return trainer


def _assert_twin_equal(trainer, dtype=torch.float32):
    records = trainer.records
    assert len(records) == 4  # 2 optimizer steps x 2 accumulation micro-batches
    assert any(r["has_old"] for r in records), "num_iterations=2 must hand old log-probs to the loss"
    if dtype == torch.float32:
        # fp32 on both sides; the two paths differ only in summation order.
        loss_tol, grad_rtol, grad_atol, metric_tol, clip_atol = (2e-5, 1e-6), 1e-4, 1e-5, (1e-4, 1e-6), 1e-6
    else:
        # bf16 weights and activations: TRL's head multiplies in bf16, grpo-fused's reference head in
        # fp32, so logits differ by bf16 rounding; gradients are bf16 (2^-8 relative ulp). A clip flag
        # may flip on a ratio within rounding of its threshold: the clip fractions get 2 tokens' slack.
        loss_tol, grad_rtol, grad_atol, metric_tol, clip_atol = (2e-3, 1e-4), 2e-2, 2e-2, (2e-2, 2e-3), 0.1
    moved, nonzero_grads = False, 0
    for r in records:
        torch.testing.assert_close(r["fused_loss"], r["trl_loss"], rtol=loss_tol[0], atol=loss_tol[1])
        scale = max(g.abs().max().item() for g in r["trl_grads"] if g is not None)
        nonzero_grads += scale > 0
        for g_trl, g_fused in zip(r["trl_grads"], r["fused_grads"]):
            if g_trl is None:
                assert g_fused is None or not g_fused.any()
                continue
            torch.testing.assert_close(g_fused, g_trl, rtol=grad_rtol, atol=grad_atol * scale)
        assert set(r["fused_metrics"]) == set(r["trl_metrics"]), (r["fused_metrics"], r["trl_metrics"])
        for key, trl_values in r["trl_metrics"].items():
            clip = "clip" in key
            torch.testing.assert_close(
                torch.tensor(r["fused_metrics"][key], dtype=torch.float64),
                torch.tensor(trl_values, dtype=torch.float64), rtol=0 if clip else metric_tol[0],
                atol=clip_atol if clip else metric_tol[1], equal_nan=True, msg=key,
            )
        moved |= any(abs(r["trl_metrics"].get(k, [0.0])[0]) > 0 for k in
                     ("clip_ratio/region_mean", "cispo_clip_ratio", "kl"))
    assert nonzero_grads, "every micro-batch had a zero gradient: nothing was compared"
    return moved


# One case per TRL loss type, each turning on a different option that changes the numbers.
CASES = {
    "grpo_beta": dict(loss_type="grpo", beta=0.04),
    "bnpo_delta": dict(loss_type="bnpo", delta=1.2),
    "dr_grpo_beta_no_bias_correction": dict(loss_type="dr_grpo", beta=0.04, use_bias_correction_kl=False),
    "dapo_entropy_bonus": dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01),
    "cispo": dict(loss_type="cispo", epsilon_high=1.02),
    "sapo_beta": dict(loss_type="sapo", beta=0.04),
    "luspo_sequence": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "gspo_grpo_sequence_entropy": dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.02),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trl_trainer_same_loss_grads_metrics(case, model_dir, tmp_path):
    trainer = _run_twin(model_dir, tmp_path, **CASES[case])
    assert trainer._grpo_fused.lm_head == "grpo_fused"
    moved = _assert_twin_equal(trainer)
    # The large learning rate must have moved the policy so that clipping / KL are exercised.
    assert moved, f"{case}: no clipping or KL happened, the comparison would not test them"


def test_trl_head_kept_matches(model_dir, tmp_path):
    # lm_head="trl": TRL's own head computes the log-probs, grpo-fused the loss.
    trainer = _run_twin(model_dir, tmp_path, lm_head="trl", loss_type="dapo", beta=0.04)
    assert trainer._grpo_fused.lm_head == "trl"
    _assert_twin_equal(trainer)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_trl_bf16_model_matches(loss_type, model_dir, tmp_path):
    trainer = _run_twin(model_dir, tmp_path, loss_type=loss_type, beta=0.04,
                        model_init_kwargs={"dtype": torch.bfloat16})
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert _assert_twin_equal(trainer, dtype=torch.bfloat16)


def test_trl_reference_backend_matches(model_dir, tmp_path):
    _assert_twin_equal(_run_twin(model_dir, tmp_path, backend="reference", loss_type="grpo", beta=0.04))


@pytest.mark.skipif(not _backend_ready("triton"), reason="Triton backend unavailable (no CUDA and no TRITON_INTERPRET=1)")
def test_trl_triton_backend_matches(model_dir, tmp_path):
    # Under the CPU interpreter this is slow per launch; V=7, N=48 tokens keep it to seconds.
    _assert_twin_equal(_run_twin(model_dir, tmp_path, backend="triton", loss_type="dapo", beta=0.04,
                                 entropy_coef=0.01))


def test_patch_trainer_on_plain_trl_trainer(model_dir, tmp_path):
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=_reward,
        args=_args(tmp_path, loss_type="bnpo", max_steps=1, num_iterations=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=build_char_tokenizer("abc="),
    )
    assert gf_trl.patch_trainer(trainer, backend="reference") is trainer
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = 2  # set by train(); the normalizers read it
    trainer.model.train()
    fused = trainer._compute_loss(trainer.model, inputs)
    trainer._compute_loss = GRPOTrainer._compute_loss.__get__(trainer)
    reference = trainer._compute_loss(trainer.model, inputs)
    torch.testing.assert_close(fused, reference, rtol=2e-5, atol=1e-6)


def test_config_mapping():
    args = trl.GRPOConfig(output_dir="unused", loss_type="dapo", epsilon=0.15, epsilon_high=0.3, delta=2.0,
                          beta=0.05, temperature=0.7, importance_sampling_level="sequence",
                          use_bias_correction_kl=False, sapo_temperature_pos=0.8, sapo_temperature_neg=1.2,
                          entropy_coef=0.01, max_completion_length=33, report_to="none", use_cpu=True, bf16=False)
    cfg = gf_trl.config_from_trl_args(args)
    assert (cfg.loss_type, cfg.epsilon_low, cfg.eps_high, cfg.delta, cfg.beta) == ("dapo", 0.15, 0.3, 2.0, 0.05)
    assert (cfg.temperature, cfg.importance_sampling_level, cfg.use_bias_correction_kl) == (0.7, "sequence", False)
    assert (cfg.sapo_temperature_pos, cfg.sapo_temperature_neg, cfg.entropy_coef) == (0.8, 1.2, 0.01)
    assert cfg.max_completion_length == 33 and cfg.kl_estimator == "k3"
    # epsilon_high unset means epsilon, as in TRL.
    args_sym = trl.GRPOConfig(output_dir="unused", epsilon=0.1, report_to="none", use_cpu=True, bf16=False)
    assert gf_trl.config_from_trl_args(args_sym).eps_high == 0.1


# Options grpo_fused.GRPOConfig does not state: the patched trainer runs TRL's own loss code on the
# grpo-fused head. Each changes the numbers here (the assertions below check that it did something).
TRL_ONLY = {
    "vespo": dict(loss_type="vespo", beta=0.04),
    "top_entropy_quantile": dict(loss_type="dapo", top_entropy_quantile=0.2, entropy_coef=0.01),
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    "adaptive_entropy": dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=10.0,
                             entropy_coef_delta=0.005),
}


@pytest.mark.parametrize("case", list(TRL_ONLY))
def test_trl_only_options_run_trl_loss_on_the_fused_head(case, model_dir, tmp_path):
    trainer = _run_twin(model_dir, tmp_path, **TRL_ONLY[case])
    assert trainer._grpo_fused.config is None and trainer._grpo_fused.lm_head == "grpo_fused"
    _assert_twin_equal(trainer)
    logged = {k for r in trainer.records for k in r["trl_metrics"]}
    if case == "vespo":
        assert "vespo/phi_seq_mean" in logged
    if case == "adaptive_entropy":
        coefs = [v for r in trainer.records for v in r["fused_metrics"].get("entropy_coef", [])]
        assert coefs and coefs[0] != 0.01, "the controller never moved"


def test_fused_head_refuses_softcapping():
    model = build_tiny_model(8, hidden_size=16, num_layers=1, num_heads=2)
    model.config.final_logit_softcapping = 30.0
    assert gf_trl._resolve_lm_head(model, "auto")[0] == "trl"
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        gf_trl._resolve_lm_head(model, "grpo_fused")
    with pytest.raises(ValueError, match="lm_head must be one of"):
        gf_trl._resolve_lm_head(model, "fused")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_vllm_is_ratio_tool_mask_and_eval_mode(loss_type, model_dir, tmp_path):
    # vLLM is not installed: the IS ratio and tool mask TRL would attach are injected into real inputs,
    # and the flags TRL reads are set, so both loss functions take those branches.
    trainer = gf_trl.FusedGRPOTrainer(
        model=model_dir, reward_funcs=_reward,
        args=_args(tmp_path, loss_type=loss_type, beta=0.04, entropy_coef=0.01, max_steps=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=build_char_tokenizer("abc="), fused_backend=FUSED_BACKEND,
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    B, T = inputs["completion_ids"].shape
    g = torch.Generator().manual_seed(0)
    inputs["importance_sampling_ratio"] = torch.rand(B, T, generator=g) + 0.5
    inputs["tool_mask"] = (torch.rand(B, T, generator=g) > 0.2).int()
    inputs["old_per_token_logps"] = inputs["ref_per_token_logps"] + 0.3 * torch.randn(B, T, generator=g)
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.current_gradient_accumulation_steps = 2  # set by train(); the normalizers read it
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for training in (True, False):
        trainer.model.train(training)
        trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        fused_loss = gf_trl.fused_compute_loss(trainer, trainer.model, inputs)
        torch.testing.assert_close(fused_loss, trl_loss, rtol=2e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(fused_loss, params), torch.autograd.grad(trl_loss, params)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)



@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    # A randomly initialized two-expert Qwen2-MoE whose config asks for router logits and carries a
    # router_aux_loss_coef, so TRL adds the load-balancing loss.
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2_moe")
    tokenizer = build_char_tokenizer("abc=")
    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                            output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2MoeForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_moe_router_loss_is_added_as_trl_adds_it(moe_model_dir, tmp_path):
    trainer = _run_twin(moe_model_dir, tmp_path, loss_type="dapo", beta=0.04)
    assert trainer.aux_loss_enabled and trainer._grpo_fused.lm_head == "grpo_fused"
    _assert_twin_equal(trainer)
    assert all("aux_loss" in r["fused_metrics"] for r in trainer.records)


def _train_logs(model_dir, tmp_path, trainer_class, **overrides):
    trainer = trainer_class(
        model=model_dir, reward_funcs=_reward, args=_args(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=build_char_tokenizer("abc="),
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], trainer


@pytest.mark.parametrize("precision", ["bf16_model", "bf16_autocast"])
def test_bf16_run_matches_trl_within_trl_own_head_precision(precision, model_dir, tmp_path):
    # Unmodified TRL multiplies its head in bf16; grpo-fused's head in fp32. How far two TRL runs drift
    # apart when only the head's precision changes (cast_lm_head_to_fp32) is the tolerance.
    overrides = dict(loss_type="dapo", beta=0.04, max_steps=2, num_iterations=1, gradient_accumulation_steps=1)
    if precision == "bf16_model":
        overrides["model_init_kwargs"] = {"dtype": torch.bfloat16}
    else:
        overrides.update(bf16=True, use_cpu=True)
    trl_logs, _ = _train_logs(model_dir, tmp_path / "trl", GRPOTrainer, **overrides)
    control_logs, _ = _train_logs(model_dir, tmp_path / "control", GRPOTrainer, cast_lm_head_to_fp32=True, **overrides)
    fused_logs, fused = _train_logs(model_dir, tmp_path / "fused", gf_trl.FusedGRPOTrainer, **overrides)
    # On-policy, the old and reference passes and the loss share the fused head: the first step's KL is
    # exactly 0 and the loss is exactly -mean(advantage) over the tokens (dapo), in any precision.
    assert fused_logs[0]["kl"] == 0.0
    for key in ("loss", "grad_norm", "entropy"):
        for step, (mine, theirs, control) in enumerate(zip(fused_logs, trl_logs, control_logs)):
            bound = 2 * abs(control[key] - theirs[key]) + 1e-6 * max(1.0, abs(theirs[key]))
            assert abs(mine[key] - theirs[key]) <= bound, f"step {step} {key}: {mine[key]} vs TRL {theirs[key]} " \
                                                          f"(TRL with an fp32 head: {control[key]})"


def test_peft_lora_with_the_head_in_modules_to_save(model_dir, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is part of the test extra")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                           modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    tokenizer = build_char_tokenizer("abc=")
    trainer = TwinTrainer(
        model=model_dir, reward_funcs=_reward, args=_args(tmp_path, loss_type="dapo", beta=0.04),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
        peft_config=lora, fused_backend=FUSED_BACKEND,
    )
    assert trainer._grpo_fused.lm_head == "grpo_fused"
    trainer.train()
    _assert_twin_equal(trainer)


@pytest.mark.parametrize("shape", ["token", "sequence"])
def test_vllm_importance_sampling_modes(shape, model_dir, tmp_path):
    # TRL's token_* modes hand the loss a (B, T) ratio, its sequence_* modes a (B, 1) one (truncated or
    # masked to 0 by TRL before the loss): both multiply the policy term.
    trainer = gf_trl.FusedGRPOTrainer(
        model=model_dir, reward_funcs=_reward, args=_args(tmp_path, loss_type="grpo", beta=0.04, max_steps=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=build_char_tokenizer("abc="), fused_backend=FUSED_BACKEND,
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    B, T = inputs["completion_ids"].shape
    g = torch.Generator().manual_seed(1)
    ratio = torch.rand((B, T) if shape == "token" else (B, 1), generator=g) + 0.5
    ratio[0] = 0.0  # a sequence_mask / token_mask mode dropped it
    inputs["importance_sampling_ratio"] = ratio
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    with gf_trl.using_trl_head(trainer):
        trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    fused_loss = gf_trl.fused_compute_loss(trainer, trainer.model, inputs)
    torch.testing.assert_close(fused_loss, trl_loss, rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Sampling-support replay (opt-in).
# --------------------------------------------------------------------------------------


def test_sampling_rule_from_trl_args():
    args = _args("/tmp/unused", top_k=5, top_p=0.9, min_p=None)
    assert gf_trl.sampling_rule_from_trl_args(args) == gf.SamplingRule(top_k=5, top_p=0.9, top_k_ties="all")
    args = _args("/tmp/unused", top_k=0, top_p=1.0, generation_kwargs={"top_k": 7})
    assert gf_trl.sampling_rule_from_trl_args(args) == gf.SamplingRule(top_k=7, top_k_ties="all")
    args = _args("/tmp/unused", top_k=0, top_p=1.0)
    assert not gf_trl.sampling_rule_from_trl_args(args).active
    args.use_vllm = True  # vLLM's top-k keeps exactly k; min-p with top-p is vLLM's order
    args.top_p, args.min_p = 0.8, 0.1
    assert gf_trl.sampling_rule_from_trl_args(args) == gf.SamplingRule(top_p=0.8, min_p=0.1)
    for overrides, words in (
        (dict(repetition_penalty=1.1), "repetition_penalty"),
        (dict(generation_kwargs={"bad_words": ["a"]}), "bad_words"),
        (dict(top_p=0.8, min_p=0.1), "top_p with min_p"),
    ):
        with pytest.raises(ValueError, match=words):
            gf_trl.sampling_rule_from_trl_args(_args("/tmp/unused", **overrides))


def test_sampling_support_replays_transformers_sampler(model_dir, tmp_path):
    """transformers samples with top-k 3 and top-p 0.9; with the replay, every sampled token lies in
    grpo-fused's support (sampling/outside_support is 0 at every on-policy step), the policy head scores the
    truncated distribution (checked against the reference on the model's own logits) and the reference
    model's head the full one."""
    trainer = gf_trl.FusedGRPOTrainer(
        model=model_dir, reward_funcs=_reward,
        # One iteration per generation: every step scores tokens of the policy that sampled them.
        args=_args(tmp_path, loss_type="grpo", beta=0.04, top_k=3, top_p=0.9, max_steps=2, num_iterations=1),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=build_char_tokenizer("abc="),
        fused_backend=FUSED_BACKEND, fused_sampling_support=True,
    )
    assert trainer._grpo_fused.sampling == gf.SamplingRule(top_k=3, top_p=0.9, top_k_ties="all")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["sampling/outside_support"] == 0.0 for h in logs)

    policy, reference = gf_trl._head_models(trainer)
    ids = torch.tensor([[1, 2, 3, 4, 2, 1, 3]])
    labels = ids.clone()
    with torch.no_grad():
        for model, rule in ((policy, dict(top_k=3, top_p=0.9, top_k_ties="all")), (reference, {})):
            head = model(input_ids=ids, labels=labels, fused_lm_head=True)
            with gf_trl.using_trl_head(trainer):
                logits = model(input_ids=ids).logits[:, :-1]
            want, _ = gf.reference.selective_log_softmax(logits.double(), ids[:, 1:], 0.9, **rule)
            torch.testing.assert_close(head.log_probs.double(), want, rtol=1e-5, atol=1e-5)


def test_sampling_support_refusals(model_dir, tmp_path):
    build = lambda **kw: gf_trl.FusedGRPOTrainer(  # noqa: E731
        model=model_dir, reward_funcs=_reward, args=_args(tmp_path, top_k=3, **kw),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=build_char_tokenizer("abc="),
        fused_backend="reference", fused_sampling_support=True)
    with pytest.raises(ValueError, match="needs grpo-fused's loss, and loss_type='vespo'"):
        build(loss_type="vespo")
