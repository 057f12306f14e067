"""Streamlit web interface for both models: draw MNIST digits, reconstruct your own audio, and where an audio VAE
is served, draw new clips from its prior and walk between two of yours.

    make webapp                                             # http://127.0.0.1:8501
    streamlit run webapp.py                                 # the same; .streamlit/config.toml keeps it headless
    streamlit run webapp.py --server.address 127.0.0.1 --server.port 8502

The page holds only widgets and the cache: loading a checkpoint, sampling and reconstructing are the
scripts' own inference surfaces, and the limits (samples, steps, Griffin-Lim iterations, upload size and
duration) are api.py's, so the page refuses exactly what the API refuses. The models load once per
process (st.cache_resource) and every browser session shares them; a lock per model runs one request
at a time, as the API's lanes do. Nothing is fetched from the internet and no usage statistics are sent.
"""

import hashlib
import io
import os
import threading
import time

import numpy as np
import pydantic
import streamlit as st
import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import make_grid

import api
import audio_gen
import image_gen

# ----------------------------------------------------------------------------
# Config: the benchmark figures shown beside each setting (README, "Results at a glance")
# ----------------------------------------------------------------------------
UPSCALE = 4  # 28-px digits drawn at 112 px, nearest neighbour
FID_SOURCE = ("1,000 samples of the shipped model (100 per digit, sample seed 1) against the 10,000 MNIST test "
              "images, TF-Inception pool3; commands and machines in docs/image.md, sections 2, 5 and 6")
FID = {  # (model, sampler, steps, eta, guidance) -> FID-1k of the shipped checkpoint
    ("diffusion", "ddpm", 1000, 0.0, 1.0): 9.90, ("diffusion", "ddpm", 1000, 0.0, 1.5): 10.26,
    ("diffusion", "ddpm", 1000, 0.0, 2.0): 11.86,
    ("diffusion", "ddim", 5, 0.0, 1.0): 18.69, ("diffusion", "ddim", 10, 0.0, 1.0): 13.59,
    ("diffusion", "ddim", 20, 0.0, 1.0): 12.5,
    ("diffusion", "ddim", 50, 0.0, 1.0): 12.74, ("diffusion", "ddim", 50, 1.0, 1.0): 10.4,
    ("diffusion", "ddim", 50, 0.0, 1.5): 12.24, ("diffusion", "ddim", 50, 0.0, 2.0): 13.51,
    ("diffusion", "dpmpp", 10, 0.0, 1.0): 13.01,
    ("gan", "gan", 1, 0.0, 1.0): 18.38,
}
SPEED_SOURCE = "batch 100, one CPU thread, bf16 autocast: `benchmarks/bench_image.py --only speed` and `--only gan`"
MS_PER_IMAGE_STEP = {"diffusion": 1.0, "gan": 0.53}  # DDIM-50 at 50 ms/image, DDPM-1000 at 1.01 s; the GAN's one step
UNMEASURED = "—"  # a setting the benchmark did not measure
# The same IAG_* variables as api.py; unset, the checkpoints are the ones --mode infer picks.
TORCH_THREADS = os.environ.get("IAG_TORCH_THREADS", "1")  # checked against api.FLAG_LIMITS below, as the API does
IMAGE_CHECKPOINT = os.environ.get("IAG_IMAGE_CHECKPOINT")
GAN_CHECKPOINT = os.environ.get("IAG_GAN_CHECKPOINT")
AUDIO_CHECKPOINT = os.environ.get("IAG_AUDIO_CHECKPOINT")
VAE_CHECKPOINT = os.environ.get("IAG_VAE_CHECKPOINT")  # unset: models/audio_vae.pt or the shipped one, if either exists


# ----------------------------------------------------------------------------
# Models: loaded once per process, shared by every session, one call at a time each
# ----------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the image models…")
def image_models(checkpoint: str | None, gan_checkpoint: str | None) -> dict[str, tuple[image_gen.ImageGenerator,
                                                                                        threading.Lock]]:
    """Keyed by the checkpoints, as every cached model here, so that other IAG_* settings get their own."""
    torch.set_num_threads(TORCH_THREADS)
    models = {"diffusion": (image_gen.load_image_generator(checkpoint, model="diffusion"), threading.Lock())}
    try:
        models["gan"] = (image_gen.load_image_generator(gan_checkpoint, model="gan"), threading.Lock())
    except image_gen.UsageError:
        if gan_checkpoint:
            raise
        # no GAN checkpoint trained or shipped: diffusion only
    return models


@st.cache_resource(show_spinner="Loading the audio autoencoder…")
def audio_model(checkpoint: str | None) -> tuple[audio_gen.AudioModel, threading.Lock]:
    torch.set_num_threads(TORCH_THREADS)
    return audio_gen.load_audio_model(checkpoint), threading.Lock()


@st.cache_resource(show_spinner="Loading the audio VAE…")
def vae_model(checkpoint: str | None) -> tuple[audio_gen.AudioModel, threading.Lock] | None:
    """The VAE the API would serve (api.load_vae), or None where none is trained or shipped; keyed by the checkpoint
    so that a different IAG_VAE_CHECKPOINT gets its own."""
    torch.set_num_threads(TORCH_THREADS)
    vae = api.load_vae(checkpoint, None)
    return None if vae is None else (vae, threading.Lock())


# ----------------------------------------------------------------------------
# Pictures and sounds as bytes
# ----------------------------------------------------------------------------
def enlarge(image_u8: np.ndarray) -> Image.Image:
    image = Image.fromarray(image_u8, mode="L")
    return image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.NEAREST)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digit_grid(images_u8: np.ndarray, digit: int | None, conditional: bool) -> np.ndarray:
    """Balanced samples with one digit per column (the page is wide, unlike the CLI's one per row), else
    the API's near-square grid."""
    if not conditional or digit is not None:
        return api.grid_u8(images_u8, digit, conditional)
    labels = image_gen.balanced_labels(len(images_u8), None, "cpu").numpy()
    rows = np.bincount(labels, minlength=10).max()
    cells = np.full((rows, 10, *images_u8.shape[1:]), 255, np.uint8)  # (row, digit, H, W), blank cells white
    for image, label, row in zip(images_u8, labels, np.arange(len(labels)) - np.searchsorted(labels, labels),
                                 strict=True):
        cells[row, label] = image
    cells = torch.from_numpy(cells.reshape(-1, *images_u8.shape[1:]))[:, None]  # (rows * 10, 1, H, W)
    return make_grid(cells, nrow=10, padding=2, pad_value=255)[0].numpy()


def animation_gif(frames: list[np.ndarray], digit: int | None, conditional: bool) -> bytes:
    """Each frame (N, 28, 28) as a grid, the last held for 1.5 s: the denoising, or the GAN's latent walk."""
    pictures = [enlarge(digit_grid(frame, digit, conditional)) for frame in frames]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:],
                     duration=[80] * (len(pictures) - 1) + [1500], loop=0)
    return buffer.getvalue()


def mel_figure(mel: torch.Tensor, mel_hat: torch.Tensor) -> Figure:
    """Original and reconstructed log-mel side by side, on one colour scale."""
    fig = Figure(figsize=(10, 3.2))
    low, high = mel.min().item(), mel.max().item()
    for ax, (title, m) in zip(fig.subplots(1, 2, sharey=True), [("original", mel), ("reconstructed", mel_hat)],
                              strict=True):
        ax.imshow(m.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high, cmap="magma")
        ax.set_title(f"{title} log-mel", fontsize=10)
        ax.set_xlabel("frame")
    fig.axes[0].set_ylabel("mel bin")
    fig.tight_layout()
    return fig


def mel_grid_figure(mels: torch.Tensor, titles: list[str], columns: int = 4) -> Figure:
    """Generated log-mels (N, n_mels, T) side by side on one colour scale, as audio_gen's vae_samples.png."""
    columns = min(columns, len(mels))
    rows = -(-len(mels) // columns)
    fig = Figure(figsize=(3.2 * columns, 2.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    low, high = mels.min().item(), mels.max().item()
    for ax, mel, title in zip(axes.flat, mels, titles):
        ax.imshow(mel.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high, cmap="magma")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])  # two statements: Streamlit's magic would print a bare tuple on the page
        ax.set_yticks([])
    for ax in axes.flat[len(mels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def first_error(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or 'settings'}: {first['msg'].removeprefix('Value error, ')}"


# ----------------------------------------------------------------------------
# Digits tab
# ----------------------------------------------------------------------------
@st.cache_data
def shipped_sha256(kind: str) -> str | None:
    path = image_gen.PRETRAINED_DIR / f"{kind}_model.pt"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def figures_for(generator: image_gen.ImageGenerator, sampler: str, steps: int, eta: float,
                guidance: float) -> tuple[str, str]:
    """The measured FID of this setting (only for the shipped checkpoint, which the benchmark scored, else "—")
    and its expected sampling time per image."""
    diffusion = generator.kind == "diffusion"
    network_steps = (api.DDPM_STEPS if sampler == "ddpm" else steps) if diffusion else 1
    key = (generator.kind, sampler, network_steps, eta if sampler == "ddim" else 0.0, guidance if diffusion else 1.0)
    fid = f"{FID[key]:.1f}" if key in FID and generator.sha256 == shipped_sha256(generator.kind) else UNMEASURED
    cost = MS_PER_IMAGE_STEP[generator.kind] * network_steps * (2 if diffusion and guidance != 1 else 1)
    return fid, f"≈ {cost:.0f} ms" if cost >= 1 else f"≈ {cost:.1f} ms"


def digits_tab() -> None:
    models = image_models(IMAGE_CHECKPOINT, GAN_CHECKPOINT)
    model = st.radio("Model", list(models), horizontal=True, key="model", help="the GAN appears here once one is trained")
    generator, lock = models[model]
    with st.form("digits"):
        left, right = st.columns(2)
        digit = left.selectbox("Digit", ["all ten", *range(10)], key="digit", disabled=not generator.class_conditional)
        num_samples = left.slider("Samples", 1, api.MAX_NUM_SAMPLES, 30, key="num_samples")
        seed = left.number_input("Seed", 0, 2**32 - 1, 0, key="seed", help="the same seed and settings draw the same digits")
        samplers = list(generator.samplers)
        sampler = right.selectbox("Sampler", samplers, index=samplers.index(api.DEFAULT_SAMPLER[generator.kind]), key="sampler",
                                  help="ddpm walks all 1000 steps; ddim and dpmpp take the steps below")
        steps = right.slider("Steps", 1, 200, image_gen.DEFAULT_STEPS, key="steps", disabled=generator.kind == "gan")
        diffusion = generator.kind == "diffusion"
        guidance = right.slider("Guidance scale", 0.0, 5.0, image_gen.DEFAULT_GUIDANCE, 0.5, key="guidance",
                                disabled=not (diffusion and generator.class_conditional))
        eta = right.slider("η (DDIM noise)", 0.0, 1.0, 0.0, 0.5, key="eta", disabled=not diffusion)
        submitted = st.form_submit_button("Generate", type="primary")
    fid, speed = figures_for(generator, sampler, steps, eta, guidance)
    fid_column, speed_column, source_column = st.columns([1, 1, 4])
    fid_column.metric("FID-1k of this setting", fid, help="— : not measured by the benchmark, or not the shipped model")
    speed_column.metric("Sampling per image", speed, help="— : not measured by the benchmark")
    source_column.caption(f"Benchmark figures. FID: {FID_SOURCE}. Speed: {SPEED_SOURCE}; guidance runs the U-Net "
                          f"twice.")

    if submitted:
        chosen = None if digit == "all ten" else int(digit)
        try:
            request = api.ImageRequest(model=model, digit=chosen, num_samples=num_samples, sampler=sampler,
                                       steps=steps, guidance_scale=guidance if diffusion else 1.0,
                                       eta=eta if diffusion else 0.0, seed=int(seed))  # the GAN has neither
        except pydantic.ValidationError as error:
            st.error(first_error(error))
            return
        frames: list[np.ndarray] = []
        with st.status(f"Drawing {num_samples} digits with {sampler}…", expanded=False) as status:
            started = time.monotonic()
            with lock:
                images = generator.generate(request.num_samples, digit=request.digit, sampler=request.sampler,
                                            steps=request.steps, guidance_scale=request.guidance_scale,
                                            eta=request.eta, seed=request.seed, frames=frames)
                if generator.kind == "gan":  # one step, nothing to denoise: walk its latent space instead
                    frames = generator.interpolate(request.num_samples, request.digit, request.seed)
            seconds = time.monotonic() - started
            status.update(label=f"Drew {num_samples} digits in {seconds:.2f} s", state="complete")
        grid = enlarge(digit_grid(images, request.digit, generator.class_conditional))
        st.session_state.drawn = {"grid": png(grid), "gif": animation_gif(frames, request.digit,
                                                                           generator.class_conditional),
                                   "caption": f"{num_samples} samples, {sampler}, seed {request.seed}, "
                                              f"{seconds:.2f} s",
                                   "animation": ("latent walk (slerp through 4 latents)", "latent_interpolation.gif")
                                   if generator.kind == "gan" else ("noise → digits", "denoising.gif")}

    if drawn := st.session_state.get("drawn"):
        grid_column, gif_column = st.columns(2)
        grid_column.image(drawn["grid"], caption=drawn["caption"], output_format="PNG")
        grid_column.download_button("Download the grid (PNG)", drawn["grid"], "digits.png", "image/png")
        what, name = drawn["animation"]
        gif_column.image(drawn["gif"], caption=what, output_format="GIF")
        gif_column.download_button("Download the animation (GIF)", drawn["gif"], name, "image/gif")


# ----------------------------------------------------------------------------
# Audio tab
# ----------------------------------------------------------------------------
def metrics_table(metrics: dict) -> dict[str, list]:
    """Rows of the waveform metrics, the autoencoder beside the Griffin-Lim ceiling (the original mel inverted)."""
    model, ceiling = metrics["waveform"]["autoencoder"], metrics["waveform"]["griffin_lim_ceiling"]
    names = {"spectral_convergence": "spectral convergence (lower is better)",
             "log_spectral_distance_db": "log-spectral distance, dB (lower is better)",
             "pesq_wb": "PESQ-WB (speech, higher is better)", "stoi": "STOI (speech, higher is better)"}

    def show(value: float | str) -> str:
        return value if isinstance(value, str) else f"{value:.3f}"

    return {"metric": list(names.values()), "autoencoder": [show(model[k]) for k in names],
            "Griffin-Lim ceiling": [show(ceiling[k]) for k in names]}


def checked_audio(upload, seconds: float | None = None) -> torch.Tensor:
    """An upload as (L,) at 16 kHz, refused as the API refuses it (api.Problem: too large, not audio, too long;
    audio_gen.UsageError: silent, too short, NaN) before any model work; cut to `seconds` when given."""
    data = upload.getvalue()
    if len(data) > api.MAX_UPLOAD_MB * 1e6:
        raise api.Problem(413, f"the file exceeds the {api.MAX_UPLOAD_MB} MB limit")
    api.probe_audio(data, api.MAX_AUDIO_SECONDS)  # not audio, or too long: refused before any work
    wav = audio_gen.decode_audio(data, name=upload.name)
    return wav if seconds is None else wav[: round(seconds * audio_gen.SAMPLE_RATE)]


def audio_tab() -> None:
    model, lock = audio_model(AUDIO_CHECKPOINT)
    source = st.radio("Audio", ["Upload a file", "Record with the microphone"], horizontal=True, key="source")
    if source == "Upload a file":
        upload = st.file_uploader(f"{api.AUDIO_FORMATS}, at most {api.MAX_AUDIO_SECONDS:g} s",
                                  type=["wav", "flac", "ogg"], key="upload")
    else:
        upload = st.audio_input("Record a clip", key="recording")
    left, right = st.columns(2)
    iterations = left.slider("Griffin-Lim iterations", 1, api.MAX_GRIFFIN_LIM_ITERS, 32, key="griffin_lim_iters")
    refine = left.slider("Latent refinement steps", 0, api.MAX_REFINE_STEPS, audio_gen.REFINE_STEPS, key="refine_steps")
    speech = right.checkbox("Speech (adds PESQ-WB and STOI)", value=True, key="speech")
    if upload is not None and st.button("Reconstruct", type="primary", key="reconstruct"):
        try:
            wav = checked_audio(upload)
        except (api.Problem, audio_gen.UsageError) as error:
            st.error(error.detail if isinstance(error, api.Problem) else str(error))
            return
        with st.status(f"Reconstructing {wav.numel() / model.sample_rate:.1f} s…") as status:
            started = time.monotonic()
            with lock:
                rec = model.reconstruct(wav, griffin_lim_iters=iterations, refine_steps=refine)
                metrics = model.metrics(wav, rec, speech_like=speech)
            status.update(label=f"Reconstructed in {time.monotonic() - started:.2f} s", state="complete")
        st.session_state.reconstructed = {"wav": wav.numpy(), "rec": rec, "metrics": metrics,
                                  "wav_bytes": api.wav_bytes(rec["wav_hat"], model.sample_rate)}

    if done := st.session_state.get("reconstructed"):
        st.pyplot(mel_figure(done["rec"]["mel"], done["rec"]["mel_hat"]))
        original, reconstructed = st.columns(2)
        original.caption("original (16 kHz mono)")
        original.audio(done["wav"], sample_rate=model.sample_rate)
        reconstructed.caption(f"reconstructed ({model.kind}, Griffin-Lim)")
        reconstructed.audio(done["wav_bytes"], format="audio/wav")
        reconstructed.download_button("Download the reconstruction (WAV)", done["wav_bytes"], "reconstruction.wav",
                                      "audio/wav")
        st.table(metrics_table(done["metrics"]))
        st.caption(f"mel MSE {done['metrics']['mel']['mse']:.4f}. The Griffin-Lim ceiling inverts the original "
                   f"mel through the same path: what a perfect autoencoder would score.")


# ----------------------------------------------------------------------------
# Audio VAE tab: samples from the prior, a walk between two clips
# ----------------------------------------------------------------------------
def vae_tab(vae: audio_gen.AudioModel, lock: threading.Lock) -> None:
    described = api.describe_vae(vae)
    st.caption(f"{vae.checkpoint.name}: epoch {vae.epoch}, latent_dim {described['latent_dim']}, "
               f"prior {' or '.join(described['priors'])}")
    st.subheader("Sample from the prior")
    with st.form("vae_sample"):
        left, right = st.columns(2)
        num_samples = left.slider("Clips", 1, api.MAX_AUDIO_SAMPLES, 4, key="vae_num_samples")
        seconds = left.slider("Seconds each", api.CLIP_SECONDS.low, api.MAX_AUDIO_SECONDS, 5.0, 0.5, key="vae_seconds",
                              help=f"clips x seconds ≤ {api.MAX_GENERATED_SECONDS:g} s, as the API allows")
        seed = left.number_input("Seed", 0, int(api.AUDIO_SEED.high), 0, key="vae_seed")
        prior = right.selectbox("Prior", described["priors"], key="vae_prior",
                                help="mixture: the clip mixture fitted to the training codes; standard: N(0, I)")
        temperature = right.slider("Temperature", 0.0, 2.0, 1.0, 0.1, key="vae_temperature",
                                   help="0: the prior's means; 1: as trained; above 1: wilder")
        iterations = right.slider("Griffin-Lim iterations", 1, api.MAX_GRIFFIN_LIM_ITERS, 32, key="vae_griffin_lim_iters")
        submitted = st.form_submit_button("Sample", type="primary")
    if submitted:
        try:
            request = api.AudioSampleRequest(num_samples=num_samples, seconds=seconds, temperature=temperature,
                                             prior=prior, seed=int(seed), griffin_lim_iters=iterations)
        except pydantic.ValidationError as error:
            st.error(first_error(error))
        else:
            with st.status(f"Drawing {num_samples} clips of {seconds:g} s…") as status:
                started = time.monotonic()
                with lock:
                    out = vae.sample(request.num_samples, seconds=request.seconds, temperature=request.temperature,
                                     seed=request.seed, griffin_lim_iters=request.griffin_lim_iters, prior=request.prior)
                status.update(label=f"Drew {num_samples} clips in {time.monotonic() - started:.2f} s", state="complete")
            st.session_state.vae_sampled = {
                "mel_hat": out["mel_hat"], "clips": [api.wav_bytes(wav, vae.sample_rate) for wav in out["wav_hat"]],
                "all": api.clips_wav(out["wav_hat"], vae.sample_rate),
                "caption": f"{prior} prior, temperature {temperature:g}, seed {request.seed}"}
    if sampled := st.session_state.get("vae_sampled"):
        st.pyplot(mel_grid_figure(sampled["mel_hat"], [f"sample {i}" for i in range(len(sampled["clips"]))]))
        st.caption(sampled["caption"])
        for row in range(0, len(sampled["clips"]), 4):
            for column, (i, clip) in zip(st.columns(4), enumerate(sampled["clips"][row:row + 4], row)):
                column.caption(f"sample {i}")
                column.audio(clip, format="audio/wav")
        st.download_button(f"Download the clips as one WAV ({api.CLIP_GAP_SECONDS:g} s apart)", sampled["all"],
                           "vae_samples.wav", "audio/wav", key="vae_download_samples")

    st.subheader("Interpolate between two clips")
    first, second = st.columns(2)
    upload_a = first.file_uploader("Start (t = 0)", type=["wav", "flac", "ogg"], key="vae_a")
    upload_b = second.file_uploader("End (t = 1)", type=["wav", "flac", "ogg"], key="vae_b")
    left, middle, right = st.columns(3)
    steps = left.slider("Steps", 1, api.MAX_INTERPOLATION_STEPS, 6, key="vae_steps",
                        help="steps + 1 clips from the start to the end")
    walk_seconds = middle.slider("Seconds of each clip", api.CLIP_SECONDS.low, api.MAX_AUDIO_SECONDS, 3.0, 0.5,
                                 key="vae_walk_seconds",
                                 help=f"(steps + 1) x seconds ≤ {api.MAX_GENERATED_SECONDS:g} s, as the API allows")
    walk_iterations = right.slider("Griffin-Lim iterations", 1, api.MAX_GRIFFIN_LIM_ITERS, 32,
                                   key="vae_walk_griffin_lim_iters")
    if upload_a is not None and upload_b is not None and st.button("Interpolate", type="primary",
                                                                   key="vae_interpolate"):
        try:
            wavs = [checked_audio(upload, walk_seconds) for upload in (upload_a, upload_b)]
            clip_seconds = min(wav.numel() for wav in wavs) / vae.sample_rate
            if (steps + 1) * clip_seconds > api.MAX_GENERATED_SECONDS:
                raise api.Problem(422, f"(steps + 1) x seconds = {steps + 1} x {clip_seconds:.2f} s exceeds "
                                       f"{api.MAX_GENERATED_SECONDS:g} s of audio; take fewer steps or shorter clips")
        except (api.Problem, audio_gen.UsageError) as error:
            st.error(error.detail if isinstance(error, api.Problem) else str(error))
            return
        with st.status(f"Walking {steps} steps…") as status:
            started = time.monotonic()
            with lock:
                walk = vae.interpolate(*wavs, steps, griffin_lim_iters=walk_iterations)
            status.update(label=f"Walked {steps} steps in {time.monotonic() - started:.2f} s", state="complete")
        st.session_state.vae_walk = {"mel_hat": walk["mel_hat"], "t": walk["t"].tolist(),
                                     "wav": api.clips_wav(walk["wav_hat"], vae.sample_rate),
                                     "caption": f"{upload_a.name} (t = 0) to {upload_b.name} (t = 1), "
                                                f"{clip_seconds:.1f} s each"}
    if walked := st.session_state.get("vae_walk"):
        st.pyplot(mel_grid_figure(walked["mel_hat"], [f"t = {t:.2f}" for t in walked["t"]],
                                  columns=min(len(walked["t"]), 7)))
        st.caption(walked["caption"])
        st.audio(walked["wav"], format="audio/wav")
        st.download_button("Download the walk (WAV)", walked["wav"], "vae_interpolation.wav", "audio/wav",
                           key="vae_download_walk")


# ----------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------
st.set_page_config(page_title="ImageAudioGen", layout="wide")
st.title("ImageAudioGen")
try:
    TORCH_THREADS = int(TORCH_THREADS)
    if TORCH_THREADS not in api.FLAG_LIMITS["torch_threads"]:
        raise ValueError
except ValueError:
    st.error(f"IAG_TORCH_THREADS must be a whole number {api.FLAG_LIMITS['torch_threads'].describe()}, "
             f"got {TORCH_THREADS!r}")
    st.stop()
try:
    served_vae = vae_model(VAE_CHECKPOINT)
except audio_gen.UsageError as error:  # a VAE named by IAG_VAE_CHECKPOINT that does not load
    st.error(f"The audio VAE could not be loaded: {error}")
    served_vae = None
tabs = st.tabs(["Digits", "Audio", *(["Audio VAE"] if served_vae else [])])
for tab, draw in zip(tabs, [digits_tab, audio_tab, lambda: vae_tab(*served_vae)]):
    with tab:
        try:
            draw()
        except (image_gen.UsageError, audio_gen.UsageError) as error:  # a checkpoint that does not load
            st.error(f"The model could not be loaded: {error}")  # the other tabs still work
