"""Every transcript in protocols/transcripts is replayed byte for byte, in chunks of 1..N bytes.

And every concrete example in protocols/PROTOCOL.md is a line of some
transcript, so that the spec's examples are checked against the server too.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.transcript import TRANSCRIPTS, parse, replay

PATHS = sorted(TRANSCRIPTS.glob("*.txt"))
SPEC = TRANSCRIPTS.parent / "PROTOCOL.md"


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


#: A sketch in the spec, not a real line: its rid is a placeholder.
_SKETCH = re.compile(r'"rid":R\b')


def spec_examples() -> list[tuple[int, str, str]]:
    """The ``C:``/``S:`` lines of PROTOCOL.md: (line number, C or S, line), sketches left out."""
    examples = []
    for number, line in enumerate(SPEC.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"[CS]: [A-Z]{1,16}( |\Z)", line) and not _SKETCH.search(line):
            examples.append((number, line[0], line[3:]))
    return examples


def test_protocol_examples_appear_in_transcripts():
    """Every C:/S: example in PROTOCOL.md is, byte for byte, a line some transcript sends or expects."""
    lines = {(s.kind, s.text) for path in PATHS for s in parse(path)[1] if s.kind in ("C", "S")}
    examples = spec_examples()
    assert len(examples) >= 60
    missing = [f"PROTOCOL.md:{n}: {kind}: {text}" for n, kind, text in examples if (kind, text) not in lines]
    assert not missing, "examples that no transcript has:\n" + "\n".join(missing)


def test_transcripts_readme_lists_every_transcript():
    """protocols/transcripts/README.md says for every transcript where it runs."""
    readme = (TRANSCRIPTS / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w-]+\.txt)` \|", readme, re.M))
    assert listed == {p.name for p in PATHS}
