"""The main demo (``./dev demo``, ``python -m gridd.demo``), run for real: a server, workers and photos."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

GRIDCTL = "from gridd.cli.gridctl import main; main()"


def test_demo_processes_the_uploads_refuses_the_broken_one_and_leaves_a_gallery(tmp_path):
    out = tmp_path / "demo"
    ran = subprocess.run(
        [sys.executable, "-m", "gridd.demo", "--out", str(out), "--photos", "8", "--workers", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    said = ran.stdout + ran.stderr
    assert ran.returncode == 0, said
    assert "9/9 photos" in said and "8 stored, 1 error" in said
    assert re.search(r"refused: upload-cut-short\.jpg: truncated image", said)
    assert re.search(r"worker-1 +│ +\d+ │ +\d+", said) and "8 photos stored as" in said
    page = (out / "index.html").read_text()
    assert page.count("<figure>") == 8 and "upload-cut-short.jpg" in page
    verified = subprocess.run(
        [sys.executable, "-c", GRIDCTL, "photos", "verify", (out / "site").as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0 and "the copies agree" in verified.stdout, verified.stdout + verified.stderr
