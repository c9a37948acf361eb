"""Caption prompts, per-row error isolation, and the real VLM code path on a tiny random Qwen3-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from krea2_core.captioning.captioner import (CaptionContext, TextLlmCaptioner, VlmCaptioner, build_prompt,
                                             make_captioner)
from krea2_core.captioning.config import CaptionerConfig
from krea2_core.captioning.llm import Generated

CONTEXT = CaptionContext(ocr_text="OPEN 24 HOURS", entities=("Eiffel Tower",),
                         metadata={"Make": "Canon", "Model": "EOS R5", "FNumber": "2.8", "ExposureTime": "1/250",
                                   "ISOSpeedRatings": "400", "FocalLength": "35", "Software": "darktable"})
_SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<unk>"]
_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _user_text(messages: list[dict]) -> str:
    content = messages[1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def test_prompt_carries_ocr_and_metadata() -> None:
    text = _user_text(build_prompt(CONTEXT, with_image=False))
    assert '"OPEN 24 HOURS"' in text
    for value in ("Make: Canon", "Model: EOS R5", "FNumber: 2.8", "ExposureTime: 1/250", "ISOSpeedRatings: 400",
                  "FocalLength: 35", "Software: darktable", "Eiffel Tower"):
        assert value in text
    assert text.index("Make") < text.index("FNumber") < text.index("Software")  # camera settings first


def test_prompt_says_none_without_ocr_and_omits_absent_fields() -> None:
    messages = build_prompt(CaptionContext(metadata={"Make": "Nikon"}), with_image=True)
    text = _user_text(messages)
    assert "OCR text: none" in text and "Make: Nikon" in text
    for absent in ("Model", "FNumber", "ISOSpeedRatings", "Known entities", "Metadata:"):
        assert absent not in text
    assert messages[1]["content"][0] == {"type": "image"}
    assert "cannot see" in build_prompt(CONTEXT, with_image=False)[0]["content"]


class _FakeLlm:
    """Fails any batch that holds the OCR text "boom"; otherwise echoes the OCR line."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def generate(self, messages_batch: list, max_new_tokens: int) -> list[Generated]:
        self.batch_sizes.append(len(messages_batch))
        texts = [_user_text(m) for m in messages_batch]
        if any('"boom"' in t for t in texts):
            raise RuntimeError("generation failed")
        return [Generated(t.splitlines()[1], truncated=False) for t in texts]


def test_generation_error_is_isolated_to_its_row() -> None:
    llm = _FakeLlm()
    captioner = TextLlmCaptioner(CaptionerConfig(batch_size=3), llm=llm)
    contexts = [CaptionContext(ocr_text=t) for t in ("one", "boom", "three", "four")]
    results = captioner.caption([Image.new("RGB", (8, 8))] * 4, contexts)
    assert [r.error is None for r in results] == [True, False, True, True]
    assert "generation failed" in results[1].error and results[1].text == ""
    assert results[2].text == 'OCR text: "three"'
    assert llm.batch_sizes == [3, 1, 1, 1, 1]  # the failing batch retried row by row, then the last batch


@pytest.fixture(scope="module")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL with a processor built offline (word-level tokenizer, PIL image processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (AutoProcessor, PreTrainedTokenizerFast, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Qwen3VLProcessor checks its video processor's class, which needs torchvision (not installed):
    # an image-only subclass (attributes come from the __init__ signature) skips it.
    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    AutoProcessor.register(Qwen3VLConfig, ImageOnlyQwen3VLProcessor, exist_ok=True)
    words = _SPECIAL + [f"w{i}" for i in range(60)] + list("abcdefghijklmnopqrstuvwxyz.,:;\"'-")
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        unk_token="<unk>", additional_special_tokens=_SPECIAL[1:7])
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               min_pixels=32 * 32, max_pixels=64 * 64)
    root = tmp_path_factory.mktemp("tiny_qwen3_vl")
    ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=_TEMPLATE).save_pretrained(root)
    ids = {t: vocab[t] for t in _SPECIAL}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         # mrope_section sums to head_dim / 2
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True},
                         pad_token_id=ids["<pad>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(root)
    return root


def test_tiny_qwen3_vl_captions_a_batch_and_flags_truncation(tiny_qwen3_vl: Path) -> None:
    config = CaptionerConfig(kind="vlm", model_id=str(tiny_qwen3_vl), max_new_tokens=8, batch_size=2, device="cpu")
    captioner = make_captioner(config)
    assert isinstance(captioner, VlmCaptioner)
    images = [Image.new("RGB", (100, 60), (200, 10, 10)), Image.new("RGBA", (50, 90), (0, 0, 250, 128))]
    contexts = [CONTEXT, CaptionContext()]  # prompts of different lengths: left padding in one batch
    results = captioner.caption(images, contexts)
    assert len(results) == 2
    assert all(r.error is None and r.text for r in results)
    assert all(r.truncated for r in results)  # random weights never emit <|im_end|> within 8 tokens
    # a row alone gives the same greedy caption as in the padded batch
    assert captioner.caption(images[1:], contexts[1:])[0].text == results[1].text
