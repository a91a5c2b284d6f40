"""Urban-R1 post-training: prompts, parsing, rewards, balanced batches, GRPO on a tiny random LM, bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.apps.r1.prompts import accuracy_reward, format_reward, parse_answer
from urbanprofile.apps.r1.task import R1Data, R1Example, TaskSpec, balanced_order, build_task
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.errors import DataError, UnknownNameError, UrbanProfileError

pytest.importorskip("trl")
pytest.importorskip("peft")


def _cities() -> list[CityData]:
    a = make_synthetic_city(n_regions=40, random_state=0)
    a.name = "syn-a"
    b = make_synthetic_city(n_regions=30, random_state=1)
    b.name = "syn-b"
    return [a, b]


# -- parsing and rewards ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "value", "well_formed"),
    [
        ("<answer>3</answer>", 3.0, True),
        ("I think <answer> 2 </answer> because", 2.0, True),
        ("level 4", 4.0, False),
        ("<answer>7</answer>", None, False),  # off the 0..4 scale
        ("<answer>2.5</answer>", None, False),  # not a level
        ("no idea", None, False),
        ("", None, False),
        ("-1", None, False),
    ],
)
def test_parse_answer_levels(completion: str, value: float | None, well_formed: bool) -> None:
    parsed = parse_answer(completion, "level", 5)
    assert parsed.value == value
    assert parsed.well_formed == well_formed


def test_unparseable_completion_is_a_format_failure_not_a_crash() -> None:
    for junk in ["", "<answer></answer>", "ñ\x00<answer>x</answer>", "9" * 400]:
        parsed = parse_answer(junk, "level", 5)
        assert parsed.value is None
        assert format_reward(parsed) == 0.0
        assert accuracy_reward(parsed, 2, "level", 5) == 0.0


def test_rewards() -> None:
    assert format_reward(parse_answer("<answer>1</answer>")) == 1.0
    assert format_reward(parse_answer("1")) == 0.5
    assert accuracy_reward(parse_answer("<answer>2</answer>"), 2, "level", 5) == 1.0
    assert accuracy_reward(parse_answer("<answer>0</answer>"), 4, "level", 5) == 0.0
    assert accuracy_reward(parse_answer("<answer>3</answer>"), 2, "level", 5) == pytest.approx(0.75)
    exact = accuracy_reward(parse_answer("<answer>100</answer>", "number"), 100, "number", 5)
    off = accuracy_reward(parse_answer("<answer>300</answer>", "number"), 100, "number", 5)
    assert exact == 1.0 and 0.0 < off < 1.0


# -- task building and balanced batches ------------------------------------------------------------
def test_build_task_levels_from_training_labels_only() -> None:
    cities = _cities()
    data = build_task(cities, TaskSpec("crime", blocks_per_city=2))
    assert data.groups == ["syn-a/block 0", "syn-a/block 1", "syn-b/block 0", "syn-b/block 1"]
    train, test = data.frame("train"), data.frame("test")
    assert len(train) + len(test) == 70 and len(test) > 0
    assert set(train["level"]) <= set(range(5))
    assert "<answer>2</answer>" in data.examples[0].prompt
    # Moving a held-out label does not move any level edge.
    cities[0].targets.loc[test[test.city == "syn-a"].region_id.iloc[0], "crime"] = 1e9
    assert build_task(cities, TaskSpec("crime", blocks_per_city=2)).edges == data.edges


def test_held_out_city_is_all_test_and_its_ridge_baseline_fits_across_cities(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.evaluate import NOT_ACROSS_CITIES, evaluate_run

    cities = _cities()
    data = build_task(cities, TaskSpec("crime", holdout_city="syn-b"))
    frame = data.frame()
    assert set(frame.loc[frame.split == "test", "city"]) == {"syn-b"} and (frame.city == "syn-b").sum() == 30
    assert set(frame.loc[frame.split == "train", "city"]) == {"syn-a"} and (frame.city == "syn-a").sum() == 40
    assert set(frame.loc[frame.city == "syn-b", "level"]) == set(range(5))  # its own scale, equal shares
    config = R1Config(datasets=["syn-a", "syn-b"], task="crime", model="tiny-random", holdout_city="syn-b")
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    payload = evaluate_run(tmp_path, ["ridge", "knn-location"], cities=cities)
    assert payload["methods"]["knn-location"] == {"skipped": NOT_ACROSS_CITIES}
    ridge = payload["methods"]["ridge"]
    assert ridge["n"] == 30 and ridge["spearman"] > 0.3, ridge  # the synthetic label follows the features
    with pytest.raises(UrbanProfileError, match="not among the datasets"):
        build_task(cities, TaskSpec("crime", holdout_city="syn-c"))
    with pytest.raises(UrbanProfileError, match="at least one other city"):
        build_task(cities[:1], TaskSpec("crime", holdout_city="syn-a"))


def test_a_held_out_city_gives_no_prompts_to_the_training_steps(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.loop import train_grpo

    config = R1Config(datasets=["syn-a", "syn-b"], task="crime", model="tiny-random", steps=3, generations=2,
                      max_new_tokens=3, save_every=3, sft=False, lora_rank=4, lora_layers=1, holdout_city="syn-b")
    summary = train_grpo(config, tmp_path / "run", cities=_cities())
    assert summary["groups"] == ["syn-a/block 0", "syn-a/block 1"] and summary["completions_per_step"] == 4
    log = [json.loads(line) for line in (tmp_path / "run" / "reward_log.jsonl").read_text().splitlines()]
    assert [sum(row["step"] == k for row in log) for k in (1, 2, 3)] == [4, 4, 4]  # every step full
    assert {row["group"] for row in log} == {"syn-a/block 0", "syn-a/block 1"}


def test_a_baseline_a_city_cannot_run_is_reported_as_skipped(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.evaluate import evaluate_run

    cities = _cities()
    for city in cities:  # like CityView tiles: locations and labels, no count views
        city.views = {}
    config = R1Config(datasets=["syn-a", "syn-b"], task="crime", model="tiny-random")
    (tmp_path / "config.json").write_text(json.dumps(config.to_json()))
    payload = evaluate_run(tmp_path, ["ridge", "knn-location"], cities=cities)
    assert "poi_counts" in payload["methods"]["ridge"]["skipped"]
    assert payload["methods"]["knn-location"]["n"] == payload["n_test"]


def test_tile_captions_go_into_the_prompt() -> None:
    import pandas as pd

    city = _cities()[0]
    first = city.region_ids[0]
    city.modalities["tile_caption"] = pd.DataFrame(
        {"region_id": [first] * 4, "text": ["A dense block of towers", "Busy roads", "A park", "A fourth line"]}
    )
    data = build_task([city], TaskSpec("crime"))
    prompt = next(e.prompt for e in data.examples if e.region_id == first)
    assert "A dense block of towers. Busy roads. A park." in prompt and "fourth" not in prompt


def test_balanced_order_gives_every_group_one_prompt_per_batch() -> None:
    data = build_task(_cities(), TaskSpec("crime", blocks_per_city=2))
    train = data.split("train")
    order, groups = balanced_order(train, n_batches=25, random_state=0)
    assert len(order) == 25 * len(groups)
    for k in range(25):
        batch = [train[i].group for i in order[k * len(groups) : (k + 1) * len(groups)]]
        assert sorted(batch) == groups


def test_empty_group_and_missing_task_are_one_line_errors() -> None:
    with pytest.raises(DataError, match="no training examples"):
        balanced_order([], n_batches=3)
    with pytest.raises(UnknownNameError, match="nosuch"):
        build_task(_cities(), TaskSpec("nosuch"))
    with pytest.raises(DataError, match="fold 99"):
        build_task(_cities(), TaskSpec("crime", fold=99))
    with pytest.raises(UrbanProfileError, match="n_levels"):
        build_task(_cities(), TaskSpec("crime", n_levels=20))


def test_bad_model_paths(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.policy import check_model_path, load_policy

    with pytest.raises(UrbanProfileError, match="no such folder"):
        check_model_path(str(tmp_path / "missing"))
    not_lm = tmp_path / "not-a-causal-lm"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (not_lm / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(UrbanProfileError):
        load_policy(str(not_lm))


def test_device_names() -> None:
    import torch

    from urbanprofile.apps.r1.policy import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UrbanProfileError, match="unknown torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UrbanProfileError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_only_the_distance_reward_pays_an_uninformed_constant_answer() -> None:
    """Under ``distance`` a policy that ignores the region does best answering the middle level (GRPO's
    collapse); under ``exact`` and ``debiased`` every constant answer earns the same on average, and the true
    level still earns the most for each region."""
    from urbanprofile.apps.r1.prompts import AccuracyReward

    train_levels = np.repeat(np.arange(5), 4).astype(float)  # equal-share levels of one city

    def mean_of_constant(kind: str, answer: int) -> float:
        reward = AccuracyReward(kind, "level", 5, {"c": train_levels})
        return float(np.mean([reward(parse_answer(f"<answer>{answer}</answer>"), t, "c") for t in train_levels]))

    distance = [mean_of_constant("distance", a) for a in range(5)]
    assert int(np.argmax(distance)) == 2 and distance[2] > distance[0] + 0.1
    for kind in ("exact", "debiased"):
        means = [mean_of_constant(kind, a) for a in range(5)]
        assert np.ptp(means) == pytest.approx(0.0, abs=1e-12), (kind, means)
        reward = AccuracyReward(kind, "level", 5, {"c": train_levels})
        for truth in range(5):
            scores = [reward(parse_answer(f"<answer>{a}</answer>"), truth, "c") for a in range(5)]
            assert int(np.argmax(scores)) == truth
            assert reward(parse_answer("no idea"), truth, "c") <= min(scores)  # (the format reward adds 0 too)
    debiased = AccuracyReward("debiased", "level", 5, {"c": train_levels})
    assert debiased(parse_answer("no idea"), 0, "c") < debiased(parse_answer("<answer>4</answer>"), 0, "c")
    assert debiased(parse_answer("<answer>1</answer>"), 0, "c") > debiased(parse_answer("<answer>3</answer>"), 0, "c")
    with pytest.raises(UrbanProfileError, match="reward must be one of"):
        AccuracyReward("median", "level", 5, {"c": train_levels})
    with pytest.raises(UrbanProfileError, match="exact reward needs answer=level"):
        AccuracyReward("exact", "number", 5)
    with pytest.raises(UrbanProfileError, match="training targets"):
        AccuracyReward("debiased", "level", 5)


def test_level_question_names_every_level_not_one_example() -> None:
    """An example digit in the question anchors a small model on it (SmolLM2 put 84% of its mass on it)."""
    from urbanprofile.apps.r1.prompts import question

    text = question("crime", "Chicago", "level", 5)
    assert all(f"<answer>{k}</answer>" in text for k in range(5))
    assert "for example" not in text


# -- GRPO on a tiny random LM ------------------------------------------------------------------------
def _toy_data(answer_level: int = 3) -> R1Data:
    """A toy task whose right answer is known: every prompt's answer is level 3."""
    examples = [
        R1Example(city="toy", region_id=i, group=f"g{i % 2}", split="train", prompt=f"r{i}: level?",
                  target=float(answer_level), label=float(answer_level), level=answer_level)
        for i in range(8)
    ]
    return R1Data(spec=TaskSpec("toy"), examples=examples, edges={"toy": [1.0, 2.0, 3.0, 4.0]})


def _mean_sampled_reward(model: object, tokenizer: object, data: R1Data, n: int = 96) -> float:
    import torch

    from urbanprofile.apps.r1.policy import chat_prompt

    torch.manual_seed(123)
    prompt = chat_prompt(tokenizer, data.examples[0].prompt, "<answer>")
    enc = tokenizer([prompt] * n, return_tensors="pt", add_special_tokens=False)  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=6, temperature=1.0,  # type: ignore[attr-defined]
                             pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # type: ignore[attr-defined]
    parsed = [parse_answer("<answer>" + t, "level", 5) for t in texts]
    return float(np.mean([format_reward(p) + accuracy_reward(p, 3, "level", 5) for p in parsed]))


def test_grpo_moves_the_policy_toward_higher_reward(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.loop import train_grpo
    from urbanprofile.apps.r1.policy import load_policy

    data = _toy_data()
    config = R1Config(datasets=["toy"], task="toy", model="tiny-random", steps=10, generations=8, max_new_tokens=4,
                      learning_rate=3e-2, lora_rank=0, beta=0.0, save_every=10, sft=False, random_state=0,
                      reward="distance")  # one right answer for every region: debiasing would leave no signal
    before_model, tokenizer = load_policy("tiny-random", 0)
    before = _mean_sampled_reward(before_model, tokenizer, data)
    train_grpo(config, tmp_path / "run", data=data)
    after_model, tokenizer = load_policy(str(tmp_path / "run" / "final"))
    after = _mean_sampled_reward(after_model, tokenizer, data)
    print(before, after)
    assert after > before + 0.2, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "reward_log.jsonl").read_text().splitlines()]
    assert {row["group"] for row in log} == {"g0", "g1"}
    assert len(log) == 10 * 2 * 8  # every completion of every step, with its group


def test_resume_after_a_kill_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.loop import train_grpo

    cities = _cities()
    config = R1Config(datasets=["syn-a", "syn-b"], task="crime", model="tiny-random", steps=4, generations=2,
                      max_new_tokens=4, save_every=2, sft=False, lora_rank=4, lora_layers=1)
    run = tmp_path / "run"
    first = train_grpo(config, run, cities=cities)
    assert first["resumed_from_step"] == 0
    # A kill after step 3 leaves checkpoint-2 as the last complete one.
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "final")
    second = train_grpo(config, run, cities=cities)
    assert second["resumed_from_step"] == 2 and second["steps_this_call"] == 2
    steps = [json.loads(line)["step"] for line in (run / "reward_log.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    assert len(steps) == 4 * 4 * 2  # nothing logged twice
    other = R1Config(**{**config.to_json(), "generations": 4})
    with pytest.raises(UrbanProfileError, match="generations"):
        train_grpo(other, run, cities=cities)


def test_grpo_can_start_from_the_sft_model_which_is_then_its_reference(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.loop import train_grpo
    from urbanprofile.apps.r1.sft import train_sft

    cities = _cities()
    config = R1Config(datasets=["syn-a", "syn-b"], task="crime", model="tiny-random", steps=2, generations=2,
                      max_new_tokens=3, save_every=2, lora_rank=4, lora_layers=1, init="sft", sft_learning_rate=5e-2)
    run = tmp_path / "run"
    with pytest.raises(UrbanProfileError, match="init=sft needs the SFT model"):
        train_grpo(config, run, cities=cities)
    train_sft(config, run, cities=cities)
    train_grpo(config, run, cities=cities, resume=False)
    from safetensors.torch import load_file

    sft_weights = load_file(str(run / "sft" / "final" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in sft_weights.items() if "lora_B" in k)  # SFT moved the model
    history = json.loads((run / "train_log.json").read_text())
    # At step 1 the policy is the SFT model; a zero KL means the reference is that model, not the base.
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UrbanProfileError, match="init must be one of"):
        R1Config(datasets=["syn-a"], task="crime", init="warm").check()


def test_trl_engine_runs_and_logs_every_completion(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.loop import train_grpo

    data = _toy_data()
    config = R1Config(datasets=["toy"], task="toy", model="tiny-random", steps=2, generations=2, max_new_tokens=3,
                      engine="trl", lora_rank=4, save_every=2, sft=False)
    summary = train_grpo(config, tmp_path / "run", data=data)
    assert summary["engine"] == "trl" and (tmp_path / "run" / "final").is_dir()
    assert len((tmp_path / "run" / "reward_log.jsonl").read_text().splitlines()) == 2 * 2 * 2


def test_cli_train_and_evaluate_end_to_end(make_data_dir: Callable[..., Path], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import pandas as pd
    from helpers import assert_user_error

    def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "URBANPROFILE_DATA": str(data_dir)}
        return subprocess.run([sys.executable, "-m", "urbanprofile.cli", *args], capture_output=True, text=True,
                              env=env, timeout=900)

    data_dir = make_data_dir(n=60)
    run = tmp_path / "run"
    args = ["r1", "train", "--datasets", "hafusion-testcity", "--task", "crime", "--model", "tiny-random",
            "--steps", "2", "-G", "2", "--max-new-tokens", "4", "--out", str(run)]
    result = run_cli(*args, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert (run / "config.json").is_file() and (run / "final").is_dir() and (run / "sft" / "final").is_dir()
    result = run_cli("r1", "evaluate", str(run), "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())["methods"]
    assert set(metrics) == {"zero-shot", "grpo", "sft", "ridge", "knn-location"}
    for m in metrics.values():
        assert 0.0 <= m["parse_failure_rate"] <= 1.0
        assert m["worst_group_mae"] >= m["level_mae"] - 1e-9
    assert metrics["ridge"]["parse_failure_rate"] == 0.0
    assert "spearman_expected_level" in metrics["grpo"] and "spearman_expected_level" not in metrics["ridge"]
    predictions = pd.read_csv(run / "predictions.csv")
    mean_level = predictions.loc[predictions.method == "zero-shot", "expected_level"]
    assert mean_level.between(0, 4).all()  # a mean over the level digits' probabilities

    assert_user_error(run_cli(*[a if a != "crime" else "nosuch" for a in args[:-1]], str(tmp_path / "r2"),
                              data_dir=data_dir), "nosuch")
    assert_user_error(run_cli(*[a if a != "tiny-random" else str(tmp_path / "nomodel") for a in args[:-1]],
                              str(tmp_path / "r3"), data_dir=data_dir), "no such folder")
    assert_user_error(run_cli("r1", "evaluate", str(tmp_path / "nothing"), data_dir=data_dir), "not a run folder")
    assert_user_error(run_cli(*args[:-1], str(tmp_path / "r4"), "--device", "gpu0", data_dir=data_dir),
                      "unknown torch device")


def test_entropy_bonus_spreads_a_collapsed_policy_and_is_checked() -> None:
    import torch

    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.grpo import grpo_loss

    torch.manual_seed(0)
    logits = torch.zeros(4, 2, 6)
    logits[..., 0] = 4.0  # nearly all mass on one token (one level)
    logits.requires_grad_(True)
    tokens = torch.zeros(4, 2, dtype=torch.long)
    rewards, mask = torch.ones(4), torch.ones(4, 2)  # equal rewards: no advantage, so no policy-gradient signal

    def entropy_after_a_step(coef: float) -> tuple[float, float]:
        logp_all = torch.log_softmax(logits, dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
        loss, stats = grpo_loss(logp, logp.detach(), None, rewards, mask, 0.0, 0.2, False, entropy, coef)
        (grad,) = torch.autograd.grad(loss, logits)
        stepped = torch.log_softmax(logits.detach() - 10.0 * grad, dim=-1)
        return stats["entropy"], float(-(stepped.exp() * stepped).sum(dim=-1).mean())

    before, after = entropy_after_a_step(0.1)
    assert after > before + 0.01
    before, after = entropy_after_a_step(0.0)
    assert after == pytest.approx(before)
    with pytest.raises(UrbanProfileError, match="entropy_coef must be"):
        R1Config(datasets=["syn-a"], task="crime", entropy_coef=-1.0).check()
    with pytest.raises(UrbanProfileError, match="needs engine=prefix"):
        R1Config(datasets=["syn-a"], task="crime", entropy_coef=0.01, engine="trl").check()


def test_constrained_answers_draw_only_level_digits_and_renormalise_over_them(tmp_path: Path) -> None:
    import torch

    from urbanprofile.apps.r1.config import R1Config
    from urbanprofile.apps.r1.grpo import completion_logprobs_entropy, sample_group
    from urbanprofile.apps.r1.loop import train_grpo
    from urbanprofile.apps.r1.policy import generate_answers, level_token_ids, load_policy

    model, tokenizer = load_policy("tiny-random", 0)  # untrained: left free it writes any character
    allowed = torch.tensor(level_token_ids(tokenizer, 5))
    ids = tokenizer("region 7 <answer>", return_tensors="pt", add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    free = sample_group(model, tokenizer, ids, 64, 1, 1.0, generator)
    assert not set(free.completion_ids[:, 0].tolist()) <= set(allowed.tolist())
    rollout = sample_group(model, tokenizer, ids, 64, 3, 1.0, generator, allowed)
    assert set(rollout.completion_ids[:, 0].tolist()) <= set(allowed.tolist())
    assert all(parse_answer(t[:1], "level", 5).value is not None for t in rollout.texts)
    logp, entropy = completion_logprobs_entropy(model, rollout)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert float(entropy[:, 0].detach().max()) <= float(np.log(5)) + 1e-5  # a distribution over the 5 levels alone
    first = {int(t): float(lp) for t, lp in zip(rollout.completion_ids[:, 0], logp[:, 0].detach(), strict=True)}
    assert len(first) >= 2 and sum(np.exp(v) for v in first.values()) <= 1 + 1e-5
    greedy = generate_answers(model, tokenizer, ["region 7 <answer>", "region 9 <answer>"], 2,
                              first_allowed=allowed.tolist())
    assert all(g[:1] in "01234" for g in greedy)

    config = R1Config(datasets=["syn-a", "syn-b"], task="crime", model="tiny-random", steps=2, generations=2,
                      max_new_tokens=4, save_every=2, sft=False, lora_rank=4, lora_layers=1, constrain_answer=True)
    train_grpo(config, tmp_path / "run", cities=_cities())
    log = [json.loads(line) for line in (tmp_path / "run" / "reward_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 * 4 * 2 and all(row["parsed"] for row in log)  # the tiny random model always gives a level
    assert R1Config(**{**config.to_json(), "constrain_answer": True}).full_completion("3") == "<answer>3</answer>"
    for bad in ({"answer": "number", "reward": "distance"}, {"answer_prefix": False}, {"engine": "trl"}):
        with pytest.raises(UrbanProfileError, match="constrain_answer needs"):
            R1Config(datasets=["syn-a"], task="crime", constrain_answer=True, **bad).check()  # type: ignore[arg-type]


def test_advantage_by_answer_separates_what_format_failures_gave(tmp_path: Path) -> None:
    from urbanprofile.apps.r1.rewards import advantage_by_answer

    rows = [  # prompt 1: one failure lifts the two others; prompt 2: accuracy alone
        {"format": 1.0, "accuracy": 0.0, "parsed": True, "value": 3.0},
        {"format": 1.0, "accuracy": 0.0, "parsed": True, "value": 1.0},
        {"format": 0.0, "accuracy": -1.0, "parsed": False, "value": None},
        {"format": 1.0, "accuracy": 0.5, "parsed": True, "value": 3.0},
        {"format": 1.0, "accuracy": -0.5, "parsed": True, "value": 1.0},
        {"format": 1.0, "accuracy": 0.0, "parsed": True, "value": 2.0},
    ]
    path = tmp_path / "reward_log.jsonl"
    path.write_text("".join(json.dumps({"step": 1, "group": "g", **r}) + "\n" for r in rows))
    import pandas as pd

    from urbanprofile.apps.r1.rewards import reward_summary

    out = advantage_by_answer(pd.read_json(path, lines=True), 3)
    assert {k: v for k, v in reward_summary(path, generations=3).items() if k in out} == out  # one read, same split
    assert out["prompts_with_a_format_failure"] == 1
    rounded = {"1": 0.67, "3": 0.67, "unparsed": -1.33}  # to 0.01
    assert out["advantage_with_a_format_failure"] == pytest.approx(rounded)
    assert out["advantage_without"] == pytest.approx({"1": -0.5, "2": 0.0, "3": 0.5})
    assert advantage_by_answer(pd.read_json(path, lines=True), 4) == {}  # not whole prompts of G completions
