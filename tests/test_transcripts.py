"""Every transcript in protocols/transcripts is replayed byte for byte, in chunks of 1..N bytes."""

from __future__ import annotations

import os

import pytest

from tests.transcript import TRANSCRIPTS, replay

PATHS = sorted(TRANSCRIPTS.glob("*.txt"))


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_transcript_replays_exactly(path, chunk):
    """The server answers the transcript's peer lines with exactly its server lines."""
    if os.environ.get("GRIDD_RECORD_TRANSCRIPTS") and chunk is None:
        path.write_text("\n".join(replay(path, record=True)) + "\n", encoding="utf-8")
    replay(path, chunk=chunk)


def test_transcripts_exist():
    """The protocol folder ships transcripts for the tests to replay."""
    assert len(PATHS) >= 5
