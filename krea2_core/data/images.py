"""Reading images from any URI safely: header probes and small analysis copies.

Every failure becomes a ``BadImage`` with a reason code instead of an exception escaping a worker, so a
broken file is a recorded rejection, never a crashed stage.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import stat
import time
import warnings
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote_to_bytes, urlsplit

import fsspec
import imagecodecs
import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

pillow_heif.register_heif_opener()  # HEIC/HEIF; AVIF is Pillow's own

# The decompression-bomb limit is enforced from the header by ``AnalysisConfig.max_pixels`` before any
# pixel is decoded; PIL's own check stays on as a second line of defence.
_EXIF_KEEP = ("Make", "Model", "LensModel", "FNumber", "ExposureTime", "ISOSpeedRatings", "FocalLength",
              "DateTimeOriginal", "DateTime", "Orientation", "Software", "Artist", "Copyright")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes for 16-bit greyscale (PNG, TIFF, PGM)
# ISO-BMFF (ftyp box) brands of HEIF and AVIF still images and sequences
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1", b"avif",
                b"avis")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_COLOUR_GRID = Image.fromarray(np.stack(np.meshgrid(*[np.arange(0, 256, 17, dtype=np.uint8)] * 3), -1)
                               .reshape(64, 64, 3))  # 16 levels per channel: tells an sRGB-equivalent profile


class BadImage(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class NotAFile(OSError):
    """A directory entry with no data to read: a FIFO, socket, device or broken symbolic link."""


class Unreachable(OSError):
    """A remote URI whose server could not be reached, after retries: the source may come back, so unlike a broken
    file it is worth trying again."""


READ_ERRORS = {NotAFile: "not_a_file", Unreachable: "unreachable"}  # the error reason each of them records
REMOTE_ATTEMPTS = 3  # tries of a remote URI whose server does not answer, 0.5 s then 1 s apart
_NETWORK = (ConnectionError, TimeoutError, socket.gaierror)  # aiohttp's and botocore's connection errors are these
_unreachable_hosts: set[str] = set()  # hosts this process gave up on: one try each afterwards, no waiting


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    format: str
    exif: dict[str, str]


def open_uri(uri: str) -> IO[bytes]:
    """A binary file object for a local path, file:// URI (percent-encoded bytes, so any file name) or any fsspec
    URI (s3://, gs://, https://). Raises NotAFile for a local entry with no data (opening a FIFO would block) and
    Unreachable for a remote server that did not answer REMOTE_ATTEMPTS tries."""
    if "://" not in uri:
        return _open_local(uri)
    if uri.startswith("file://"):
        return _open_local(unquote_to_bytes(urlsplit(uri).path))
    host = urlsplit(uri).netloc
    attempts = 1 if host in _unreachable_hosts else REMOTE_ATTEMPTS
    for attempt in range(attempts):
        try:
            return fsspec.open(uri, "rb").open()
        except OSError as err:
            cause = _network_cause(err)
            if cause is None:
                raise
            if attempt + 1 == attempts:
                _unreachable_hosts.add(host)
                raise Unreachable(f"{uri}: no answer after {attempts} tries ({type(cause).__name__}: {cause})") from err
            time.sleep(0.5 * 2 ** attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def _network_cause(err: BaseException) -> BaseException | None:
    """The connection failure behind ``err`` (fsspec reports a refused connection as FileNotFoundError), if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, _NETWORK):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISDIR: "a directory"}


def _open_local(path: str | bytes) -> IO[bytes]:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.lexists(path):
            raise NotAFile(f"{os.fsdecode(path)}: a broken symbolic link") from None
        raise
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")
        raise NotAFile(f"{os.fsdecode(path)}: {kind}")
    return open(path, "rb")


def read_bytes(uri: str) -> bytes:
    with open_uri(uri) as f:
        return f.read()


def _open(fp: IO[bytes]) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        fp.seek(0)
        raise _unidentified(fp.read(16)) from None
    except Exception as err:  # noqa: BLE001 - any decoder error is a broken file
        raise BadImage("broken_file", f"{type(err).__name__}: {err}") from None


def _unidentified(head: bytes) -> BadImage:
    """Why Pillow could not open a file starting with ``head`` (the 16 bytes its openers see): an image format
    with no decoder installed (HEIF, AVIF, JPEG XL), a broken header of a format that has one, or no image."""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        name = f"HEIF/AVIF (brand {head[8:12].decode()})"
    elif head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        name = "JPEG XL"
    else:
        return BadImage("not_an_image", f"unrecognised format (starts with {head[:8]!r})")
    for _, accept in Image.OPEN.values():
        with contextlib.suppress(Exception):  # an opener's quick check may trip on a short prefix
            if accept is not None and accept(head) is True:
                return BadImage("broken_file", f"{name} whose header its installed decoder could not read")
    return BadImage("unsupported_format", f"{name}: no decoder installed")


def _exif_block(image: Image.Image) -> Image.Exif:
    """EXIF without decoding pixels: PNG's getexif() decodes the whole image to find an eXIf chunk
    placed after the pixel data, so before decoding only a chunk seen in the header counts."""
    if image.format == "PNG" and "exif" not in image.info:
        return Image.Exif()
    try:
        return image.getexif()
    except Exception:  # noqa: BLE001 - malformed EXIF is not a reason to drop an image
        return Image.Exif()


def _exif(image: Image.Image) -> dict[str, str]:
    raw = _exif_block(image)
    named = {ExifTags.TAGS.get(k, str(k)): v for k, v in raw.items()}
    named.update({ExifTags.TAGS.get(k, str(k)): v for k, v in raw.get_ifd(ExifTags.IFD.Exif).items()})
    return {k: str(v)[:200] for k, v in named.items() if k in _EXIF_KEEP}


def _orientation(image: Image.Image) -> int | None:
    return _exif_block(image).get(ExifTags.Base.Orientation)


def probe(fp: IO[bytes]) -> Header:
    """Header-only read: oriented size, format and the EXIF fields captioning uses (camera settings)."""
    image = _open(fp)
    width, height = image.size if _orientation(image) not in _ROTATED else image.size[::-1]
    return Header(width=width, height=height, format=image.format or "", exif=_exif(image))


def load_image(uri: str, side: int, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``uri`` as an RGB PIL image with long side at most ``side`` (see ``analysis_copy``);
    the default pixel limit is PIL's, which is also ``AnalysisConfig.max_pixels``'s default."""
    pixels, _ = analysis_copy(read_bytes(uri), side=side, max_pixels=max_pixels)
    return Image.fromarray(pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels become white (as a trainer and the models see them), not
    whatever colour they hide; 16-bit greyscale keeps its top 8 bits."""
    if image.mode == "RGB":
        return image
    image = _eight_bit(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def analysis_copy(data: bytes, side: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to an RGB uint8 array whose long side is at most ``side``; also the oriented full size.

    JPEGs decode directly at reduced scale (libjpeg DCT scaling via ``draft``, as far as the copy's size allows: a
    ``side`` x ``side`` box would keep a wide image's short side >= ``side``), which is most of the speed of this
    stage; plain PNGs decode through libspng (benchmarks/image_decoders.py). As a trainer would see them: EXIF
    orientation applied, 16-bit channels scaled to 8, an embedded ICC profile converted to sRGB, the first frame of an
    animation, transparency composited on white.
    """
    image = _open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
        raise BadImage("decompression_bomb", f"header claims {image.width}x{image.height} pixels (> {max_pixels})")
    try:
        full_size = image.size  # before draft(), which shrinks the reported size
        image = reduced_decode(data, image, side)  # now, so corrupt data fails here and not inside a metadata read
        orientation = _orientation(image)
        if orientation in _ROTATED:
            full_size = full_size[::-1]
        if orientation not in (None, 1):  # exif_transpose copies the image even when nothing changes
            image = ImageOps.exif_transpose(image)
        icc = image.info.get("icc_profile")  # _eight_bit makes a new image without it
        image = _to_srgb(_eight_bit(image), icc)
        # shrink first, then composite on white: same result, a fraction of the pixels (RGBA resizes premultiplied)
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        image.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        image = to_rgb(image)
        pixels = np.asarray(image)
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - truncated / corrupt data surfaces here, at decode time
        raise BadImage("broken_file", f"{type(err).__name__}: {err}") from None
    return pixels, full_size


def reduced_decode(data: bytes, image: Image.Image, side: int) -> Image.Image:
    """``image`` (opened from ``data``) decoded as cheaply as a copy of long side ``side`` allows: a plain PNG through
    libspng, a JPEG DCT-scaled to the copy's own size, anything else by Pillow at full size."""
    plain = decode_plain_png(data, image)
    if plain is not None:
        return plain
    image.draft("RGB", copy_size(image.size, side))
    image.load()
    return image


def copy_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled to long side ``side`` (as ``thumbnail`` does), or itself when already within it."""
    scale = side / max(size)
    return size if scale >= 1 else (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def decode_plain_png(data: bytes, image: Image.Image) -> Image.Image | None:
    """A plain PNG (8-bit RGB, RGBA or grey; no profile, transparency key, EXIF or animation) decoded by libspng
    (imagecodecs), 1.24x as fast as Pillow's decoder and pixel-identical to it (benchmarks/image_decoders.py); None
    for any other image, and for one libspng refuses, which Pillow then decodes (or reports as broken)."""
    if (image.format != "PNG" or image.mode not in ("RGB", "RGBA", "L")
            or [tile.args for tile in image.tile] != [image.mode]  # 8 bits a sample (Pillow calls 16-bit RGB "RGB")
            or getattr(image, "n_frames", 1) > 1
            or image.info.keys() & {"icc_profile", "transparency", "exif"} or b"eXIf" in data):  # eXIf may follow IDAT
        return None
    try:
        pixels = imagecodecs.spng_decode(data)
    except imagecodecs.SpngError:
        return None
    expected = (image.height, image.width, *{"RGB": (3,), "RGBA": (4,)}.get(image.mode, ()))
    return Image.fromarray(pixels) if pixels.shape == expected else None


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale as 8-bit L (the top byte): ``convert`` would clip every value above 255 to white. Pillow
    already keeps the top byte of 16-bit RGB(A) and grey + alpha."""
    if image.mode not in _SIXTEEN_BIT:
        return image
    return Image.fromarray(np.clip(np.asarray(image) >> 8, 0, 255).astype(np.uint8))


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """``image`` in sRGB when its ICC profile ``icc`` is another one (Adobe RGB, Display P3, a CMYK or grey profile).

    Applied before shrinking: resizing in the source's colour space and converting after moves edge pixels of real
    photos by up to ~10 levels (tens on noise); JPEGs are already decoded at reduced scale."""
    if not icc:
        return image
    if image.has_transparency_data and image.mode != "RGBA":
        image = image.convert("RGBA")
    elif image.mode not in ("L", "RGB", "RGBA", "CMYK"):
        image = image.convert("RGB")
    transform = _srgb_transform(icc, image.mode)
    return image if transform is None else transform.apply(image)


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from profile ``icc`` to sRGB for ``mode`` images; None for a profile that already is sRGB (maps
    a grid of colours onto itself within rounding), or one that is unreadable or does not fit the mode."""
    try:
        transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode,
                                            "RGBA" if mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError):
        return None
    if mode in ("RGB", "RGBA"):
        grid = _COLOUR_GRID.convert(mode)
        if np.abs(np.asarray(transform.apply(grid), np.int16) - np.asarray(grid, np.int16)).max() <= 1:
            return None
    return transform
