"""OCR engine on rendered world scenes, whose words and text positions are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from krea2_core.captioning.config import OcrConfig
from krea2_core.captioning.ocr import OcrError, OcrResult, RapidOcrEngine, TextLine, reading_order
from krea2_core.world import Scene, render, sample_scene, text_cell


@pytest.fixture(scope="module")
def engine() -> RapidOcrEngine:
    return RapidOcrEngine(OcrConfig())


def text_scene(seed: int, width: int = 384, height: int = 384) -> Scene:
    return sample_scene(np.random.default_rng(seed), width, height, text_prob=1.0)


def recognised(result: OcrResult) -> str:
    return result.text.upper().replace(" ", "")


def line(text: str, x: float, y: float, w: float = 40, h: float = 10) -> TextLine:
    return TextLine(text, 1.0, ((x, y), (x + w, y), (x + w, y + h), (x, y + h)))


def test_reads_rendered_world_text(engine: RapidOcrEngine) -> None:
    scenes = [text_scene(seed) for seed in range(8)]
    results = [engine.read(render(scene)) for scene in scenes]
    hits = [scene.text in recognised(r) for scene, r in zip(scenes, results, strict=True)]
    read = [(scene.text, r.text) for scene, r in zip(scenes, results, strict=True)]
    assert sum(hits) >= 7, f"read {sum(hits)}/8 words: {read}"
    assert all(r.text_density > 0 for r, hit in zip(results, hits, strict=True) if hit)


def test_no_text_gives_empty_result(engine: RapidOcrEngine) -> None:
    plain = sample_scene(np.random.default_rng(3), 384, 384, text_prob=0.0)
    assert plain.text is None
    assert engine.read(render(plain)) == OcrResult((), 0.0)
    assert engine.read(Image.new("RGB", (320, 240), (128, 128, 128))) == OcrResult((), 0.0)


def test_boxes_are_in_original_pixel_space(engine: RapidOcrEngine) -> None:
    scene = text_scene(11, 1600, 900)  # downsized to 960 px for detection
    result = engine.read(render(scene))
    assert scene.text in recognised(result), result
    row, col = divmod(text_cell(scene), 3)
    cell_x, cell_y = (col * 1600 / 3, (col + 1) * 1600 / 3), (row * 900 / 3, (row + 1) * 900 / 3)
    (word,) = [ln for ln in result.lines if scene.text in ln.text.upper()]
    xs, ys = [p[0] for p in word.box], [p[1] for p in word.box]
    assert 0 <= min(xs) and max(xs) <= 1600 and 0 <= min(ys) and max(ys) <= 900
    assert cell_x[0] - 10 <= min(xs) and max(xs) <= cell_x[1] + 10  # the word spans ~80% of its cell's width
    assert cell_y[0] <= min(ys) and max(ys) <= cell_y[1]
    assert max(xs) - min(xs) > 0.6 * 1600 / 3


def test_min_score_drops_lines(engine: RapidOcrEngine) -> None:
    image = render(text_scene(0))
    loose = RapidOcrEngine(OcrConfig(min_score=0.0)).read(image)
    score = min(ln.score for ln in loose.lines)
    assert score < 1.0
    assert RapidOcrEngine(OcrConfig(min_score=score)).read(image).lines == loose.lines
    strict = RapidOcrEngine(OcrConfig(min_score=math.nextafter(score, 1.0))).read(image)
    assert len(strict.lines) < len(loose.lines)
    assert all(ln.score >= math.nextafter(score, 1.0) for ln in strict.lines)


def test_greyscale_and_transparent_images_are_read(engine: RapidOcrEngine) -> None:
    scene = text_scene(1)
    grey = render(scene).convert("L")
    assert scene.text in recognised(engine.read(grey))
    # Black ink on a transparent canvas: dropping alpha would give an all-black image.
    ink = Image.new("RGBA", grey.size, (0, 0, 0, 0))
    ink.putalpha(ImageOps.invert(grey))
    assert scene.text in recognised(engine.read(ink))


def test_engine_failure_is_an_ocr_error(engine: RapidOcrEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(_: np.ndarray) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_ocr", fail)
    with pytest.raises(OcrError, match="40x30 RGB"):
        engine.read(Image.new("RGB", (40, 30)))


def test_reading_order_is_rows_then_columns() -> None:
    lines = [line("c", 0, 50), line("b", 100, 2), line("a", 0, 0), line("d", 100, 52)]
    result = OcrResult(reading_order(lines), 0.0)
    assert result.text == "a / b / c / d"
