"""Long, context-rich captions: the captioning model sees the OCR text and the metadata next to the image.

``vlm``: a transformers image-text-to-text model (Qwen3-VL in real runs) looks at the image.
``text_llm``: an LLM that cannot see the image writes from the OCR text and metadata only (offline SmolLM2).
A generation error becomes an error on its own row, never an exception for the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from krea2_core.captioning.config import CaptionerConfig
from krea2_core.captioning.llm import ChatLLM, Generated, LocalChatLLM, Messages, decode_new_tokens, eos_token_ids
from krea2_core.common.device import resolve_device
from krea2_core.data.images import to_rgb

# EXIF tags shown as camera settings, in this order; other metadata keys follow sorted
CAMERA_KEYS = ("Make", "Model", "LensModel", "FNumber", "ExposureTime", "ISOSpeedRatings", "FocalLength",
               "DateTimeOriginal")

_VLM_SYSTEM = ("You caption images for training a text-to-image model. Write one dense, factual, long caption "
               "of the image in a single paragraph: subjects, their attributes and positions, background, "
               "lighting, style and composition. Quote any visible text exactly as given by the OCR. Use the "
               "metadata and known entities only where they agree with the image. Do not speculate.")
_TEXT_SYSTEM = ("You caption images for training a text-to-image model, but you cannot see the image. Write one "
                "dense, factual, long caption in a single paragraph describing only what the OCR text and the "
                "metadata reveal about the image. Quote the OCR text exactly. Do not invent visual details.")


@dataclass(frozen=True)
class CaptionContext:
    ocr_text: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # EXIF and other fields; absent keys are omitted
    entities: tuple[str, ...] = ()  # known entities (people, places, products) named in the source


@dataclass(frozen=True)
class CaptionResult:
    text: str
    truncated: bool
    error: str | None = None


def _context_lines(context: CaptionContext) -> list[str]:
    ocr = f'"{context.ocr_text.strip()}"' if context.ocr_text.strip() else "none"
    lines = [f"OCR text: {ocr}"]
    present = {k: v for k, v in context.metadata.items() if str(v).strip()}
    camera = [f"{k}: {present[k]}" for k in CAMERA_KEYS if k in present]
    other = [f"{k}: {present[k]}" for k in sorted(present) if k not in CAMERA_KEYS]
    if camera:
        lines.append("Camera settings: " + "; ".join(camera))
    if other:
        lines.append("Metadata: " + "; ".join(other))
    if context.entities:
        lines.append("Known entities: " + ", ".join(context.entities))
    return lines


def build_prompt(context: CaptionContext, with_image: bool) -> Messages:
    """Chat messages asking for one long caption; with an image placeholder in the user turn for VLMs."""
    request = "Caption this image." if with_image else "Describe the image from this information."
    text = "\n".join([request, *_context_lines(context)])
    if with_image:
        user: Any = [{"type": "image"}, {"type": "text", "text": text}]
    else:
        user = text
    return [{"role": "system", "content": _VLM_SYSTEM if with_image else _TEXT_SYSTEM},
            {"role": "user", "content": user}]


class Captioner(Protocol):
    def caption(self, images: Sequence[Image.Image], contexts: Sequence[CaptionContext]) -> list[CaptionResult]:
        ...


Row = tuple[Image.Image, CaptionContext]


def _result(generated: Generated) -> CaptionResult:
    return CaptionResult(generated.text, generated.truncated, None if generated.text else "empty caption")


def _error(err: Exception) -> CaptionResult:
    return CaptionResult("", False, f"{type(err).__name__}: {err}")


def _caption_rows(generate: Callable[[list[Row]], list[Generated]], rows: list[Row],
                  batch_size: int) -> list[CaptionResult]:
    """Batched; a failing batch is retried row by row so only the failing row carries the error."""
    results: list[CaptionResult] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        try:
            results += [_result(g) for g in generate(batch)]
            continue
        except Exception as err:  # noqa: BLE001 - isolated per row below
            if len(batch) == 1:
                results.append(_error(err))
                continue
        for row in batch:
            try:
                results += [_result(g) for g in generate([row])]
            except Exception as err:  # noqa: BLE001 - recorded on the row
                results.append(_error(err))
    return results


def _check(images: Sequence[Image.Image], contexts: Sequence[CaptionContext]) -> list[Row]:
    if len(images) != len(contexts):
        raise ValueError(f"{len(images)} images but {len(contexts)} contexts")
    return list(zip(images, contexts, strict=True))


class VlmCaptioner:
    """A transformers image-text-to-text model and its processor, by hub id or local directory."""

    def __init__(self, config: CaptionerConfig) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = Path(config.model_id).expanduser().is_dir()
        path = str(Path(config.model_id).expanduser()) if local else config.model_id
        self.config = config
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=local)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local)
        self.model = self.model.eval().to(resolve_device(config.device))
        self._eos = eos_token_ids(self.processor.tokenizer, self.model)

    def _generate(self, rows: list[Row]) -> list[Generated]:
        conversations = []
        for image, context in rows:
            messages = build_prompt(context, with_image=True)
            messages[1]["content"][0]["image"] = to_rgb(image)
            conversations.append(messages)
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True}).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        return decode_new_tokens(self.processor.tokenizer, out[:, inputs["input_ids"].shape[1]:], self._eos)

    def caption(self, images: Sequence[Image.Image], contexts: Sequence[CaptionContext]) -> list[CaptionResult]:
        return _caption_rows(self._generate, _check(images, contexts), self.config.batch_size)


class TextLlmCaptioner:
    """Captions from OCR text and metadata only: the LLM never sees the pixels."""

    def __init__(self, config: CaptionerConfig, llm: ChatLLM | None = None) -> None:
        self.config = config
        self.llm = llm if llm is not None else LocalChatLLM.load(config.model_id, config.device)

    def _generate(self, rows: list[Row]) -> list[Generated]:
        return self.llm.generate([build_prompt(c, with_image=False) for _, c in rows], self.config.max_new_tokens)

    def caption(self, images: Sequence[Image.Image], contexts: Sequence[CaptionContext]) -> list[CaptionResult]:
        return _caption_rows(self._generate, _check(images, contexts), self.config.batch_size)


def make_captioner(config: CaptionerConfig) -> Captioner:
    return VlmCaptioner(config) if config.kind == "vlm" else TextLlmCaptioner(config)
