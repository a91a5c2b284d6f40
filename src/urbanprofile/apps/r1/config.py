"""A run's settings (:class:`R1Config`) and its folder: ``config.json``, resumable state, the task it trains on."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urbanprofile.apps.r1.prompts import check_reward_kind
from urbanprofile.apps.r1.task import R1Data, TaskSpec, build_task
from urbanprofile.data.registry import load_dataset
from urbanprofile.errors import UrbanProfileError

CONFIG_FILE = "config.json"
ENGINES = ("prefix", "trl")
INITS = ("base", "sft")
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


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
    return (last_checkpoint(checkpoints) is not None or (run_dir / "final").is_dir()
            or (run_dir / "sft" / "final").is_dir())


def write_config(run_dir: Path, config: R1Config, resume: bool) -> None:
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


def last_checkpoint(folder: Path) -> Path | None:
    steps = []
    for child in folder.glob("checkpoint-*") if folder.is_dir() else []:
        suffix = child.name.rpartition("-")[2]
        if suffix.isdigit() and (child / "trainer_state.json").is_file():
            steps.append((int(suffix), child))
    return max(steps)[1] if steps else None


def first_tokens(config: R1Config, tokenizer: Any) -> list[int] | None:
    """The token ids an answer's first token is drawn among: the level digits when ``constrain_answer``."""
    if not config.constrain_answer:
        return None
    # policy imports torch: reading a run's config (the CLI, `r1 evaluate` of baselines) does not pay for it.
    from urbanprofile.apps.r1.policy import level_token_ids

    return level_token_ids(tokenizer, config.n_levels)
