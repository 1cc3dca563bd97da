"""The demo's sample photos (gridd.photos.samples) and the gallery page (gridd.photos.gallery), on real files."""

from __future__ import annotations

import pytest
from PIL import Image

from gridd.photos.gallery import write_gallery
from gridd.photos.samples import make_samples


def test_samples_are_real_jpegs_whose_exif_says_what_the_sample_says(tmp_path):
    samples = make_samples(tmp_path, 8)
    good = [s for s in samples if not s.corrupt]
    assert len(good) == 8 and len(samples) == 9
    assert {s.orientation for s in good} == {1, 3, 6, 8}
    for sample in good:
        with Image.open(sample.path) as image:
            image.load()
            exif = image.getexif()
            assert image.format == "JPEG" and image.size == (sample.width, sample.height)
            assert (exif[0x010F], exif[0x0110], exif[0x0112]) == (sample.make, sample.model, sample.orientation)
            gps = exif.get_ifd(0x8825)
            degrees, minutes, seconds = (float(x) for x in gps[2])
            assert degrees + minutes / 60 + seconds / 3600 == pytest.approx(abs(sample.lat), abs=1e-4)
            assert gps[1] == ("N" if sample.lat >= 0 else "S") and gps[3] == ("E" if sample.lon >= 0 else "W")
            assert exif.get_ifd(0x8769)[0x9011] == sample.taken[-6:]


def test_the_corrupt_sample_fails_to_decode_and_the_same_seed_makes_the_same_files(tmp_path):
    first = make_samples(tmp_path / "a", 3)
    second = make_samples(tmp_path / "b", 3)
    assert [s.path.read_bytes() for s in first] == [s.path.read_bytes() for s in second]
    [corrupt] = [s for s in first if s.corrupt]
    with pytest.raises(OSError, match="truncated"), Image.open(corrupt.path) as image:
        image.load()


def test_gallery_links_local_renditions_relatively_and_escapes_what_it_shows(tmp_path):
    objects = tmp_path / "site" / "objects"
    objects.mkdir(parents=True)
    document = {
        "sha256": "ab" * 32, "source": "/uploads/<script>.jpg", "width": 1600, "height": 1200, "format": "JPEG",
        "make": "Canon", "model": 'EOS "R6"', "taken": "2026-06-01T06:00:00+01:00",
        "gps": {"lat": 47.3769, "lon": 8.5417, "alt": None}, "tags": ["<b>holiday</b>"],
        "outputs": [
            {"width": 1280, "url": (objects / "1280.jpg").as_uri()},
            {"width": 320, "url": (objects / "320.jpg").as_uri()},
            ],
    }  # fmt: skip
    page = write_gallery(
        tmp_path / "site" / "index.html", [document], [("/uploads/cut.jpg", "image file is truncated")]
    )
    text = page.read_text()
    assert 'src="objects/320.jpg"' in text and 'href="objects/1280.jpg"' in text
    assert "<script>" not in text and "&lt;script&gt;.jpg" in text and "&lt;b&gt;holiday" in text
    assert "47.3769, 8.5417" in text and "/uploads/cut.jpg: image file is truncated" in text
