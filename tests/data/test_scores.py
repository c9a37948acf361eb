import numpy as np

from krea2_core.curation.config import AnalysisConfig
from krea2_core.data.scores import border_fraction, image_scores, rgb_entropy

rng = np.random.default_rng(0)


def _textured(height: int = 200, width: int = 300) -> np.ndarray:
    ramp = np.linspace(40, 200, width)[None, :, None] + np.linspace(0, 40, height)[:, None, None]
    return np.clip(ramp + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)


def test_entropy_separates_flat_from_textured() -> None:
    flat = np.full((100, 100, 3), 128, np.uint8)
    assert rgb_entropy(flat) == 0.0
    assert rgb_entropy(_textured()) > 5.0
    assert rgb_entropy(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) > 7.9


def test_laplacian_variance_flags_noise_not_photos() -> None:
    config = AnalysisConfig()
    noise = image_scores(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), config)["laplacian_var"]
    smooth = image_scores(_textured(), config)["laplacian_var"]
    assert noise > 10 * smooth


def test_white_and_black_ratios() -> None:
    pixels = _textured()
    pixels[:50] = 255
    pixels[-20:] = 0
    scores = image_scores(pixels, AnalysisConfig())
    assert abs(scores["white_ratio"] - 50 / 200) < 0.01
    assert abs(scores["black_ratio"] - 20 / 200) < 0.01


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
