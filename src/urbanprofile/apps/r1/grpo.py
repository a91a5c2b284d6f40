"""A prompt-sharing GRPO step for CPUs: each prompt runs through the model once, not once per completion.

trl's ``GRPOTrainer`` feeds the G completions of a prompt as G full sequences, so the prompt (about 140
tokens here, against at most 8 answer tokens) is recomputed G times for sampling, for the reference
log-probabilities and for the gradient; on 2 shared CPU cores one step of SmolLM2-135M took 700 s. Here the
prompt is encoded once into a key/value cache that is repeated for the G completions: sampling decodes
from it, and the policy loss backpropagates through it (the cache keeps its graph). The objective is
trl's ``loss_type="grpo"``: advantages ``(r - mean) / std`` within the prompt's G completions, the clipped
policy ratio (one update per batch, so the ratio is 1 and the clip inactive, as in trl's default), and
the k3 estimate of KL to the reference policy (the base model: the LoRA adapter disabled), averaged over
each completion's tokens and then over completions; optionally an entropy bonus on the completion tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from urbanprofile.apps.r1.policy import mask_to


@dataclass
class GroupRollout:
    """G sampled completions of one prompt."""

    prompt_ids: torch.Tensor  # (1, P)
    completion_ids: torch.Tensor  # (G, C), pad after the end of each completion
    mask: torch.Tensor  # (G, C) 1 on tokens up to and including EOS
    texts: list[str]
    first_allowed: torch.Tensor | None = None  # token ids the first completion token was drawn among


def _first_logits(last: torch.Tensor, first_allowed: torch.Tensor | None) -> torch.Tensor:
    """The first completion token's logits, restricted to ``first_allowed`` when answers are constrained."""
    if first_allowed is None:
        return last

    return mask_to(last, first_allowed)


def _prompt_cache(model: Any, prompt_ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    out = model(input_ids=prompt_ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1, :]


@torch.no_grad()
def sample_group(
    model: Any, tokenizer: Any, prompt_ids: torch.Tensor, generations: int, max_new_tokens: int, temperature: float,
    generator: torch.Generator | None = None, first_allowed: torch.Tensor | None = None,
) -> GroupRollout:
    """Sample G completions from one prompt encoded once (its cache repeated G times).

    ``first_allowed`` (token ids) constrains the first token: the policy's distribution there is renormalised
    over those tokens, for sampling and (through the rollout) for every log-probability of it.
    """
    cache, last = _prompt_cache(model, prompt_ids)
    cache.batch_repeat_interleave(generations)
    logits = _first_logits(last, first_allowed).expand(generations, -1)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens, alive = [], torch.ones(generations, dtype=torch.bool, device=prompt_ids.device)
    mask = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
        # Drawn on the CPU (the generator lives there), so a seed gives the same draws on every device.
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        tokens.append(nxt)
        mask.append(alive.clone())
        if eos is not None:
            alive = alive & (nxt != eos)
        if not alive.any():
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
    completion_ids = torch.stack(tokens, dim=1)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return GroupRollout(prompt_ids, completion_ids, torch.stack(mask, dim=1).float(), texts, first_allowed)


def _vocab_logprobs(model: Any, rollout: GroupRollout) -> torch.Tensor:
    """Log-softmax over the vocabulary at every completion position, (G, C, V), the prompt run once."""
    g = rollout.completion_ids.shape[0]
    cache, last = _prompt_cache(model, rollout.prompt_ids)
    cache.batch_repeat_interleave(g)
    first = _first_logits(last, rollout.first_allowed).expand(g, -1)[:, None, :]
    if rollout.completion_ids.shape[1] > 1:
        rest = model(input_ids=rollout.completion_ids[:, :-1], past_key_values=cache, use_cache=True).logits
        logits = torch.cat([first, rest], dim=1)
    else:
        logits = first
    return torch.log_softmax(logits.float(), dim=-1)


def completion_logprobs(model: Any, rollout: GroupRollout) -> torch.Tensor:
    """Log-probability of every completion token, (G, C), with the prompt run once (graph kept)."""
    return _vocab_logprobs(model, rollout).gather(-1, rollout.completion_ids[:, :, None]).squeeze(-1)


def completion_logprobs_entropy(model: Any, rollout: GroupRollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the completion tokens and the policy's entropy over the vocabulary there, (G, C) each."""
    logp = _vocab_logprobs(model, rollout)
    entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)  # 0 * -inf -> 0
    return logp.gather(-1, rollout.completion_ids[:, :, None]).squeeze(-1), entropy


def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, rewards: torch.Tensor,
    mask: torch.Tensor, beta: float, epsilon: float, scale_rewards: bool = True,
    entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss of one prompt's G completions (see the module docstring).

    ``scale_rewards=False`` leaves the advantages unscaled (r - mean, as Dr. GRPO does): dividing by the
    group's reward spread weighs prompts whose answers all score alike (the middle levels) above the rest.
    ``entropy`` (the policy's entropy at each completion token, with its graph) and ``entropy_coef`` > 0 add
    an entropy bonus, ``- entropy_coef * entropy`` per token, which resists the collapse of the sampled
    answers onto one level.
    """
    advantages = rewards - rewards.mean()
    if scale_rewards:
        advantages = advantages / (rewards.std(unbiased=False) + 1e-4)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    stats = {"kl": float(((kl * mask).sum(dim=1) / lengths).mean().detach()),
             "reward_std": float(rewards.std(unbiased=False))}
    if entropy is not None:
        stats["entropy"] = float(((entropy * mask).sum(dim=1) / lengths).mean().detach())
    return loss, stats


def grpo_step(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    reward_fn: Callable[[list[str], int], list[float]],
    optimizer: torch.optim.Optimizer,
    generations: int,
    max_new_tokens: int,
    temperature: float,
    beta: float,
    epsilon: float,
    generator: torch.Generator | None = None,
    max_grad_norm: float = 1.0,
    ref_model: Any = None,
    scale_rewards: bool = True,
    entropy_coef: float = 0.0,
    first_allowed: torch.Tensor | None = None,
) -> dict[str, float]:
    """One optimizer step over some prompts (one per group), G completions each.

    Args:
        reward_fn: ``(completion texts of prompt i, i) -> rewards``.
        ref_model: The frozen reference policy for full fine-tuning; with a LoRA adapter the reference is the
            model with its adapter disabled.
        entropy_coef: Weight of the entropy bonus (0: none); the mean entropy is logged either way.
        first_allowed: Token ids the first completion token is drawn among (constrained answers; see
            :func:`sample_group`).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad()
    stats: dict[str, float] = {"loss": 0.0, "kl": 0.0, "reward": 0.0, "reward_std": 0.0, "entropy": 0.0}
    has_adapter = hasattr(model, "disable_adapter")
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        model.eval()
        rollout = sample_group(model, tokenizer, ids, generations, max_new_tokens, temperature, generator,
                               first_allowed)
        rewards = torch.tensor(reward_fn(rollout.texts, i), dtype=torch.float32, device=ids.device)
        ref_logp = None
        if beta > 0 and (has_adapter or ref_model is not None):
            reference = ref_model if ref_model is not None else model
            adapter_off = model.disable_adapter() if ref_model is None else contextlib.nullcontext()
            with torch.no_grad(), adapter_off:
                ref_logp = completion_logprobs(reference, rollout)
        model.train()
        logp, entropy = completion_logprobs_entropy(model, rollout)
        loss, extra = grpo_loss(logp, logp.detach(), ref_logp, rewards, rollout.mask, beta, epsilon,
                                 scale_rewards, entropy, entropy_coef)
        (loss / len(prompts)).backward()
        stats["loss"] += float(loss.detach()) / len(prompts)
        for name in ("kl", "reward_std", "entropy"):
            stats[name] += extra[name] / len(prompts)
        stats["reward"] += float(rewards.mean()) / len(prompts)
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
    optimizer.step()
    return stats
