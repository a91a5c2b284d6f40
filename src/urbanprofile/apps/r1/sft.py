"""The SFT baseline of a run: the same LoRA, trained with cross-entropy on the true answer, for as many steps
as GRPO."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from urbanprofile.apps.r1.config import ANSWER_OPEN, R1Config, prepare_task
from urbanprofile.apps.r1.policy import chat_prompt, load_policy, lora_config, top_layers
from urbanprofile.apps.r1.task import R1Data, R1Example
from urbanprofile.errors import TrainingError, require


def train_sft(config: R1Config, run_dir: str | Path, data: R1Data | None = None,
              cities: list[Any] | None = None) -> dict[str, Any]:
    """The SFT baseline: LoRA (same rank and layers) with cross-entropy on ``<answer>true level</answer>``.

    Shuffled passes over the same training regions (the usual SFT recipe, not group-balanced), as many steps
    as GRPO with as many prompts per step as a GRPO step has groups.
    """
    from tqdm import tqdm


    config.check()
    run_dir = Path(run_dir)
    data = data if data is not None else prepare_task(config, cities)
    torch.manual_seed(config.random_state)
    model, tokenizer = load_policy(config.model, config.random_state, config.device)
    if config.lora_rank > 0:
        peft = require("peft", "rl")
        layers = top_layers(model, config.lora_layers)
        lora = lora_config(config.lora_rank, 2 * config.lora_rank, layers=layers, model=model)
        model = peft.get_peft_model(model, lora)
    train = data.split("train")
    batch = max(len(data.train_groups), 1)
    rng = np.random.default_rng(config.random_state)
    passes = math.ceil(config.steps * batch / len(train))
    order = np.concatenate([rng.permutation(len(train)) for _ in range(passes)])[: config.steps * batch]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.sft_learning_rate)
    eos = tokenizer.eos_token or ""
    device = model.device
    model.train()
    start = time.perf_counter()
    losses = []
    n_steps = math.ceil(len(order) / batch)
    for k in tqdm(range(n_steps), desc="SFT", unit="step"):
        rows = [train[i] for i in order[k * batch : (k + 1) * batch]]
        prompts = [chat_prompt(tokenizer, e.prompt, config.prefix) for e in rows]
        answers = [f"{'' if config.answer_prefix else ANSWER_OPEN}{_answer_text(e, config.answer)}</answer>{eos}"
                   for e in rows]
        input_ids, labels = [], []
        for p, a in zip(prompts, answers, strict=True):
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(a, add_special_tokens=False)["input_ids"]
            input_ids.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
        width = max(len(x) for x in input_ids)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in input_ids], device=device)
        lab = torch.tensor([[-100] * (width - len(x)) + x for x in labels], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in input_ids], device=device)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"SFT loss is {loss.item()} at step {k}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    seconds = time.perf_counter() - start
    final = run_dir / "sft" / "final"
    final.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    summary = {"steps": n_steps, "seconds": seconds, "seconds_per_step": seconds / max(n_steps, 1),
               "loss_first": losses[0] if losses else None,
               "loss_last": float(np.mean(losses[-5:])) if losses else None}
    (run_dir / "sft" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _answer_text(example: R1Example, answer: str) -> str:
    if answer == "level":
        return str(int(example.target))
    return str(round(example.label))
