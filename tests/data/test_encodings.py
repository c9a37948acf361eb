"""Every common image encoding is read as a trainer would see it: 8-bit sRGB RGB, EXIF orientation applied,
transparency composited on white. Each file is generated here and compared with the image it was made from."""

import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image, ImageCms

from krea2_core.curation.config import AnalysisConfig
from krea2_core.data import images
from krea2_core.data.curation import score_image
from krea2_core.data.images import BadImage, analysis_copy, probe, to_rgb
from krea2_core.data.schemas import Scores

SIDE = 256  # larger than every image below, so the analysis copy is the full image


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    """A PNG of a uint8 or uint16 array (H, W[, 1-4 channels]); Pillow cannot write 16-bit colour PNGs."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, -1).astype(f">u{pixels.dtype.itemsize}")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8 * pixels.dtype.itemsize, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _read(data: bytes, side: int = SIDE) -> np.ndarray:
    pixels, _ = analysis_copy(data, side=side, max_pixels=10**9)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    return pixels.astype(np.int16)


def _scene(width: int = 96, height: int = 64) -> np.ndarray:
    """An asymmetric uint8 RGB image: four flat quadrants of distinct colours plus a mild gradient, so every
    flip and rotation looks different and lossy codecs keep it close."""
    pixels = np.empty((height, width, 3), np.float64)
    top, left = height // 2, width // 2
    pixels[:top, :left], pixels[:top, left:] = (200, 40, 30), (30, 120, 220)
    pixels[top:, :left], pixels[top:, left:] = (250, 230, 60), (60, 160, 90)
    pixels += np.linspace(-20, 20, width)[None, :, None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _sixteen(pixels8: np.ndarray) -> np.ndarray:
    """The 16-bit image whose top byte is ``pixels8``, with a varying low byte (values far above 255)."""
    low = (np.arange(pixels8.size, dtype=np.uint16) * 37 % 256).reshape(pixels8.shape)
    return (pixels8.astype(np.uint16) << 8) | low


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return (rgb * a + 255 * (1 - a)).round().astype(np.int16)


# ------------------------------------------------------------------------- PNG: libspng for plain files


def _photo_like(width: int = 640, height: int = 400) -> np.ndarray:
    rng = np.random.default_rng(1)
    smooth = np.kron(_scene(width // 8, height // 8), np.ones((8, 8, 1), np.uint8)).astype(np.int16)
    return np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_plain_png_takes_libspng_and_reads_exactly_as_pillow(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.fromarray(_photo_like()).convert(mode)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 640).astype(np.uint8), (400, 1))))
    data = _encode(image, "PNG")
    assert images.decode_plain_png(data, Image.open(io.BytesIO(data))) is not None
    fast, fast_size = analysis_copy(data, side=SIDE, max_pixels=10**9)
    monkeypatch.setattr(images, "decode_plain_png", lambda *_: None)
    pillow, pillow_size = analysis_copy(data, side=SIDE, max_pixels=10**9)
    assert fast_size == pillow_size == (640, 400) and np.array_equal(fast, pillow)


def _rgb_image() -> Image.Image:
    return Image.fromarray(_photo_like(96, 64))


def _apng() -> bytes:
    first = _rgb_image()
    return _encode(first, "PNG", save_all=True, append_images=[first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


NOT_PLAIN = {
    "16-bit RGB": lambda: _png(_sixteen(_photo_like(96, 64))),
    "16-bit grey": lambda: _png(_sixteen(_photo_like(96, 64)[..., 0])),
    "1-bit": lambda: _encode(_rgb_image().convert("1"), "PNG"),
    "palette": lambda: _encode(_rgb_image().convert("P"), "PNG"),
    "RGB with a tRNS colour key": lambda: _encode(_rgb_image(), "PNG", transparency=(0, 0, 0)),
    "ICC profile": lambda: _encode(_rgb_image(), "PNG", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("LAB")).tobytes()),
    "EXIF orientation": lambda: _encode(_rgb_image(), "PNG", exif=_exif(6)),
    "APNG": _apng,
    "JPEG": lambda: _encode(_rgb_image(), "JPEG"),
}


@pytest.mark.parametrize("kind", NOT_PLAIN)
def test_other_images_are_left_to_pillow(kind: str) -> None:
    data = NOT_PLAIN[kind]()
    assert images.decode_plain_png(data, Image.open(io.BytesIO(data))) is None


def test_a_plain_png_libspng_refuses_is_read_by_pillow_or_reported_broken() -> None:
    data = _encode(_rgb_image(), "PNG")
    truncated = data[: len(data) // 2]
    with pytest.raises(BadImage) as err:
        analysis_copy(truncated, side=SIDE, max_pixels=10**9)
    assert err.value.reason == "broken_file"


# ------------------------------------------------------------------------- PNG: bit depths and transparency


@pytest.mark.parametrize("bits", [8, 16])
def test_greyscale_png_keeps_its_levels(bits: int) -> None:
    grey8 = np.tile(np.linspace(0, 255, 128).round().astype(np.uint8), (64, 1))
    data = _png(grey8 if bits == 8 else _sixteen(grey8))
    assert Image.open(io.BytesIO(data)).mode == ("L" if bits == 8 else "I;16")
    pixels = _read(data)
    assert (pixels == grey8[..., None]).all()  # the top byte: no value clipped to white


def test_sixteen_bit_greyscale_photo_scores_like_its_eight_bit_copy() -> None:
    """The reported bug: a 16-bit greyscale PNG was read as white and rejected (white_pixels, low_entropy,
    flat_border)."""
    rng = np.random.default_rng(0)
    grey8 = np.clip(np.linspace(30, 220, 160)[None, :] + rng.normal(0, 12, (120, 160)), 0, 255).astype(np.uint8)
    eight, sixteen = (score_image(data, AnalysisConfig()) for data in (_png(grey8), _png(_sixteen(grey8))))
    assert sixteen["error_reason"] is None and sixteen["white_ratio"] == eight["white_ratio"] < 0.01
    assert sixteen["entropy"] == pytest.approx(eight["entropy"]) and sixteen["entropy"] > 5
    assert sixteen["border_fraction"] == pytest.approx(eight["border_fraction"])


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("alpha", [False, True], ids=["rgb", "rgba"])
def test_colour_png_at_8_and_16_bits(bits: int, alpha: bool) -> None:
    rgb = _scene()
    opacity = np.tile(np.linspace(0, 255, rgb.shape[1]).round().astype(np.uint8), (rgb.shape[0], 1))
    pixels8 = np.dstack([rgb, opacity]) if alpha else rgb
    pixels = _read(_png(pixels8 if bits == 8 else _sixteen(pixels8)))
    expected = _on_white(rgb, opacity) if alpha else rgb
    assert np.abs(pixels - expected).max() <= 1


@pytest.mark.parametrize("bits", [8, 16])
def test_grey_with_alpha_png(bits: int) -> None:
    grey = np.tile(np.linspace(0, 255, 96).round().astype(np.uint8), (64, 1))
    alpha = np.zeros_like(grey)
    alpha[:32] = 255  # top half opaque, bottom half transparent
    pixels8 = np.dstack([grey, alpha])
    pixels = _read(_png(pixels8 if bits == 8 else _sixteen(pixels8)))
    assert np.abs(pixels[:32] - grey[:32, :, None]).max() <= 1
    assert (pixels[32:] == 255).all()


def test_palette_png_with_trns_transparency() -> None:
    indices = np.zeros((64, 96), np.uint8)
    indices[:, 32:64], indices[:, 64:] = 1, 2
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, 200, 40, 30, 30, 120, 220])
    data = _encode(image, "PNG", transparency=0)  # index 0 fully transparent (tRNS)
    assert Image.open(io.BytesIO(data)).mode == "P"
    pixels = _read(data)
    assert (pixels[:, :32] == 255).all()
    assert (pixels[:, 32:64] == (200, 40, 30)).all() and (pixels[:, 64:] == (30, 120, 220)).all()


def test_to_rgb_scales_sixteen_bit_greyscale() -> None:
    grey8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    assert (np.asarray(to_rgb(Image.fromarray(_sixteen(grey8)))) == grey8[..., None]).all()


# ------------------------------------------------------------------------------------------- JPEG variants

# sRGB colour patches; their CMYK separation uses black (K) so that both ink and K handling are checked
PATCHES = np.array([[200, 40, 30], [30, 120, 220], [250, 230, 60], [90, 90, 90]], np.float64)


def _patches_cmyk() -> np.ndarray:
    """The 64 x 128 image of PATCHES (32 px each) in CMYK ink amounts (0 = no ink), full grey component
    replacement: K = 1 - max(R, G, B)."""
    k = 255 - PATCHES.max(axis=1, keepdims=True)
    cmy = (255 - PATCHES - k) / (255 - k) * 255
    cmyk = np.hstack([cmy, k]).round().astype(np.uint8)
    return np.repeat(np.repeat(cmyk[None], 64, axis=0), 32, axis=1)


def _patch_centres(pixels: np.ndarray) -> np.ndarray:
    return pixels[32, 16::32]


def test_cmyk_jpeg_colours() -> None:
    data = _encode(Image.fromarray(_patches_cmyk(), "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(_patch_centres(_read(data)) - PATCHES).max() <= 4


def test_ycck_jpeg_colours() -> None:
    """Adobe YCCK as Photoshop writes it: Y, Cb, Cr of the C, M, Y inks and K stored inverted, APP14 transform 2
    (libjpeg converts it back to Adobe-inverted CMYK)."""
    ink = _patches_cmyk()
    ycc = np.asarray(Image.fromarray(ink[..., :3]).convert("YCbCr"))
    stored = np.dstack([ycc, 255 - ink[..., 3]])  # the samples in the file
    # Pillow writes CMYK JPEGs Adobe-inverted (sample = 255 - value) with an APP14 marker saying "transform 0"
    data = bytearray(_encode(Image.fromarray(255 - stored, "CMYK"), "JPEG", quality=95))
    app14 = data.index(b"\xff\xee")
    assert data[app14 + 4:app14 + 9] == b"Adobe"
    data[app14 + 15] = 2  # marker, length, "Adobe", version, flags0, flags1, then the transform byte
    assert Image.open(io.BytesIO(bytes(data))).info["adobe_transform"] == 2
    assert np.abs(_patch_centres(_read(bytes(data))) - PATCHES).max() <= 4


def test_progressive_jpeg_decodes_small_like_a_baseline_one() -> None:
    rng = np.random.default_rng(0)
    photo = np.clip(np.linspace(0, 255, 800)[None, :, None] + rng.normal(0, 10, (600, 800, 3)), 0, 255)
    image = Image.fromarray(photo.astype(np.uint8))
    progressive = _encode(image, "JPEG", quality=90, progressive=True)
    assert Image.open(io.BytesIO(progressive)).info.get("progressive")
    pixels, full = analysis_copy(progressive, side=128, max_pixels=10**9)
    baseline, _ = analysis_copy(_encode(image, "JPEG", quality=90), side=128, max_pixels=10**9)
    assert full == (800, 600) and pixels.shape == baseline.shape == (96, 128, 3)
    assert np.abs(pixels.astype(np.int16) - baseline).mean() < 1


@pytest.mark.parametrize("size", [(2560, 1280), (1280, 2560), (640, 4000)])
def test_wide_jpeg_is_dct_scaled_by_its_long_side_and_matches_a_full_decode(size: tuple[int, int]) -> None:
    """A 2:1 JPEG decodes at 1/8 scale for a 256 px copy (a 256 x 256 box would stop at 1/4), and the copy still
    matches the full decode shrunk by Pillow."""
    image = Image.fromarray(np.kron(_scene(size[0] // 32, size[1] // 32), np.ones((32, 32, 1), np.uint8)))
    data = _encode(image, "JPEG", quality=95)
    decoded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spy(self: Image.Image) -> object:
        result = real_load(self)
        decoded.append(self.size)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image.Image, "load", spy)
        pixels, full = analysis_copy(data, side=256, max_pixels=10**9)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    reference.thumbnail((256, 256), Image.Resampling.BILINEAR, reducing_gap=2.0)
    assert full == size and pixels.shape[:2] == reference.size[::-1]
    assert max(decoded[0]) < 2 * 256  # the decode itself is already under twice the copy's size
    assert np.abs(pixels.astype(np.int16) - np.asarray(reference, np.int16)).mean() < 2


# ------------------------------------------------------------------------------------------ EXIF orientation

# how each EXIF orientation stores the upright image (the EXIF spec's row 0 / column 0 positions)
STORED = {
    1: lambda a: a,
    2: np.fliplr,  # top-right: mirrored
    3: lambda a: np.rot90(a, 2),  # bottom-right: upside down
    4: np.flipud,  # bottom-left: flipped
    5: lambda a: a.transpose(1, 0, 2),  # left-top: transposed
    6: lambda a: np.rot90(a, 1),  # right-top: shown after a 90 degree clockwise turn
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # right-bottom: transversed
    8: lambda a: np.rot90(a, -1),  # left-bottom: shown after a 90 degree anticlockwise turn
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation: int, fmt: str) -> None:
    upright = _scene(96, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED[orientation](upright))
    data = _encode(Image.fromarray(stored), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    header = probe(io.BytesIO(data))
    pixels, full = analysis_copy(data, side=SIDE, max_pixels=10**9)
    assert (header.width, header.height) == full == (96, 64)
    error = np.abs(pixels.astype(np.int16) - upright)
    assert error.max() == 0 if fmt == "PNG" else error.mean() < 2  # a wrong turn is off by ~100 on average


# ----------------------------------------------------------------------------------------------- ICC profiles


def _wide_gamut_profile() -> bytes:
    """LittleCMS's sRGB profile with Adobe RGB (1998)'s primaries (D50-adapted colorants): a wide-gamut RGB
    profile that still calls itself "sRGB built-in", so only its behaviour can tell."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", icc[128:132])[0]
    offsets = {bytes(icc[132 + 12 * i:136 + 12 * i]): struct.unpack(">I", icc[136 + 12 * i:140 + 12 * i])[0]
               for i in range(count)}
    colorants = {b"rXYZ": (0.60974, 0.31111, 0.01947), b"gXYZ": (0.20528, 0.62567, 0.06087),
                 b"bXYZ": (0.14919, 0.06322, 0.74457)}
    for tag, xyz in colorants.items():
        start = offsets[tag] + 8  # after the 'XYZ ' type signature and 4 reserved bytes
        icc[start:start + 12] = struct.pack(">3i", *(round(v * 65536) for v in xyz))
    return bytes(icc)


def test_non_srgb_profile_is_converted_to_srgb() -> None:
    source = Image.fromarray(_scene())
    wide = _wide_gamut_profile()
    expected = ImageCms.profileToProfile(source, ImageCms.ImageCmsProfile(io.BytesIO(wide)),
                                         ImageCms.createProfile("sRGB"))
    expected = np.asarray(expected, np.int16)
    assert np.abs(expected - _scene()).max() > 20  # Adobe RGB's values mean more saturated colours
    for data in (_encode(source, "PNG", icc_profile=wide), _encode(source, "TIFF", icc_profile=wide)):
        assert np.abs(_read(data) - expected).max() <= 1


def test_jpeg_profile_is_converted_after_dct_scaling() -> None:
    source = Image.fromarray(np.repeat(np.repeat(_scene(), 4, axis=0), 4, axis=1))  # 384 x 256
    wide = _wide_gamut_profile()
    converted = ImageCms.profileToProfile(source, ImageCms.ImageCmsProfile(io.BytesIO(wide)),
                                          ImageCms.createProfile("sRGB"))
    expected = np.asarray(converted.resize((96, 64), Image.Resampling.BOX), np.int16)
    pixels = _read(_encode(source, "JPEG", quality=95, icc_profile=wide), side=96)
    assert pixels.shape == (64, 96, 3) and np.abs(pixels - expected).mean() < 2


@pytest.mark.parametrize("icc", [None, "srgb", b"not a profile", "lab"])
def test_srgb_absent_or_unusable_profile_leaves_pixels(icc: bytes | str | None) -> None:
    profiles = {"srgb": ImageCms.createProfile("sRGB"), "lab": ImageCms.createProfile("LAB")}
    if isinstance(icc, str):
        icc = ImageCms.ImageCmsProfile(profiles[icc]).tobytes()
    kwargs = {} if icc is None else {"icc_profile": icc}
    assert (_read(_encode(Image.fromarray(_scene()), "PNG", **kwargs)) == _scene()).all()


# ------------------------------------------------------------------------- WebP, GIF, TIFF, BMP, AVIF, HEIC


def _frames(*colours: tuple[int, int, int]) -> list[Image.Image]:
    return [Image.new("RGB", (96, 64), colour) for colour in colours]


def test_webp_still_lossless_and_lossy() -> None:
    source = Image.fromarray(_scene())
    assert (_read(_encode(source, "WEBP", lossless=True)) == _scene()).all()
    assert np.abs(_read(_encode(source, "WEBP", quality=95)) - _scene()).mean() < 3


def test_webp_with_alpha_is_composited_on_white() -> None:
    rgba = np.dstack([_scene(), np.full((64, 96), 255, np.uint8)])
    rgba[:, :48, 3] = 0
    pixels = _read(_encode(Image.fromarray(rgba), "WEBP", lossless=True))
    assert (pixels[:, :48] == 255).all() and (pixels[:, 48:] == _scene()[:, 48:]).all()


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "PNG"], ids=["webp", "gif", "apng"])
def test_animation_reads_its_first_frame(fmt: str) -> None:
    first, *rest = _frames((200, 40, 30), (30, 120, 220), (60, 160, 90))
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **extra)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.abs(_read(data) - (200, 40, 30)).max() <= 2  # GIF's palette may round a level or two


def test_gif_transparency_is_composited_on_white() -> None:
    indices = np.zeros((64, 96), np.uint8)
    indices[:, 48:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 255, 0, 30, 120, 220])
    frames = [image, Image.new("P", (96, 64), 1)]
    data = _encode(frames[0], "GIF", transparency=0, save_all=True, append_images=frames[1:], duration=100)
    pixels = _read(data)
    assert (pixels[:, :48] == 255).all() and (pixels[:, 48:] == (30, 120, 220)).all()


def test_tiff_at_8_and_16_bits() -> None:
    rgb = _scene()
    grey8 = rgb[..., 1]
    assert (_read(_encode(Image.fromarray(rgb), "TIFF")) == rgb).all()
    assert (_read(_encode(Image.fromarray(rgb), "TIFF", compression="tiff_lzw")) == rgb).all()
    grey16 = _encode(Image.fromarray(_sixteen(grey8)), "TIFF")
    assert Image.open(io.BytesIO(grey16)).mode.startswith("I;16")
    assert (_read(grey16) == grey8[..., None]).all()
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, _sixteen(rgb), photometric="rgb")  # Pillow cannot write 16-bit colour
    assert np.abs(_read(buffer.getvalue()) - rgb).max() <= 1


def test_bmp_true_colour_and_palette() -> None:
    assert (_read(_encode(Image.fromarray(_scene()), "BMP")) == _scene()).all()
    palette = Image.fromarray(_scene()).quantize(16)
    assert (_read(_encode(palette, "BMP")) == np.asarray(palette.convert("RGB"))).all()


def test_avif() -> None:
    data = _encode(Image.fromarray(_scene()), "AVIF", quality=95)
    assert probe(io.BytesIO(data)).format == "AVIF"
    assert np.abs(_read(data) - _scene()).mean() < 3


def test_heic() -> None:
    data = _encode(Image.fromarray(_scene()), "HEIF", quality=95)  # pillow-heif's encoder
    assert data[4:12] == b"ftypheic"
    header = probe(io.BytesIO(data))
    assert header.format == "HEIF" and (header.width, header.height) == (96, 64)
    assert np.abs(_read(data) - _scene()).mean() < 3


# ------------------------------------------------------------------------------------- unsupported formats

JXL_CODESTREAM = b"\xff\x0a\xfa\x1f" + bytes(60)
JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(60)


def _reason(data: bytes) -> tuple[str, str]:
    """The reason of both the header probe and the decode, which must agree."""
    reasons = []
    for read in (lambda: probe(io.BytesIO(data)), lambda: analysis_copy(data, side=SIDE, max_pixels=10**9)):
        with pytest.raises(BadImage) as err:
            read()
        reasons.append(err.value.reason)
    assert reasons[0] == reasons[1]
    return reasons[0], str(err.value)


@pytest.mark.parametrize("data", [JXL_CODESTREAM, JXL_CONTAINER], ids=["codestream", "container"])
def test_jpeg_xl_is_an_unsupported_format(data: bytes) -> None:
    reason, message = _reason(data)
    assert reason == "unsupported_format" and "JPEG XL" in message


def test_heic_without_its_decoder_is_an_unsupported_format(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(Image.fromarray(_scene()), "HEIF", quality=60)
    monkeypatch.delitem(Image.OPEN, "HEIF")
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])
    reason, message = _reason(data)
    assert reason == "unsupported_format" and "heic" in message


def test_heic_with_a_broken_header_is_a_broken_file() -> None:
    data = bytearray(_encode(Image.fromarray(_scene()), "HEIF", quality=60))
    data[40:200] = bytes(160)
    assert _reason(bytes(data))[0] == "broken_file"


def test_other_iso_media_is_not_an_image() -> None:
    assert _reason(b"\x00\x00\x00\x18ftypisom" + bytes(40))[0] == "not_an_image"  # an MP4 video


def test_unsupported_format_is_a_recorded_scores_reason() -> None:
    row = {"id": "a.jxl", **score_image(JXL_CONTAINER, AnalysisConfig())}
    assert row["error_reason"] == "unsupported_format"
    Scores.validate(pd.DataFrame([row]).reindex(columns=list(Scores.to_schema().columns)))
