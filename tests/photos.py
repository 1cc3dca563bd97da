"""Real photos made on the fly for the photos tests: Pillow images with the EXIF a camera writes."""

from __future__ import annotations

import io
import struct

from PIL import ExifTags, Image, ImageCms
from PIL.TiffImagePlugin import IFDRational


def exif_block(
    *,
    orientation=None,
    make="Canon",
    model="EOS R5",
    lens="RF24-105mm F4 L IS USM",
    taken="2024:05:06 07:08:09",
    offset="+02:00",
    gps=((48, 51, 29.58), "N", (2, 17, 40.2), "E", 35.0),
) -> Image.Exif:
    """An EXIF block like a camera's: camera, lens, exposure, time with its offset, GPS."""
    exif = Image.Exif()
    if make is not None:
        exif[0x010F] = make
    if model is not None:
        exif[0x0110] = model
    if orientation is not None:
        exif[0x0112] = orientation
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if taken is not None:
        sub[0x9003] = taken
    if offset is not None:
        sub[0x9011] = offset
    sub[0x829A] = IFDRational(1, 250)
    sub[0x829D] = IFDRational(28, 10)
    sub[0x8827] = 400
    sub[0x920A] = IFDRational(50, 1)
    if lens is not None:
        sub[0xA434] = lens
    if gps is not None:
        lat, lat_ref, lon, lon_ref, alt = gps
        block = exif.get_ifd(ExifTags.IFD.GPSInfo)
        block[1] = lat_ref
        block[2] = tuple(IFDRational(round(v * 100), 100) for v in lat)
        block[3] = lon_ref
        block[4] = tuple(IFDRational(round(v * 100), 100) for v in lon)
        if alt is not None:
            block[5] = b"\x00" if alt >= 0 else b"\x01"
            block[6] = IFDRational(round(abs(alt) * 10), 10)
    return exif


def make_photo(width=400, height=300, *, format="JPEG", exif=None, icc=None, mode="RGB", **save) -> bytes:
    """A photo whose top-left quarter is red and the rest blue, so that its orientation can be seen."""
    colour = {"RGB": ((255, 0, 0), (0, 0, 255)), "RGBA": ((255, 0, 0, 255), (0, 0, 255, 128))}[mode]
    image = Image.new(mode, (width, height), colour[1])
    image.paste(colour[0], (0, 0, width // 2, height // 2))
    if exif is not None:
        save["exif"] = exif
    if icc is not None:
        save["icc_profile"] = icc
    out = io.BytesIO()
    image.save(out, format, **save)
    return out.getvalue()


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def hostile_exif() -> bytes:
    """An EXIF block (``Exif\\0\\0`` + TIFF) whose IFD entries point far outside it and loop to themselves."""
    entries = [
        (0x010F, 2, 0xFFFFFF, 0x7FFFFFF0),  # Make: 16 MB of ASCII, far past the end
        (0x0112, 3, 1, 0x0000_0009),  # Orientation 9: no such orientation
        (0x8769, 4, 1, 8),  # Exif sub-IFD at the IFD itself: a loop
        (0x8825, 4, 1, 0x7FFFFFFF),  # GPS IFD past the end
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHII", tag, kind, count, value)
    ifd += struct.pack("<I", 8)  # next IFD: itself again
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
