"""PerceptionScore (UrbanVLP, equations 1-3): caption quality = (CLIPScore + CycleScore) / 2.

- **CLIPScore** (Hessel et al. 2021): ``w * max(cos(E_I(I), E_T(T)), 0)`` with ``w = 2.5``, computed
  here with *our* aligned towers (frozen EfficientNet-Lite0 and MiniLM features through the UrbanVLP
  image and text towers, aligned on the real image-caption pairs), not with OpenAI's CLIP.
- **CycleScore**: ``1 - MAE(Seg(I), Seg(I'))`` where ``I' = T2I(T)`` is an image generated from the
  caption (SDXL in the paper) and ``Seg`` gives the share of each semantic class (ADE20K in the paper).
  Neither a text-to-image model nor a segmenter ships offline with this project, so CycleScore is
  computed only when the caller supplies both (as Python callables, or ``module:function`` names);
  otherwise the result says plainly that only CLIPScore was computed and ``perception_score`` is
  ``None``: the missing half is never filled in.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from urbanprofile.embedders.multimodal.urbanvlp import UrbanVLPNetwork, clip_loss
from urbanprofile.errors import DataError, UrbanProfileError

#: CLIPScore's rescaling weight (Hessel et al. 2021).
CLIP_SCORE_WEIGHT = 2.5
ONLY_CLIP_NOTE = (
    "only CLIPScore was computed: CycleScore needs a text-to-image model and a segmenter, which are not "
    "available offline; PerceptionScore (their mean) is therefore not reported"
)

TextToImage = Callable[[str], np.ndarray]
Segmenter = Callable[[np.ndarray], np.ndarray]


def clip_score(image_vectors: np.ndarray, text_vectors: np.ndarray, w: float = CLIP_SCORE_WEIGHT) -> np.ndarray:
    """CLIPScore of matched rows: ``w * max(cos, 0)`` per (image, caption) pair."""
    image_vectors = np.asarray(image_vectors, dtype=float)
    text_vectors = np.asarray(text_vectors, dtype=float)
    if image_vectors.shape != text_vectors.shape:
        raise DataError(f"CLIPScore: {image_vectors.shape} image vectors vs {text_vectors.shape} caption vectors")
    cos = _cosine_rows(image_vectors, text_vectors)
    return w * np.maximum(cos, 0.0)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(axis=1) / np.maximum(norm, 1e-12), dtype=float)


def cycle_score(image: np.ndarray, caption: str, text_to_image: TextToImage, segmenter: Segmenter) -> float:
    """Equation (2): ``1 - MAE(Seg(I), Seg(T2I(T)))`` on the class shares of the two images."""
    generated = text_to_image(caption)
    original_shares = _shares(segmenter(image), "the input image")
    generated_shares = _shares(segmenter(np.asarray(generated)), "the generated image")
    if original_shares.shape != generated_shares.shape:
        raise UrbanProfileError(
            f"CycleScore: the segmenter gave {len(original_shares)} classes for the input image and "
            f"{len(generated_shares)} for the generated one; it must return the same classes for both"
        )
    return float(1.0 - np.abs(original_shares - generated_shares).mean())


def _shares(values: Any, what: str) -> np.ndarray:
    shares = np.asarray(values, dtype=float).ravel()
    if shares.size == 0 or not np.isfinite(shares).all() or (shares < 0).any():
        raise UrbanProfileError(f"CycleScore: the segmenter's output for {what} is not a vector of class shares")
    total = shares.sum()
    if total <= 0:
        raise UrbanProfileError(f"CycleScore: the segmenter found no class in {what}")
    return shares / total


@dataclass
class PerceptionResult:
    """Per-pair scores. ``cycle_score`` and ``perception_score`` are ``None`` unless CycleScore ran."""

    clip_score: np.ndarray
    cycle_score: np.ndarray | None
    perception_score: np.ndarray | None
    note: str

    @property
    def only_clip(self) -> bool:
        return self.cycle_score is None

    def summary(self) -> dict[str, Any]:
        def mean(values: np.ndarray | None) -> float | None:
            return None if values is None else float(np.mean(values))

        return {"n_pairs": len(self.clip_score), "clip_score": mean(self.clip_score),
                "cycle_score": mean(self.cycle_score), "perception_score": mean(self.perception_score),
                "note": self.note}


def load_callable(spec: str | Callable[..., Any] | None, what: str) -> Callable[..., Any] | None:
    """A callable given as itself or as ``module:function``; a one-line error if it cannot be loaded."""
    if spec is None or callable(spec):
        return spec
    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise UrbanProfileError(f"{what} must be given as 'module:function', got {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise UrbanProfileError(f"{what} {spec!r} cannot be loaded: {err}") from None
    if not callable(function):
        raise UrbanProfileError(f"{what} {spec!r} is not callable")
    return function


def perception_score(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    images: Sequence[np.ndarray] | None = None,
    captions: Sequence[str] | None = None,
    text_to_image: TextToImage | str | None = None,
    segmenter: Segmenter | str | None = None,
) -> PerceptionResult:
    """PerceptionScore of matched (image, caption) pairs, or CLIPScore alone when CycleScore cannot run.

    Args:
        image_vectors: (n, d) images through the aligned image tower.
        text_vectors: (n, d) captions through the aligned text tower.
        images: The n images as HxWx3 uint8 arrays (needed by CycleScore only).
        captions: The n captions (needed by CycleScore only).
        text_to_image: Caption -> HxWx3 uint8 image (e.g. an SDXL pipeline), or ``module:function``.
        segmenter: Image -> class shares (e.g. an ADE20K segmenter's pixel shares), or ``module:function``.
    """
    clip = clip_score(image_vectors, text_vectors)
    t2i = load_callable(text_to_image, "text_to_image")
    seg = load_callable(segmenter, "segmenter")
    if t2i is None and seg is None:
        return PerceptionResult(clip, None, None, ONLY_CLIP_NOTE)
    if t2i is None or seg is None:
        missing = "a text-to-image model" if t2i is None else "a segmenter"
        raise UrbanProfileError(f"CycleScore needs both a text-to-image model and a segmenter; {missing} is missing")
    if images is None or captions is None or len(images) != len(clip) or len(captions) != len(clip):
        raise UrbanProfileError(f"CycleScore needs the {len(clip)} images and their captions")
    cycle = np.array([cycle_score(np.asarray(i), str(c), t2i, seg) for i, c in zip(images, captions, strict=True)])
    return PerceptionResult(clip, cycle, (clip + cycle) / 2.0,
                            "PerceptionScore = (CLIPScore + CycleScore) / 2, both computed")


def align_image_tower(
    network: UrbanVLPNetwork,
    image_features: np.ndarray,
    text_features: np.ndarray,
    epochs: int = 200,
    lr: float = 1e-3,
    random_state: int = 0,
) -> UrbanVLPNetwork:
    """Train the image tower on real (image, caption) pairs by equation (5), the text tower frozen.

    The text tower keeps what pretraining on every caption taught it; only the image tower moves, so a
    handful of pairs can align images into the caption space without disturbing it.
    """
    if network.image is None:
        raise DataError("image-text alignment needs a network with an image tower")
    if len(image_features) != len(text_features) or len(image_features) < 2:
        raise DataError(f"image-text alignment needs >= 2 matched pairs, got {len(image_features)} images "
                        f"and {len(text_features)} captions")
    torch.manual_seed(random_state)
    images = torch.as_tensor(image_features, dtype=torch.float32)
    with torch.no_grad():
        texts = network.encode_text(torch.as_tensor(text_features, dtype=torch.float32))
    optimizer = torch.optim.AdamW(network.image.parameters(), lr=lr, weight_decay=1e-2)
    network.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = clip_loss(network.encode_image(images), texts, network.log_scale_global.detach())
        loss.backward()
        optimizer.step()
    network.eval()
    return network
