"""GRPO post-training with geography-balanced batches: our prompt-sharing loop (``prefix``) or trl's
``GRPOTrainer`` (``trl``).

A run folder holds ``config.json``, ``checkpoints/`` (resumable), ``reward_log.jsonl`` (every sampled completion's
reward with its step and group), ``train_log.json``, ``train_summary.json``, ``reward_curve.png``, ``final/`` (the
adapter or model) and, with SFT (:mod:`urbanprofile.apps.r1.sft`), ``sft/final/``."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from urbanprofile.apps.r1.config import R1Config, first_tokens, last_checkpoint, prepare_task, write_config
from urbanprofile.apps.r1.grpo import grpo_step
from urbanprofile.apps.r1.policy import (
    chat_prompt,
    check_model_path,
    load_policy,
    lora_config,
    resolve_device,
    top_layers,
)
from urbanprofile.apps.r1.prompts import format_reward, parse_answer
from urbanprofile.apps.r1.rewards import (
    REWARD_LOG,
    RewardLog,
    append_rewards,
    make_reward,
    plot_reward_curves,
    reward_summary,
    trim_reward_log,
)
from urbanprofile.apps.r1.task import R1Data, R1Example, balanced_order
from urbanprofile.errors import TrainingError, UrbanProfileError, require


def training_order(data: R1Data, config: R1Config) -> list[R1Example]:
    """The prompts of every step, step after step (balanced: one per group per step)."""
    train = data.split("train")
    if not train:
        raise UrbanProfileError("no training regions")
    order, _ = balanced_order(train, config.steps, config.random_state)
    if not config.balanced:
        rng = np.random.default_rng(config.random_state)
        order = [int(i) for i in rng.choice(len(train), size=len(order), replace=True)]
    return [train[i] for i in order]


def train_grpo(
    config: R1Config, run_dir: str | Path, resume: bool = True, cities: list[Any] | None = None,
    data: R1Data | None = None,
) -> dict[str, Any]:
    """Post-train the policy with GRPO; resumes from the last checkpoint in ``run_dir`` when there is one.

    Returns:
        A summary: steps, seconds per step, peak memory, final mean rewards.
    """


    config.check()
    check_model_path(config.model)
    run_dir = Path(run_dir)
    data = data if data is not None else prepare_task(config, cities)
    write_config(run_dir, config, resume)
    checkpoints = run_dir / "checkpoints"
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    last = last_checkpoint(checkpoints)
    reward_path = run_dir / REWARD_LOG
    if last is None:
        reward_path.unlink(missing_ok=True)
    else:
        trim_reward_log(reward_path, int(last.name.rpartition("-")[2]))

    torch.manual_seed(config.random_state)
    start_step = int(last.name.rpartition("-")[2]) if last is not None else 0
    start = time.perf_counter()
    if config.engine == "trl":
        tokenizer = _train_with_trl(config, run_dir, data, last, reward_path)
    else:
        tokenizer = _train_prefix(config, run_dir, data, last, reward_path)
    seconds = time.perf_counter() - start
    n_groups = len(data.train_groups)
    summary = {
        "engine": config.engine,
        "steps": config.steps,
        "steps_this_call": config.steps - start_step,
        "resumed_from_step": start_step,
        "seconds": seconds,
        "seconds_per_step": seconds / max(config.steps - start_step, 1),
        "groups": data.train_groups,
        "n_train": len(data.split("train")),
        "n_test": len(data.split("test")),
        "completions_per_step": n_groups * config.generations,
    }
    del tokenizer
    # The prefix engine's log keeps each prompt's G completions together, so advantages can be rebuilt.
    summary.update(reward_summary(reward_path, generations=config.generations if config.engine == "prefix" else None))
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    plot_reward_curves(run_dir)
    return summary


def _train_with_trl(config: R1Config, run_dir: Path, data: R1Data, last: Path | None, reward_path: Path) -> Any:
    require("trl", "rl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer


    checkpoints = run_dir / "checkpoints"
    model, tokenizer = load_policy(config.model, config.random_state, config.device)
    steps = training_order(data, config)
    n_groups = len(data.train_groups)
    dataset = Dataset.from_list(
        [{"prompt": chat_prompt(tokenizer, e.prompt, config.prefix), "target": e.target, "group": e.group}
         for e in steps]
    )
    args = GRPOConfig(
        output_dir=str(checkpoints),
        max_steps=config.steps,
        per_device_train_batch_size=n_groups * config.generations,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=config.generations,
        max_completion_length=config.max_new_tokens,
        shuffle_dataset=False,  # the dataset is already in balanced batch order
        learning_rate=config.learning_rate,
        beta=config.beta,
        epsilon=config.epsilon,
        temperature=config.temperature,
        loss_type="grpo",
        scale_rewards="group" if config.scale_rewards else "none",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_every,
        save_total_limit=2,
        report_to="none",
        use_cpu=resolve_device(config.device) == "cpu",
        bf16=False,
        fp16=False,
        seed=config.random_state,
        data_seed=config.random_state,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        log_completions=False,
        gradient_checkpointing=False,  # short sequences: memory is not the limit, compute is
    )
    reward_log = RewardLog(reward_path, make_reward(config, data), config.prefix)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=cast(Any, reward_log.functions()),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=(
            lora_config(config.lora_rank, 2 * config.lora_rank, layers=top_layers(model, config.lora_layers),
                        model=model)
            if config.lora_rank > 0 else None
        ),
    )
    trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    final = run_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    history = [row for row in trainer.state.log_history if "loss" in row or "reward" in row]
    (run_dir / "train_log.json").write_text(json.dumps(history, indent=1, default=float))
    return tokenizer


def _train_prefix(config: R1Config, run_dir: Path, data: R1Data, last: Path | None, reward_path: Path) -> Any:
    """Our prompt-sharing GRPO loop; checkpoints hold the adapter (or model), the optimizer and the log."""

    from safetensors.torch import load_file
    from tqdm import tqdm

    sft_final = run_dir / "sft" / "final"
    if config.init == "sft" and not sft_final.is_dir():
        raise UrbanProfileError(f"{run_dir}: init=sft needs the SFT model ({sft_final} is missing); train SFT first")
    start_from = str(sft_final) if config.init == "sft" and config.lora_rank == 0 else config.model
    model, tokenizer = load_policy(start_from, config.random_state, config.device)
    ref_model = None
    if config.lora_rank > 0:
        peft = require("peft", "rl")
        layers = top_layers(model, config.lora_layers)
        lora = lora_config(config.lora_rank, 2 * config.lora_rank, layers=layers, model=model)
        model = peft.get_peft_model(model, lora)
        if config.init == "sft":  # start from the SFT adapter; the SFT policy is also the KL reference
            peft.set_peft_model_state_dict(model, load_file(str(sft_final / "adapter_model.safetensors")))
    if config.beta > 0 and (config.lora_rank == 0 or config.init == "sft"):
        ref_model = copy.deepcopy(model).eval()
        ref_model.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    history: list[dict[str, Any]] = []
    start_step = 0
    if last is not None:
        weights = last / ("adapter_model.safetensors" if config.lora_rank > 0 else "model.safetensors")
        state = load_file(str(weights))
        if config.lora_rank > 0:
            peft.set_peft_model_state_dict(model, state)
        else:
            model.load_state_dict(state, strict=False)
        optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        history = json.loads((last / "history.json").read_text())
        start_step = int(last.name.rpartition("-")[2])
    order = training_order(data, config)
    accuracy = make_reward(config, data)
    n_groups = len(data.train_groups)
    prompts = [chat_prompt(tokenizer, e.prompt, config.prefix) for e in order]
    allowed = first_tokens(config, tokenizer)
    first_allowed = None if allowed is None else torch.tensor(allowed)
    checkpoints = run_dir / "checkpoints"
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="GRPO", unit="step")
    for step in bar:
        batch = order[step * n_groups : (step + 1) * n_groups]

        def rewards(texts: list[str], i: int, batch: list[R1Example] = batch, step: int = step) -> list[float]:
            example = batch[i]
            parsed = [parse_answer(config.full_completion(t), config.answer, config.n_levels) for t in texts]
            fmt = [format_reward(p) for p in parsed]
            acc = [accuracy(p, example.target, example.group) for p in parsed]
            append_rewards(reward_path, step + 1, [example.group] * len(parsed), parsed, acc)
            return [f + a for f, a in zip(fmt, acc, strict=True)]

        generator = torch.Generator().manual_seed(config.random_state * 100_003 + step)
        torch.manual_seed(config.random_state * 100_003 + step)
        tick = time.perf_counter()
        stats = grpo_step(
            model, tokenizer, prompts[step * n_groups : (step + 1) * n_groups], rewards, optimizer,
            config.generations, config.answer_tokens, config.temperature, config.beta, config.epsilon,
            generator=generator, ref_model=ref_model, scale_rewards=config.scale_rewards,
            entropy_coef=config.entropy_coef, first_allowed=first_allowed,
        )
        if not math.isfinite(stats["loss"]):
            raise TrainingError(f"GRPO loss is {stats['loss']} at step {step + 1}")
        history.append({"step": step + 1, **stats, "step_seconds": time.perf_counter() - tick})
        bar.set_postfix(reward=f"{stats['reward']:.2f}", kl=f"{stats['kl']:.3f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            folder = checkpoints / f"checkpoint-{step + 1}"
            partial = checkpoints / f".partial-{step + 1}"
            partial.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(partial))
            torch.save(optimizer.state_dict(), partial / "optimizer.pt")
            (partial / "history.json").write_text(json.dumps(history))
            (partial / "trainer_state.json").write_text(json.dumps({"global_step": step + 1}))
            partial.rename(folder)  # a kill mid-save leaves no half-written checkpoint behind
            for old in sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))[:-2]:
                shutil.rmtree(old)
    final = run_dir / "final"
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    (run_dir / "train_log.json").write_text(json.dumps(history, indent=1))
    return tokenizer
