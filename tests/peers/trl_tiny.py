"""A tiny causal LM, tokenizer, prompt set and reward for running TRL's GRPOTrainer on CPU.

Everything is built here (nothing from a model hub): a character-level tokenizer over a
12-symbol vocabulary (so that the end-of-sequence token is sampled often and completions have
varied lengths), a 1-layer Llama with hidden size 16 (or a 2-expert Mixtral of that size), a
dataset of short letter prompts and a deterministic reward that prefers completions with many
``a`` and few other letters.

The model and tokenizer are saved to a directory once (:func:`save_tiny`): the trainers load
their policy from there, and TRL builds its reference model (``beta > 0``) from the same path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from trl import GRPOConfig

__all__ = [
    "LETTERS",
    "build_model",
    "build_tokenizer",
    "load_model",
    "prompts",
    "reward",
    "save_tiny",
]

LETTERS = "abcdefgh"
SPECIALS = ("<pad>", "<eos>", "<bos>", " ")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``LETTERS`` and space, plus pad, eos and bos (12 ids)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(LETTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        padding_side="left",
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, moe: bool = False) -> Any:
    """A 1-layer Llama, hidden 16, 2 heads, float32, seeded; with ``moe`` a Mixtral of the same
    size with 2 experts (1 per token) and ``router_aux_loss_coef=0.1``, so that TRL adds its
    load-balancing loss."""
    torch.manual_seed(seed)
    size = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    if moe:
        experts = dict(num_local_experts=2, num_experts_per_tok=1, router_aux_loss_coef=0.1)
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=16, **experts, **size))
    else:
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=32, **size))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(directory: Path, seed: int = 0, moe: bool = False) -> Path:
    """Build and save the tokenizer and model into ``directory``; returns it."""
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed, moe).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_model(directory: Path) -> Any:
    """A fresh copy of the saved model (identical initial weights for every trainer)."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def prompts(n: int = 8) -> Dataset:
    """``n`` short letter prompts in TRL's standard (non-conversational) format."""
    texts = [" ".join(LETTERS[(i + k) % len(LETTERS)] for k in range(3)) + " " for i in range(n)]
    return Dataset.from_dict({"prompt": texts})


def reward(completions: list[str], **kwargs: object) -> list[float]:
    """Deterministic: +1 per ``a``, -0.25 per other letter, +0.5 for ending early (short)."""
    out = []
    for text in completions:
        letters = [c for c in text if c in LETTERS]
        out.append(
            letters.count("a") - 0.25 * (len(letters) - letters.count("a")) + 0.5 * (len(text) < 6)
        )
    return out


def config(output_dir: Path, **options: Any) -> GRPOConfig:
    """The runs' GRPOConfig: 4 prompts x 4 generations of up to 8 tokens per micro-batch, 3
    optimizer steps of SGD (lr 0.5: the ratios move within a step), logs at every step, CPU,
    float32, seed 1; ``options`` override."""
    base: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=1,
        bf16=False,
        disable_tqdm=True,
    )
    base.update(options)
    return GRPOConfig(**base)


def trainer(cls: type, directory: Path, output_dir: Path, model: Any = None, **options: Any) -> Any:
    """``cls`` (GRPOTrainer or a subclass) on the saved tiny model in ``directory``."""
    return cls(
        model=load_model(directory) if model is None else model,
        reward_funcs=reward,
        args=config(output_dir, **options),
        train_dataset=prompts(),
        eval_dataset=prompts(4) if options.get("eval_strategy") else None,
        processing_class=build_tokenizer(),
    )


def history(cls: type, directory: Path, output_dir: Path, **options: Any) -> list[dict[str, Any]]:
    """Train ``cls`` and return its log history (one dict per logged step)."""
    run = trainer(cls, directory, output_dir / cls.__name__, **options)
    run.train()
    return run.state.log_history


def main(argv: list[str] | None = None) -> None:
    """``python -m peers.trl_tiny DIRECTORY OUT.json OPTIONS_JSON`` (under torch.distributed.run):
    TRL's GRPOTrainer, then SapoGRPOTrainer, on the tiny model saved in DIRECTORY; rank 0
    writes both log histories to OUT.json as {"trl": [...], "ours": [...]}."""
    from sapo_torch.integrations.trl import SapoGRPOTrainer
    from trl import GRPOTrainer

    directory, out, options = argv if argv is not None else sys.argv[1:]
    histories = {
        name: history(cls, Path(directory), Path(out).parent / name, **json.loads(options))
        for name, cls in (("trl", GRPOTrainer), ("ours", SapoGRPOTrainer))
    }
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(histories))


if __name__ == "__main__":
    main()
