"""The trainer's embedded default task: a character tokenizer, a tiny causal LM and a copy task.

What ``grpo-fused train`` runs without ``--model``: a randomly initialized Qwen2 (no download), one
token per character, prompts ``"cab="`` whose verifiable answer is ``"cab"`` (reward = fraction of
characters right). Kept apart from the training loop so that the loop reads as the trainer and
this file as one example task; tests and the README's reward curve use it too.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence

import torch

# Characters of the embedded tokenizer: the copy task's letters, digits and a few symbols. A small
# vocabulary keeps the random-init policy's first rewards well above zero.
DEFAULT_CHARS = "abcdefghij0123456789=+- "
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
COPY_LETTERS = "abcdef"

def build_char_tokenizer(chars: str = DEFAULT_CHARS):
    """A ``PreTrainedTokenizerFast`` with one token per character, built locally (no download).

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then ``chars`` in order. Decoding joins characters.
    """
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(dict.fromkeys(chars)))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                     pad_token_id: int = 0, eos_token_id: int = 1):
    """A randomly initialized Qwen2 causal LM built from a config: ``hidden_size`` x ``num_layers``, untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def copy_task(num_prompts: int = 256, length: int = 3, letters: str = COPY_LETTERS, seed: int = 0) -> List[Dict]:
    """Prompts ``"<letters>="`` whose verifiable answer is the same letters: ``{"prompt", "answer"}`` rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        word = "".join(rng.choice(letters) for _ in range(length))
        rows.append({"prompt": word + "=", "answer": word})
    return rows


def copy_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_) -> List[float]:
    """Fraction of positions where the completion matches the answer, over the longer of the two
    (so extra characters cost); 1.0 only for the exact answer."""
    scores = []
    for completion, target in zip(completions, answer):
        hits = sum(a == b for a, b in zip(completion, target))
        scores.append(hits / max(len(completion), len(target), 1))
    return scores


