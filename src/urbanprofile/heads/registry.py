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

A head kind is one :class:`HeadKind` registration (:func:`register_head`, or an ``urbanprofile.heads`` entry
point): the names it answers to, how it builds its estimator from what the protocol passes
(:class:`HeadContext`), and the modules its code lives in (the code version of its results covers those).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from urbanprofile.embedders.base import BLOCK_SEP
from urbanprofile.errors import unknown_name
from urbanprofile.registry import Registry

#: Prompt-vector sources with a fixed name (``local:<folder>`` is accepted as well).
PROMPT_MODELS = ("llama", "qwen", "minilm", "smollm2")
DEFAULT_HEAD = "ridge"


@dataclass(frozen=True)
class HeadSpec:
    """A parsed head name.

    Attributes:
        name: The name as given.
        kind: The registered :class:`HeadKind` that builds it (``ridge``, ``knn``, ``mlp``, ``moe``,
            ``prompt4re``, ...).
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


@dataclass(frozen=True)
class HeadContext:
    """What a protocol knows when it builds a head for one fold.

    Attributes:
        fixed_probe: The protocol's probe policy: ``True`` for the peers' fixed probe settings (``paper``),
            ``False`` for settings chosen by inner CV on the training regions.
        random_state: Seed.
        n_region_features: Width of the embedding part of the input (prompt heads: the rest are prompts).
        blocks: Column counts of the input's modality blocks (``moe``); ``None`` for one block.
        block_names: Their names.
        n_learned: Width of the learned block (``ridge-blocks``: the leading ``emb_*`` columns).
    """

    fixed_probe: bool = False
    random_state: int | None = 0
    n_region_features: int | None = None
    blocks: tuple[int, ...] | None = None
    block_names: tuple[str, ...] | None = None
    n_learned: int = 0


@dataclass(frozen=True)
class HeadKind:
    """One registered kind of head: its names, how it is built, and where its code lives.

    Attributes:
        kind: Registry name (:attr:`HeadSpec.kind`).
        build: A fresh, unfitted estimator for a spec of this kind under a :class:`HeadContext`; it has
            ``fit(X, y, groups=None)``, ``predict(X)`` and ``chosen()``.
        modules: The modules of its code (imported only by ``build``); a result's code version covers these.
        names: The names it answers to, as listed (``names`` of a pattern family are examples).
        parse: For a family of names (``prompt4re-<model>``): the spec of a name, or ``None`` when the name is
            not of this family. Default: exactly ``names``, each of kind ``kind``.
        multitask: Whether the names in ``names`` fit all tasks jointly (when ``parse`` is not given).
        probe: Whether it is a linear or nearest-neighbour probe (deterministic, cheap; the runner evaluates
            a deterministic method under these once, and under the others per seed).
        unavailable: Why a spec has no estimator under a fixed-probe protocol (``None``: it has one).
    """

    kind: str
    build: Callable[[HeadSpec, HeadContext], Any]
    modules: tuple[str, ...]
    names: tuple[str, ...] = ()
    parse: Callable[[str], HeadSpec | None] | None = None
    multitask: bool = False
    probe: bool = False
    unavailable: Callable[[HeadSpec], str | None] | None = None

    def spec(self, name: str) -> HeadSpec | None:
        """The spec of ``name`` when this kind answers to it."""
        if self.parse is not None:
            return self.parse(name)
        return HeadSpec(name, self.kind, multitask=self.multitask) if name in self.names else None


#: Every head kind; plug-ins come from the ``urbanprofile.heads`` entry-point group (a ``HeadKind``).
HEADS: Registry[HeadKind] = Registry("head", "urbanprofile.heads", name_of=lambda kind: kind.kind,
                                     accepts=lambda obj: isinstance(obj, HeadKind))


def register_head(kind: HeadKind, replace: bool = False) -> HeadKind:
    """Add a head kind (``replace=True`` to override one of the same name)."""
    return HEADS.register(kind.kind, kind, replace=replace)


def _probe(spec: HeadSpec, ctx: HeadContext) -> Any:
    from urbanprofile.heads.probes import make_probe

    return make_probe(spec.kind, ctx.fixed_probe, ctx.random_state, n_learned=ctx.n_learned)


def _blocks_unavailable(spec: HeadSpec) -> str | None:
    from urbanprofile.heads.probes import blocks_paper_reason

    return blocks_paper_reason(spec.name)


def _mlp(spec: HeadSpec, ctx: HeadContext) -> Any:
    from urbanprofile.heads.neural import MLPHead

    return MLPHead(multitask=spec.multitask, random_state=ctx.random_state)


def _moe(spec: HeadSpec, ctx: HeadContext) -> Any:
    from urbanprofile.heads.moe import UrbanMoE

    return UrbanMoE(blocks=ctx.blocks, block_names=ctx.block_names, random_state=ctx.random_state)


def _prompt4re(spec: HeadSpec, ctx: HeadContext) -> Any:
    from urbanprofile.heads.prompt4re import Prompt4REHead

    if ctx.n_region_features is None:
        raise ValueError("prompt heads need n_region_features")
    # Prompt4RE starts from the protocol's own ridge head: the fixed Ridge or the tuned probe.
    return Prompt4REHead(n_region_features=ctx.n_region_features, align=spec.align, attention=spec.attention,
                         ridge_start="paper" if ctx.fixed_probe else "tuned", random_state=ctx.random_state)


def _parse_prompt_head(name: str) -> HeadSpec | None:
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
            return None
        if align and model.endswith("-notask"):
            model, task_prompt = model[: -len("-notask")], False
        if model in PROMPT_MODELS:
            return HeadSpec(name, "prompt4re", prompt_model=model, task_prompt=task_prompt, align=align,
                            attention=attention)
    return None


_PROBES = ("urbanprofile.heads.probes",)
for _kind in (
    HeadKind("ridge", _probe, _PROBES, ("ridge",), probe=True),
    HeadKind("knn", _probe, _PROBES, ("knn",), probe=True),
    HeadKind("ridge-blocks", _probe, _PROBES, ("ridge-blocks",), probe=True, unavailable=_blocks_unavailable),
    HeadKind("mlp", _mlp, ("urbanprofile.heads.neural",), ("mlp", "mlp-multitask"),
             parse=lambda name: HeadSpec(name, "mlp", multitask=name == "mlp-multitask")
             if name in ("mlp", "mlp-multitask") else None),
    HeadKind("moe", _moe, ("urbanprofile.heads.moe",), ("moe",), multitask=True),
    # The prompt vectors are read by the protocols (prompt features), yet belong to the prompt heads alone.
    HeadKind("prompt4re", _prompt4re, ("urbanprofile.heads.prompt4re", "urbanprofile.heads.prompts"),
             (*(f"prompt4re-{m}" for m in PROMPT_MODELS), *(f"prompt4re-{m}-notask" for m in PROMPT_MODELS),
              *(f"concat-{m}" for m in PROMPT_MODELS)), parse=_parse_prompt_head),
):
    register_head(_kind)

#: The built-in head names (:func:`list_heads` adds registered plug-ins).
HEAD_NAMES: tuple[str, ...] = tuple(name for kind in HEADS.items.values() for name in kind.names)


class _HeadModules(Mapping[str, tuple[str, ...]]):
    """The modules of each registered head kind, read live from the registry."""

    def __getitem__(self, kind: str) -> tuple[str, ...]:
        return HEADS.get(kind).modules

    def __iter__(self) -> Iterator[str]:
        return iter(HEADS.names())

    def __len__(self) -> int:
        return len(HEADS.names())


#: The modules that implement each head kind (:attr:`HeadSpec.kind`), imported by :func:`build_head` only for that
#: kind. A result's code version covers the modules of the head it used and none of the others'
#: (:mod:`urbanprofile.benchmark.versions`); each :class:`HeadKind` declares its own.
HEAD_MODULES: Mapping[str, tuple[str, ...]] = _HeadModules()


def parse_head(name: str) -> HeadSpec:
    """The spec of a head name, or a one-line error listing the valid names."""
    for kind_name in HEADS.names():  # built-in kinds first: a plug-in cannot take over a built-in name
        spec = HEADS.items[kind_name].spec(name)
        if spec is not None:
            return spec
    raise unknown_name("head", name, list_heads())


def head_kind(spec: HeadSpec) -> HeadKind:
    """The registered kind that builds ``spec``."""
    return HEADS.get(spec.kind)


def head_unavailable_reason(head: str, fixed_probe: bool) -> str | None:
    """Why ``head`` has no estimator under a protocol with this probe policy (``None`` when it has one).

    ``ridge-blocks`` (a learned embedding beside raw counts) has none under the fixed probe
    (:func:`urbanprofile.heads.probes.blocks_paper_reason`); the tuned policy has every head.
    """
    spec = parse_head(head)
    kind = head_kind(spec)
    if fixed_probe and kind.unavailable is not None:
        return kind.unavailable(spec)
    return None


def list_heads() -> list[str]:
    """Every named head (``prompt4re-local:<folder>`` and ``concat-local:<folder>`` are accepted too)."""
    return [name for kind in HEADS.names() for name in HEADS.get(kind).names]


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
    spec: HeadSpec, fixed_probe: bool, random_state: int | None = 0, n_region_features: int | None = None,
    blocks: tuple[int, ...] | None = None, block_names: tuple[str, ...] | None = None, n_learned: int = 0,
) -> Any:
    """A fresh, unfitted estimator for a head.

    Args:
        spec: The parsed head.
        fixed_probe: The protocol's probe policy (:attr:`urbanprofile.evaluation.protocols.Protocol.fixed_probe`):
            ``True`` gives the peers' fixed probe settings for ridge and knn; neural heads choose epochs on an
            inner split of the training regions under either policy (Prompt4RE starts from the protocol's own
            ``ridge`` head: the fixed Ridge or the tuned probe).
        random_state: Seed.
        n_region_features: Width of the embedding part of the input (prompt heads: the rest are prompts).
        blocks: Column counts of the input's modality blocks (``moe``); ``None`` for one block.
        block_names: Their names.
        n_learned: Width of the learned block (``ridge-blocks``: the leading ``emb_*`` columns).
    """
    ctx = HeadContext(fixed_probe=fixed_probe, random_state=random_state, n_region_features=n_region_features,
                      blocks=blocks, block_names=block_names, n_learned=n_learned)
    return head_kind(spec).build(spec, ctx)
