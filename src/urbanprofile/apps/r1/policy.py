"""The policy: a causal LM and its tokenizer, chat-formatted prompts and batched greedy answers."""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from urbanprofile.apps.r1.prompts import SYSTEM_PROMPT
from urbanprofile.encoders.llm import load_causal_lm
from urbanprofile.errors import UrbanProfileError, require

#: A randomly initialised model built from a config (no weights): for tests and smoke runs only.
TINY_RANDOM = "tiny-random"


def tiny_causal_lm(random_state: int = 0, hidden_size: int = 32, n_layers: int = 2) -> tuple[Any, Any]:
    """A tiny Llama with a character-level tokenizer, built in memory (nothing is read or downloaded)."""
    transformers = require("transformers", "rl")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = list(string.ascii_letters + string.digits + " .,:;%()<>/?-=+'\n")
    vocab = {c: i for i, c in enumerate(["<pad>", "<unk>", "<eos>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(random_state)
    model = transformers.LlamaForCausalLM(config)
    return model, tokenizer


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name is checked and returned.

    Raises:
        UrbanProfileError: The device name is unknown or names a GPU that is not there.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UrbanProfileError(f"unknown torch device {device!r} (use auto, cpu or cuda)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UrbanProfileError(f"device {device!r}: no CUDA GPU is visible here (use --device cpu)")
    return device


def load_policy(name_or_path: str, random_state: int = 0, device: str = "cpu") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: ``tiny-random``, ``smollm2`` or a local causal-LM folder.

    Args:
        device: Torch device (``auto``: a GPU when one is visible).

    Raises:
        DataError: The path does not exist or is not a causal LM (from ``load_causal_lm``).
    """
    if name_or_path == TINY_RANDOM:
        model, tokenizer = tiny_causal_lm(random_state)
    else:
        model, tokenizer = load_causal_lm(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(device))
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def chat_prompt(tokenizer: Any, user_message: str, answer_prefix: str = "") -> str:
    """The prompt text with the model's chat template (a plain ``User:``/``Assistant:`` layout without one).

    Args:
        answer_prefix: Text that starts the assistant's turn (e.g. ``<answer>``), so the model continues it.
    """
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_message}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(text) + answer_prefix
    return f"{SYSTEM_PROMPT}\n\nUser: {user_message}\nAssistant:" + (" " + answer_prefix if answer_prefix else "")


def linear_names(model: Any) -> list[str]:
    """Names of the linear projections inside the decoder layers (``q_proj``, ``up_proj``, ...)."""
    names = {
        name.rpartition(".")[2]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }
    return sorted(names)


def lora_config(
    rank: int = 16, alpha: int = 32, dropout: float = 0.0, layers: list[int] | None = None, model: Any = None
) -> Any:
    """LoRA on every attention and MLP projection (of the given decoder layers; all when ``None``)."""
    peft = require("peft", "rl")
    targets: str | list[str] = linear_names(model) if model is not None and layers is not None else "all-linear"
    return peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def top_layers(model: Any, n: int) -> list[int] | None:
    """Indices of the last ``n`` decoder layers (``None`` = all layers, for ``n = 0``)."""
    total = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if n <= 0 or total == 0 or n >= total:
        return None
    return list(range(total - n, total))


def level_token_ids(tokenizer: Any, n_levels: int) -> list[int]:
    """The token id of every level digit ``0 .. n_levels - 1``.

    Raises:
        UrbanProfileError: The tokenizer splits a level into several tokens.
    """
    digits = []
    for k in range(n_levels):
        ids = tokenizer(str(k), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UrbanProfileError(f"the tokenizer splits the level {k} into {len(ids)} tokens")
        digits.append(ids[0])
    return digits


def mask_to(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token outside ``allowed`` (token ids) set to -inf, over the last axis."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[allowed.to(logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


class _FirstTokenIn:
    """A ``generate`` logits processor: the first new token must be one of ``allowed``."""

    def __init__(self, allowed: torch.Tensor, prompt_length: int) -> None:
        self.allowed, self.prompt_length = allowed, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return mask_to(scores, self.allowed) if input_ids.shape[1] == self.prompt_length else scores


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 12,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    first_allowed: list[int] | None = None,
) -> list[str]:
    """Greedy completions of chat-formatted prompts, in batches (left padding).

    Args:
        first_allowed: Token ids the first new token must be one of (constrained answers); ``None``: any.
    """
    from transformers import LogitsProcessorList

    model.eval()
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        processors = LogitsProcessorList()
        if first_allowed is not None:
            processors.append(_FirstTokenIn(torch.tensor(first_allowed), enc["input_ids"].shape[1]))
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=processors,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        completions.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        if progress is not None:
            progress(len(batch))
    return completions


def expected_levels(
    model: Any, tokenizer: Any, prompts: list[str], n_levels: int, batch_size: int = 8
) -> list[float]:
    """The policy's mean level: ``sum_k k * p(k)`` over the level digits at the answer's first token.

    The prompts must end where the level digit comes (the ``<answer>`` prefix). Greedy answers show only
    the policy's favourite level; this shows whether its preferences move with the region (for ranking).
    """
    digits = level_token_ids(tokenizer, n_levels)
    values = torch.arange(n_levels, dtype=torch.float32)
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            logits = model(**enc).logits[:, -1, :].float().cpu()  # left padding: the last position is the prompt's
            probs = torch.softmax(logits[:, digits], dim=-1)
            out.extend((probs @ values).tolist())
    return out


def check_model_path(name_or_path: str) -> None:
    """Fail early with one line when a local model path does not exist."""
    if name_or_path in (TINY_RANDOM, "smollm2"):
        return
    path = Path(name_or_path)
    if not path.exists():
        raise UrbanProfileError(f"model {name_or_path!r}: no such folder (give 'smollm2' or a local causal-LM folder)")
