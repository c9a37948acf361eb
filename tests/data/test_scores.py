import io
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from krea2_core.curation.config import AnalysisConfig
from krea2_core.data.images import analysis_copy
from krea2_core.data.scores import border_fraction, image_scores, rgb_entropy

rng = np.random.default_rng(0)


def _textured(height: int = 200, width: int = 300) -> np.ndarray:
    ramp = np.linspace(40, 200, width)[None, :, None] + np.linspace(0, 40, height)[:, None, None]
    return np.clip(ramp + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)


def test_entropy_separates_flat_from_textured() -> None:
    flat = np.full((100, 100, 3), 128, np.uint8)
    assert rgb_entropy(Image.fromarray(flat)) == 0.0
    assert rgb_entropy(Image.fromarray(_textured())) > 5.0
    assert rgb_entropy(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))) > 7.9


@pytest.mark.parametrize("size", [(64, 48), (640, 480), (4000, 3000)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pixel_correlation_flags_noise_at_any_size_and_not_photos(size: tuple[int, int], fmt: str) -> None:
    """Noise is told by its missing spatial correlation, which the downscale to the analysis copy keeps (its
    amplitude, which the Laplacian variance measured, is averaged away: a 640x480 noise image passed)."""
    config = AnalysisConfig()

    def correlation(image: Image.Image) -> float:
        encoded = io.BytesIO()
        image.save(encoded, format=fmt)
        pixels, _ = analysis_copy(encoded.getvalue(), config.side, config.max_pixels)
        return image_scores(pixels, config)["pixel_correlation"]

    width, height = size
    assert correlation(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))) < 0.3
    photo = Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB")
    assert correlation(photo.resize(size, Image.Resampling.LANCZOS)) > 0.7
    assert image_scores(np.full((50, 60, 3), 90, np.uint8), config)["pixel_correlation"] == 1.0  # nothing varies


def test_white_and_black_ratios() -> None:
    pixels = _textured()
    pixels[:50] = 255
    pixels[-20:] = 0
    scores = image_scores(pixels, AnalysisConfig())
    assert abs(scores["white_ratio"] - 50 / 200) < 0.01
    assert abs(scores["black_ratio"] - 20 / 200) < 0.01


def test_pixel_correlation_stays_a_correlation_on_a_smooth_blob() -> None:
    """Found at 30k images: the lag products average over one line fewer than the variance, so a smooth blob in the
    middle of a flat image measured 1.007, which the Scores schema (<= 1) refused, failing the whole stage."""
    y, x = np.linspace(-1, 1, 58)[:, None], np.linspace(-1, 1, 58)[None, :]
    blob = np.repeat((128 + 50 * np.exp(-(x**2 + y**2) / 0.09)).astype(np.uint8)[..., None], 3, axis=2)
    assert 0.99 < image_scores(blob, AnalysisConfig())["pixel_correlation"] <= 1.0


def test_border_fraction_measures_letterbox_and_frames_but_not_gradients() -> None:
    pixels = _textured(200, 300)
    assert border_fraction(pixels, 1.0) < 0.02
    letterbox = pixels.copy()
    letterbox[:30] = 0
    letterbox[-30:] = 0
    assert abs(border_fraction(letterbox, 1.0) - 30 / 200) < 0.01
    framed = pixels.copy()
    framed[:, :45] = (10, 200, 30)
    assert abs(border_fraction(framed, 1.0) - 45 / 300) < 0.01
    vertical_gradient = np.repeat(np.linspace(0, 255, 200)[:, None, None], 300, axis=1).repeat(3, axis=2)
    assert border_fraction(vertical_gradient.astype(np.uint8), 1.0) < 0.02  # rows are flat but change colour


def test_a_jpeg_bar_counts_its_ringing_lines_next_to_the_content() -> None:
    """At a size the analysis copy does not shrink, JPEG ringing makes the bar's last block of lines vary by a few
    levels, and its chroma drifts a few levels off the bar's colour: they are still the bar."""
    measured = []
    for seed in range(20):
        ramp = np.linspace(40, 200, 160)[None, :, None] + np.linspace(0, 40, 120)[:, None, None]
        pixels = np.clip(ramp + np.random.default_rng(seed).normal(0, 6, (120, 160, 3)), 0, 255).astype(np.uint8)
        pixels[:20] = (20, 20, 30)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        copy, _ = analysis_copy(buffer.getvalue(), side=256, max_pixels=10**9)
        measured.append(border_fraction(copy, 1.0) * 120)
    assert min(measured) >= 18 and max(measured) <= 20  # the strict 1-level rule alone: 16 lines


def test_a_flat_strip_that_fades_into_the_image_without_an_edge_is_no_border() -> None:
    """A blurred sky: the top lines are flat, then the colour drifts slowly (0.5 level a line) into the picture. A bar
    ends at an edge; this strip has none."""
    height, width = 200, 300
    rows = np.concatenate([np.full(40, 90.0), 90 + 0.5 * np.arange(1, height - 40 + 1)])
    sky = np.repeat(np.repeat(rows[:, None, None], width, axis=1), 3, axis=2)
    sky[120:] += rng.normal(0, 8, (height - 120, width, 3))  # the picture below the sky
    assert border_fraction(np.clip(sky, 0, 255).astype(np.uint8), 1.0) == 0.0
