"""Captioning of one shard of images: OCR for every image, then a long caption and its rewrites.

World images keep their exact scene-graph captions (their tags and conversational form are derived from
them); other images get a long caption from the configured captioner (it sees the OCR text and the EXIF
camera settings) and shorter variants from the rewriter LLM. Any failure is recorded on its row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from PIL import Image

from krea2_core.captioning.captioner import CaptionContext, Captioner, make_captioner
from krea2_core.captioning.llm import ChatLLM, LocalChatLLM
from krea2_core.captioning.ocr import OcrError, OcrResult, RapidOcrEngine, TextLine
from krea2_core.captioning.rewriter import rewrite_many
from krea2_core.captioning.config import CaptioningConfig
from krea2_core.text import content_words
from krea2_core.data.images import BadImage, load_image

OCR_COLUMNS = ("ocr_text", "ocr_lines", "text_density")
# (id, uri, EXIF JSON, the image's OCR from an earlier run: (ocr_lines JSON, text_density), or None)
Item = tuple[str, str, str, tuple[str, float] | None]


def _lines_json(ocr: OcrResult | None) -> str:
    lines = ocr.lines if ocr else ()
    return json.dumps([{"text": line.text, "score": round(line.score, 4), "box": [[round(x, 1), round(y, 1)]
                        for x, y in line.box]} for line in lines])


def _ocr_of(lines_json: str, text_density: float) -> OcrResult:
    """An OCR result read back from its row (``_lines_json`` rounds, and rounding again changes nothing)."""
    lines = tuple(TextLine(line["text"], line["score"], tuple(tuple(corner) for corner in line["box"]))
                  for line in json.loads(lines_json))
    return OcrResult(lines=lines, text_density=text_density)


def _row(image_id: str, ocr: OcrResult | None, **fields: str) -> dict[str, object]:
    return {"id": image_id, "ocr_text": ocr.text if ocr else "", "ocr_lines": _lines_json(ocr),
            "text_density": ocr.text_density if ocr else 0.0,
            "long": "", "medium": "", "short": "", "tags": "", "conversational": "", "source": "none",
            "flags": "", "error": None, **fields}


def scene_graph_row(image_id: str, ocr: OcrResult, caption: dict[str, str]) -> dict[str, object]:
    words = dict.fromkeys(w for w in content_words(caption["medium"]) if w)  # ordered, unique
    return _row(image_id, ocr, long=caption["long"], medium=caption["medium"], short=caption["short"],
                tags=", ".join(words), conversational=f"Could you make me {caption['short']}?", source="scene_graph")


@dataclass
class CaptionWorker:
    """Callable on a shard; models load once per worker (a Ray actor holds one worker)."""

    config: CaptioningConfig
    scene_captions: dict[str, dict[str, str]]  # id -> long/medium/short of world images
    _captioner: Captioner | None = field(default=None, init=False, repr=False)
    _rewriter: ChatLLM | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ocr = RapidOcrEngine(self.config.ocr)

    def _models(self) -> tuple[Captioner, ChatLLM]:
        if self._captioner is None:  # only shards with non-world images need the LLMs
            self._captioner = make_captioner(self.config.captioner)
            self._rewriter = LocalChatLLM.load(self.config.rewriter.model_id, self.config.rewriter.device)
        return self._captioner, self._rewriter

    def __call__(self, shard: Sequence[Item]) -> pd.DataFrame:
        rows: list[dict[str, object]] = []
        pending: list[tuple[int, Image.Image, CaptionContext]] = []
        for image_id, uri, exif, known_ocr in shard:
            try:
                image = load_image(uri, side=self.config.ocr.max_side)
                ocr = _ocr_of(*known_ocr) if known_ocr else self.ocr.read(image)
            except (BadImage, OSError, OcrError) as err:
                rows.append(_row(image_id, None, error=f"{type(err).__name__}: {err}"))
                continue
            if image_id in self.scene_captions:
                rows.append(scene_graph_row(image_id, ocr, self.scene_captions[image_id]))
            else:
                rows.append(_row(image_id, ocr))
                pending.append((len(rows) - 1, image, CaptionContext(ocr.text, json.loads(exif or "{}"), ())))
        if pending:
            self._caption(rows, pending)
        return pd.DataFrame(rows)

    def _caption(self, rows: list[dict[str, object]], pending: list[tuple[int, Image.Image, CaptionContext]]) -> None:
        captioner, rewriter = self._models()
        results = captioner.caption([image for _, image, _ in pending], [context for _, _, context in pending])
        ok = [(index, result) for (index, _, _), result in zip(pending, results, strict=True) if not result.error]
        for (index, _, _), result in zip(pending, results, strict=True):
            if result.error:
                rows[index]["error"] = f"caption: {result.error}"
        variants = rewrite_many([result.text for _, result in ok], rewriter, self.config.rewriter)
        for (index, result), rewritten in zip(ok, variants, strict=True):
            flags = (["long_truncated"] if result.truncated else []) + list(rewritten.flags)
            rows[index].update(long=result.text, medium=rewritten.medium, short=rewritten.short, tags=rewritten.tags,
                               conversational=rewritten.conversational, source=self.config.captioner.kind,
                               flags=",".join(flags))
