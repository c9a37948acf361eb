import io

import numpy as np
import pytest
from PIL import Image

from krea2_core.data.images import BadImage, analysis_copy, probe
from krea2_core.world.pool import _bomb_png


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_encode(_photo(), "PNG"))
    data[len(data) // 3:len(data) // 3 + 64] = bytes(range(64))
    return bytes(data)


def _photo(width: int = 400, height: int = 300) -> Image.Image:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def test_jpeg_is_decoded_small_and_full_size_is_reported() -> None:
    pixels, full = analysis_copy(_encode(_photo(1600, 1200), "JPEG"), side=256, max_pixels=10**9)
    assert full == (1600, 1200)
    assert max(pixels.shape[:2]) <= 256 and pixels.shape[2] == 3 and pixels.dtype == np.uint8


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 400x300, shown 300x400
    data = _encode(_photo(400, 300), "JPEG", exif=exif.tobytes())
    assert (probe(io.BytesIO(data)).width, probe(io.BytesIO(data)).height) == (300, 400)
    pixels, full = analysis_copy(data, side=256, max_pixels=10**9)
    assert full == (300, 400) and pixels.shape[0] > pixels.shape[1]


def test_exif_camera_settings_are_probed() -> None:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Krea", "Cam 2"
    header = probe(io.BytesIO(_encode(_photo(), "JPEG", exif=exif.tobytes())))
    assert header.exif["Make"] == "Krea" and header.exif["Model"] == "Cam 2" and header.format == "JPEG"


def test_transparent_png_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    pixels, _ = analysis_copy(_encode(rgba, "PNG"), side=64, max_pixels=10**9)
    assert (pixels == 255).all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_encode(_photo(), "JPEG")[:2000], "broken_file"),
        (_corrupt_png(), "broken_file"),
        (b"<html>404</html>", "not_an_image"),
        (b"", "not_an_image"),
        (_bomb_png(40_000, 40_000), "decompression_bomb"),
    ],
    ids=["truncated", "corrupt_png", "html", "empty", "bomb"],
)
def test_bad_files_raise_bad_image_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage) as err:
        analysis_copy(data, side=256, max_pixels=89_478_485)
    assert err.value.reason == reason


def test_configured_pixel_limit_rejects_before_decoding() -> None:
    with pytest.raises(BadImage) as err:
        analysis_copy(_bomb_png(5000, 5000), side=256, max_pixels=1_000_000)
    assert err.value.reason == "decompression_bomb" and "5000x5000" in err.value.detail
