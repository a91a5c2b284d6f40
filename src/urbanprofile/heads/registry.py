"""Heads as an axis: every head by name, what it needs, and how it is built (torch is imported only on build).

A head maps a region embedding (and, for the prompt heads, frozen prompt vectors) to indicator
predictions. Heads see labels, so the protocols fit them inside each outer fold on its training regions
only; their settings and epochs come from inner splits of those regions.

Names:

* ``ridge`` (default), ``knn``: linear and nearest-neighbour probes (settings by inner CV).
* ``ridge-blocks``: a ridge probe over a learned + raw embedding (leading ``emb_*`` columns learned, the
  rest raw counts) that weighs the two blocks, the weight chosen by inner CV (``hafusion+raw``, ``srel+raw``).
* ``mlp``: a single-task MLP; ``mlp-multitask``: a dense MLP with one output per task, all tasks jointly.
* ``moe``: UrbanMoE, a sparse multi-modal mixture of experts, all tasks jointly.
* ``prompt4re-<model>``: ToPT's Prompt4RE (cross-attention alignment of prompt vectors to the embedding)
  with prompt vectors from ``llama`` or ``qwen`` (the vectors shipped for Chicago), ``minilm`` or
  ``smollm2`` (computed offline), or ``local:<folder>`` (a local causal language model).
  ``prompt4re-<model>-notask``: the same with task-free prompt vectors (geo-text only); a ``-region``
  suffix makes each region attend over its own prompt vector only (default: over all training regions');
  ``concat-<model>``: the prompt vectors concatenated to the embedding, no alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from urbanprofile.embedders.base import BLOCK_SEP
from urbanprofile.errors import unknown_name

#: Prompt-vector sources with a fixed name (``local:<folder>`` is accepted as well).
PROMPT_MODELS = ("llama", "qwen", "minilm", "smollm2")
_BASE_HEADS = ("ridge", "knn", "ridge-blocks", "mlp", "mlp-multitask", "moe")
#: Every named head.
HEAD_NAMES: tuple[str, ...] = (
    *_BASE_HEADS,
    *(f"prompt4re-{m}" for m in PROMPT_MODELS),
    *(f"prompt4re-{m}-notask" for m in PROMPT_MODELS),
    *(f"concat-{m}" for m in PROMPT_MODELS),
)
DEFAULT_HEAD = "ridge"
#: The modules that implement each head kind (:attr:`HeadSpec.kind`), imported by :func:`build_head` only for that
#: kind. A result's code version covers the modules of the head it used and none of the others'
#: (:mod:`urbanprofile.benchmark.versions`), so a new kind must be declared here.
HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "ridge": ("urbanprofile.heads.probes",),
    "knn": ("urbanprofile.heads.probes",),
    "ridge-blocks": ("urbanprofile.heads.probes",),
    "mlp": ("urbanprofile.heads.neural",),
    "moe": ("urbanprofile.heads.moe",),
    # The prompt vectors are read by the protocols (prompt features), yet belong to the prompt heads alone.
    "prompt4re": ("urbanprofile.heads.prompt4re", "urbanprofile.heads.prompts"),
}


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head name.

    Attributes:
        name: The name as given.
        kind: ``ridge``, ``knn``, ``mlp``, ``moe`` or ``prompt4re``.
        multitask: Whether the head fits all tasks jointly (one model, one output per task).
        prompt_model: Source of prompt vectors (prompt heads only).
        task_prompt: Whether the prompt vectors come from the task-specific prompt.
        align: Whether prompt vectors are aligned by cross-attention (``False``: plain concatenation).
        attention: ``all`` (each region attends over every training region's prompts, as the released code)
            or ``region`` (each region attends over its own prompts only; name suffix ``-region``).
    """

    name: str
    kind: str
    multitask: bool = False
    prompt_model: str | None = None
    task_prompt: bool = True
    align: bool = True
    attention: str = "all"

    @property
    def needs_prompts(self) -> bool:
        return self.prompt_model is not None


def parse_head(name: str) -> HeadSpec:
    """The spec of a head name, or a one-line error listing the valid names."""
    if name in ("ridge", "knn", "ridge-blocks", "mlp"):
        return HeadSpec(name, name)
    if name == "mlp-multitask":
        return HeadSpec(name, "mlp", multitask=True)
    if name == "moe":
        return HeadSpec(name, "moe", multitask=True)
    for prefix, align in (("prompt4re-", True), ("concat-", False)):
        if not name.startswith(prefix):
            continue
        model = name[len(prefix):]
        task_prompt, attention = True, "all"
        if align and model.endswith("-region"):
            model, attention = model[: -len("-region")], "region"
        if model.startswith("local:"):
            if len(model) > len("local:"):
                return HeadSpec(name, "prompt4re", prompt_model=model, align=align, attention=attention)
            break
        if align and model.endswith("-notask"):
            model, task_prompt = model[: -len("-notask")], False
        if model in PROMPT_MODELS:
            return HeadSpec(name, "prompt4re", prompt_model=model, task_prompt=task_prompt, align=align,
                            attention=attention)
    raise unknown_name("head", name, HEAD_NAMES)


def protocol_unavailable_reason(head: str, protocol: str) -> str | None:
    """Why ``head`` has no probe under ``protocol`` (``None`` when it has one).

    ``ridge-blocks`` (a learned embedding beside raw counts) has none under ``paper``
    (:func:`urbanprofile.heads.probes.blocks_paper_reason`); ``nested`` and ``spatial`` are defined.
    """
    from urbanprofile.heads.probes import blocks_paper_reason

    if parse_head(head).kind == "ridge-blocks" and protocol == "paper":
        return blocks_paper_reason(head)
    return None


def list_heads() -> list[str]:
    """Every named head (``prompt4re-local:<folder>`` and ``concat-local:<folder>`` are accepted too)."""
    return list(HEAD_NAMES)


def embedding_blocks(columns: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Modality blocks of an embedding from its column names: ``<block>__<k>`` columns, contiguous.

    An embedding whose columns carry no block prefix (``emb_0 ..``) is one block called ``embedding``.
    """
    names: list[str] = []
    sizes: list[int] = []
    for column in map(str, columns):
        block = column.split(BLOCK_SEP, 1)[0] if BLOCK_SEP in column else "embedding"
        if names and names[-1] == block:
            sizes[-1] += 1
        elif block in names:
            raise ValueError(f"columns of block {block!r} are not contiguous")
        else:
            names.append(block)
            sizes.append(1)
    return tuple(names), tuple(sizes)


def build_head(
    spec: HeadSpec, protocol: str, random_state: int | None = 0, n_region_features: int | None = None,
    blocks: tuple[int, ...] | None = None, block_names: tuple[str, ...] | None = None, n_learned: int = 0,
) -> Any:
    """A fresh, unfitted estimator for a head.

    Args:
        spec: The parsed head.
        protocol: ``paper`` gives the peers' fixed probe settings for ridge and knn; neural heads choose
            epochs on an inner split of the training regions under every protocol (Prompt4RE starts from the
            protocol's own ``ridge`` head: the fixed Ridge under ``paper``, the tuned probe otherwise).
        random_state: Seed.
        n_region_features: Width of the embedding part of the input (prompt heads: the rest are prompts).
        blocks: Column counts of the input's modality blocks (``moe``); ``None`` for one block.
        block_names: Their names.
        n_learned: Width of the learned block (``ridge-blocks``: the leading ``emb_*`` columns).
    """
    from urbanprofile.heads.probes import make_probe

    if spec.kind in ("ridge", "knn", "ridge-blocks"):
        return make_probe(spec.kind, protocol, random_state, n_learned=n_learned)
    if spec.kind == "mlp":
        from urbanprofile.heads.neural import MLPHead

        return MLPHead(multitask=spec.multitask, random_state=random_state)
    if spec.kind == "moe":
        from urbanprofile.heads.moe import UrbanMoE

        return UrbanMoE(blocks=blocks, block_names=block_names, random_state=random_state)
    if spec.kind == "prompt4re":
        from urbanprofile.heads.prompt4re import Prompt4REHead

        if n_region_features is None:
            raise ValueError("prompt heads need n_region_features")
        return Prompt4REHead(n_region_features=n_region_features, align=spec.align, attention=spec.attention,
                             ridge_start="paper" if protocol == "paper" else "tuned", random_state=random_state)
    raise unknown_name("head", spec.name, HEAD_NAMES)
