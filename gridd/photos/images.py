"""One photo in, its renditions and metadata out (Pillow).

:func:`process_photo` decodes a photo's bytes, applies its EXIF orientation,
renders one output per width and extracts the metadata a photo site
catalogues. It touches no file, store or network: the job type
(:mod:`gridd.photos.jobtype`) reads the source and writes the results.

Renditions:

- one per requested width at most as wide as the photo as displayed (after
  its EXIF orientation): a photo is never upscaled. When no width fits, the
  photo's own width is rendered, once;
- the height keeps the aspect ratio (rounded, at least 1 pixel);
- JPEG (default) or WebP, at the given quality; the original's ICC colour
  profile is embedded, so colours look the same; a CMYK photo is converted
  to sRGB through its profile where it has one;
- no EXIF: the orientation is already applied, and the camera serial
  numbers and GPS position of the original are not published with it.

Metadata (JSON values; None where the photo does not say):

``width``, ``height``
    pixels as displayed (EXIF orientation applied);
``format``
    Pillow's name of the original's format (``JPEG``, ``PNG``, ...);
``bytes``, ``sha256``
    size and SHA-256 (hex) of the original's bytes;
``make``, ``model``, ``lens``
    camera make and model, lens model (text);
``exposure_time``, ``f_number``, ``iso``, ``focal_length``
    seconds, the f-number, ISO speed (integer), millimetres;
``taken``
    when it was taken, ISO 8601 (``2024-05-06T07:08:09``, with the offset
    ``+02:00`` when the EXIF has OffsetTimeOriginal or its kin);
``gps``
    ``{"lat", "lon", "alt"}`` in decimal degrees (south and west negative)
    and metres (None when absent), or None;
``orientation``
    the EXIF orientation tag, 1-8.

Bad input raises :class:`PhotoError`, a :class:`gridd.jobtypes.RecordError`,
with a message saying what is wrong: zero bytes, not an image, truncated or
corrupt data, a decompression bomb (more pixels than Pillow's
``Image.MAX_IMAGE_PIXELS``, which stays on; Pillow's
``DecompressionBombWarning`` is made an error in every process that imports
this module) or absurd dimensions. Malformed or hostile EXIF never fails a
photo: the fields it should have given are None.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from PIL import ExifTags, Image, ImageCms, features

from gridd.jobtypes import RecordError

__all__ = [
    "DEFAULT_WIDTHS",
    "FORMATS",
    "MAX_SIDE",
    "MAX_ASPECT",
    "PhotoError",
    "Rendition",
    "Processed",
    "process_photo",
    "check_options",
]

DEFAULT_WIDTHS = (320, 640, 1280, 2048)

#: Output formats: Pillow's name -> (content type, file name extension).
FORMATS = {"JPEG": ("image/jpeg", "jpg"), "WEBP": ("image/webp", "webp")}

#: Input formats Pillow may decode: the ones photos come in (a multi-picture JPEG opens as MPO). Fewer
#: decoders, fewer surprises.
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "BMP")

#: A side longer than this (pixels) is not a photo, whatever its pixel count.
MAX_SIDE = 50_000
#: Nor is an image more than this many times as long as it is wide (or wide as long).
MAX_ASPECT = 100

#: Pillow's own default, used should a process have turned the guard off (``MAX_IMAGE_PIXELS = None``).
_PILLOW_MAX_PIXELS = 89_478_485

Image.init()  # every decoder registered, so that Image.open(formats=INPUT_FORMATS) knows them all

# A photo with more pixels than MAX_IMAGE_PIXELS is refused, not decoded with a warning.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose does).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# EXIF tags read (numbers from the EXIF 2.32 specification).
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_EXPOSURE_TIME, _F_NUMBER, _ISO = 0x829A, 0x829D, 0x8827
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_OFFSET_TIME, _OFFSET_TIME_ORIGINAL, _OFFSET_TIME_DIGITIZED = 0x9010, 0x9011, 0x9012
_FOCAL_LENGTH, _LENS_MAKE, _LENS_MODEL = 0x920A, 0xA433, 0xA434
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_ALT_REF, _GPS_ALT = 1, 2, 3, 4, 5, 6

#: Text fields longer than this are cut: EXIF text is whatever the file says.
_MAX_TEXT = 200


class PhotoError(RecordError):
    """This photo cannot be processed; the message says why."""


@dataclass(frozen=True)
class Rendition:
    """One output: the encoded image and what it is."""

    width: int
    height: int
    format: str
    content_type: str
    data: bytes

    @property
    def extension(self) -> str:
        return FORMATS[self.format][1]


@dataclass(frozen=True)
class Processed:
    """A photo's metadata (JSON values) and its renditions, narrowest first."""

    metadata: dict
    outputs: list[Rendition]


def check_options(widths: Iterable[int], format: str, quality: int) -> tuple[list[int], str, int]:
    """The options made canonical (sorted distinct widths, upper-case format); ValueError names a bad one."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Iterable):
        raise ValueError(f"widths must be a list of whole numbers of pixels, not {widths!r}")
    widths = list(widths)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_SIDE for w in widths):
        raise ValueError(f"widths must be a non-empty list of whole numbers from 1 to {MAX_SIDE}, not {widths!r}")
    if not isinstance(format, str) or format.upper() not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be a whole number from 1 to 100, not {quality!r}")
    return sorted(set(widths)), format.upper(), quality


def process_photo(
    data: bytes, *, widths: Iterable[int] = DEFAULT_WIDTHS, format: str = "JPEG", quality: int = 85
) -> Processed:
    """Decode ``data``, render it at each width that fits and extract its metadata; PhotoError on bad input."""
    try:
        widths, format, quality = check_options(widths, format, quality)
    except ValueError as e:
        raise PhotoError(str(e)) from None
    if format == "WEBP" and not features.check("webp"):
        raise PhotoError("this worker's Pillow cannot write WebP")
    if not data:
        raise PhotoError("empty file (zero bytes)")
    image = _decode(data)
    exif = _exif(image)
    orientation = _orientation(exif)
    icc = image.info.get("icc_profile") or None
    original_format = image.format
    try:
        if orientation in _TRANSPOSE:
            image = image.transpose(_TRANSPOSE[orientation])
        image, icc = _for_output(image, icc, format)
    except MemoryError:
        raise
    except Exception as e:
        raise PhotoError(f"corrupt image: {_reason(e)}") from None
    fitting = [w for w in widths if w <= image.width] or [image.width]
    outputs = [_render(image, width, format, quality, icc) for width in fitting]
    metadata = {
        "width": image.width,
        "height": image.height,
        "format": original_format,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **_camera(exif),
        "orientation": orientation,
    }
    return Processed(metadata, outputs)


# -- decoding ----------------------------------------------------------------------------


def _decode(data: bytes) -> Image.Image:
    """The fully decoded image; PhotoError for anything that is not a whole, sane image."""
    limit = Image.MAX_IMAGE_PIXELS or _PILLOW_MAX_PIXELS
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.UnidentifiedImageError:
        raise PhotoError(f"not an image (or not one of {', '.join(INPUT_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PhotoError(f"decompression bomb: {e}") from None
    except MemoryError:
        raise
    except Exception as e:
        text = _reason(e)
        raise PhotoError(f"{'truncated' if 'truncated' in text.lower() else 'corrupt'} image: {text}") from None
    width, height = image.size
    if width < 1 or height < 1 or max(width, height) > MAX_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise PhotoError(f"absurd dimensions: {width}x{height} pixels (sides up to {MAX_SIDE}, at most {MAX_ASPECT}:1)")
    if width * height > limit:
        raise PhotoError(f"decompression bomb: {width}x{height} is more than {limit} pixels")
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as e:
        text = _reason(e)
        what = "truncated image" if "truncated" in text.lower() else "corrupt image"
        raise PhotoError(f"{what}: {text}") from None
    return image


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__


def _for_output(image: Image.Image, icc: bytes | None, format: str) -> tuple[Image.Image, bytes | None]:
    """The image in a mode the output format takes (alpha kept for WebP, on white for JPEG), and its profile."""
    if image.mode == "CMYK":
        if icc:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                image = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except (ImageCms.PyCMSError, OSError, ValueError):
                image = image.convert("RGB")
        else:
            image = image.convert("RGB")
        return image, None  # now sRGB: the CMYK profile no longer applies
    alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if alpha:
        image = image.convert("RGBA")
        if format == "WEBP":
            return image, icc
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background, icc
    if image.mode in ("RGB", "L"):
        return image, icc
    return image.convert("RGB"), icc


def _render(image: Image.Image, width: int, format: str, quality: int, icc: bytes | None) -> Rendition:
    height = max(1, round(image.height * width / image.width))
    resized = image if (width, height) == image.size else image.resize((width, height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    options = {"quality": quality}
    if icc:
        options["icc_profile"] = icc
    resized.save(out, format, **options)
    return Rendition(width, height, format, FORMATS[format][0], out.getvalue())


# -- EXIF -----------------------------------------------------------------------------------
#
# Every reader takes what the file says and returns a JSON value or None;
# none of them raises, whatever the EXIF holds.


class _NoExif(dict):
    def get_ifd(self, tag):
        return {}


def _exif(image: Image.Image):
    try:
        return image.getexif()
    except MemoryError:
        raise
    except Exception:
        return _NoExif()


def _ifd(exif, which) -> dict:
    try:
        ifd = exif.get_ifd(which)
        return ifd if isinstance(ifd, dict) else {}
    except MemoryError:
        raise
    except Exception:
        return {}


def _orientation(exif) -> int | None:
    value = _get(exif, _ORIENTATION)
    if isinstance(value, tuple | list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8 else None


def _get(mapping, tag):
    try:
        return mapping.get(tag)
    except MemoryError:
        raise
    except Exception:
        return None


def _camera(exif) -> dict:
    sub = _ifd(exif, ExifTags.IFD.Exif)
    return {
        "make": _text(_get(exif, _MAKE)),
        "model": _text(_get(exif, _MODEL)),
        "lens": _text(_get(sub, _LENS_MODEL)) or _text(_get(sub, _LENS_MAKE)),
        "exposure_time": _number(_get(sub, _EXPOSURE_TIME)),
        "f_number": _number(_get(sub, _F_NUMBER)),
        "iso": _iso(_get(sub, _ISO)),
        "focal_length": _number(_get(sub, _FOCAL_LENGTH)),
        "taken": _taken(exif, sub),
        "gps": _gps(_ifd(exif, ExifTags.IFD.GPSInfo)),
    }


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(c for c in value if c.isprintable()).strip()
    return value[:_MAX_TEXT] or None


def _number(value) -> float | None:
    """A finite non-negative number from an EXIF rational or integer."""
    if isinstance(value, tuple | list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _iso(value) -> int | None:
    if isinstance(value, tuple | list) and value:
        value = value[0]
    number = _number(value)
    return int(number) if number is not None and 0 < number < 10_000_000 and number == int(number) else None


def _taken(exif, sub) -> str | None:
    for when_tag, offset_tag, ifd in (
        (_DATETIME_ORIGINAL, _OFFSET_TIME_ORIGINAL, sub),
        (_DATETIME_DIGITIZED, _OFFSET_TIME_DIGITIZED, sub),
        (_DATETIME, _OFFSET_TIME, exif),
    ):
        when = _text(_get(ifd, when_tag))
        if when is None:
            continue
        try:
            moment = datetime.strptime(when[:19], "%Y:%m:%d %H:%M:%S")
        except ValueError:
            continue
        offset = _offset(_text(_get(sub, offset_tag)))
        if offset is not None:
            moment = moment.replace(tzinfo=offset)
        return moment.isoformat()
    return None


def _offset(text: str | None) -> timezone | None:
    """``+02:00`` or ``-05:30`` as a timezone, None for anything else."""
    if text is None or len(text) != 6 or text[0] not in "+-" or text[3] != ":":
        return None
    hours, minutes = text[1:3], text[4:6]
    if not (hours.isdigit() and minutes.isdigit()) or int(hours) > 14 or int(minutes) > 59:
        return None
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    return timezone(-delta if text[0] == "-" else delta)


def _gps(gps: dict) -> dict | None:
    lat = _degrees(_get(gps, _GPS_LAT), _text(_get(gps, _GPS_LAT_REF)), "N", "S", 90)
    lon = _degrees(_get(gps, _GPS_LON), _text(_get(gps, _GPS_LON_REF)), "E", "W", 180)
    if lat is None or lon is None:
        return None
    alt = _number(_get(gps, _GPS_ALT))
    below = _get(gps, _GPS_ALT_REF)
    if alt is not None and (below == 1 or below == b"\x01"):
        alt = -alt
    return {"lat": lat, "lon": lon, "alt": alt}


def _degrees(value, ref: str | None, positive: str, negative: str, limit: float) -> float | None:
    """Degrees, minutes and seconds (or fewer) to signed decimal degrees within ±limit."""
    if not isinstance(value, tuple | list) or not 1 <= len(value) <= 3 or ref not in (positive, negative):
        return None
    parts = [_number(part) for part in value]
    if any(part is None for part in parts) or any(part >= 60 for part in parts[1:]):
        return None
    degrees = sum(part / 60**i for i, part in enumerate(parts))
    if degrees > limit:
        return None
    return round(-degrees if ref == negative else degrees, 7)
