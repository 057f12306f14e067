"""The helpers both scripts copy on purpose (seeding, devices, torchrun setup, atomic writes) must stay identical."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNER = "# Utilities (kept identical"


def utilities_block(script: str) -> str:
    """The lines from the Utilities banner up to the next banner rule after it."""
    lines = (ROOT / script).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(BANNER))
    end = next(i for i in range(start + 2, len(lines)) if re.fullmatch(r"# -{20,}", lines[i]))
    return "\n".join(lines[start:end])


def test_utilities_identical_in_both_scripts():
    image, audio = utilities_block("image_gen.py"), utilities_block("audio_gen.py")
    assert "def atomic_write" in audio and "class UsageError" in audio
    assert image == audio
