"""Benchmark of audio_gen.py: the autoencoder against PCA with the same latent budget, and its speed.

For each set (synthetic harmonic, synthetic mixture, real speech) both models are fitted on the same
training clips and scored on held-out clips:
  - mel MSE and cosine on the normalised log-mel (the training objective's domain);
  - on speech: wideband PESQ and STOI after the mel inverse + Griffin-Lim (32 iterations), for the
    project's NNLS inverse and torchaudio's InverseMelScale, beside the Griffin-Lim ceiling (same path
    started from the original mel);
and the time to reconstruct one 5-s clip (encode, decode, mel inverse, 32 Griffin-Lim iterations) on one thread.
PCA baseline: the mel is cut into 16-frame patches (n_mels x 16 numbers) and each is kept as its top 64
principal components: the 64 numbers per 16 frames the autoencoder's latent holds. The autoencoder's linear patch
path starts as this same PCA (audio_gen.py's init_linear_path), so the margin measures what training it together with
the convolutional path adds.

Speech is synthesised with Debian's espeak-ng (apt-get install espeak-ng), or read from --wav_dir.

    python benchmarks/bench_audio.py                       # about 15 minutes on one CPU thread
    python benchmarks/bench_audio.py --wav_dir ~/speech    # your own speech instead of espeak-ng
    python benchmarks/bench_audio.py --epochs 5 --sets harmonic    # a quick look
    python benchmarks/bench_audio.py --checkpoint models/pretrained/audio_autoencoder.pt   # a trained model vs PCA
"""

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import audio_gen as ag  # noqa: E402

WORDS = ("the a one two red green small large river mountain garden window morning evening people music "
         "quickly slowly often never always carry follow build listen remember answer open close water light "
         "stone paper table station market teacher doctor winter summer yellow quiet simple strong bright "
         "under over after before between through seven eleven twenty hundred bring take give find keep").split()
VOICES = ("en+m1", "en+m3", "en+m5", "en+m7", "en+f1", "en+f2", "en+f3", "en+f4", "en-us+m2", "en-us+f5")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="audio autoencoder vs PCA benchmark")
    p.add_argument("--sets", default="harmonic,mixture,speech", help="comma-separated: any synthetic stem, and speech")
    p.add_argument("--train_clips", type=int, default=768, help="5-s training clips per set")
    p.add_argument("--val_clips", type=int, default=24, help="5-s held-out clips per set")
    p.add_argument("--epochs", type=int, default=40, help="autoencoder epochs over the training clips")
    p.add_argument("--batch_size", type=int, default=16, help="autoencoder batch size")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="autoencoder peak learning rate (warm-up, cosine)")
    p.add_argument("--weight_decay", type=float, default=0.05, help="autoencoder AdamW weight decay")
    p.add_argument("--hidden_channels", type=int, default=192, help="autoencoder hidden channels")
    p.add_argument("--latent_dim", type=int, default=64, help="latent channels per 16 frames = PCA components per 16-frame patch")
    p.add_argument("--checkpoint", default=None,
                   help="score this trained audio_gen.py checkpoint instead of training: against PCA fitted on its own "
                        "synthetic training clips, on its own held-out clips")
    p.add_argument("--wav_dir", default=None, help="speech folder to use instead of espeak-ng")
    p.add_argument("--threads", type=int, default=1, help="torch threads (timings are always on one)")
    p.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and Griffin-Lim")
    return p.parse_args()


def espeak_clips(n: int, seed: int, workdir: Path) -> torch.Tensor:
    """n 5-s clips of espeak-ng speech: random word sequences, ten voices, varied rate and pitch."""
    rng = np.random.default_rng(seed)
    stream, k = [], 0
    while sum(s.numel() for s in stream) < (n + 1) * ag.CLIP_SAMPLES:
        text = " ".join(rng.choice(WORDS, rng.integers(8, 16)))
        out = workdir / f"utt_{seed}_{k}.wav"
        subprocess.run(["espeak-ng", "-v", VOICES[k % len(VOICES)], "-s", str(rng.integers(135, 185)),
                        "-p", str(rng.integers(30, 70)), "-w", str(out), text], check=True)
        stream += [ag.read_audio(out), torch.zeros(int(rng.uniform(0.1, 0.4) * ag.SAMPLE_RATE))]
        k += 1
    return torch.stack(ag.cut_segments(torch.cat(stream))[:n])


def load_set(name: str, cfg: argparse.Namespace, workdir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train clips, held-out clips, description), each (N, CLIP_SAMPLES)."""
    if name != "speech":
        ds = ag.SyntheticMUSDBDataset(cfg.train_clips + cfg.val_clips, name, cfg.seed)
        clips = torch.stack([ds[i] for i in range(len(ds))])
        return clips[: cfg.train_clips], clips[cfg.train_clips :], f"synthetic {name}"
    if cfg.wav_dir:
        clips = ag.load_segments(sorted(p for p in Path(cfg.wav_dir).rglob("*") if p.suffix.lower() in ag.AUDIO_SUFFIXES))
        n_val = max(1, len(clips) // 10)
        return clips[n_val:], clips[:n_val], f"speech from {cfg.wav_dir}"
    # different seeds: held-out sentences never appear in training (the ten voices do)
    return (espeak_clips(cfg.train_clips, cfg.seed, workdir), espeak_clips(cfg.val_clips, cfg.seed + 1, workdir),
            "espeak-ng speech, 10 voices")


def train_autoencoder(train: torch.Tensor, val: torch.Tensor, cfg: argparse.Namespace, workdir: Path) -> tuple:
    """The project's own training on these clips, as audio_gen.py's train() does it: normalisation fitted on the training
    clips, mels computed once, linear path set to their PCA, then AudioTrainer. Returns (model, preprocessor,
    training mels, held-out mels, seconds)."""
    tcfg = argparse.Namespace(epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                              weight_decay=cfg.weight_decay, seed=cfg.seed,
                              n_mels=128, latent_dim=cfg.latent_dim, hidden_channels=cfg.hidden_channels, stem="bench",
                              num_samples=len(train), audio_dir=None, musdb_root=None)
    ag.seed_everything(cfg.seed)
    model = ag.AudioAutoencoder(128, cfg.latent_dim, cfg.hidden_channels)
    start = time.perf_counter()
    cpu = torch.device("cpu")
    pre = ag.AudioPreprocessor(128)
    train_mel, val_mel = ag.log_mels(train, pre, 64, cpu), ag.log_mels(val, pre, 64, cpu)
    pre = ag.AudioPreprocessor(128, *ag.fit_normalisation(train_mel))
    train_mel, val_mel = pre.normalise(train_mel), pre.normalise(val_mel)
    model.init_linear_path(train_mel)
    trainer = ag.AudioTrainer(model, pre, tcfg, cpu, 0, 1, steps_per_epoch=-(-len(train) // cfg.batch_size))
    trainer.fit(train_mel, val_mel, workdir / "ae.pt")
    return model.eval(), pre, train_mel, val_mel, time.perf_counter() - start


def pca_reconstruct(train_mel: torch.Tensor, val_mel: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k principal components of 16-frame patches fitted on train_mel, applied to val_mel (B, n_mels, T)."""
    def patches(m):  # (B, n_mels, T) -> (B * T/16, n_mels * 16)
        B, C, T = m.shape
        return m.reshape(B, C, T // 16, 16).permute(0, 2, 1, 3).reshape(-1, C * 16)

    X = patches(train_mel).double()
    mu = X.mean(0)
    V = torch.linalg.svd(X - mu, full_matrices=False).Vh[:k]  # (k, n_mels*16)
    P = patches(val_mel).double()
    rec = ((P - mu) @ V.T @ V + mu).float()
    B, C, T = val_mel.shape
    return rec.reshape(B, T // 16, C, 16).permute(0, 2, 1, 3).reshape(B, C, T)


def speech_scores(wav: torch.Tensor, mel: torch.Tensor, pre, inverse: str, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    out = pre.to_waveform(mel, wav.shape[-1], 32, inverse)
    w = ag.waveform_metrics(wav, out, speech_like=True)
    return w["pesq_wb"], w["stoi"]


def time_reconstruction(model, pre, clip: torch.Tensor, repeats: int = 7) -> tuple[float, float]:
    """Median seconds for the whole 5-s reconstruction, and for Griffin-Lim alone, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    full, gl = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            mel_hat = model(pre(clip))
            linear = pre.mel_to_linear(pre.mel_power(mel_hat))
            t1 = time.perf_counter()
            pre.griffin_lim(linear, clip.shape[-1], 32)
            t2 = time.perf_counter()
            full.append(t2 - t0), gl.append(t2 - t1)
    torch.set_num_threads(threads)
    return float(np.median(full)), float(np.median(gl))


def batched(fn, x: torch.Tensor, size: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def score_checkpoint(path: Path, cfg: argparse.Namespace) -> None:
    """A trained checkpoint against PCA on the checkpoint's own split of its synthetic set: PCA is fitted on the
    clips the autoencoder trained on, with the checkpoint's normalisation, and both are scored on the held-out clips."""
    try:
        ckpt = ag.load_checkpoint(path)
        model, pre = ag.model_from_checkpoint(ckpt, path)
    except ag.UsageError as e:
        raise SystemExit(f"error: {e}") from None
    c = ckpt["config"]
    if c["audio_dir"] or c["musdb_root"]:
        raise SystemExit(f"error: {path} was trained on real audio; --checkpoint scores synthetic checkpoints only")
    train_set, val_set, desc, _ = ag.build_datasets(argparse.Namespace(**c))
    train, val = (torch.stack([ds[i] for i in range(len(ds))]) for ds in (train_set, val_set))
    model.eval()
    train_mel, val_mel = batched(pre, train), batched(pre, val)
    ae_mel, pca_mel = batched(model, val_mel), pca_reconstruct(train_mel, val_mel, c["latent_dim"])
    ae, pca = ag.mel_metrics(val_mel, ae_mel, pre), ag.mel_metrics(val_mel, pca_mel, pre)
    print(f"checkpoint {path}: {desc}, epoch {ckpt['epoch']}, hidden {c['hidden_channels']}, latent {c['latent_dim']}; "
          f"{len(train)} training / {len(val)} held-out clips")
    print("| set | AE MSE | PCA MSE | AE vs PCA | AE cosine | PCA cosine | AE PESQ proxy | PCA PESQ proxy |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {desc} | {ae['mse']:.4f} | {pca['mse']:.4f} | {100 * (ae['mse'] / pca['mse'] - 1):+.1f}% MSE | {ae['cosine']:.4f} | "
          f"{pca['cosine']:.4f} | {ae['pesq_proxy']:.3f} | {pca['pesq_proxy']:.3f} |")


def main() -> None:
    start = time.perf_counter()
    cfg = parse_args()
    torch.set_num_threads(cfg.threads)
    if cfg.checkpoint:
        score_checkpoint(Path(cfg.checkpoint), cfg)
        return
    sets = cfg.sets.split(",")
    if "speech" in sets and not cfg.wav_dir and shutil.which("espeak-ng") is None:
        print("espeak-ng is not installed: the speech set is skipped (apt-get install espeak-ng, or pass --wav_dir)")
        sets.remove("speech")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    header = (f"command: python {' '.join(sys.argv)}\nmachine: {cpu}, torch {torch.__version__}, "
              f"{cfg.threads} training thread(s), timings on 1 thread")
    print(header)
    rows, speech_rows, timing = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in sets:
            train, val, desc = load_set(name, cfg, workdir)
            print(f"\n== {desc}: {len(train)} training / {len(val)} held-out 5-s clips", flush=True)
            model, pre, train_mel, val_mel, seconds = train_autoencoder(train, val, cfg, workdir)
            with torch.no_grad():
                ae_mel, pca_mel = model(val_mel), pca_reconstruct(train_mel, val_mel, cfg.latent_dim)
            ae, pca = ag.mel_metrics(val_mel, ae_mel, pre), ag.mel_metrics(val_mel, pca_mel, pre)
            rows.append((desc, ae, pca, seconds))
            if name == "speech":
                for inverse in ("nnls", "torchaudio"):
                    for path, mel in (("autoencoder", ae_mel), ("PCA", pca_mel), ("ceiling (original mel)", val_mel)):
                        speech_rows.append((inverse, path, *speech_scores(val, mel, pre, inverse, cfg.seed)))
                timing = time_reconstruction(model, pre, val[:1])
            elif timing is None and name == sets[-1]:
                timing = time_reconstruction(model, pre, val[:1])

    print(f"\n{header}\n")
    print(f"held-out mel (normalised log-mel), latent budget {cfg.latent_dim} numbers per 16 frames (compression 32x):")
    print("| set | AE MSE | PCA MSE | AE vs PCA | AE cosine | PCA cosine | AE training |")
    print("|---|---|---|---|---|---|---|")
    for desc, ae, pca, seconds in rows:
        margin = 100 * (ae["mse"] / pca["mse"] - 1)  # negative: the autoencoder's error is lower
        print(f"| {desc} | {ae['mse']:.4f} | {pca['mse']:.4f} | {margin:+.1f}% MSE | {ae['cosine']:.4f} | {pca['cosine']:.4f} | "
              f"{cfg.epochs} epochs, {seconds / 60:.1f} min |")
    if speech_rows:
        print("\nspeech after mel inverse + 32 Griffin-Lim iterations (wideband PESQ, STOI; mean over held-out clips):")
        print("| mel inverse | from | PESQ-WB | STOI |")
        print("|---|---|---|---|")
        for inverse, path, p, s in speech_rows:
            print(f"| {inverse} | {path} | {p:.3f} | {s:.3f} |")
        nnls = {path: p for inverse, path, p, _ in speech_rows if inverse == "nnls"}
        print(f"\nPESQ gain of the autoencoder over PCA (NNLS inverse): {nnls['autoencoder'] - nnls['PCA']:+.3f}")
    if timing:
        print(f"\n5-s clip reconstructed (encode, decode, NNLS mel inverse, 32 Griffin-Lim iterations) on 1 thread: "
              f"{timing[0] * 1000:.0f} ms (Griffin-Lim alone {timing[1] * 1000:.0f} ms), median of 7")
    print(f"\nbenchmark wall time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
