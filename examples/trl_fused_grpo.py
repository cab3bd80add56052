"""TRL's GRPOTrainer with its loss computed by grpo-fused, offline, on CPU, in under a minute.

    python examples/trl_fused_grpo.py

A tiny Qwen2 built from a config and a character tokenizer stand in for a real model (pass any
local model directory as ``model=`` instead). The only grpo-fused line is the trainer class;
``grpo_fused.integrations.trl.patch_trainer(trainer)`` does the same to an existing trainer.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402

from grpo_fused.integrations.trl import FusedGRPOTrainer  # noqa: E402
from grpo_fused.trainer.demo_task import build_char_tokenizer, build_tiny_model, copy_reward, copy_task  # noqa: E402


def main():
    torch.set_num_threads(1)
    model_dir = tempfile.mkdtemp(prefix="tiny_qwen2_")
    tokenizer = build_char_tokenizer()
    build_tiny_model(len(tokenizer), hidden_size=64, num_layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = copy_task(num_prompts=64)
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_fused_"),
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04,
        per_device_train_batch_size=16, num_generations=16, max_completion_length=4,
        learning_rate=5e-3, max_steps=20, logging_steps=5, report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
    )
    trainer = FusedGRPOTrainer(
        model=model_dir,
        reward_funcs=copy_reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        fused_backend="auto",  # Triton on CUDA, the C++ extension on CPU
    )
    trainer.train()


if __name__ == "__main__":
    main()
