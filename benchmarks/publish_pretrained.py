"""Turn finished training runs into the shipped pretrained models and the README gallery.

    .venv/bin/python benchmarks/publish_pretrained.py --image_run RUN_DIR --audio_run RUN_DIR
    .venv/bin/python benchmarks/publish_pretrained.py --gan_run RUN_DIR
    .venv/bin/python benchmarks/publish_pretrained.py --vae_run RUN_DIR
    .venv/bin/python benchmarks/publish_pretrained.py --audio_expert synthetic=CHECKPOINT

RUN_DIR is what a training command left behind: its checkpoint (diffusion_model.pt,
gan_model.pt, audio_autoencoder.pt or audio_vae.pt) beside the results/ folder it wrote. The checkpoints
lose their optimizer state (the image models keep their EMA weights as their only weights,
and the GAN drops its discriminator), so that they are small and load with weights_only=True;
the pictures and wavs go to docs/. --audio_expert adds a specialist autoencoder to the shipped one
as an expert that reconstruction may hand a clip to (audio_gen.py's Expert and choose_coder).
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import audio_gen  # noqa: E402
from image_gen import atomic_write  # noqa: E402

TRAINING_ONLY = ("optimizer", "lr_scheduler", "scheduler", "discriminator", "optimizer_d")


def inference_only(checkpoint: Path, destination: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "ema" in state:  # the averaged weights are the ones that sample well
        state["model"] = state.pop("ema")
    for key in TRAINING_ONLY:
        state.pop(key, None)
    atomic_write(destination, lambda tmp: torch.save(state, tmp))
    print(f"{destination.relative_to(ROOT)}: {destination.stat().st_size / 1e6:.1f} MB "
          f"(from {checkpoint}, epoch {state.get('epoch')})")


def copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    print(f"{destination.relative_to(ROOT)} <- {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_run", type=Path, help="folder with diffusion_model.pt and results/")
    parser.add_argument("--gan_run", type=Path, help="folder with gan_model.pt and results/")
    parser.add_argument("--audio_run", type=Path, help="folder with audio_autoencoder.pt and results/")
    parser.add_argument("--vae_run", type=Path, help="folder with audio_vae.pt and results/")
    parser.add_argument("--audio_expert", metavar="NAME=CHECKPOINT",
                        help="add this autoencoder checkpoint to the shipped autoencoder as the expert NAME")
    args = parser.parse_args()
    images = ROOT / "docs" / "images"
    if args.image_run:
        inference_only(args.image_run / "diffusion_model.pt", ROOT / "models" / "pretrained" / "diffusion_model.pt")
        results = args.image_run / "results"
        for name in ("final_samples.png", "denoising.gif", "training_loss.png",
                     "epoch_comparisons/metrics_comparison.png"):
            copy(results / name, images / Path(name).name)
    if args.gan_run:
        inference_only(args.gan_run / "gan_model.pt", ROOT / "models" / "pretrained" / "gan_model.pt")
        results = args.gan_run / "results"
        for name in ("final_samples.png", "latent_interpolation.gif", "training_loss.png"):
            copy(results / name, images / f"gan_{name}")
    if args.audio_run:
        inference_only(args.audio_run / "audio_autoencoder.pt", ROOT / "models" / "pretrained" / "audio_autoencoder.pt")
        results = args.audio_run / "results"
        for name in ("spectrogram_comparison.png", "training_curves.png"):
            copy(results / name, images / name)
        for wav in sorted(results.glob("audio_*.wav")):
            copy(wav, ROOT / "docs" / "audio" / wav.name)
    if args.vae_run:  # the learned prior stays: it is what --mode sample draws from
        inference_only(args.vae_run / "audio_vae.pt", ROOT / "models" / "pretrained" / "audio_vae.pt")
        copy(args.vae_run / "results" / "training_curves.png", images / "vae_training_curves.png")
    if args.audio_expert:  # after --audio_run: the expert joins the model just published
        name, _, path = args.audio_expert.partition("=")
        if not name or not path:
            parser.error(f"--audio_expert {args.audio_expert}: give NAME=CHECKPOINT, e.g. synthetic=runs/specialist/audio_autoencoder.pt")
        shipped = ROOT / "models" / "pretrained" / "audio_autoencoder.pt"
        try:
            state = audio_gen.attach_expert(shipped, Path(path), name)
        except audio_gen.UsageError as e:
            parser.error(str(e))
        atomic_write(shipped, lambda tmp: torch.save(state, tmp))
        print(f"{shipped.relative_to(ROOT)}: {shipped.stat().st_size / 1e6:.1f} MB with expert {name} (from {path})")


if __name__ == "__main__":
    main()
