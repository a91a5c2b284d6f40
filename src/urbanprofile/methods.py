"""The method registry: every embedder by name, what it needs, and how it is probed.

Methods are described by a :class:`MethodSpec` and imported only when built, so listing them or
running data commands never imports torch. A new method plugs in with :func:`register_method` (or an
``urbanprofile.methods`` entry point returning a ``MethodSpec``); the CLI and benchmark pick it up.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from urbanprofile.errors import DataError, MethodUnavailableError, UrbanProfileError
from urbanprofile.registry import Registry

if TYPE_CHECKING:
    from urbanprofile.data.city import CityData
    from urbanprofile.embedders.base import Embedder


@dataclass(frozen=True)
class MethodSpec:
    """How to build and evaluate one method.

    Attributes:
        name: Registry name, e.g. ``raw-poi``.
        factory: ``"module:Class"`` of the :class:`Embedder`.
        params: Constructor arguments (``random_state`` is added per seed).
        head: Probe kind: ``ridge`` (linear probe), ``knn``, or ``ridge-blocks`` (a learned embedding beside
            raw features, the blocks' weights chosen by inner CV).
        requires_views: Views the dataset must have (the method cannot run without each of them).
        views: Every view the method reads, in the order it reads them (default: ``requires_views``). Those not in
            ``requires_views`` are read when a city has them; a method that requires none needs at least one.
            This is the one place a method's views are declared: the embedder is built with the views a city
            has (see :meth:`for_city`).
        views_param: The constructor argument that takes the views to read: :meth:`build` passes it the spec's
            views, so the argument's default in the embedder plays no part (``None``: the method reads fixed
            inputs of its own, which ``requires_views`` must name).
        needs_locations: Whether region locations are required.

    A method's requirements (``requires_views``, ``views``, ``needs_locations``) are declared here only; an
    embedder class declares none (``tests/test_single_source.py`` checks both), so the two cannot disagree.
        stochastic: Whether results vary with the seed (then run over several seeds).
        family: ``baseline`` or the paper the method comes from.
        description: One line for ``urbanprofile methods``.
        city_check: Whether the embedder class has more to say about a city (a missing optional package, a
            region kind): its classmethod ``unavailable_reason(name, city, **params)`` is consulted too.
    """

    name: str
    factory: str
    params: dict[str, Any] = field(default_factory=dict)
    head: str = "ridge"
    requires_views: tuple[str, ...] = ()
    needs_locations: bool = False
    stochastic: bool = False
    family: str = "baseline"
    description: str = ""
    city_check: bool = False
    views: tuple[str, ...] = ()
    views_param: str | None = None

    def __post_init__(self) -> None:
        given = self.params.get(self.views_param) if self.views_param is not None else None
        if given is not None and tuple(given) != self.all_views:  # the views stated twice, differently
            raise ValueError(f"method {self.name!r}: params[{self.views_param!r}] = {tuple(given)} differs from "
                             f"its views {self.all_views}; declare them once, in views (or requires_views)")

    @property
    def all_views(self) -> tuple[str, ...]:
        """Every view the method reads when a city has them all."""
        return self.views or self.requires_views

    @property
    def optional_views(self) -> tuple[str, ...]:
        """Views read only when a city has them."""
        return tuple(v for v in self.all_views if v not in self.requires_views)

    def views_for(self, city: CityData) -> tuple[str, ...]:
        """The views this method reads on ``city`` (all of :attr:`all_views` that it has)."""
        return tuple(v for v in self.all_views if v in city.views)

    def describe_views(self) -> str:
        """What the method reads, in one phrase (for ``urbanprofile methods list``)."""
        required, optional = ", ".join(self.requires_views), ", ".join(self.optional_views)
        if required and optional:
            return f"{required}; {optional} if present"
        if optional:
            return f"any of {optional}"
        return required

    def build(self, random_state: int | None = 0) -> Embedder:
        module_name, _, class_name = self.factory.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        params = dict(self.params)
        if self.views_param is not None:  # the embedder reads the views declared here, not its argument's default
            params.setdefault(self.views_param, self.all_views)
        embedder: Embedder = cls(**params, random_state=random_state)
        return embedder

    def unavailable_reason(self, city: CityData) -> str | None:
        """Why this method cannot run on ``city`` (one line), or ``None`` if it can."""
        missing = [v for v in self.requires_views if v not in city.views]
        if missing:
            return f"{self.name} needs the {missing[0]!r} view, which {city.name} lacks"
        if self.all_views and not self.views_for(city):
            listed = ", ".join(repr(v) for v in self.all_views)
            return f"{self.name} needs at least one of the {listed} views, which {city.name} lacks"
        if self.needs_locations and not city.has_locations:
            return f"{self.name} needs region locations, which {city.name} lacks"
        if self.city_check:
            module_name, _, class_name = self.factory.partition(":")
            cls = getattr(importlib.import_module(module_name), class_name)
            reason: str | None = cls.unavailable_reason(self.name, city, **self.params)
            return reason
        return None

    def check_available(self, city: CityData) -> None:
        reason = self.unavailable_reason(city)
        if reason:
            raise MethodUnavailableError(reason)

    def for_city(self, city: CityData) -> MethodSpec:
        """This method as it runs on ``city``: reading the views the city has.

        A city with every view gets this spec unchanged (same parameters and configuration hash); a city
        lacking some optional view gets a spec whose ``views`` (and the embedder's views argument) are those
        it has, so its configuration hash differs.

        Raises:
            MethodUnavailableError: If the method cannot run on ``city`` (one line naming what is missing).
        """
        self.check_available(city)
        present = self.views_for(city)
        if self.views_param is None or present == self.all_views:
            return self
        return replace(self, params={**self.params, self.views_param: present}, views=present)

    @property
    def config_hash(self) -> str:
        """A short hash of everything that defines this configuration (for the results store)."""
        payload = json.dumps(
            {"factory": self.factory, "params": self.params, "head": self.head}, sort_keys=True, default=str
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


_POI = ("poi_counts",)
_LANDUSE = ("landuse_counts",)
_OD = ("od_flows",)
_ALL = ("poi_counts", "landuse_counts", "od_flows")
_HAFUSION = "urbanprofile.embedders.multiview.hafusion:HAFusionEmbedder"
_SREL = "urbanprofile.embedders.multiview.srel:SRELEmbedder"
_WITH_RAW = "urbanprofile.embedders.baselines.with_raw:WithRawFeatures"

# The multi-view embedders' mobility objective needs trips; they read POI and land use when a city has them.
_BUILTIN = [
    MethodSpec("raw-poi", "urbanprofile.embedders.baselines.raw:RawViews", {"views": _POI},
               requires_views=_POI, views_param="views",
               description="POI counts per category"),
    MethodSpec("raw-landuse", "urbanprofile.embedders.baselines.raw:RawViews", {"views": _LANDUSE},
               requires_views=_LANDUSE, views_param="views",
               description="land-use counts per class"),
    MethodSpec("raw-mobility", "urbanprofile.embedders.baselines.raw:RawViews", {"views": _OD},
               requires_views=_OD, views_param="views",
               description="out-flow and in-flow trip profiles (OD rows and columns)"),
    MethodSpec("raw-all", "urbanprofile.embedders.baselines.raw:RawViews", {"views": _ALL},
               requires_views=_ALL, views_param="views",
               description="POI, land use and mobility profiles side by side"),
    MethodSpec("pca", "urbanprofile.embedders.baselines.pca:PCAEmbedder", {"n_components": 32}, views=_ALL,
               views_param="views",
               description="32 principal components of the log-standardised raw views"),
    MethodSpec("autoencoder", "urbanprofile.embedders.baselines.autoencoder:AutoencoderEmbedder",
               {"n_components": 32, "epochs": 300}, views=_ALL, views_param="views", stochastic=True,
               description="MLP autoencoder (torch) of the log-standardised raw views, 32-d"),
    MethodSpec("raw-location", "urbanprofile.embedders.baselines.raw:SinusoidalLocation", {}, needs_locations=True,
               description="multi-scale sinusoidal features of the region centroid"),
    MethodSpec("knn-location", "urbanprofile.embedders.baselines.raw:Coordinates", {}, head="knn", needs_locations=True,
               description="k-nearest-neighbour regression on centroids (k chosen in training folds)"),
    MethodSpec("mvure", "urbanprofile.embedders.multiview.mvure:MVUREEmbedder", {}, requires_views=_OD, views=_ALL,
               views_param="views", stochastic=True, family="MVURE (IJCAI 2020)",
               description="per-view graph attention, cross-view sharing, attentive fusion; multi-task loss"),
    MethodSpec("mgfn", "urbanprofile.embedders.multiview.mgfn:MGFNEmbedder", {},
               requires_views=("od_flows", "od_patterns"),
               stochastic=True, family="MGFN (IJCAI 2022)",
               description="mobility pattern graphs fused by intra-/inter-pattern attention; mobility loss"),
    MethodSpec("hafusion", _HAFUSION, {}, requires_views=_OD, views=_ALL, views_param="views",
               stochastic=True, family="HAFusion (ICDE 2024)",
               description="intra-/inter-view attentive fusion + inter-region self-attention; multi-task loss"),
    MethodSpec("srel", _SREL, {}, requires_views=_OD, views=_ALL, views_param="views", stochastic=True,
               family="ToPT (SREL)",
               description="view fusion + Graphormer attention with distance bias and centrality (sparse if large)"),
    # srel-deep keeps the objective and read-out it was benchmarked with (before the authors' objective).
    MethodSpec("srel-deep", _SREL,
               {"n_layers": 5, "lr": 2e-4, "spatial_weight": 0.4, "objective": "distribution", "readout": "mlp",
                "weight_decay": 1e-5}, requires_views=_OD, views=_ALL, views_param="views", stochastic=True,
               family="ToPT (SREL)",
               description="srel with the ToPT paper's check-in setting: 5 layers, lr 2e-4, lambda 0.4 "
                           "(previous objective)"),
    MethodSpec("urbanfusion", "urbanprofile.embedders.multimodal.urbanfusion:UrbanFusionEmbedder", {}, stochastic=True,
               family="UrbanFusion (2025)",
               description="frozen modality encoders -> Transformer fusion; stochastic multimodal fusion (InfoNCE + "
                           "reconstruction); any modality subset at inference (--modalities)"),
    MethodSpec("concat", "urbanprofile.embedders.multimodal.modal_baselines:ConcatModalities", {},
               description="the frozen modality encoder outputs concatenated (block-scaled), tuned Ridge"),
    MethodSpec("tfidf-captions", "urbanprofile.embedders.multimodal.modal_baselines:TfidfCaptions", {}, city_check=True,
               description="TF-IDF + truncated SVD (128-d) of each region's caption text"),
    MethodSpec("urbanvlp", "urbanprofile.embedders.multimodal.urbanvlp:UrbanVLPEmbedder", {}, needs_locations=True,
               stochastic=True, city_check=True, family="UrbanVLP (AAAI 2025)",
               description="tile + street-view branches fused, CLIP loss to tile captions, token loss to "
                           "street-view captions; frozen encoders (needs tile captions)"),
    MethodSpec("hafusion+raw", _WITH_RAW, {"learned": _HAFUSION, "learned_params": {}}, head="ridge-blocks",
               requires_views=_OD, views=_ALL, views_param="raw_views", stochastic=True,
               family="HAFusion (ICDE 2024)",
               description="hafusion's embedding beside raw-all's features; block weights chosen by inner CV"),
    MethodSpec("srel+raw", _WITH_RAW, {"learned": _SREL, "learned_params": {}}, head="ridge-blocks",
               requires_views=_OD, views=_ALL, views_param="raw_views", stochastic=True, family="ToPT (SREL)",
               description="srel's embedding beside raw-all's features; block weights chosen by inner CV"),
]

# srai's embedders (pip install 'urbanprofile[srai]'); the adapters import srai only when fitted.
_SRAI = "urbanprofile.embedders.srai"
_BUILTIN += [
    MethodSpec("srai-count", f"{_SRAI}:SraiCount", {}, requires_views=_POI, city_check=True, family="srai",
               description="srai's CountEmbedder on POIs rebuilt from poi_counts (equals raw-poi)"),
    MethodSpec("srai-contextual-count", f"{_SRAI}:SraiContextualCount", {}, requires_views=_POI, city_check=True,
               family="srai", description="srai's ContextualCountEmbedder: POI counts of the region and of its "
                                          "neighbour rings 1-2 (H3, shared borders, else 6 nearest centroids)"),
    MethodSpec("hex2vec", f"{_SRAI}:SraiHex2Vec", {}, requires_views=_POI, city_check=True, stochastic=True,
               family="Hex2Vec (srai)", description="srai's Hex2VecEmbedder: POI-count encoder trained so that "
                                                    "neighbours look alike (20 epochs, CPU)"),
    MethodSpec("geovex", f"{_SRAI}:SraiGeoVex", {}, requires_views=_POI, city_check=True, stochastic=True,
               family="GeoVex (srai)", description="srai's GeoVexEmbedder: hexagonal convolutional autoencoder of "
                                                   "the POI counts in 2 H3 rings (H3 builds only)"),
]

_BUILTIN.append(
    MethodSpec("modalities", "urbanprofile.embedders.multimodal.modal_blocks:ModalityBlocks", {},
               description="every modality as its own standardised block (<modality>__k columns; moe reads them)"),
)

#: Every method by name; plug-ins come from the ``urbanprofile.methods`` entry-point group (a ``MethodSpec``).
METHODS: Registry[MethodSpec] = Registry("method", "urbanprofile.methods", name_of=lambda spec: spec.name,
                                         accepts=lambda obj: isinstance(obj, MethodSpec))
_REGISTRY = METHODS.items


def register_method(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method to the registry (``replace=True`` to override one of the same name).

    Raises:
        DuplicateNameError: A method of that name is registered and ``replace`` is false.
    """
    _ensure_loaded()
    return METHODS.register(spec.name, spec, replace=replace)


def _ensure_loaded() -> None:
    for spec in _BUILTIN:  # also after a test emptied the registry (each keeps its place)
        if spec.name not in _REGISTRY:
            _REGISTRY[spec.name] = spec
    METHODS.load_plugins()


def broken_plugins() -> dict[str, str]:
    """Method plug-ins that could not be loaded: entry-point name -> one-line reason."""
    _ensure_loaded()
    return dict(METHODS.broken)


def list_methods(external: bool = False) -> list[str]:
    """Names of every registered method (with ``external=True`` also the ``file:`` embeddings and the checkpoints
    registered in this session, which a plan runs only when it names them)."""
    _ensure_loaded()
    return [name for name, spec in _REGISTRY.items() if external or not isinstance(spec, ExternalMethodSpec)]


def with_modalities(spec: MethodSpec, modalities: list[str] | tuple[str, ...]) -> MethodSpec:
    """The spec restricted to some modalities (``name[m1,m2]``, registered so the runner finds it).

    Only methods that take a ``modalities`` argument (``urbanfusion``, ``concat``) accept this.
    """
    import inspect

    module_name, _, class_name = spec.factory.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if "modalities" not in inspect.signature(cls.__init__).parameters:
        raise MethodUnavailableError(f"method {spec.name!r} does not take --modalities")
    mods = tuple(dict.fromkeys(modalities))
    derived = replace(spec, name=f"{spec.name}[{','.join(mods)}]", params={**spec.params, "modalities": mods},
                      description=f"{spec.description} (modalities: {', '.join(mods)})")
    return register_method(derived, replace=True)


def get_method(name: str) -> MethodSpec:
    """The spec of a method, or a one-line error listing the valid names."""
    _ensure_loaded()
    return METHODS.get(name)


#: Prefix of the methods that serve an embedding made elsewhere.
EXTERNAL_PREFIX = "file:"
_EXTERNAL_FACTORY = "urbanprofile.embedders.external:ExternalEmbedding"


@dataclass(frozen=True)
class ExternalMethodSpec(MethodSpec):
    """A method that serves a given embedding (a file or a DataFrame), keyed in the store by its content hash.

    ``params`` holds only the content hash, so the same content under another path is the same result and a
    changed file is a new one.
    """

    source: Any = field(default=None, compare=False, repr=False)

    def build(self, random_state: int | None = 0) -> Embedder:
        # Here: it pulls pandas (0.9 s measured), which the registry, and so `urbanprofile --help`, must not pay.
        from urbanprofile.embedders.external import ExternalEmbedding

        return ExternalEmbedding(self.source, self.params.get("content_hash"), random_state=random_state)

    def unavailable_reason(self, city: CityData) -> str | None:
        """Why the embedding does not fit ``city`` (another dataset, ids that differ, bad columns), or ``None``."""
        try:
            self.build().fit(city)
        except DataError as err:
            return str(err)
        return None


def register_embedding(name: str, source: str | Any) -> ExternalMethodSpec:
    """Register an embedding made elsewhere as the method ``file:<name>`` (replacing one of the same name).

    Args:
        name: Short name; the method is ``file:<name>``.
        source: A ``.parquet`` / ``.csv`` file with a ``region_id`` column (or index) and numeric columns, or a
            DataFrame indexed by ``region_id`` (or with a ``region_id`` column).

    Returns:
        The registered spec; its rows go through the same protocols, heads, bias figures and store.

    Raises:
        DataError: The file is missing or unreadable, or has no region ids.
        UrbanProfileError: The name is empty or holds ``,`` / ``=``.
    """
    from pathlib import Path

    import pandas as pd

    # Here: it pulls pandas (0.6 s measured), which the registry, and so `urbanprofile --help`, must not pay.
    from urbanprofile.data.embeddings import file_hash, frame_hash, read_embedding_file

    name = name.removeprefix(EXTERNAL_PREFIX).strip()
    if not name or any(c in name for c in ",=[]"):
        raise UrbanProfileError(f"embedding name {name!r} must be non-empty without ',', '=' or brackets")
    held: pd.DataFrame | Path
    if isinstance(source, pd.DataFrame):
        held = source.set_index("region_id") if "region_id" in source.columns else source
        content, where = frame_hash(held), "a DataFrame"
    else:
        held = Path(source).expanduser().resolve()
        read_embedding_file(held)  # a missing or unreadable file fails here, before any work
        content, where = file_hash(held), str(held)
    _ensure_loaded()
    spec = ExternalMethodSpec(f"{EXTERNAL_PREFIX}{name}", _EXTERNAL_FACTORY, {"content_hash": content},
                              family="external", description=f"embedding read from {where}", source=held)
    register_method(spec, replace=True)
    return spec


def register_embeddings(text: str) -> list[str]:
    """Register ``NAME=FILE,NAME=FILE`` (a bare ``FILE`` is named after its stem); returns the method names."""
    from pathlib import Path

    names = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not path.strip():
            raise UrbanProfileError(f"--embeddings: {item!r} names no file (expected NAME=FILE)")
        names.append(register_embedding(name, path.strip()).name)
    if not names:
        raise UrbanProfileError("--embeddings: no NAME=FILE given")
    if len(set(names)) < len(names):
        raise UrbanProfileError(f"--embeddings: a name is used twice ({', '.join(names)})")
    return names


#: Prefix of the methods that serve a pretrained UrbanFusion checkpoint (``urbanfusion:ckpt-<content hash>``).
CHECKPOINT_PREFIX = "urbanfusion:ckpt-"
_CHECKPOINT_FACTORY = "urbanprofile.embedders.multimodal.pretrained:PretrainedUrbanFusion"


@dataclass(frozen=True)
class CheckpointMethodSpec(ExternalMethodSpec):
    """A pretrained UrbanFusion checkpoint served frozen, like an embedding made elsewhere: its name and ``params``
    hold the checkpoint's content hash, so a changed checkpoint is a new result and a copy elsewhere the same one.
    """

    def build(self, random_state: int | None = 0) -> Embedder:
        from urbanprofile.embedders.multimodal.pretrained import PretrainedUrbanFusion

        return PretrainedUrbanFusion(self.source, self.params.get("checkpoint_hash"), self.params.get("modalities"),
                                     random_state=random_state)

    def unavailable_reason(self, city: CityData) -> str | None:
        """Why the checkpoint does not fit ``city`` (none of its modalities, another width), or ``None``."""
        try:
            self.build().fit(city)
        except (DataError, MethodUnavailableError) as err:
            return str(err)
        return None


def register_checkpoint(folder: str | os.PathLike[str], method: str | None = None) -> CheckpointMethodSpec:
    """Register a pretrained UrbanFusion checkpoint folder as the method ``urbanfusion:ckpt-<content hash>``.

    Args:
        folder: What ``urbanprofile pretrain --out`` wrote.
        method: The method named beside it, if any: only ``urbanfusion`` goes with a checkpoint.

    Raises:
        DataError: The folder is not a readable urbanfusion checkpoint.
        UrbanProfileError: ``method`` is another method.
    """
    from pathlib import Path

    # Here: it pulls torch, which the registry, and so `urbanprofile --help`, must not pay.
    from urbanprofile.embedders.multimodal.pretrained import checkpoint_hash, read_checkpoint

    if method is not None and method != "urbanfusion":
        raise UrbanProfileError(f"--checkpoint is an urbanfusion checkpoint; it does not go with --method {method} "
                                "(leave out --method, or give --method urbanfusion)")
    root = Path(folder).expanduser().resolve()
    read_checkpoint(root)  # a folder that is not a checkpoint fails here, before any data is read
    content = checkpoint_hash(root)
    _ensure_loaded()
    spec = CheckpointMethodSpec(f"{CHECKPOINT_PREFIX}{content}", _CHECKPOINT_FACTORY, {"checkpoint_hash": content},
                                family="UrbanFusion (2025)", description=f"urbanfusion pretrained, read from {root}",
                                source=root)
    register_method(spec, replace=True)
    return spec


def register_checkpoints(folders: list[str]) -> list[str]:
    """Register each checkpoint folder (:func:`register_checkpoint`); returns the method names.

    Raises:
        UrbanProfileError: No folder, or two folders holding the same checkpoint (one name, one result).
    """
    if not folders:
        raise UrbanProfileError("--checkpoints: no checkpoint folder given")
    names: dict[str, str] = {}
    for folder in folders:
        name = register_checkpoint(folder).name
        if name in names:
            raise UrbanProfileError(f"--checkpoints: {names[name]} and {folder} hold the same checkpoint ({name})")
        names[name] = folder
    return list(names)
