"""Reading images from any URI safely: header probes and small analysis copies.

Every failure becomes a ``BadImage`` with a reason code instead of an exception escaping a worker, so a
broken file is a recorded rejection, never a crashed stage.
"""

from __future__ import annotations

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
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# The decompression-bomb limit is enforced from the header by ``AnalysisConfig.max_pixels`` before any
# pixel is decoded; PIL's own check stays on as a second line of defence.
_EXIF_KEEP = ("Make", "Model", "LensModel", "FNumber", "ExposureTime", "ISOSpeedRatings", "FocalLength",
              "DateTimeOriginal", "DateTime", "Orientation", "Software", "Artist", "Copyright")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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
        raise BadImage("not_an_image", f"unrecognised format (starts with {fp.read(8)!r})") from None
    except Exception as err:  # noqa: BLE001 - any decoder error is a broken file
        raise BadImage("broken_file", f"{type(err).__name__}: {err}") from None


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
    whatever colour they hide."""
    if image.mode == "RGB":
        return image
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def analysis_copy(data: bytes, side: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode to an RGB uint8 array whose long side is at most ``side``; also the oriented full size.

    JPEGs decode directly at reduced scale (libjpeg DCT scaling via ``draft``), which is most of the
    speed of this stage. Transparent images are composited on white, as a trainer would see them.
    """
    image = _open(io.BytesIO(data))
    if image.width * image.height > max_pixels:
        raise BadImage("decompression_bomb", f"header claims {image.width}x{image.height} pixels (> {max_pixels})")
    try:
        full_size = image.size  # before draft(), which shrinks the reported size
        image.draft("RGB", (side, side))
        image.load()  # decode now, so corrupt data fails here and not inside a metadata read
        orientation = _orientation(image)
        if orientation in _ROTATED:
            full_size = full_size[::-1]
        if orientation not in (None, 1):  # exif_transpose copies the image even when nothing changes
            image = ImageOps.exif_transpose(image)
        # shrink first, then composite on white: same result, a fraction of the pixels (RGBA resizes premultiplied)
        if image.mode != "RGB":
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        image.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        image = to_rgb(image)
        pixels = np.asarray(image)
    except BadImage:
        raise
    except Exception as err:  # noqa: BLE001 - truncated / corrupt data surfaces here, at decode time
        raise BadImage("broken_file", f"{type(err).__name__}: {err}") from None
    return pixels, full_size

