"""The thin trainer: its pieces against hand-computed values, a few-step run through ``main`` (log,
PNG, checkpoint), and one update computed by each available backend against the reference.

The embedded model here is hidden 16 x 1 layer (vocab 27), 2 prompts x 4 completions: seconds on CPU.
"""

import copy
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import fused_backends  # noqa: E402
from grpo_fused import trainer as T  # noqa: E402

TINY = ["--hidden-size", "16", "--num-layers", "1", "--prompts-per-step", "2", "--num-generations", "4",
        "--threads", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_completion_mask_stops_after_first_eos():
    eos = 1
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.int32)
    assert torch.equal(T.completion_mask_from(ids, eos), expected)


def test_copy_reward_hand_values():
    got = T.copy_reward(["abc="] * 5, ["abc", "abd", "ab", "abcab", ""], answer=["abc"] * 5)
    assert got == pytest.approx([1.0, 2 / 3, 2 / 3, 3 / 5, 0.0])


def test_char_tokenizer_round_trip():
    tok = T.build_char_tokenizer()
    ids = tok("cab=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and tok.decode(ids) == "cab="
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_train_args_validation():
    with pytest.raises(ValueError, match="num_generations \\(--num-generations\\) must be >= 2"):
        T.TrainArgs(num_generations=1).validate()
    with pytest.raises(ValueError, match="grad_accum \\(--grad-accum\\)=3 must divide"):
        T.TrainArgs(prompts_per_step=2, num_generations=4, grad_accum=3).validate()
    with pytest.raises(ValueError, match="loss_type"):
        T.TrainArgs(loss_type="ppo").validate()
    with pytest.raises(ValueError, match="module:function"):
        T.TrainArgs(reward="no_colon").validate()


def test_main_short_run_writes_log_png_checkpoint(tmp_path):
    out = tmp_path / "run"
    rc = T.main(["--steps", "3", "--output-dir", str(out), "--grad-accum", "2", "--num-iterations", "2",
                 "--beta", "0.04", "--backend", "reference", *TINY])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward_mean", "loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm", "completion_length"):
            assert math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["entropy"] > 0
    assert all(r["kl"] >= 0 for r in rows)  # k3 is never negative
    with open(out / "reward_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-final", local_files_only=True)
    assert reloaded.config.hidden_size == 16


def test_prompts_file_and_user_reward(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ab=", "target": "a"}\n{"prompt": "ba=", "target": "b"}\n')
    module = tmp_path / "my_reward.py"
    module.write_text(
        "CALLS = []\n"
        "def score(prompts, completions, target, **kw):\n"
        "    CALLS.append((list(prompts), list(target)))\n"
        "    return [float(c.startswith(t)) for c, t in zip(completions, target)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    T.main(["--steps", "2", "--output-dir", str(out), "--prompts", str(prompts), "--reward", "my_reward:score",
            "--backend", "reference", *TINY])
    import my_reward

    assert len(my_reward.CALLS) == 2
    seen_prompts, seen_targets = my_reward.CALLS[0]
    assert len(seen_prompts) == 8  # 2 prompts x 4 completions, each prompt's column repeated per completion
    assert all({"ab=": "a", "ba=": "b"}[p] == t for p, t in zip(seen_prompts, seen_targets))




@pytest.mark.parametrize("backend", fused_backends("linear_grpo_loss"))
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_fused_update_matches_reference(backend, loss_type):
    # One rollout, then one update per backend from the same weights: same loss, metrics and gradients.
    args = T.TrainArgs(hidden_size=16, num_layers=1, prompts_per_step=2, num_generations=4, grad_accum=2,
                       num_iterations=1, beta=0.04, loss_type=loss_type, progress=False)
    torch.manual_seed(0)
    model, tokenizer = T._load_model_and_tokenizer(args, torch.device("cpu"))
    rows = T.copy_task(num_prompts=2, seed=1)
    batch = T._rollout(model, tokenizer, rows, args.num_generations, args, torch.device("cpu"))
    rewards = torch.tensor(T.copy_reward(batch["prompts"], batch["completions"], **batch["columns"]))
    rewards = rewards + torch.linspace(0, 0.5, rewards.numel())  # a signal in every group
    advantages, _ = T.api.group_advantages(rewards, group_size=args.num_generations, backend="reference")
    ref_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # move the policy away from the reference so the KL term is nonzero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    results = {}
    for name in ("reference", backend):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        metrics = T._update(m, ref_model, opt, batch, advantages, args.loss_config(), dataclass_replace(args, backend=name))
        results[name] = (metrics, [p.grad.clone() for p in m.parameters()])
    (m_ref, g_ref), (m_fused, g_fused) = results["reference"], results[backend]
    assert m_ref["kl"] > 0
    for key in m_ref:
        assert m_fused[key] == pytest.approx(m_ref[key], rel=1e-4, abs=1e-6), key
    scale = max(g.abs().max().item() for g in g_ref)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def dataclass_replace(args, **changes):
    import dataclasses

    return dataclasses.replace(args, **changes)


def test_local_model_directory(tmp_path):
    model_dir = tmp_path / "model"
    tokenizer = T.build_char_tokenizer()
    model = T.build_tiny_model(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=3)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    summary = T.train(T.TrainArgs(model=str(model_dir), steps=1, prompts_per_step=2, num_generations=4,
                                  output_dir=str(tmp_path / "run"), backend="reference", progress=False))
    assert os.path.isfile(summary["metrics"])
    # A head the hidden-state path cannot reproduce is refused, not silently approximated.
    model.config.final_logit_softcapping = 30.0
    model.save_pretrained(model_dir)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        T.train(T.TrainArgs(model=str(model_dir), steps=1, output_dir=str(tmp_path / "run2"), progress=False))
    with pytest.raises(ValueError, match="local Hugging Face model folder"):
        T.train(T.TrainArgs(model=str(tmp_path / "missing"), steps=1, output_dir=str(tmp_path / "run3"),
                            progress=False))
