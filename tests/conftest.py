"""Shared fixtures: the repository root on sys.path and one MNIST copy per test session."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Two cores are shared by the test process and the scripts it starts: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(script: str, *args: str, cwd: Path | None = None, torchrun: int = 0,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a top-level script as a user would, capturing its output. torchrun gets a free port rather than its
    default 29500, so that two test runs on one machine do not collide."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_port", str(free_port())] if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / script), *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """MNIST unpacked once from the packaged copy into torchvision's layout."""
    import image_gen

    data_dir = tmp_path_factory.mktemp("data")
    image_gen.load_mnist(str(data_dir), "train")
    return data_dir


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A VAE of 32 hidden channels trained for 2 epochs on 20 synthetic clips (about 15 s), with its mixture prior;
    one per session, shared by the API and web-app tests."""
    folder = tmp_path_factory.mktemp("vae")
    result = run_script("audio_gen.py", "--mode", "train", "--model", "vae", "--epochs", "2", "--num_samples", "20",
                        "--batch_size", "8", "--hidden_channels", "32", "--eval_clips", "2", "--device", "cpu",
                        "--checkpoint", str(folder / "vae.pt"), "--results_dir", str(folder / "results"))
    assert result.returncode == 0, result.stderr
    return folder / "vae.pt"
