"""A pretrained UrbanFusion checkpoint used as a frozen embedder (``urbanprofile embed/evaluate --checkpoint``).

The checkpoint folder is what ``urbanprofile pretrain`` writes (``urbanfusion.safetensors`` and ``urbanfusion.json``;
no pickle). Nothing is trained: fitting reads the checkpoint and checks it against the city (which of its
modalities the city has, and at which width), so a mismatch is one line naming the modality and both widths
before any embedding is made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import Embedder
from urbanprofile.embedders.multimodal.modalities import MODALITIES, available_modalities, check_modalities
from urbanprofile.embedders.multimodal.urbanfusion import (
    CHECKPOINT,
    CHECKPOINT_META,
    UrbanFusionEmbedder,
    city_modalities,
)
from urbanprofile.errors import DataError, MethodUnavailableError, unknown_name

#: What a checkpoint is, for the error that meets a folder that is not one.
_WHAT = f"a checkpoint folder holds {CHECKPOINT} and {CHECKPOINT_META}, as urbanprofile pretrain --out writes them"


def check_checkpoint_folder(folder: str | Path) -> Path:
    """The folder, if it has a checkpoint's two files.

    Raises:
        DataError: It does not exist, is a file, or lacks a file (one line, saying what a checkpoint is).
    """
    root = Path(folder)
    if not root.exists():
        raise DataError(f"{root}: no such checkpoint folder ({_WHAT})")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a checkpoint folder ({_WHAT})")
    missing = [name for name in (CHECKPOINT_META, CHECKPOINT) if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root}: not an urbanfusion checkpoint (no {missing[0]}; {_WHAT})")
    return root


def read_checkpoint(folder: str | Path) -> UrbanFusionEmbedder:
    """The pretrained UrbanFusion model of a checkpoint folder.

    Raises:
        DataError: The folder is not a checkpoint, or its files do not describe an UrbanFusion model.
    """
    return UrbanFusionEmbedder.from_checkpoint(check_checkpoint_folder(folder))


def checkpoint_hash(folder: str | Path) -> str:
    """A short SHA-256 of what decides a checkpoint's embedding: the weights file's bytes and the model's
    description (parameters, modalities, widths).

    The training log in ``urbanfusion.json`` (losses, seconds per epoch) is left out: it says how the model was
    made, not what it computes, and the seconds differ between two runs that give the same weights.
    """
    root = check_checkpoint_folder(folder)
    try:
        meta = json.loads((root / CHECKPOINT_META).read_text())
        described = {key: meta[key] for key in ("params", "names", "dims")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{root / CHECKPOINT_META}: not an urbanfusion checkpoint description ({err})") from None
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode() + b"\x1f")
    with open(root / CHECKPOINT, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class PretrainedUrbanFusion(Embedder):
    """Embeds a city with a pretrained UrbanFusion checkpoint, frozen; fitting learns nothing.

    Args:
        checkpoint: The checkpoint folder.
        checkpoint_hash: Its :func:`checkpoint_hash` when it was registered as a method; a checkpoint changed since
            then is refused (its results would be stored under the old content's key).
        modalities: Modalities to embed with (``None``: every pretrained modality the city has).
        random_state: Ignored (the model is fixed and runs in eval mode); accepted like every method's.
    """

    def __init__(self, checkpoint: str | Path, checkpoint_hash: str | None = None,
                 modalities: Sequence[str] | None = None, random_state: int | None = None) -> None:
        self.checkpoint = checkpoint
        self.checkpoint_hash = checkpoint_hash
        self.modalities = modalities
        self.random_state = random_state

    def fit(self, city: CityData) -> PretrainedUrbanFusion:
        """Read the checkpoint and check it against ``city``.

        Raises:
            DataError: The checkpoint is unreadable or changed since it was registered, or a modality has another
                width in ``city`` than in pretraining (named, with both widths).
            MethodUnavailableError: ``city`` has none of the pretrained modalities, or a requested modality was not
                pretrained or is missing from ``city``.
        """
        root = Path(self.checkpoint)
        model = read_checkpoint(root)
        if self.checkpoint_hash is not None and checkpoint_hash(root) != self.checkpoint_hash:
            raise DataError(f"{root}: changed since it was registered; run again to use the new checkpoint")
        names = self._names(city, model, root)
        features = city_modalities(city, names)
        fits = [m for m in names if features.values[m].shape[1] == model.dims_[m]]
        for m in names:
            width = features.values[m].shape[1]
            if width != model.dims_[m]:
                hint = f"; use the others: --modalities {','.join(fits)}" if fits else ""
                raise DataError(f"{city.name}: modality {m!r} is {width}-d here, the checkpoint {root} was pretrained "
                                f"on {model.dims_[m]}-d{hint}")
        model.modalities = names
        self.model_ = model
        return self

    def _names(self, city: CityData, model: UrbanFusionEmbedder, root: Path) -> list[str]:
        """The modalities to embed with: those asked for, else every pretrained one that ``city`` has."""
        trained = list(model.names_)
        if self.modalities is None:
            have = available_modalities(city)
            names = [m for m in trained if m in have]
            if not names:
                raise MethodUnavailableError(
                    f"{city.name} has none of the modalities the checkpoint {root} was pretrained on "
                    f"({', '.join(trained)}; {city.name} has: {', '.join(have) or 'none'})")
            return names
        for m in self.modalities:
            if m not in MODALITIES:
                raise unknown_name("modality", m, MODALITIES)
            if m not in trained:
                raise MethodUnavailableError(f"modality {m!r} was not pretrained in the checkpoint {root} (it has: "
                                             f"{', '.join(trained)})")
        return check_modalities(city, self.modalities)

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("model_")
        embedding: pd.DataFrame = self.model_.transform(city)
        return embedding
