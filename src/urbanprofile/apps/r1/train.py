"""GRPO post-training (trl's ``GRPOTrainer``) with geography-balanced batches, and the SFT baseline.

A run folder holds ``config.json``, ``checkpoints/`` (trl/transformers checkpoints, resumable),
``reward_log.jsonl`` (every sampled completion's reward with its step and group), ``train_log.json``,
``reward_curve.png``, ``final/`` (the adapter or model) and, with SFT, ``sft/final/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from urbanprofile.apps.r1.prompts import AccuracyReward, check_reward_kind, format_reward, parse_answer
from urbanprofile.apps.r1.task import R1Data, R1Example, TaskSpec, balanced_order, build_task
from urbanprofile.errors import UrbanProfileError, require

CONFIG_FILE = "config.json"
ENGINES = ("prefix", "trl")
INITS = ("base", "sft")
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
REWARD_LOG = "reward_log.jsonl"


@dataclass
class R1Config:
    """Everything that defines a run (written to ``config.json``; a resumed run must match it).

    Attributes:
        datasets: Dataset names or folders (one city each); groups are blocks inside each city.
        task: Indicator asked about.
        model: ``smollm2``, ``tiny-random`` or a local causal-LM folder.
        answer, n_levels, protocol, fold, blocks_per_city, holdout_city: See :class:`TaskSpec`.
        steps: GRPO optimizer steps; every step has one prompt per group, each sampled ``generations`` times.
        generations: Completions per prompt (G).
        max_new_tokens: Completion length limit.
        learning_rate: AdamW learning rate.
        beta: KL penalty to the reference policy (the base model: LoRA disabled).
        epsilon: Clip range of the policy ratio.
        temperature: Sampling temperature of the completions.
        lora_rank: LoRA rank (0: full fine-tuning).
        lora_layers: LoRA on the last this many decoder layers only (0: all layers); the backward pass then
            stops there, which is what makes CPU steps cheap.
        engine: ``prefix`` (our prompt-sharing GRPO step, :mod:`urbanprofile.apps.r1.grpo`: each prompt runs once
            per step) or ``trl`` (trl's ``GRPOTrainer``, which runs each prompt once per completion; for GPUs).
        answer_prefix: Start the assistant's turn with ``<answer>`` (a structured answer template), so the
            model writes the value and the closing tag; the reward still checks both.
        reward: Accuracy reward: ``distance``, ``exact`` or ``debiased`` (centred per geographic group; see
            :class:`~urbanprofile.apps.r1.prompts.AccuracyReward`; ``distance`` lets GRPO collapse to the middle
            level). Runs written before this field existed used ``distance``.
        init: Where GRPO starts: ``base`` (the base model) or ``sft`` (the SFT baseline of the same run,
            trained first; it is then also the KL reference, as in an SFT-then-RL recipe).
        scale_rewards: Divide a prompt's advantages by the spread of its G rewards (GRPO as published; trl's
            ``scale_rewards="group"``). Off by default (Dr. GRPO: advantages ``r - mean``): the division
            weighs prompts whose answers all score alike above the rest, and with a level scale those are
            the middle levels, which pulled the policy there even under the debiased reward. Runs written
            before this field existed scaled.
        entropy_coef: Weight of an entropy bonus on the completion tokens (0: none; ``prefix`` engine only).
            The policy's entropy over the vocabulary is averaged over each completion's tokens and subtracted
            from the loss, against the collapse of the sampled answers onto one level.
        constrain_answer: The policy's action is the level digit alone (``answer=level`` with the
            ``<answer>`` prefix, ``prefix`` engine): one token, drawn from the softmax over the level tokens
            only, in sampling, in every log-probability of GRPO and in the greedy evaluation of every
            language model of the run; the template closes the tag. Nothing is then a format failure
            (``max_new_tokens`` plays no part). Off by default.
            Why it exists: with free answers, a completion that does not parse scores about 2 below its
            group's others, so their advantages all rise by the same amount whatever level they chose; the
            softmax gradient turns such a uniform push into one proportional to each level's probability,
            which sharpens the policy toward the levels it already favours (measured: the format failures
            gave more advantage to levels 3-4 than all the accuracy reward did).
        balanced: One prompt per group in every batch (False: prompts drawn uniformly from all training
            regions, same batch size; the ablation).
        save_every: Checkpoint every this many steps.
        sft: Also train the SFT baseline: as many steps as GRPO, as many prompts per step (shuffled passes
            over the training regions), so both see the same number of prompts.
        sft_learning_rate: Learning rate of the SFT baseline.
        random_state: Seed of sampling, initialisation and batching.
        device: Torch device of the policy (``auto``: ``cuda`` when a GPU is visible, else ``cpu``); not
            part of a run's identity, so a run started on a GPU can resume on a CPU.
    """

    datasets: list[str]
    task: str
    model: str = "smollm2"
    answer: str = "level"
    n_levels: int = 5
    protocol: str = "spatial"
    fold: int = 0
    blocks_per_city: int = 2
    holdout_city: str | None = None
    steps: int = 60
    generations: int = 4
    max_new_tokens: int = 4
    learning_rate: float = 5e-4
    beta: float = 0.04
    epsilon: float = 0.2
    temperature: float = 1.0
    lora_rank: int = 16
    lora_layers: int = 4
    engine: str = "prefix"
    answer_prefix: bool = True
    reward: str = "debiased"
    init: str = "base"
    scale_rewards: bool = False
    entropy_coef: float = 0.0
    constrain_answer: bool = False
    balanced: bool = True
    save_every: int = 10
    sft: bool = True
    sft_learning_rate: float = 5e-4
    random_state: int = 0
    data_dir: str | None = field(default=None, metadata={"identity": False})
    device: str = field(default="auto", metadata={"identity": False})

    @property
    def prefix(self) -> str:
        return ANSWER_OPEN if self.answer_prefix else ""

    @property
    def answer_tokens(self) -> int:
        """Tokens the policy writes: the level digit alone when answers are constrained."""
        return 1 if self.constrain_answer else self.max_new_tokens

    def full_completion(self, completion: str) -> str:
        """The completion as the parser sees it (with the answer prefix the prompt ended with, and the closing
        tag the template writes after a constrained level)."""
        return self.prefix + completion + (ANSWER_CLOSE if self.constrain_answer else "")

    def spec(self) -> TaskSpec:
        return TaskSpec(self.task, self.answer, self.n_levels, self.protocol, self.fold, self.blocks_per_city,
                        self.holdout_city)

    def check(self) -> None:
        self.spec().check()
        for name in ("steps", "generations", "max_new_tokens", "save_every"):
            if getattr(self, name) < 1:
                raise UrbanProfileError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.generations < 2:
            raise UrbanProfileError("generations must be >= 2 (GRPO compares completions of one prompt)")
        if self.lora_rank < 0 or self.lora_layers < 0:
            raise UrbanProfileError("lora_rank and lora_layers must be >= 0")
        check_reward_kind(self.reward, self.answer)
        if self.init not in INITS:
            raise UrbanProfileError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "sft" and (self.engine != "prefix" or not self.sft):
            raise UrbanProfileError("init=sft needs engine=prefix and the SFT baseline (sft=True)")
        if self.entropy_coef < 0 or not math.isfinite(self.entropy_coef):
            raise UrbanProfileError(f"entropy_coef must be a number >= 0, got {self.entropy_coef}")
        if self.entropy_coef > 0 and self.engine != "prefix":
            raise UrbanProfileError("entropy_coef > 0 needs engine=prefix (trl's GRPOTrainer has no entropy bonus)")
        if self.constrain_answer and not (self.answer == "level" and self.answer_prefix and self.engine == "prefix"):
            raise UrbanProfileError("constrain_answer needs answer=level, the <answer> prefix and engine=prefix")
        if self.engine not in ENGINES:
            raise UrbanProfileError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> R1Config:
        payload = {"reward": "distance", "scale_rewards": True, **payload}  # runs written before these fields
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - set(fields))
        if unknown:
            raise UrbanProfileError(f"unknown field {unknown[0]!r}")
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]  # datasets, task
        missing = [n for n in required if n not in payload]
        if missing:
            raise UrbanProfileError(f"field {missing[0]!r} is missing")
        for name, value in payload.items():
            default = fields[name].default
            if name == "datasets":
                ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
            elif isinstance(default, bool):
                ok, want = isinstance(value, bool), "true or false"
            elif isinstance(default, float):
                ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
            elif isinstance(default, int):
                ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
            else:  # text; null where the default is None (holdout_city, data_dir)
                ok, want = isinstance(value, str) or (value is None and default is None), "text"
            if not ok:
                raise UrbanProfileError(f"field {name!r} must be {want}, got {value!r}")
        return cls(**payload)


def load_cities(config: R1Config) -> list[Any]:
    from urbanprofile.data.registry import load_dataset

    return [load_dataset(name, config.data_dir) for name in config.datasets]


def prepare_task(config: R1Config, cities: list[Any] | None = None) -> R1Data:
    config.check()
    return build_task(cities if cities is not None else load_cities(config), config.spec())


def read_config(run_dir: Path) -> R1Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UrbanProfileError(f"{run_dir}: not a run folder ({CONFIG_FILE} is missing)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UrbanProfileError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(payload, dict):
        raise UrbanProfileError(f"{path}: not a run configuration (a JSON object of fields)")
    try:
        config = R1Config.from_json(payload)
        config.check()
    except UrbanProfileError as err:  # name the file: the user edits it, not the fields' code
        raise UrbanProfileError(f"{path}: {err}") from None
    return config


def has_run_state(run_dir: Path) -> bool:
    """Whether a run folder holds trained state (a checkpoint or a final model), which a run must resume."""
    checkpoints = run_dir / "checkpoints"
    return (_last_checkpoint(checkpoints) is not None or (run_dir / "final").is_dir()
            or (run_dir / "sft" / "final").is_dir())


def _write_config(run_dir: Path, config: R1Config, resume: bool) -> None:
    path = run_dir / CONFIG_FILE
    # A folder whose run never got to a checkpoint (it failed at the start) holds nothing to resume: the
    # corrected command takes it over instead of being refused for the options it corrects.
    if path.is_file() and resume and has_run_state(run_dir):
        old = read_config(run_dir)
        mismatch = [
            f.name for f in dataclasses.fields(R1Config)
            if f.metadata.get("identity", True) and getattr(old, f.name) != getattr(config, f.name)
        ]
        if mismatch:
            raise UrbanProfileError(
                f"{run_dir} holds a run with another {mismatch[0]} ({getattr(old, mismatch[0])!r}); "
                "use a new folder or --no-resume"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_json(), indent=2))


def first_tokens(config: R1Config, tokenizer: Any) -> list[int] | None:
    """The token ids an answer's first token is drawn among: the level digits when ``constrain_answer``."""
    if not config.constrain_answer:
        return None
    from urbanprofile.apps.r1.policy import level_token_ids

    return level_token_ids(tokenizer, config.n_levels)


def make_reward(config: R1Config, data: R1Data) -> AccuracyReward:
    """The run's accuracy reward, centred (``debiased``) on the training targets of each geographic group."""
    reference: dict[str, list[float]] = {}
    for example in data.split("train"):
        reference.setdefault(example.group, []).append(example.target)
    return AccuracyReward(config.reward, config.answer, config.n_levels,
                          {group: np.asarray(v) for group, v in reference.items()})


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


class RewardLog:
    """The two reward functions trl calls, recording each completion's reward by step and group."""

    def __init__(self, path: Path, reward: AccuracyReward, prefix: str = "") -> None:
        self.path = path
        self.reward = reward
        self.answer = reward.answer
        self.n_levels = reward.n_levels
        self.prefix = prefix

    def _parse(self, completions: list[Any]) -> list[Any]:
        return [parse_answer(self.prefix + _text(c), self.answer, self.n_levels) for c in completions]

    def functions(self) -> list[Callable[..., list[float]]]:
        def format_reward_fn(completions: list[Any], **kwargs: Any) -> list[float]:
            return [format_reward(p) for p in self._parse(completions)]

        def accuracy_reward_fn(
            completions: list[Any], target: list[float], group: list[str], **kwargs: Any
        ) -> list[float]:
            parsed = self._parse(completions)
            acc = [self.reward(p, t, g) for p, t, g in zip(parsed, target, group, strict=True)]
            state = kwargs.get("trainer_state")
            step = int(state.global_step) + 1 if state is not None else -1
            append_rewards(self.path, step, group, parsed, acc)
            return acc

        format_reward_fn.__name__ = "format"
        accuracy_reward_fn.__name__ = "accuracy"
        return [format_reward_fn, accuracy_reward_fn]


def append_rewards(path: Path, step: int, groups: list[str], parsed: list[Any], accuracy: list[float]) -> None:
    """Append one ``reward_log.jsonl`` record per completion (both engines write the same records)."""
    with path.open("a") as handle:
        for p, a, g in zip(parsed, accuracy, groups, strict=True):
            row = {"step": step, "group": g, "format": format_reward(p), "accuracy": a,
                   "parsed": p.value is not None, "value": p.value}
            handle.write(json.dumps(row) + "\n")


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _trim_reward_log(path: Path, after_step: int) -> None:
    """Drop records of steps after a checkpoint (they are redone when a killed run resumes)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def _last_checkpoint(folder: Path) -> Path | None:
    steps = []
    for child in folder.glob("checkpoint-*") if folder.is_dir() else []:
        suffix = child.name.rpartition("-")[2]
        if suffix.isdigit() and (child / "trainer_state.json").is_file():
            steps.append((int(suffix), child))
    return max(steps)[1] if steps else None


def train_grpo(
    config: R1Config, run_dir: str | Path, resume: bool = True, cities: list[Any] | None = None,
    data: R1Data | None = None,
) -> dict[str, Any]:
    """Post-train the policy with GRPO; resumes from the last checkpoint in ``run_dir`` when there is one.

    Returns:
        A summary: steps, seconds per step, peak memory, final mean rewards.
    """
    import torch

    from urbanprofile.apps.r1.policy import check_model_path

    config.check()
    check_model_path(config.model)
    run_dir = Path(run_dir)
    data = data if data is not None else prepare_task(config, cities)
    _write_config(run_dir, config, resume)
    checkpoints = run_dir / "checkpoints"
    if not resume:
        import shutil

        shutil.rmtree(checkpoints, ignore_errors=True)
    last = _last_checkpoint(checkpoints)
    reward_path = run_dir / REWARD_LOG
    if last is None:
        reward_path.unlink(missing_ok=True)
    else:
        _trim_reward_log(reward_path, int(last.name.rpartition("-")[2]))

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

    from urbanprofile.apps.r1.policy import chat_prompt, load_policy, lora_config, resolve_device, top_layers

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
    import copy

    import torch
    from safetensors.torch import load_file
    from tqdm import tqdm

    from urbanprofile.apps.r1.grpo import grpo_step
    from urbanprofile.apps.r1.policy import chat_prompt, load_policy, lora_config, top_layers

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
            from urbanprofile.errors import TrainingError

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
                import shutil

                shutil.rmtree(old)
    final = run_dir / "final"
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    (run_dir / "train_log.json").write_text(json.dumps(history, indent=1))
    return tokenizer


def reward_summary(path: Path, last: int = 10, generations: int | None = None) -> dict[str, Any]:
    """Mean reward (format + accuracy) over the first and last ``last`` steps, overall and per group; with
    ``generations`` (the log holds each prompt's G completions in a row) also :func:`advantage_by_answer`."""
    import pandas as pd

    if not path.is_file() or path.stat().st_size == 0:
        return {}
    log = pd.read_json(path, lines=True)
    advantages = advantage_by_answer(log, generations) if generations else {}
    log["reward"] = log["format"] + log["accuracy"]
    steps = np.sort(log["step"].unique())
    first, final = log[log["step"].isin(steps[:last])], log[log["step"].isin(steps[-last:])]
    return {
        "reward_first_steps": float(first["reward"].mean()),
        "reward_last_steps": float(final["reward"].mean()),
        "parsed_first_steps": float(first["parsed"].mean()),
        "parsed_last_steps": float(final["parsed"].mean()),
        "group_reward_last_steps": {str(k): float(v) for k, v in final.groupby("group")["reward"].mean().items()},
        **_answer_shares(first, final),
        **advantages,
    }


def advantage_by_answer(log: Any, generations: int) -> dict[str, Any]:
    """Total advantage (``r - mean`` within each prompt's G completions) that every answer received over the
    run, apart for the prompts where some completion did not parse and for the others.

    ``log`` is the reward log as a table; it must hold each prompt's G completions in a row (the ``prefix``
    engine's order). Where a
    completion fails to parse, its penalty lifts the advantage of every other completion of that prompt by
    the same amount, whatever level it gave; this shows how much of what each level was pushed by came from
    that, next to what the accuracy reward gave it.
    """
    import pandas as pd

    if len(log) % generations or "value" not in log:
        return {}
    reward = (log["format"] + log["accuracy"]).to_numpy(float).reshape(-1, generations)
    advantage = (reward - reward.mean(axis=1, keepdims=True)).ravel()
    failed = np.repeat(~log["parsed"].to_numpy(bool).reshape(-1, generations).all(axis=1), generations)
    answer = log["value"].map(lambda v: "unparsed" if pd.isna(v) else f"{v:g}")
    out: dict[str, Any] = {}
    for name, rows in (("advantage_with_a_format_failure", failed), ("advantage_without", ~failed)):
        totals = pd.Series(advantage[rows]).groupby(answer[rows].to_numpy()).sum()
        out[name] = {str(k): round(float(v), 2) for k, v in totals.items()}
    out["prompts_with_a_format_failure"] = int(failed.sum() // generations)
    return out


def _answer_shares(first: Any, final: Any) -> dict[str, Any]:
    """How often each answer was sampled early and late (a policy collapsing onto one answer shows here)."""
    if "value" not in final:
        return {}
    shares = {}
    for name, rows in (("answers_first_steps", first), ("answers_last_steps", final)):
        counts = rows["value"].dropna().value_counts(normalize=True).sort_index()
        shares[name] = {f"{k:g}": round(float(v), 3) for k, v in counts.items()}
    return shares


def plot_reward_curves(run_dir: Path, window: int = 5) -> Path | None:
    """``reward_curve.png``: mean reward per step (rolling mean), overall and per group."""
    import pandas as pd

    path = run_dir / REWARD_LOG
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = pd.read_json(path, lines=True)
    log["reward"] = log["format"] + log["accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    overall = log.groupby("step")["reward"].mean().rolling(window, min_periods=1).mean()
    ax.plot(overall.index, overall.to_numpy(), color="black", lw=2, label="all groups")
    for group, rows in log.groupby("group"):
        curve = rows.groupby("step")["reward"].mean().rolling(window, min_periods=1).mean()
        ax.plot(curve.index, curve.to_numpy(), lw=1, label=str(group))
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"reward (format + accuracy), rolling mean of {window}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "reward_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def train_sft(config: R1Config, run_dir: str | Path, data: R1Data | None = None,
              cities: list[Any] | None = None) -> dict[str, Any]:
    """The SFT baseline: LoRA (same rank and layers) with cross-entropy on ``<answer>true level</answer>``.

    Shuffled passes over the same training regions (the usual SFT recipe, not group-balanced), as many steps
    as GRPO with as many prompts per step as a GRPO step has groups.
    """
    import torch
    from tqdm import tqdm

    from urbanprofile.apps.r1.policy import chat_prompt, load_policy, lora_config, top_layers

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
            from urbanprofile.errors import TrainingError

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
