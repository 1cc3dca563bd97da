"""Sample photos made on the fly, for the demo, the benchmark and the tests: ``make_samples(directory)``.

Each is a real JPEG drawn with Pillow (a gradient sky, a ground, a sun and
a few shapes, so that it compresses like a photo rather than a flat
colour), of varied size and aspect, stored in one of the four EXIF
orientations a camera writes, with EXIF as a camera would write it: make,
model, lens, exposure, aperture, ISO, focal length, the time taken with its
offset from UTC, and a GPS position. ``corrupt=True`` adds one truncated
JPEG, the kind of file a broken upload leaves. The same ``seed`` makes the
same files.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageDraw, TiffImagePlugin

__all__ = ["CAMERAS", "PLACES", "Sample", "jpeg_with_exif", "make_samples"]

#: (make, model, lens) of the cameras the samples claim.
CAMERAS = (
    ("Canon", "Canon EOS R6", "RF24-105mm F4 L IS USM"),
    ("NIKON CORPORATION", "NIKON Z 6_2", "NIKKOR Z 24-70mm f/4 S"),
    ("FUJIFILM", "X-T4", "XF16-80mmF4 R OIS WR"),
    ("Apple", "iPhone 15", "iPhone 15 back camera 6.86mm f/1.6"),
)
#: (name, latitude, longitude, UTC offset) where they were taken.
PLACES = (
    ("Zürich", 47.3769, 8.5417, "+01:00"),
    ("Lisbon", 38.7223, -9.1393, "+00:00"),
    ("Reykjavík", 64.1466, -21.9426, "+00:00"),
    ("Cape Town", -33.9249, 18.4241, "+02:00"),
    ("Montréal", 45.5019, -73.5674, "-05:00"),
)
#: (width, height) before orientation: landscape, portrait, square, panorama.
SIZES = ((1600, 1200), (1200, 1600), (1024, 1024), (2400, 900), (800, 600), (3000, 2000))
#: EXIF orientations: as shot, upside down, and rotated a quarter either way.
ORIENTATIONS = (1, 3, 6, 8)


@dataclass(frozen=True)
class Sample:
    """One sample file and what its EXIF says, to check the pipeline's metadata against."""

    path: Path
    width: int  # as stored, before the orientation is applied
    height: int
    orientation: int
    make: str
    model: str
    place: str
    lat: float
    lon: float
    taken: str  # ISO 8601 with offset
    corrupt: bool = False


def _rational(value: float, limit: int = 10_000) -> TiffImagePlugin.IFDRational:
    fraction = Fraction(value).limit_denominator(limit)
    return TiffImagePlugin.IFDRational(fraction.numerator, fraction.denominator)


def _dms(degrees: float) -> tuple:
    """Decimal degrees as EXIF's (degrees, minutes, seconds)."""
    degrees = abs(degrees)
    whole = int(degrees)
    minutes = int((degrees - whole) * 60)
    seconds = (degrees - whole - minutes / 60) * 3600
    return (_rational(whole), _rational(minutes), _rational(round(seconds, 2), 100))


def _draw(width: int, height: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    top, bottom = (rng.randrange(40, 120), rng.randrange(90, 170), 230), (250, rng.randrange(180, 240), 180)
    horizon = int(height * rng.uniform(0.5, 0.75))
    for y in range(horizon):  # the sky, one line at a time
        t = y / max(1, horizon - 1)
        draw.line([(0, y), (width, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    ground = (rng.randrange(30, 90), rng.randrange(80, 140), rng.randrange(20, 60))
    draw.rectangle([0, horizon, width, height], fill=ground)
    r = min(width, height) // rng.randrange(8, 14)
    cx, cy = rng.randrange(r, width - r), rng.randrange(r, max(r + 1, horizon - r))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 220, 90))
    for _ in range(rng.randrange(5, 15)):  # hills and houses
        x, w = rng.randrange(0, width), rng.randrange(width // 20, width // 5)
        h = rng.randrange(height // 20, height // 4)
        colour = tuple(rng.randrange(0, 255) for _ in range(3))
        if rng.random() < 0.5:
            draw.polygon([(x - w, horizon), (x, horizon - h), (x + w, horizon)], fill=colour)
        else:
            draw.rectangle([x, horizon - h, x + w, horizon], fill=colour)
    return image


def jpeg_with_exif(
    image: Image.Image,
    *,
    orientation: int = 1,
    camera: tuple[str, str, str] = CAMERAS[0],
    taken: str = "2026:06:21 18:30:00",
    offset: str | None = "+01:00",
    gps: tuple[float, float, float | None] | None = (47.3769, 8.5417, 408.0),
    quality: int = 88,
    extra: dict | None = None,
) -> bytes:
    """``image`` as a JPEG with a camera's EXIF; ``extra`` adds or overrides base-IFD tags (numbers to values)."""
    exif = Image.Exif()
    make, model, lens = camera
    exif[0x010F], exif[0x0110], exif[0x0112] = make, model, orientation  # Make, Model, Orientation
    exif[0x0132] = taken  # DateTime
    details = exif.get_ifd(0x8769)  # the Exif IFD
    details[0x9003] = taken  # DateTimeOriginal
    if offset is not None:
        details[0x9011] = offset  # OffsetTimeOriginal
    details[0xA434] = lens  # LensModel
    details[0x829A] = _rational(1 / 250)  # ExposureTime
    details[0x829D] = _rational(4.0)  # FNumber
    details[0x8827] = 400  # ISOSpeedRatings
    details[0x920A] = _rational(35.0)  # FocalLength
    if gps is not None:
        lat, lon, alt = gps
        where = exif.get_ifd(0x8825)  # the GPS IFD
        where[1], where[2] = ("N" if lat >= 0 else "S"), _dms(lat)
        where[3], where[4] = ("E" if lon >= 0 else "W"), _dms(lon)
        if alt is not None:
            where[5], where[6] = (0 if alt >= 0 else 1), _rational(abs(alt))
    for tag, value in (extra or {}).items():
        exif[tag] = value
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def make_samples(directory: str | Path, count: int = 24, *, seed: int = 0, corrupt: bool = True) -> list[Sample]:
    """Write ``count`` sample photos (and one corrupt file) into ``directory``; what each one's EXIF says."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for n in range(count):
        width, height = SIZES[n % len(SIZES)]
        orientation = ORIENTATIONS[n % len(ORIENTATIONS)]
        camera = CAMERAS[n % len(CAMERAS)]
        place, lat, lon, offset = PLACES[n % len(PLACES)]
        day, hour = 1 + n % 28, 6 + n % 14
        taken = f"2026:06:{day:02d} {hour:02d}:{(7 * n) % 60:02d}:00"
        data = jpeg_with_exif(
            _draw(width, height, rng), orientation=orientation, camera=camera, taken=taken, offset=offset,
            gps=(lat, lon, float(rng.randrange(0, 900))),
        )  # fmt: skip
        path = directory / f"photo-{n:03d}-{place.lower().replace(' ', '-')}.jpg"
        path.write_bytes(data)
        iso = f"2026-06-{day:02d}T{hour:02d}:{(7 * n) % 60:02d}:00{offset}"
        samples.append(Sample(path, width, height, orientation, camera[0], camera[1], place, lat, lon, iso))
    if corrupt:
        path = directory / "upload-cut-short.jpg"
        whole = jpeg_with_exif(_draw(640, 480, rng))
        path.write_bytes(whole[: len(whole) // 3])  # a broken upload: the file ends a third of the way in
        samples.append(Sample(path, 640, 480, 1, CAMERAS[0][0], CAMERAS[0][1], "", 0.0, 0.0, "", corrupt=True))
    return samples
