"""One photo's renditions and metadata (gridd.photos.images), on real photos made by Pillow."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image, features

from gridd.jobtypes import RecordError
from gridd.photos.images import MAX_SIDE, PhotoError, process_photo
from tests.photos import exif_block, hostile_exif, make_photo, srgb_profile


def decoded(rendition) -> Image.Image:
    image = Image.open(io.BytesIO(rendition.data))
    image.load()
    return image


def pixel_at(image: Image.Image, x: float, y: float) -> tuple:
    """The colour at a point given as fractions of the width and height."""
    return image.convert("RGB").getpixel((int(x * (image.width - 1)), int(y * (image.height - 1))))


def is_red(colour) -> bool:
    return colour[0] > 200 and colour[2] < 60


def is_blue(colour) -> bool:
    return colour[2] > 200 and colour[0] < 60


# -- renditions --------------------------------------------------------------------


def test_renditions_one_per_width_that_fits_never_upscaled():
    """A 1500 px wide photo gets the 320, 640 and 1280 renditions, not 2048, each keeping the aspect ratio."""
    processed = process_photo(make_photo(1500, 1000))
    assert [(r.width, r.height) for r in processed.outputs] == [(320, 213), (640, 427), (1280, 853)]
    for rendition in processed.outputs:
        image = decoded(rendition)
        assert (image.format, image.size) == ("JPEG", (rendition.width, rendition.height))
        assert (rendition.format, rendition.content_type) == ("JPEG", "image/jpeg")


def test_renditions_photo_narrower_than_every_width_is_rendered_once_at_its_own_width():
    """When no width fits, the one output has the photo's own size."""
    processed = process_photo(make_photo(200, 150), widths=[320, 640])
    assert [(r.width, r.height) for r in processed.outputs] == [(200, 150)]


def test_renditions_widths_are_sorted_and_distinct():
    """Widths given in any order, repeated, give one output each, narrowest first."""
    processed = process_photo(make_photo(800, 400), widths=[640, 100, 640, 300])
    assert [r.width for r in processed.outputs] == [100, 300, 640]


@pytest.mark.parametrize(
    ("orientation", "size", "red_at"),
    [
        (1, (400, 300), (0.1, 0.1)),
        (3, (400, 300), (0.9, 0.9)),  # upside down
        (6, (300, 400), (0.9, 0.1)),  # turned 90 degrees clockwise to be upright
        (8, (300, 400), (0.1, 0.9)),  # turned 90 degrees anticlockwise
        (2, (400, 300), (0.9, 0.1)),  # mirrored
    ],
)
def test_renditions_apply_the_exif_orientation(orientation, size, red_at):
    """The output is upright: its size and where the red corner lies follow the EXIF orientation."""
    processed = process_photo(make_photo(400, 300, exif=exif_block(orientation=orientation)), widths=[1000])
    image = decoded(processed.outputs[0])
    assert image.size == size
    assert (processed.metadata["width"], processed.metadata["height"]) == size
    assert is_red(pixel_at(image, *red_at))
    assert is_blue(pixel_at(image, 1 - red_at[0], 1 - red_at[1]))
    assert processed.metadata["orientation"] == orientation


def test_renditions_keep_the_icc_profile_and_drop_the_exif():
    """The original's colour profile is embedded in every output; its EXIF (GPS included) is not."""
    icc = srgb_profile()
    processed = process_photo(make_photo(800, 600, exif=exif_block(), icc=icc), widths=[320, 640])
    for rendition in processed.outputs:
        image = decoded(rendition)
        assert image.info.get("icc_profile") == icc
        assert dict(image.getexif()) == {}


def test_renditions_quality_changes_the_size():
    """A lower quality gives smaller outputs."""
    data = make_photo(1200, 900)
    low = process_photo(data, widths=[640], quality=20).outputs[0]
    high = process_photo(data, widths=[640], quality=95).outputs[0]
    assert len(low.data) < len(high.data)


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP")
def test_renditions_webp_keeps_transparency():
    """WebP outputs are WebP, and a transparent PNG stays transparent in them."""
    processed = process_photo(make_photo(400, 300, format="PNG", mode="RGBA"), widths=[200], format="webp")
    (rendition,) = processed.outputs
    assert (rendition.format, rendition.content_type) == ("WEBP", "image/webp")
    image = decoded(rendition)
    assert image.format == "WEBP" and image.mode == "RGBA"
    assert image.getpixel((190, 140))[3] < 200


def test_renditions_jpeg_of_a_transparent_png_is_on_white():
    """A transparent PNG rendered as JPEG is composed on white (not black)."""
    processed = process_photo(make_photo(400, 300, format="PNG", mode="RGBA"), widths=[200])
    colour = pixel_at(decoded(processed.outputs[0]), 0.9, 0.9)
    assert colour[0] > 100 and colour[2] > 200, colour  # half-transparent blue on white: light blue


def test_renditions_of_a_cmyk_jpeg_are_rgb():
    """A CMYK photo becomes an RGB output."""
    image = Image.new("CMYK", (400, 300), (255, 0, 0, 0))
    out = io.BytesIO()
    image.save(out, "JPEG")
    (rendition,) = process_photo(out.getvalue(), widths=[100]).outputs
    assert decoded(rendition).mode == "RGB"


# -- metadata ----------------------------------------------------------------------


def test_metadata_from_a_camera_exif():
    """Camera, lens, exposure, time taken with its offset and GPS come out as JSON values."""
    data = make_photo(640, 480, exif=exif_block(orientation=1))
    metadata = process_photo(data).metadata
    assert metadata == {
        "width": 640,
        "height": 480,
        "format": "JPEG",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "make": "Canon",
        "model": "EOS R5",
        "lens": "RF24-105mm F4 L IS USM",
        "exposure_time": 0.004,
        "f_number": 2.8,
        "iso": 400,
        "focal_length": 50.0,
        "taken": "2024-05-06T07:08:09+02:00",
        "gps": {"lat": pytest.approx(48.858217), "lon": pytest.approx(2.2945), "alt": 35.0},
        "orientation": 1,
    }
    json.dumps(metadata, allow_nan=False)


def test_metadata_gps_south_west_and_below_sea_level_are_negative():
    """S and W give negative degrees; an altitude below sea level is negative."""
    exif = exif_block(gps=((33, 52, 4.0), "S", (151, 12, 30.0), "W", -12.5))
    gps = process_photo(make_photo(exif=exif)).metadata["gps"]
    assert gps == {"lat": pytest.approx(-33.867778), "lon": pytest.approx(-151.208333), "alt": -12.5}


def test_metadata_time_without_offset_is_naive():
    """Without OffsetTimeOriginal the time has no offset."""
    metadata = process_photo(make_photo(exif=exif_block(offset=None))).metadata
    assert metadata["taken"] == "2024-05-06T07:08:09"


def test_metadata_absent_fields_are_none():
    """A photo with no EXIF has its pixel facts and None for every camera field."""
    data = make_photo(300, 200, format="PNG")
    metadata = process_photo(data).metadata
    assert (metadata["width"], metadata["height"], metadata["format"], metadata["bytes"]) == (
        300,
        200,
        "PNG",
        len(data),
    )
    camera = ("make", "model", "lens", "exposure_time", "f_number", "iso", "focal_length", "taken", "gps")
    assert {key: metadata[key] for key in (*camera, "orientation")} == dict.fromkeys((*camera, "orientation"))


@pytest.mark.parametrize(
    ("fields", "none"),
    [
        ({"taken": "2024:13:45 99:00:00"}, "taken"),  # no such date
        ({"taken": "yesterday"}, "taken"),
        ({"offset": "+99:00"}, None),  # the time stays, without the offset
        ({"gps": ((148, 0, 0), "N", (2, 0, 0), "E", None)}, "gps"),  # latitude past the pole
        ({"gps": ((48, 0, 0), "X", (2, 0, 0), "E", None)}, "gps"),  # no such reference
        ({"make": "\x00\x01\x02"}, "make"),  # nothing printable
        ({"orientation": 42}, "orientation"),
    ],
)
def test_metadata_nonsense_values_become_none(fields, none):
    """A value no camera writes gives None for that field only; the photo is processed."""
    processed = process_photo(make_photo(exif=exif_block(**fields)))
    if none is not None:
        assert processed.metadata[none] is None
    if "offset" in fields:
        assert processed.metadata["taken"] == "2024-05-06T07:08:09"
    assert processed.metadata["model"] == "EOS R5"
    assert len(processed.outputs) == 1


def test_metadata_hostile_exif_never_fails_the_photo():
    """EXIF whose entries point past its end and loop to themselves: fields are None, outputs are made."""
    processed = process_photo(make_photo(400, 300, exif=hostile_exif()))
    assert (processed.metadata["make"], processed.metadata["orientation"], processed.metadata["gps"]) == (
        None,
        None,
        None,
    )
    assert [(r.width, r.height) for r in processed.outputs] == [(320, 240)]


def test_metadata_zero_denominator_rationals_are_none():
    """An exposure of 1/0 (NaN or infinity in Pillow) is None, so the document stays JSON."""
    from PIL.TiffImagePlugin import IFDRational

    exif = exif_block()
    exif.get_ifd(0x8769)[0x829A] = IFDRational(1, 0)
    metadata = process_photo(make_photo(exif=exif)).metadata
    assert metadata["exposure_time"] is None
    json.dumps(metadata, allow_nan=False)


# -- bad input ---------------------------------------------------------------------


def bomb(width: int, height: int) -> bytes:
    """A tiny PNG (one bit per pixel, all zero) that decodes to width x height pixels."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", r"empty file \(zero bytes\)"),
        (b"this is a text file, not a photo\n", "not an image"),
        (b"%PDF-1.7\n" + bytes(200), "not an image"),
        (make_photo(1200, 900)[:3000], "truncated image"),
        (make_photo(1200, 900)[:100], "truncated image"),
        (b"\xff\xd8\xff\xe0" + bytes(500), "not an image"),  # a JPEG's signature and nothing of one
        (make_photo(format="PNG")[:60], "truncated image"),
        (bomb(10_000, 9_000), "decompression bomb"),  # past MAX_IMAGE_PIXELS: Pillow's warning, made an error
        (bomb(14_000, 14_000), "decompression bomb"),  # past twice the limit: Pillow's own error
        (bomb(MAX_SIDE + 10, 600), "absurd dimensions"),
        (bomb(20_000, 10), "absurd dimensions"),
    ],
    ids=[
        "zero-bytes",
        "text",
        "pdf",
        "truncated",
        "truncated-header",
        "jpeg-signature-only",
        "truncated-png",
        "bomb",
        "bigger-bomb",
        "side-too-long",
        "too-thin",
    ],
)
def test_bad_input_is_a_photo_error_saying_what(data, words):
    """Each bad input raises PhotoError (a RecordError: the job goes on) with a message naming the problem."""
    with pytest.raises(PhotoError, match=words) as caught:
        process_photo(data)
    assert isinstance(caught.value, RecordError)


@pytest.mark.parametrize("marker", [b"\xff\xc4", b"\xff\xda"], ids=["huffman-table", "start-of-scan"])
def test_bad_input_corrupt_jpeg_is_a_photo_error(marker):
    """A JPEG whose Huffman table or scan header is overwritten with garbage is refused as corrupt."""
    data = bytearray(make_photo(800, 600))
    start = data.index(marker)
    data[start + 4 : start + 40] = b"\xaa" * 36
    with pytest.raises(PhotoError, match="corrupt image: broken data stream"):
        process_photo(bytes(data))


def test_bad_input_the_pixel_limit_stays_pillows():
    """A lower MAX_IMAGE_PIXELS in the process is the limit that applies."""
    data = make_photo(400, 300)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 400 * 300 - 1
    try:
        with pytest.raises(PhotoError, match="decompression bomb"):
            process_photo(data)
    finally:
        Image.MAX_IMAGE_PIXELS = old


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"widths": []}, "widths"),
        ({"widths": [0]}, "widths"),
        ({"widths": "320"}, "widths"),
        ({"widths": [320.5]}, "widths"),
        ({"format": "GIF"}, "format"),
        ({"quality": 0}, "quality"),
        ({"quality": True}, "quality"),
    ],
)
def test_bad_options_are_photo_errors(options, words):
    """Widths, format and quality out of range are refused, naming the option."""
    with pytest.raises(PhotoError, match=words):
        process_photo(make_photo(), **options)
