"""Benchmark of audio_gen.py on audio no training run has heard: the project's corpus, held-out split.

The held-out split has voices of other languages and voice variants reading new sentences, and songs with
other General MIDI programs at tempos outside the training range (audio_gen.py's SPEECH_LANGUAGES,
VOICE_VARIANTS, GM_PROGRAMS, TEMPO_RANGES). Five parts, each optional:

  held-out   a checkpoint, per source (speech, music mixture, each stem, synthetic stems): mel MSE against PCA
             with the same latent budget, spectral convergence and log-spectral distance after the mel inverse
             + Griffin-Lim beside the Griffin-Lim ceiling (the same path from the original mel), PESQ-WB and
             STOI on speech; plus the held-out synthetic mixtures the earlier specialist was scored on; and the
             share of each source's clips that choose_coder hands to one of the checkpoint's experts.
  rate       rate-distortion: one model per latent budget (--budgets), trained the same way for --epochs epochs,
             against PCA at each budget and the ceiling; writes docs/audio/rate_distortion.png.
  long       a 10-minute file through `audio_gen.py --mode infer --input`: wall time and peak memory, beside a
             1-minute file (chunked reconstruction keeps memory flat).
  speed      one 5-s clip reconstructed on one thread.
  vae        the VAE (--vae_checkpoint) beside the autoencoder (--checkpoint) at the same latent budget: held-out mel
             MSE, and after the inverse STOI / PESQ-WB on speech and spectral convergence on music, with the KL
             rate; then the Frechet distance of mel statistics (below) to held-out clips, for prior samples,
             noise shaped by the training set's mean spectrum, the autoencoder's reconstructions and training clips.

Frechet distance of mel statistics: each 5-s clip (at one RMS) becomes 4 x 32 numbers, the mean and standard
deviation over time of each bin of a 32-bin log-mel and of its frame-to-frame difference; a Gaussian is fitted
to each set's features, and the distance is ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), as FID's.
The features need no trained network, so they score any model alike. Real sets are drawn by the training mix's
source shares (--corpus_mix of the checkpoint), the mix the VAE's prior was fitted to.

PCA: the mel is cut into 16-frame patches (n_mels x 16 numbers) and each keeps its top-k principal components,
fitted on training clips of the corpus with the checkpoint's normalisation: k numbers per 16 frames, the
autoencoder's latent budget.

    python audio_gen.py --mode corpus --corpus_dir data/corpus --corpus_minutes 90      # once, 3 minutes
    python benchmarks/bench_audio.py --corpus_dir data/corpus --parts held-out,long,speed
    python benchmarks/bench_audio.py --corpus_dir data/corpus --parts rate --epochs 2
    python benchmarks/bench_audio.py --corpus_dir data/corpus --parts vae
"""

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import audio_gen as ag  # noqa: E402

SPECIALIST_MSE, SPECIALIST_STD = 0.0291, 3.9627  # the synthetic-only model shipped before the corpus (its checkpoint)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="audio_gen.py on held-out speech and music")
    p.add_argument("--corpus_dir", default="data/corpus", help="a corpus rendered by audio_gen.py --mode corpus")
    p.add_argument("--checkpoint", default=str(ag.PRETRAINED_CHECKPOINT), help="the model scored by held-out, long, speed")
    p.add_argument("--parts", default="held-out,long,speed,vae", help="comma-separated: held-out, rate, long, speed, vae")
    p.add_argument("--vae_checkpoint", default=str(ag.PRETRAINED_DIR / ag.CHECKPOINT_NAMES["vae"]), help="vae: the VAE")
    p.add_argument("--fd_clips", type=int, default=256, help="vae: clips per set in the Frechet distance")
    p.add_argument("--wave_clips", type=int, default=24, help="held-out 5-s clips per source taken through Griffin-Lim")
    p.add_argument("--pca_clips", type=int, default=1500, help="training clips PCA is fitted on")
    p.add_argument("--budgets", default="16,32,64,128", help="rate: latent channels per 16 frames, one model each")
    p.add_argument("--epochs", type=int, default=2, help="rate: training epochs per model (an epoch: one draw per clip)")
    p.add_argument("--delta_weight", type=float, default=1.0,
                   help="rate: audio_gen.py's --delta_weight for every model (the published figure: 0, made before the flag)")
    p.add_argument("--sc_weight", type=float, default=0.2,
                   help="rate: audio_gen.py's --sc_weight for every model (the published figure: 0, made before the flag)")
    p.add_argument("--refine_steps", type=int, default=ag.REFINE_STEPS,
                   help="audio_gen.py's --refine_steps for every model scored (the published VAE table: 0, made before refinement)")
    p.add_argument("--long_minutes", type=float, default=10.0, help="long: length of the long input")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling of clips, initialisation and Griffin-Lim")
    return p.parse_args()


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def pca_reconstruct(train_mel: torch.Tensor, val_mel: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k principal components of 16-frame patches fitted on train_mel, applied to val_mel (B, n_mels, T)."""
    def patches(m):  # (B, n_mels, T) -> (B * T/16, n_mels * 16)
        B, C, T = m.shape
        return m.reshape(B, C, T // 16, 16).permute(0, 2, 1, 3).reshape(-1, C * 16)

    X = patches(train_mel).double()
    mu = X.mean(0)
    cov = (X - mu).T @ (X - mu) / len(X)
    V = torch.linalg.eigh(cov).eigenvectors[:, -k:].T  # (k, n_mels*16)
    rec = ((patches(val_mel).double() - mu) @ V.T @ V + mu).float()
    B, C, T = val_mel.shape
    return rec.reshape(B, T // 16, C, 16).permute(0, 2, 1, 3).reshape(B, C, T)


def normalised_mels(pre: ag.AudioPreprocessor, clips: torch.Tensor) -> torch.Tensor:
    """Clips (N, L) -> normalised log-mels at the model's level, as training and inference see them."""
    with torch.no_grad():
        return torch.cat([pre(c * pre.level_gain(c)) for c in clips.split(64)])


def after_inverse(pre: ag.AudioPreprocessor, clips: torch.Tensor, mels: torch.Tensor, speech: bool, seed: int) -> dict:
    """Waveform metrics of mels (at the clips' level) after the NNLS inverse and 32 Griffin-Lim iterations."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = pre.to_waveform(mels, clips.shape[-1], 32) / pre.level_gain(clips)
    return ag.waveform_metrics(clips, out, speech)


def held_out(cfg: argparse.Namespace, audio: ag.AudioModel, train: torch.Tensor, val: torch.Tensor,
             val_sources: list[str]) -> None:
    pre, model, k = audio.pre, audio.model, audio.config["latent_dim"]
    train_mel = normalised_mels(pre, train)
    print(f"\n== held-out corpus, checkpoint {audio.checkpoint} (epoch {audio.epoch}, {k} latent channels, "
          f"--refine_steps {cfg.refine_steps}); PCA fitted on {len(train)} training clips")
    print("| source | clips | to an expert | mel MSE: model / PCA | spectral convergence: model / PCA / ceiling | "
          "LSD dB: model / ceiling | PESQ-WB: model / PCA / ceiling | STOI: model / PCA / ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    labels = np.array(val_sources)
    for source in dict.fromkeys(val_sources):
        clips = val[torch.from_numpy(labels == source)]
        mel = normalised_mels(pre, clips)
        model_mel = torch.cat([ag.reconstruct_mel(model, pre, m, cfg.refine_steps) for m in mel.split(32)])
        expert = torch.cat([ag.choose_coder(model, m) > 0 for m in mel.split(32)]).float().mean().item()
        pca_mel = pca_reconstruct(train_mel, mel, k)
        mse = [ag.mel_metrics(mel, m, pre)["mse"] for m in (model_mel, pca_mel)]
        n, speech = min(cfg.wave_clips, len(clips)), source == "speech"
        w = [after_inverse(pre, clips[:n], m[:n], speech, cfg.seed) for m in (model_mel, pca_mel, mel)]
        fmt = lambda key: " / ".join(f"{x[key]:.3f}" if isinstance(x[key], float) else "n/a" for x in w)  # noqa: E731
        print(f"| {source} | {len(clips)} ({n}) | {expert:.0%} | {mse[0]:.4f} / {mse[1]:.4f} | {fmt('spectral_convergence')} | "
              f"{w[0]['log_spectral_distance_db']:.2f} / {w[2]['log_spectral_distance_db']:.2f} | "
              f"{fmt('pesq_wb') if speech else 'n/a'} | {fmt('stoi') if speech else 'n/a'} |", flush=True)
    # the earlier specialist's held-out set: synthetic mixtures 990-1099 of seed 0 (mel MSE 0.0291 there)
    synthetic = ag.SyntheticMUSDBDataset(1100, "mixture", 0)
    clips = torch.stack([synthetic[i] for i in range(990, 1100)])
    mel = normalised_mels(pre, clips)
    mse = ag.mel_metrics(mel, torch.cat([ag.reconstruct_mel(model, pre, m, cfg.refine_steps) for m in mel.split(32)]), pre)["mse"]
    expert = torch.cat([ag.choose_coder(model, m) > 0 for m in mel.split(32)]).float().mean().item()
    # MSE on the normalised log-mel depends on each model's std: compare in log-mel units (MSE x std^2)
    raw, specialist = mse * pre.std.item() ** 2, SPECIALIST_MSE * SPECIALIST_STD**2
    print(f"\nsynthetic mixtures 990-1099 (seed 0, the specialist's held-out set): normalised mel MSE {mse:.4f}, "
          f"{raw:.3f} in log-mel units; the synthetic-only specialist: {SPECIALIST_MSE} normalised by its std "
          f"{SPECIALIST_STD}, {specialist:.3f} in log-mel units ({100 * (raw / specialist - 1):+.1f}%); "
          f"{expert:.0%} of the clips handed to an expert")


def rate_distortion(cfg: argparse.Namespace, train: torch.Tensor, train_sources: list[str], val: torch.Tensor,
                    val_sources: list[str]) -> None:
    """One model per latent budget, trained as audio_gen.py trains (corpus draws, PCA start, AdamW, cosine)."""
    budgets = [int(b) for b in cfg.budgets.split(",")]
    pca_sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.pca_clips]
    steps_per_epoch = -(-len(train) // 16)
    labels = np.array(val_sources)
    speech = val[torch.from_numpy(labels == "speech")][: cfg.wave_clips]
    music = val[torch.from_numpy(labels == "music_mixture")][: cfg.wave_clips]
    # audio_gen.py's own flags and defaults, so each model is configured as `--mode train` would configure it
    tcfg = ag.parse_args(["--model", "ae", "--corpus_dir", cfg.corpus_dir, "--epochs", str(cfg.epochs),
                          "--batch_size", "16", "--seed", str(cfg.seed),
                          "--delta_weight", str(cfg.delta_weight), "--sc_weight", str(cfg.sc_weight)])  # validated
    cpu = torch.device("cpu")
    weights = ag.draw_weights(ag.AudioData(train, val, "corpus", True, train_sources, val_sources), tcfg.corpus_mix)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in budgets:
            start = time.perf_counter()
            tcfg.latent_dim = k
            ag.seed_everything(cfg.seed)
            # per budget, after the seed, as the published figure's run did: log_mels' DataLoader draws from that RNG
            pre = ag.AudioPreprocessor(tcfg.n_mels)
            train_mel = ag.log_mels(train, pre, 64, cpu)
            pre = ag.AudioPreprocessor(tcfg.n_mels, *ag.fit_normalisation(train_mel))
            train_mel = pre.normalise(train_mel)
            scored = {"speech": (speech, normalised_mels(pre, speech)), "music": (music, normalised_mels(pre, music))}
            model = ag.AudioAutoencoder(tcfg.n_mels, k, tcfg.hidden_channels)
            model.init_linear_path(train_mel)
            trainer = ag.AudioTrainer(model, pre, tcfg, cpu, 0, 1, steps_per_epoch, weights)
            trainer.fit(train_mel, scored["speech"][1], Path(tmp) / f"rd{k}.pt")
            model.eval()
            row = {"k": k, "minutes": (time.perf_counter() - start) / 60}
            for name, (clips, mel) in scored.items():
                model_mel = ag.reconstruct_mel(model, pre, mel, cfg.refine_steps)
                pca_mel = pca_reconstruct(train_mel[pca_sample], mel, k)
                for path, m in (("model", model_mel), ("pca", pca_mel), ("ceiling", mel)):
                    row[f"{name}_{path}"] = after_inverse(pre, clips, m, name == "speech", cfg.seed)
            rows.append(row)
            print(f"budget {k}: {row['minutes']:.1f} min, speech STOI {row['speech_model']['stoi']:.3f} "
                  f"(PCA {row['speech_pca']['stoi']:.3f}), music SC {row['music_model']['spectral_convergence']:.3f}",
                  flush=True)
    print(f"\n== rate-distortion: {cfg.epochs * steps_per_epoch} steps of batch 16 per model; rate = channels x "
          f"{ag.LATENT_FRAMES_PER_SECOND:.3f} latent frames/s")
    print("| channels / 16 frames | numbers/s | kbit/s at 32 / 8 bit | speech STOI: model / PCA | "
          "speech PESQ-WB: model / PCA | music SC: model / PCA |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rate = r["k"] * ag.LATENT_FRAMES_PER_SECOND
        print(f"| {r['k']} | {rate:.0f} | {rate * 32 / 1000:.1f} / {rate * 8 / 1000:.1f} | "
              f"{r['speech_model']['stoi']:.3f} / {r['speech_pca']['stoi']:.3f} | "
              f"{r['speech_model']['pesq_wb']:.2f} / {r['speech_pca']['pesq_wb']:.2f} | "
              f"{r['music_model']['spectral_convergence']:.3f} / {r['music_pca']['spectral_convergence']:.3f} |")
    ceiling = rows[0]
    print(f"Griffin-Lim ceiling: speech STOI {ceiling['speech_ceiling']['stoi']:.3f}, PESQ-WB "
          f"{ceiling['speech_ceiling']['pesq_wb']:.2f}, music SC {ceiling['music_ceiling']['spectral_convergence']:.3f}")
    shipped_point = None
    if Path(cfg.checkpoint).is_file():  # loaded only now: a training run may still be writing it
        shipped, s = ag.load_audio_model(cfg.checkpoint, "cpu"), {}
        for name, clips in (("speech", speech), ("music", music)):
            rec = [shipped.reconstruct(c, seed=cfg.seed, refine_steps=cfg.refine_steps) for c in clips]
            s[name] = ag.waveform_metrics(clips, torch.stack([r["wav_hat"] for r in rec]), name == "speech")
        shipped_point = (shipped.config["latent_dim"] * ag.LATENT_FRAMES_PER_SECOND, s)
        print(f"shipped model ({shipped.config['latent_dim']} channels, full training): speech STOI "
              f"{s['speech']['stoi']:.3f}, PESQ-WB {s['speech']['pesq_wb']:.2f}, music SC "
              f"{s['music']['spectral_convergence']:.3f}")
    plot_rate_distortion(rows, shipped_point, cfg.epochs * steps_per_epoch, ROOT / "docs" / "audio" / "rate_distortion.png")


def plot_rate_distortion(rows: list[dict], shipped: tuple | None, steps: int, path: Path) -> None:
    rates = [r["k"] * ag.LATENT_FRAMES_PER_SECOND for r in rows]
    panels = (("speech", "stoi", "held-out speech: STOI (higher is better)"),
              ("speech", "pesq_wb", "held-out speech: PESQ-WB (higher is better)"),
              ("music", "spectral_convergence", "held-out music: spectral convergence (lower is better)"))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for ax, (source, key, title) in zip(axes, panels):
        ax.plot(rates, [r[f"{source}_model"][key] for r in rows], "o-", label=f"autoencoder ({steps} steps)")
        ax.plot(rates, [r[f"{source}_pca"][key] for r in rows], "s--", label="PCA, same budget")
        ax.axhline(rows[0][f"{source}_ceiling"][key], color="gray", ls=":", label="Griffin-Lim ceiling")
        if shipped is not None:
            ax.plot([shipped[0]], [shipped[1][source][key]], "*", ms=14, color="C3", label="shipped model")
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:.0f}/s\n{r * 32 / 1000:.1f} | {r * 8 / 1000:.1f} kbit/s" for r in rates])
        ax.set(title=title, xlabel="latent numbers per second (kbit/s at 32 | 8 bit)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    ag.save_figure(fig, path)
    print(f"wrote {path}")


def long_input(cfg: argparse.Namespace, val: torch.Tensor) -> None:
    """Wall time and peak memory of `--mode infer --input` on a long file and on a 1-minute one, in fresh processes."""
    print(f"\n== long inputs through audio_gen.py --mode infer --input ({ag.CHUNK_SECONDS}-s chunks)")
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in (1.0, cfg.long_minutes):
            n = int(minutes * 60 * ag.SAMPLE_RATE)
            wav = val.flatten()[:n].repeat(-(-n // val.numel()))[:n]  # held-out speech and music, end to end
            path = Path(tmp) / f"long_{minutes:g}min.wav"
            sf.write(path, wav.numpy(), ag.SAMPLE_RATE, subtype="PCM_16")
            start = time.perf_counter()
            # VmHWM, not getrusage: ru_maxrss survives exec, so it would report this benchmark's own peak
            code = ("import re, sys, audio_gen; audio_gen.main(sys.argv[1:]); print('peak_kb', "
                    "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
            proc = subprocess.run([sys.executable, "-c", code, "--mode", "infer", "--input", str(path),
                                   "--checkpoint", cfg.checkpoint, "--results_dir", tmp],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            peak = int(proc.stdout.split("peak_kb")[-1]) / 1024
            print(f"{minutes:g} min of audio: {time.perf_counter() - start:.0f} s wall, peak memory {peak:.0f} MiB")


def speed(audio: ag.AudioModel, clip: torch.Tensor, refine_steps: int, repeats: int = 7) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        audio.reconstruct(clip, refine_steps=refine_steps)  # model and ceiling paths: NNLS + 32 Griffin-Lim each
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    print(f"\n5-s clip reconstructed on 1 thread (model and ceiling paths, --refine_steps {refine_steps}): "
          f"{np.median(times) * 1000:.0f} ms, median of {repeats}")


def mel_statistics(clips: torch.Tensor) -> np.ndarray:
    """Clips (N, L) -> (N, 128): per bin of a 32-bin log-mel, the mean and std over time, and those of its frame
    difference. Each clip is first brought to one RMS, as the models see it."""
    pre = ag.AudioPreprocessor(32)
    with torch.no_grad():
        mel = torch.cat([pre.log_mel(c * pre.level_gain(c)) for c in clips.split(64)])  # (N, 32, T)
    delta = mel.diff(dim=-1)
    return torch.cat([mel.mean(-1), mel.std(-1), delta.mean(-1), delta.std(-1)], dim=1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.linalg import sqrtm

    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def draw_by_mix(sources: list[str], mix: dict[str, float], n: int, seed: int) -> torch.Tensor:
    """n clip indices drawn without replacement, each source group (speech, music, synthetic) at its training share."""
    groups = [s.split("_")[0] for s in sources]
    weights = torch.tensor([mix.get(g, 0.0) / groups.count(g) for g in groups], dtype=torch.double)
    return torch.multinomial(weights, min(n, int((weights > 0).sum())), generator=torch.Generator().manual_seed(seed))


def shaped_noise(train: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n clips of Gaussian noise coloured by the training clips' mean power spectrum (at one RMS): a floor to beat."""
    pre, window = ag.AudioPreprocessor(32), torch.hann_window(ag.N_FFT)
    clips = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:512]]
    power = torch.stack([torch.stft(c * pre.level_gain(c), ag.N_FFT, ag.HOP, window=window, return_complex=True).abs()
                         .pow(2).mean(dim=(0, 2)) for c in clips.split(64)]).mean(0)  # (n_freqs,)
    g = torch.Generator().manual_seed(seed)
    frames = 1 + train.shape[-1] // ag.HOP
    spectrum = torch.complex(torch.randn(n, len(power), frames, generator=g), torch.randn(n, len(power), frames, generator=g))
    return torch.istft(spectrum * power.sqrt()[:, None], ag.N_FFT, ag.HOP, window=window, length=train.shape[-1])


def vae_benchmark(cfg: argparse.Namespace, train: torch.Tensor, train_sources: list[str], val: torch.Tensor,
                  val_sources: list[str]) -> None:
    ae, vae = ag.load_audio_model(cfg.checkpoint, "cpu"), ag.load_audio_model(cfg.vae_checkpoint, "cpu", model="vae")
    print(f"\n== VAE {vae.checkpoint} (epoch {vae.epoch}, beta {vae.config['kl_weight']}, free bits "
          f"{vae.config['free_bits']}) beside the autoencoder {ae.checkpoint} (epoch {ae.epoch}), "
          f"{vae.config['latent_dim']} latent channels each")
    labels = np.array(val_sources)
    print("| model | held-out mel MSE (all sources) | speech STOI | speech PESQ-WB | music mixture spectral convergence | "
          "KL rate | active channels |")
    print("|---|---|---|---|---|---|---|")
    speech, mixture = val[torch.from_numpy(labels == "speech")], val[torch.from_numpy(labels == "music_mixture")]
    rows = {}
    for name, audio in (("autoencoder", ae), ("VAE (posterior mean)", vae), ("Griffin-Lim ceiling", None)):
        pre = (audio or ae).pre
        mse = "0 (the original mel)"
        if audio is not None:
            mel = normalised_mels(pre, val)
            mel_hat = torch.cat([ag.reconstruct_mel(audio.model, pre, m, cfg.refine_steps) for m in mel.split(32)])
            mse = f"{ag.mel_metrics(mel, mel_hat, pre)['mse']:.4f}"
        scores = []
        for clips, is_speech in ((speech[: cfg.wave_clips], True), (mixture[: cfg.wave_clips], False)):
            mel = normalised_mels(pre, clips)
            out = ag.reconstruct_mel(audio.model, pre, mel, cfg.refine_steps) if audio is not None else mel
            scores.append(after_inverse(pre, clips, out, is_speech, cfg.seed))
        rate = "n/a", "n/a"
        if audio is vae:
            r = ag.latent_rate(vae.model, normalised_mels(vae.pre, val), 32)
            rate = f"{r['kl_nats_per_latent_frame']:.1f} nats/latent frame = {r['kl_bits_per_second']:.0f} bit/s", \
                   f"{r['active_channels']} of {r['latent_dim']}"
        rows[name] = mse
        print(f"| {name} | {mse} | {scores[0]['stoi']:.3f} | {scores[0]['pesq_wb']:.3f} | "
              f"{scores[1]['spectral_convergence']:.3f} | {rate[0]} | {rate[1]} |", flush=True)
    ratio = float(rows["VAE (posterior mean)"]) / float(rows["autoencoder"])
    print(f"VAE mel MSE / autoencoder mel MSE: {ratio:.3f} (target <= 1.2)")

    mix = ag.parse_corpus_mix(vae.config["corpus_mix"])
    n = cfg.fd_clips
    picked = draw_by_mix(val_sources, mix, 2 * n, cfg.seed)
    reference, others = val[picked[:n]], val[picked[n:]]  # two disjoint halves of the held-out split
    reconstructed = []
    for clips in others.split(16):
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            reconstructed.append(ag.reconstruct(ae.model, ae.pre, clips, 32, "nnls", cfg.seed, cfg.refine_steps)["wav_hat"])
    def draw(prior: str, temperature: float) -> torch.Tensor:
        return torch.cat([vae.sample(min(16, n - i), 5.0, temperature, cfg.seed + i, prior=prior)["wav_hat"]
                          for i in range(0, n, 16)])

    sets = {"held-out clips (the other half, real)": others}
    for prior in ("standard", "mixture") if vae.prior else ("standard",):
        for temperature in (1.0, 0.7):
            sets[f"VAE samples, {prior} prior, T = {temperature:g}"] = draw(prior, temperature)
    sets["noise shaped by the training mean spectrum"] = shaped_noise(train, n, cfg.seed)
    sets["autoencoder reconstructions of held-out clips"] = torch.cat(reconstructed)
    sets["training clips"] = train[draw_by_mix(train_sources, mix, n, cfg.seed)]
    real = mel_statistics(reference)
    print(f"\nFrechet distance of mel statistics to {len(reference)} held-out clips ({n} clips per set, drawn "
          f"{', '.join(f'{k} {v:.0%}' for k, v in mix.items())}):")
    print("| set | Frechet distance |\n|---|---|")
    distances = {}
    for name, clips in sets.items():
        distances[name] = frechet_distance(mel_statistics(clips), real)
        print(f"| {name} | {distances[name]:.1f} |", flush=True)
    noise = distances["noise shaped by the training mean spectrum"]
    for name, fd in distances.items():
        if name.startswith("VAE samples") and name.endswith("T = 1"):
            print(f"{name}: {noise / fd:.1f}x closer to real than the shaped noise (target >= 3x)")


def main() -> None:
    start = time.perf_counter()
    cfg = parse_args()
    parts = set(cfg.parts.split(","))
    print(f"command: python {' '.join(sys.argv)}\nmachine: {machine()}")
    root = Path(cfg.corpus_dir)
    if not (root / "manifest.json").is_file():
        raise SystemExit(f"error: no corpus at {root}: python audio_gen.py --mode corpus --corpus_dir {root}")
    # the training split (5 GB in memory at 90 minutes) only for the parts that fit PCA or train models
    train, train_sources = ag.corpus_split(root, "train") if parts & {"held-out", "rate", "vae"} else (None, None)
    val, val_sources = ag.corpus_split(root, "test")
    audio = ag.load_audio_model(cfg.checkpoint, "cpu") if parts & {"held-out", "speed"} else None
    if "held-out" in parts:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.pca_clips]
        held_out(cfg, audio, train[order], val, val_sources)
    if "rate" in parts:
        rate_distortion(cfg, train, train_sources, val, val_sources)
    if "long" in parts:
        long_input(cfg, val)
    if "speed" in parts:
        speed(audio, val[0], cfg.refine_steps)
    if "vae" in parts:
        vae_benchmark(cfg, train, train_sources, val, val_sources)
    print(f"\nbenchmark wall time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
