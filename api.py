"""REST API for both models: MNIST digits from image_gen.py, audio through audio_gen.py's autoencoder and VAE.

The server holds only what serving needs: settings, limits, error mapping, one queue per model and
the routes. Loading a checkpoint, sampling and reconstructing are the scripts' own inference
surfaces (image_gen.load_image_generator, audio_gen.load_audio_model), the code path --mode infer
takes too, so the API answers what the CLI would.

    make serve                                        # http://127.0.0.1:8000, try it at /docs
    python api.py --host 127.0.0.1 --port 8000        # the same, with every flag below
    uvicorn api:app --workers 2                       # settings from the IAG_* environment variables
    IAG_API_TOKEN=secret python api.py                # /v1/* then needs "Authorization: Bearer secret"

    curl -s 127.0.0.1:8000/v1/models
    curl -s 127.0.0.1:8000/v1/images/generate -H 'Accept: image/png' -H 'Content-Type: application/json' \
        -d '{"digit": 7, "num_samples": 4}' -o sevens.png
    curl -s 127.0.0.1:8000/v1/audio/reconstruct -F file=@speech.wav -F griffin_lim_iters=32 -o rec.wav
    curl -s 127.0.0.1:8000/v1/audio/sample -H 'Accept: audio/wav' -H 'Content-Type: application/json' \
        -d '{"num_samples": 1, "seconds": 5}' -o sample.wav            # where a VAE checkpoint is served

Each worker process loads its own models and keeps no per-client state, so `--workers N` or
replicas behind any load balancer serve more clients (docs/serving.md: how, and the memory a
worker costs). Errors are application/problem+json (RFC 9457), never a 500 for a client's mistake.
"""

import argparse
import asyncio
import base64
import io
import ipaddress
import logging
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import fastapi_offline
import numpy as np
import soundfile as sf
import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

import audio_gen
import image_gen

log = logging.getLogger("api")

# ----------------------------------------------------------------------------
# Config: request limits (in the OpenAPI schema), then the server's flags
# ----------------------------------------------------------------------------
MAX_NUM_SAMPLES = 100
MAX_STEPS = 1000
MAX_SAMPLE_STEPS = 10_000  # num_samples x network steps: ~10 s of U-Net on one CPU thread (DDIM-50: 50 ms/image)
DDPM_STEPS = 1000  # ancestral sampling walks every timestep T of the shipped model, whatever `steps` says
# The same limits as the scripts' flags, read from their tables rather than copied
GUIDANCE = image_gen.LIMITS["guidance_scale"]
ETA, DIGIT, SEED = image_gen.LIMITS["eta"], image_gen.LIMITS["digit"], image_gen.LIMITS["seed"]
MAX_GUIDANCE_SCALE = GUIDANCE.high
AUDIO_LIMITS = audio_gen.LIMITS
TEMPERATURE, CLIP_SECONDS, AUDIO_SEED = AUDIO_LIMITS["temperature"], AUDIO_LIMITS["seconds"], AUDIO_LIMITS["seed"]
MAX_GRIFFIN_LIM_ITERS = 256  # tighter than audio_gen's 1000: 30 s at 256 iterations is ~26 s on one CPU thread
MAX_REFINE_STEPS = 100  # tighter than audio_gen's 10,000: 30 s at 100 steps adds about 5 s on one CPU thread
MAX_UPLOAD_MB = 10  # also .streamlit/config.toml's server.maxUploadSize, so the web app refuses what the API does
MAX_AUDIO_SECONDS = 30.0
# The VAE: what a sample or a walk may produce, in total, is what the longest reconstruction may (30 s of audio)
MAX_AUDIO_SAMPLES = 16
MAX_INTERPOLATION_STEPS = 16
MAX_GENERATED_SECONDS = MAX_AUDIO_SECONDS  # num_samples x seconds, or (steps + 1) x the walk's clip length
CLIP_GAP_SECONDS = 0.25  # several clips as one audio/wav: this much silence between them, as vae_interpolation.wav
VAE_PRIORS = ("mixture", "standard")
NO_CHECKPOINT = "none"  # --gan_checkpoint none, --vae_checkpoint none: serve no GAN, no VAE, even where one exists
DEFAULT_SAMPLER = {"diffusion": "ddim", "gan": "gan"}
AUDIO_FORMATS = "wav, flac or ogg (anything libsndfile reads)"
LOOPBACK_NAMES = {"localhost"}
Bounds = image_gen.Bounds
FLAG_LIMITS = {  # api.py's own numeric flags; each refused in one line with exit 2 outside its range
    "port": Bounds(int, 1, 65535),
    "workers": Bounds(int, 1, 64, why="each worker loads its own copy of the models, about 0.5 GB"),
    "torch_threads": Bounds(int, 1, 256),
    "queue_size": Bounds(int, 0, 1000, why="each waiting request holds its body in memory"),
    "deadline_s": Bounds(float, 0, 3600, open_low=True),
    "max_upload_mb": Bounds(float, 0, 1000, open_low=True, why="a body is held in memory while it is decoded"),
}
CHECKPOINT_FLAGS = ("image_checkpoint", "gan_checkpoint", "audio_checkpoint", "vae_checkpoint")


class RangeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each numeric flag's range from FLAG_LIMITS beside its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        return f"{text} [{FLAG_LIMITS[action.dest].describe()}]" if action.dest in FLAG_LIMITS else text


def declined(checkpoint: str | None) -> bool:
    """--gan_checkpoint none or --vae_checkpoint none: that optional model is not served."""
    return checkpoint is not None and checkpoint.lower() == NO_CHECKPOINT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, each defaulting to its IAG_<NAME> environment variable, so that `uvicorn api:app` and every
    worker process read the same settings that `python api.py` was given."""
    def env(name: str, default: str | None) -> str | None:
        return os.environ.get(f"IAG_{name.upper()}", default)

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=RangeHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=env("host", "127.0.0.1"),
                   help="interface to bind; anything but loopback exposes the models to the network (a warning)")
    g.add_argument("--port", type=int, default=env("port", "8000"), help="TCP port")
    g.add_argument("--workers", type=int, default=env("workers", "1"),
                   help="uvicorn worker processes; each loads its own copy of the models")
    g.add_argument("--cors_origins", default=env("cors_origins", ""),
                   help="comma-separated origins allowed to call from a browser (default: none, CORS off)")
    g = p.add_argument_group("models (default: the checkpoints --mode infer picks)")
    g.add_argument("--image_checkpoint", default=env("image_checkpoint", None), help="image_gen.py diffusion checkpoint")
    g.add_argument("--gan_checkpoint", default=env("gan_checkpoint", None),
                   help=f"image_gen.py GAN checkpoint (served as model 'gan' when one loads; '{NO_CHECKPOINT}': no GAN)")
    g.add_argument("--audio_checkpoint", default=env("audio_checkpoint", None),
                   help="audio_gen.py checkpoint for /v1/audio/reconstruct (an autoencoder or a VAE)")
    g.add_argument("--vae_checkpoint", default=env("vae_checkpoint", None),
                   help="audio_gen.py --model vae checkpoint for /v1/audio/sample and /interpolate (default: "
                        "models/audio_vae.pt, else models/pretrained/audio_vae.pt, served when one exists; "
                        f"'{NO_CHECKPOINT}': no VAE)")
    g.add_argument("--device", default=env("device", None), help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--torch_threads", type=int, default=env("torch_threads", "1"),
                   help="torch intra-op threads per worker process")
    g = p.add_argument_group("load shedding")
    g.add_argument("--queue_size", type=int, default=env("queue_size", "8"),
                   help="requests that may wait for each model while it runs one; more get 503 with Retry-After")
    g.add_argument("--deadline_s", type=float, default=env("deadline_s", "60"),
                   help="a request not answered this many seconds after it arrived gets 504")
    g.add_argument("--max_upload_mb", type=float, default=env("max_upload_mb", str(MAX_UPLOAD_MB)),
                   help="largest request body in MB (10^6 bytes); larger ones get 413 while they stream in")
    return validate(p, p.parse_args(argv))


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """One sentence and exit 2 for a setting that cannot work, before any model loads."""
    for name, bounds in FLAG_LIMITS.items():
        value = getattr(args, name)
        if value not in bounds:
            why = f" ({bounds.why})" if bounds.why and math.isfinite(value) and value > bounds.high else ""
            kind = "a whole" if bounds.number is int else "a finite"
            p.error(f"--{name} must be {kind} number {bounds.describe()}{why}, got {value}")
    for origin in filter(None, args.cors_origins.split(",")):
        if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("://")[1]):
            p.error(f"--cors_origins: {origin!r} is not an origin like http://127.0.0.1:8501 (scheme://host[:port])")
    for name in CHECKPOINT_FLAGS:
        path = getattr(args, name)
        if not path or (name in ("gan_checkpoint", "vae_checkpoint") and declined(path)):
            continue
        if Path(path).is_dir():
            p.error(f"--{name} {path} is a folder, not a checkpoint file")
        if not Path(path).is_file():
            p.error(f"--{name} {path} is not a file (no such checkpoint)")
        try:
            Path(path).open("rb").close()
        except OSError as error:
            p.error(f"--{name} {path} cannot be read ({error.strerror})")
    args.token = os.environ.get("IAG_API_TOKEN") or None  # a secret: never a flag, where `ps` would show it
    return args


def exposure_warning(host: str) -> str | None:
    """The warning a bind address outside loopback earns, or None for 127.0.0.0/8, ::1 and localhost."""
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"warning: --host {host} serves the models to other machines; set IAG_API_TOKEN and put TLS in front "
            f"(docs/serving.md)")


# ----------------------------------------------------------------------------
# Problems (RFC 9457): every error is {type, title, status, detail} as application/problem+json
# ----------------------------------------------------------------------------
FASTAPI_UNPARSED = "There was an error parsing the body"  # FastAPI's 400 for a body its JSON decoder raised on


class Problem(HTTPException):
    """An HTTP error with a one-sentence detail; also raised from inside body parsing (413), which FastAPI
    passes through because it is an HTTPException."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extensions: Any):
        super().__init__(status, detail, headers)
        self.extensions = extensions


def problem_response(status: int, detail: str, headers: dict[str, str] | None = None, **extensions: Any) -> Response:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extensions}
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


async def on_http_error(request: Request, error: HTTPException) -> Response:
    """404, 405, 401 and every Problem raised by this file."""
    if error.status_code == 400 and error.detail == FASTAPI_UNPARSED:  # past Python's 4300 digits, or nesting depth
        return problem_response(422, "the body could not be parsed as JSON: nested too deeply, or a number of more "
                                     "than 4300 digits")
    return problem_response(error.status_code, str(error.detail), error.headers, **getattr(error, "extensions", {}))


async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
    """A bad parameter: 422, one sentence naming the first bad field, and the full list under `errors`."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
    first = errors[0]
    if error.errors()[0]["type"] == "json_invalid":
        detail = f"the body is not valid JSON (at character {first['loc'][-1]})"
    else:
        message = first["msg"].removeprefix("Value error, ")
        detail = f"{'.'.join(str(part) for part in first['loc'][1:]) or 'body'}: {message}"
    return problem_response(422, detail, errors=errors)


async def on_usage_error(request: Request, error: Exception) -> Response:
    """The scripts refuse bad input as UsageError (silent or too short audio, a digit for an unconditional model):
    422, or 415 for an upload that is not audio at all (audio_gen.NotAudioError)."""
    return problem_response(415 if isinstance(error, audio_gen.NotAudioError) else 422, str(error))


async def on_unexpected_error(request: Request, error: Exception) -> Response:
    """A bug on our side, never a client's mistake: logged with its traceback, answered without one."""
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return problem_response(500, "the server failed on this request; it is logged")


class BodySizeLimit:
    """Refuse a request body over `limit` bytes with 413 while it streams in: by its Content-Length before a
    byte is read, otherwise as soon as the bytes received pass the limit. Nothing larger is ever held."""

    def __init__(self, app: Callable, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body exceeds the {self.limit / 1e6:g} MB limit"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await problem_response(413, too_large)(scope, receive, send)
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise Problem(413, too_large)
            return message

        await self.app(scope, counted_receive, send)


# ----------------------------------------------------------------------------
# Model lanes: one thread per model, a bounded queue in front, a deadline on every request
# ----------------------------------------------------------------------------
class ModelLane:
    """Runs one model's calls one at a time on its own thread, so the event loop never blocks on torch and two
    requests never share a model. At most `queue_size` calls wait behind the running one; more are shed with
    503 at once, and a call still waiting at its deadline is dropped without running (504)."""

    def __init__(self, name: str, queue_size: int):
        self.name, self.queue_size = name, queue_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lane-{name}")
        self.in_flight = 0  # running + waiting; only the event loop's thread touches it
        self.mean_seconds = 1.0  # running mean of a call, for Retry-After

    async def run(self, job: Callable[[], Any], arrived: float, budget_s: float) -> tuple[Any, dict[str, float]]:
        """job() on the lane's thread -> (its result, {"queue": s, "model": s}), or 503 / 504."""
        if self.in_flight > self.queue_size:
            retry = max(1, math.ceil(self.in_flight * self.mean_seconds))
            raise Problem(503, f"the {self.name} model has {self.in_flight} requests in hand; retry in {retry} s",
                          {"Retry-After": str(retry)})
        queued, deadline = time.monotonic(), arrived + budget_s

        def timed() -> tuple[Any, dict[str, float]]:
            started = time.monotonic()
            if started > deadline:
                raise TimeoutError  # waited past its deadline: nobody is listening any more
            result = job()
            finished = time.monotonic()
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (finished - started)
            return result, {"queue": started - queued, "model": finished - started}

        def done(future: asyncio.Future) -> None:
            self.in_flight -= 1
            if not future.cancelled():
                future.exception()  # retrieved here too, for a caller that stopped waiting

        self.in_flight += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, timed)
        future.add_done_callback(done)
        try:
            # shield: a request past its deadline stops waiting, but a call that has started runs to its end
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise Problem(504, f"no answer within the {budget_s:g} s deadline; try fewer samples or steps, "
                               f"or later") from None


# ----------------------------------------------------------------------------
# Loading: the scripts' inference surfaces, once per process
# ----------------------------------------------------------------------------
def load_models(args: argparse.Namespace) -> dict[str, Any]:
    """{"images": {"diffusion": ImageGenerator, ["gan": ...]}, "audio": AudioModel, "vae": AudioModel or None};
    runs on a thread at startup."""
    device = args.device
    images = {"diffusion": image_gen.load_image_generator(args.image_checkpoint, model="diffusion", device=device)}
    gan = load_gan(args.gan_checkpoint, device)
    if gan is not None:
        images["gan"] = gan
    audio = audio_gen.load_audio_model(args.audio_checkpoint, device=device)
    vae = load_vae(args.vae_checkpoint, device)
    # One tiny call of each, so the first client does not pay for lazy imports and first-call allocations.
    for generator in images.values():
        grid_u8(generator.generate(1, sampler=DEFAULT_SAMPLER[generator.kind], steps=1), None, False)
    tone = torch.sin(torch.arange(audio.sample_rate) * 0.05) * 0.1  # 1 s of a 127 Hz tone
    wav_bytes(audio.reconstruct(tone, griffin_lim_iters=1)["wav_hat"], audio.sample_rate)
    if vae is not None:
        wav_bytes(vae.sample(1, seconds=CLIP_SECONDS.low, griffin_lim_iters=1)["wav_hat"][0], vae.sample_rate)
    return {"images": images, "audio": audio, "vae": vae}


def load_gan(checkpoint: str | None, device: str | None) -> image_gen.ImageGenerator | None:
    """The GAN named, else the one --mode infer --model gan picks, else None (none trained or shipped).
    Optional like the VAE: a default file that does not load is logged and skipped; a named one raises."""
    if declined(checkpoint):
        log.info("no GAN served: --gan_checkpoint %s", NO_CHECKPOINT)
        return None
    try:
        return image_gen.load_image_generator(checkpoint, model="gan", device=device)
    except image_gen.UsageError as error:
        if checkpoint:
            raise
        log.info("no GAN served: %s", error)  # no GAN checkpoint trained or shipped yet
        return None


def load_vae(checkpoint: str | None, device: str | None) -> audio_gen.AudioModel | None:
    """The VAE named, else the one --mode sample picks when it exists, else None (no VAE trained or shipped).
    Like the GAN it is optional: a default file that does not load is logged and skipped; a named one raises."""
    if declined(checkpoint):
        return None
    if checkpoint is None and not audio_gen.default_checkpoint(None, "vae").exists():
        log.info("no VAE served: no %s trained or shipped", audio_gen.CHECKPOINT_NAMES["vae"])
        return None
    try:
        return audio_gen.load_audio_model(checkpoint, device=device, model="vae")
    except audio_gen.UsageError as error:
        if checkpoint:
            raise
        log.warning("no VAE served: %s", error)
        return None


def check_bind(host: str, port: int) -> None:
    """Bind --host:--port once and let go, so that a port in use or a host that is no address here stops
    `python api.py` in one line before the models load, not after (OSError with the sentence)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise OSError(f"--host {host} is not an address or a name that resolves here ({error})") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def check_startup(args: argparse.Namespace) -> None:
    """Load each checkpoint named by a flag once on the CPU, so that one from the other script, a truncated one or
    one of a future format stops `python api.py` with one line, not a server that never becomes ready; the same for
    a --device that does not exist here."""
    audio_gen.resolve_device(args.device)
    if args.image_checkpoint:
        image_gen.load_image_generator(args.image_checkpoint, model="diffusion", device="cpu")
    if args.gan_checkpoint and not declined(args.gan_checkpoint):
        image_gen.load_image_generator(args.gan_checkpoint, model="gan", device="cpu")
    if args.audio_checkpoint:
        audio_gen.load_audio_model(args.audio_checkpoint, device="cpu")
    if args.vae_checkpoint and not declined(args.vae_checkpoint):
        audio_gen.load_audio_model(args.vae_checkpoint, device="cpu", model="vae")


# ----------------------------------------------------------------------------
# Request and response schemas (their limits are the OpenAPI schema's)
# ----------------------------------------------------------------------------
def within(bounds: Bounds) -> dict[str, Any]:
    """A script's range (image_gen's or audio_gen's Bounds) as pydantic's Field bounds, which the schema shows;
    floats must be finite."""
    low = {"gt": bounds.low} if bounds.open_low else {"ge": bounds.low}
    high = {} if bounds.high == math.inf else {"lt": bounds.high} if bounds.open_high else {"le": bounds.high}
    if bounds.number is int:
        return {k: int(v) for k, v in {**low, **high}.items()}
    return {**low, **high, "allow_inf_nan": False}


class ImageRequest(BaseModel):
    """What to draw. The work is bounded: num_samples x network steps <= 10,000, where ddpm counts 1000 steps
    (all of T) and the GAN one."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no true for 1, no 2.5 for an int
    model: Literal["diffusion", "gan"] = Field("diffusion", description="which image model draws")
    digit: int | None = Field(None, **within(DIGIT), description="draw only this digit; null: 0-9 in equal shares")
    num_samples: int = Field(1, ge=1, le=MAX_NUM_SAMPLES, description="images to draw")
    sampler: Literal["ddpm", "ddim", "dpmpp", "gan"] | None = Field(
        None, description="ddpm (all 1000 steps), ddim or dpmpp (`steps` steps); gan for the GAN; null: ddim / gan")
    steps: int = Field(image_gen.DEFAULT_STEPS, ge=1, le=MAX_STEPS, description="network steps of ddim and dpmpp")
    guidance_scale: float | None = Field(
        None, **within(GUIDANCE),
        description=f"classifier-free guidance w; 1 = plain conditional; null: {image_gen.DEFAULT_GUIDANCE} for "
                    "diffusion, as image_gen.py's default (every --digit read as asked), 1 for the GAN")
    eta: float = Field(0.0, **within(ETA), description="DDIM noise: 0 deterministic, 1 DDPM-like")
    seed: int = Field(0, **within(SEED), description="the same seed and settings give the same images")

    @model_validator(mode="after")
    def bounded_work(self) -> Self:
        self.sampler = self.sampler or DEFAULT_SAMPLER[self.model]
        if self.guidance_scale is None:
            self.guidance_scale = image_gen.DEFAULT_GUIDANCE if self.model == "diffusion" else 1.0
        if (self.model == "gan") != (self.sampler == "gan"):
            raise ValueError(f"sampler {self.sampler} does not draw with model {self.model}")
        if self.model == "gan" and (self.guidance_scale != 1 or self.eta != 0):
            raise ValueError("guidance_scale and eta apply to the diffusion model only")
        if self.network_steps() * self.num_samples > MAX_SAMPLE_STEPS:
            raise ValueError(f"num_samples x steps = {self.num_samples} x {self.network_steps()} exceeds "
                             f"{MAX_SAMPLE_STEPS} (ddpm always takes {DDPM_STEPS} steps)")
        return self

    def network_steps(self) -> int:
        return {"ddpm": DDPM_STEPS, "gan": 1}.get(self.sampler, self.steps)


class AudioSampleRequest(BaseModel):
    """What the VAE draws. The work is bounded: num_samples x seconds <= 30 s of audio, the longest upload
    /v1/audio/reconstruct takes."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no true for 1, no 2.5 for an int
    num_samples: int = Field(1, ge=1, le=MAX_AUDIO_SAMPLES, description="clips to draw")
    seconds: float = Field(5.0, ge=CLIP_SECONDS.low, le=MAX_AUDIO_SECONDS, allow_inf_nan=False,
                           description="length of each clip")
    temperature: float = Field(1.0, **within(TEMPERATURE),
                               description="scales the prior's spread: 0 its means, 1 as trained, above 1 wilder")
    prior: Literal["mixture", "standard"] | None = Field(
        None, description="mixture: the clip-mixture prior learned at training; standard: N(0, T^2 I) per latent frame; "
                          "null: mixture where the checkpoint has one, else standard")
    seed: int = Field(0, **within(AUDIO_SEED), description="the same seed and settings give the same clips")
    griffin_lim_iters: int = Field(32, ge=1, le=MAX_GRIFFIN_LIM_ITERS, description="Griffin-Lim iterations")

    @model_validator(mode="after")
    def bounded_work(self) -> Self:
        if self.num_samples * self.seconds > MAX_GENERATED_SECONDS:
            raise ValueError(f"num_samples x seconds = {self.num_samples} x {self.seconds:g} s exceeds "
                             f"{MAX_GENERATED_SECONDS:g} s of audio")
        return self


class Timing(BaseModel):
    queue_s: float = Field(description="waiting for the model")
    model_s: float = Field(description="the model's own work")
    total_s: float = Field(description="from arrival to the answer")


class ImageResponse(BaseModel):
    model: str
    sampler: str
    steps: int
    seed: int
    images: list[str] = Field(description="one base64 PNG (28x28, grayscale) per sample")
    grid: str = Field(description="all samples as one base64 PNG grid")
    timing: Timing


class AudioClipsResponse(BaseModel):
    sample_rate: int
    clip_seconds: float = Field(description="the length of each clip")
    seed: int
    prior: str | None = Field(None, description="sample: the prior drawn from")
    temperature: float | None = Field(None, description="sample: the prior's temperature")
    t: list[float] | None = Field(None, description="interpolate: each clip's place on the walk, 0 (a) to 1 (b)")
    wavs: list[str] = Field(description="one base64 WAV (16 kHz mono PCM-16) per clip")
    timing: Timing


class ModelsResponse(BaseModel):
    images: dict[str, dict[str, Any]] = Field(description="kind, checkpoint, sha256, image_size, samplers")
    audio: dict[str, Any] = Field(description="kind, checkpoint, sha256, sample_rate, experts (the specialists a "
                                              "clip may be handed to)")
    vae: dict[str, Any] | None = Field(description="kind, checkpoint, sha256, sample_rate, latent_dim, epoch, prior "
                                                   "(the default), priors; null where no VAE is served")
    limits: dict[str, int | float]


def limits(args: argparse.Namespace) -> dict[str, int | float]:
    return {"max_num_samples": MAX_NUM_SAMPLES, "max_steps": MAX_STEPS, "max_sample_steps": MAX_SAMPLE_STEPS,
            "max_griffin_lim_iters": MAX_GRIFFIN_LIM_ITERS, "max_upload_mb": args.max_upload_mb,
            "max_audio_seconds": MAX_AUDIO_SECONDS, "max_audio_samples": MAX_AUDIO_SAMPLES,
            "max_interpolation_steps": MAX_INTERPOLATION_STEPS, "max_generated_seconds": MAX_GENERATED_SECONDS,
            "max_temperature": TEMPERATURE.high, "deadline_s": args.deadline_s, "queue_size": args.queue_size}


def describe_vae(vae: audio_gen.AudioModel | None) -> dict[str, Any] | None:
    if vae is None:
        return None
    priors = [name for name in VAE_PRIORS if name != "mixture" or vae.prior is not None]
    return {"kind": vae.kind, "checkpoint": Path(vae.checkpoint).name, "sha256": vae.sha256, "epoch": vae.epoch,
            "sample_rate": vae.sample_rate, "latent_dim": vae.config["latent_dim"], "prior": priors[0],
            "priors": priors, "prior_components": vae.config.get("prior_components", 0) if vae.prior else 0}


# ----------------------------------------------------------------------------
# Encoding: PNG grids, WAV bytes, timing headers
# ----------------------------------------------------------------------------
def png_bytes(image_u8: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_u8, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def grid_u8(images_u8: np.ndarray, digit: int | None, conditional: bool) -> np.ndarray:
    """(N, H, W) -> one image laid out as the CLI's final_samples.png (one digit per row when balanced)."""
    from torchvision.utils import make_grid

    columns = image_gen.grid_columns(len(images_u8), conditional, digit)
    return make_grid(torch.from_numpy(images_u8)[:, None], nrow=columns, padding=2, pad_value=255)[0].numpy()


def wav_bytes(wav: torch.Tensor, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wav.clamp(-1, 1).numpy(), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def clips_wav(wavs: torch.Tensor, sample_rate: int) -> bytes:
    """(N, L) clips as one WAV, CLIP_GAP_SECONDS of silence between them (the CLI's vae_interpolation.wav)."""
    gap = torch.zeros(round(CLIP_GAP_SECONDS * sample_rate))
    return wav_bytes(torch.cat([part for wav in wavs for part in (wav, gap)][:-1]), sample_rate)


def timing_headers(timing: dict[str, float]) -> dict[str, str]:
    """Server-Timing (milliseconds, what browsers' dev tools show) and the same in seconds as X-Timing-*."""
    headers = {"Server-Timing": ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in timing.items())}
    headers.update({f"X-Timing-{name.capitalize()}-Seconds": f"{seconds:.4f}" for name, seconds in timing.items()})
    return headers


def wants_png(accept: str) -> bool:
    """True when the Accept header ranks image/png (or image/*) at least as high as JSON; */* means JSON."""
    return prefers(accept, "image/png")


def prefers(accept: str, media: str) -> bool:
    """True when the Accept header ranks `media` (or its type/*) at least as high as JSON; */* means JSON."""
    q = {}
    for item in accept.lower().split(","):
        offered, *params = [part.strip() for part in item.split(";")]
        weight = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            q[offered] = float(weight) if math.isfinite(float(weight)) else 0.0
        except ValueError:
            q[offered] = 0.0
    wanted = max(q.get(media, 0), q.get(media.split("/")[0] + "/*", 0))
    return wanted > 0 and wanted >= max(q.get("application/json", 0), q.get("application/*", 0))


def probe_audio(data: bytes, limit_s: float) -> float:
    """Duration of an upload, judged by its content: 415 when it does not decode, 422 when too long."""
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise Problem(415, f"the upload does not decode as audio; send {AUDIO_FORMATS}") from None
    seconds = info.frames / info.samplerate if info.samplerate else 0.0
    if seconds > limit_s:
        raise Problem(422, f"the audio lasts {seconds:.1f} s; at most {limit_s:g} s is served")
    return seconds


PROBLEM_CONTENT = {"application/problem+json": {"schema": {"type": "object", "properties": {
    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
    "detail": {"type": "string"}}}}}


def problems(*statuses: int) -> dict[int, dict]:
    return {status: {"description": HTTPStatus(status).phrase, "content": PROBLEM_CONTENT} for status in statuses}


# ----------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------
def create_app(args: argparse.Namespace) -> FastAPI:
    """The ASGI app for one worker process; models load in the background once it starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        torch.set_num_threads(args.torch_threads)
        app.state.lanes = {name: ModelLane(name, args.queue_size) for name in ("diffusion", "gan", "audio", "vae")}

        async def load() -> None:
            try:
                app.state.models = await asyncio.to_thread(load_models, args)
                served = [*app.state.models["images"], "audio", *(["vae"] if app.state.models["vae"] else [])]
                log.info("models loaded: %s", ", ".join(served))
            except Exception as error:  # noqa: BLE001 - the server stays up and /readyz says why
                app.state.load_error = f"{type(error).__name__}: {error}"
                log.error("models failed to load: %s", app.state.load_error)

        loading = asyncio.create_task(load())
        yield
        await loading
        for lane in app.state.lanes.values():
            lane.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="ImageAudioGen", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"MNIST digits, audio reconstruction and, where a VAE is served, audio samples "
                              f"and interpolation. Every request must be answered within "
                              f"{args.deadline_s:g} s (else 504); bodies over {args.max_upload_mb:g} MB get 413; "
                              f"each model runs one request at a time with {args.queue_size} waiting (else 503).")
    app.state.models, app.state.load_error = None, None  # /readyz answers 503 until the lifespan has loaded them
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(image_gen.UsageError, on_usage_error)
    app.add_exception_handler(audio_gen.UsageError, on_usage_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    if args.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=args.cors_origins.split(","), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept"],
                           expose_headers=["Server-Timing", "X-Audio-Duration-Seconds", "X-Audio-Clips",
                                           "X-Audio-Clip-Seconds"])
    app.add_middleware(BodySizeLimit, limit=int(args.max_upload_mb * 1e6))

    # Swagger UI from fastapi-offline's copy of its files, not a CDN: /docs works with no network.
    app.mount("/static", StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="ImageAudioGen API",
                                   swagger_js_url="/static/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui.css", swagger_favicon_url="/static/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    def authorised(request: Request) -> None:
        if args.token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), args.token.encode()):
            raise Problem(401, "send the API token as 'Authorization: Bearer TOKEN'", {"WWW-Authenticate": "Bearer"})

    def json_body(request: Request) -> None:
        """A body in another media type is the client's wrong choice of format (415), not a bad parameter (422)."""
        media = request.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise Problem(415, f"send the body as application/json, not {media or 'an empty content type'}")

    def loaded(request: Request) -> dict[str, Any]:
        if request.app.state.models is None:
            reason = request.app.state.load_error or "the models are still loading"
            raise Problem(503, reason, {"Retry-After": "5"})
        return request.app.state.models

    def arrival() -> float:
        return time.monotonic()  # the deadline counts from here

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers. Never touches a model."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses=problems(503))
    async def readyz(request: Request) -> dict[str, str]:
        """Readiness: 503 until every model has loaded."""
        loaded(request)
        return {"status": "ready"}

    @app.get("/v1/models", tags=["models"], dependencies=[Depends(authorised)], responses=problems(401, 503))
    async def models(request: Request) -> ModelsResponse:
        """What each worker serves: checkpoints with their sha256, image size, samplers, audio sample rate, limits."""
        models = loaded(request)
        images = {name: {"kind": g.kind, "checkpoint": Path(g.checkpoint).name, "sha256": g.sha256,
                         "image_size": g.image_size, "samplers": list(g.samplers),
                         "class_conditional": g.class_conditional} for name, g in models["images"].items()}
        audio = models["audio"]
        return ModelsResponse(images=images, audio={"kind": audio.kind, "checkpoint": Path(audio.checkpoint).name,
                                                    "sha256": audio.sha256, "sample_rate": audio.sample_rate,
                                                    "experts": [e["name"] for e in audio.config["experts"]]},
                              vae=describe_vae(models["vae"]), limits=limits(args))

    @app.post("/v1/images/generate", tags=["images"], dependencies=[Depends(authorised), Depends(json_body)],
              responses={200: {"content": {"image/png": {}}, "description": "JSON, or a PNG grid with "
                                                                            "Accept: image/png"},
                         **problems(401, 413, 415, 422, 503, 504)})
    async def generate_images(body: ImageRequest, request: Request,
                              arrived: Annotated[float, Depends(arrival)]) -> ImageResponse:
        """Draw digits. `Accept: image/png` returns the grid as a PNG, otherwise JSON with one base64 PNG per
        sample. Limits: num_samples <= 100, steps <= 1000, num_samples x steps <= 10,000."""
        models = loaded(request)  # after the body is validated: a bad request is a 422 even while loading
        generator = models["images"].get(body.model)
        if generator is None:
            raise Problem(422, f"model {body.model} is not served here; served: {', '.join(models['images'])}")
        if body.sampler not in generator.samplers:
            raise Problem(422, f"sampler {body.sampler} is not one of {', '.join(generator.samplers)}")
        if body.digit is not None and not generator.class_conditional:
            raise Problem(422, f"digit needs a class-conditional model; {body.model} is unconditional")
        images, timing = await request.app.state.lanes[body.model].run(lambda: generator.generate(
            body.num_samples, digit=body.digit, sampler=body.sampler, steps=body.steps,
            guidance_scale=body.guidance_scale, eta=body.eta, seed=body.seed), arrived, args.deadline_s)
        grid = png_bytes(images[0] if len(images) == 1 else grid_u8(images, body.digit, generator.class_conditional))
        timing["total"] = time.monotonic() - arrived
        if wants_png(request.headers.get("accept", "")):
            return Response(grid, media_type="image/png", headers=timing_headers(timing))
        return ImageResponse(model=body.model, sampler=body.sampler, steps=body.network_steps(), seed=body.seed,
                             images=[base64.b64encode(png_bytes(image)).decode() for image in images],
                             grid=base64.b64encode(grid).decode(),
                             timing=Timing(**{f"{name}_s": seconds for name, seconds in timing.items()}))

    @app.post("/v1/audio/reconstruct", tags=["audio"], dependencies=[Depends(authorised)], response_class=Response,
              responses={200: {"content": {"audio/wav": {}}, "description": "the reconstruction, 16 kHz mono PCM"},
                         **problems(401, 413, 415, 422, 503, 504)})
    async def reconstruct_audio(
            request: Request,
            file: Annotated[UploadFile, File(description=f"{AUDIO_FORMATS}, any rate or channels, at most "
                                                         f"{MAX_AUDIO_SECONDS:g} s and {args.max_upload_mb:g} MB")],
            arrived: Annotated[float, Depends(arrival)],
            griffin_lim_iters: Annotated[int, Form(ge=1, le=MAX_GRIFFIN_LIM_ITERS,
                                                   description="Griffin-Lim iterations")] = 32,
            refine_steps: Annotated[int, Form(ge=0, le=MAX_REFINE_STEPS, description="Adam steps fitting the latent "
                                              "to the decoder; 0: the encoder alone")] = audio_gen.REFINE_STEPS,
    ) -> Response:
        """Encode (and refine the latent), decode an upload with the autoencoder, then invert its mel with Griffin-Lim.
        Returns audio/wav; X-Audio-Duration-Seconds and Server-Timing carry the duration and timings."""
        data = await file.read()  # bounded by BodySizeLimit
        seconds = probe_audio(data, MAX_AUDIO_SECONDS)
        model = loaded(request)["audio"]

        def job() -> bytes:
            wav = audio_gen.decode_audio(data, name=file.filename or "upload")
            if wav.numel() > (MAX_AUDIO_SECONDS + 1) * model.sample_rate:  # a header that understated its length
                raise Problem(422, f"the audio lasts {wav.numel() / model.sample_rate:.1f} s; at most "
                                   f"{MAX_AUDIO_SECONDS:g} s is served")
            rec = model.reconstruct(wav, griffin_lim_iters=griffin_lim_iters, refine_steps=refine_steps)
            return wav_bytes(rec["wav_hat"], model.sample_rate)

        wav, timing = await request.app.state.lanes["audio"].run(job, arrived, args.deadline_s)
        timing["total"] = time.monotonic() - arrived
        return Response(wav, media_type="audio/wav",
                        headers={"X-Audio-Duration-Seconds": f"{seconds:.3f}", **timing_headers(timing)})

    def served_vae(request: Request) -> audio_gen.AudioModel:
        vae = loaded(request)["vae"]
        if vae is None:
            raise Problem(404, "no VAE is served here: train one (python audio_gen.py --mode train --model vae) or "
                               "start the server with --vae_checkpoint PATH")
        return vae

    def clips_response(request: Request, wavs: torch.Tensor, sample_rate: int, timing: dict[str, float],
                       **fields: Any) -> Response:
        """audio/wav of every clip in a row (CLIP_GAP_SECONDS apart) when the client prefers it, else JSON."""
        clip_seconds = wavs.shape[-1] / sample_rate
        if prefers(request.headers.get("accept", ""), "audio/wav"):
            return Response(clips_wav(wavs, sample_rate), media_type="audio/wav",
                            headers={"X-Audio-Clips": str(len(wavs)), "X-Audio-Clip-Seconds": f"{clip_seconds:.4f}",
                                     **timing_headers(timing)})
        body = AudioClipsResponse(sample_rate=sample_rate, clip_seconds=clip_seconds,
                                  wavs=[base64.b64encode(wav_bytes(wav, sample_rate)).decode() for wav in wavs],
                                  timing=Timing(**{f"{name}_s": seconds for name, seconds in timing.items()}),
                                  **fields)
        return JSONResponse(body.model_dump(exclude_none=True), headers=timing_headers(timing))

    clips_content = {"application/json": {"schema": {"$ref": "#/components/schemas/AudioClipsResponse"}},
                     "audio/wav": {}}

    @app.post("/v1/audio/sample", tags=["audio"], dependencies=[Depends(authorised), Depends(json_body)],
              response_model=AudioClipsResponse,
              responses={200: {"content": clips_content,
                               "description": "JSON with one base64 WAV per clip, or with Accept: audio/wav every "
                                              f"clip in one WAV, {CLIP_GAP_SECONDS:g} s of silence between them"},
                         **problems(401, 404, 413, 415, 422, 503, 504)})
    async def sample_audio(body: AudioSampleRequest, request: Request,
                           arrived: Annotated[float, Depends(arrival)]) -> Response:
        """Draw clips from the VAE's prior and invert their mels with Griffin-Lim. JSON by default; `Accept:
        audio/wav` returns the clips as one WAV (one clip: just that clip), with X-Audio-Clips and
        X-Audio-Clip-Seconds to split it. 404 where no VAE is served. Limits: num_samples <= 16, seconds 0.5 to 30,
        num_samples x seconds <= 30 s, temperature 0 to 10."""
        vae = served_vae(request)
        prior = body.prior or describe_vae(vae)["prior"]
        if prior == "mixture" and vae.prior is None:
            raise Problem(422, f"prior: the served VAE ({Path(vae.checkpoint).name}) has no learned mixture prior; "
                               f"ask for prior standard")
        out, timing = await request.app.state.lanes["vae"].run(lambda: vae.sample(
            body.num_samples, seconds=body.seconds, temperature=body.temperature, seed=body.seed,
            griffin_lim_iters=body.griffin_lim_iters, prior=prior), arrived, args.deadline_s)
        timing["total"] = time.monotonic() - arrived
        return clips_response(request, out["wav_hat"], vae.sample_rate, timing, seed=body.seed, prior=prior,
                              temperature=body.temperature)

    @app.post("/v1/audio/interpolate", tags=["audio"], dependencies=[Depends(authorised)],
              response_model=AudioClipsResponse,
              responses={200: {"content": clips_content,
                               "description": "JSON with one base64 WAV per step, or with Accept: audio/wav the walk "
                                              f"as one WAV, {CLIP_GAP_SECONDS:g} s of silence between the steps"},
                         **problems(401, 404, 413, 415, 422, 503, 504)})
    async def interpolate_audio(
            request: Request,
            a: Annotated[UploadFile, File(description=f"the start of the walk: {AUDIO_FORMATS}, at most "
                                                      f"{MAX_AUDIO_SECONDS:g} s")],
            b: Annotated[UploadFile, File(description="the end of the walk, the same")],
            arrived: Annotated[float, Depends(arrival)],
            steps: Annotated[int, Form(ge=1, le=MAX_INTERPOLATION_STEPS,
                                       description="steps from a (t = 0) to b (t = 1): steps + 1 clips")] = 6,
            seconds: Annotated[float, Form(ge=CLIP_SECONDS.low, le=MAX_AUDIO_SECONDS, allow_inf_nan=False,
                                           description="each clip's length: both inputs are cut to it and to the "
                                                       "shorter one")] = 5.0,
            griffin_lim_iters: Annotated[int, Form(ge=1, le=MAX_GRIFFIN_LIM_ITERS,
                                                   description="Griffin-Lim iterations")] = 32,
            seed: Annotated[int, Form(**within(AUDIO_SEED),
                                      description="Griffin-Lim's starting phases")] = 0) -> Response:
        """Walk the VAE's latent space from upload a to upload b: z_t = (1 - t) z_a + t z_b, decoded at t = 0,
        1/steps, ..., 1 (t = 0 and 1 are the two reconstructions). JSON by default, `Accept: audio/wav` for the walk
        as one WAV. Limits: steps <= 16, (steps + 1) x the clips' length <= 30 s."""
        data = [await upload.read() for upload in (a, b)]  # bounded by BodySizeLimit
        lengths = [probe_audio(d, MAX_AUDIO_SECONDS) for d in data]
        clip_seconds = min(seconds, *lengths)
        if (steps + 1) * clip_seconds > MAX_GENERATED_SECONDS:
            raise Problem(422, f"(steps + 1) x seconds = {steps + 1} x {clip_seconds:.2f} s exceeds "
                               f"{MAX_GENERATED_SECONDS:g} s of audio; take fewer steps or shorter clips")
        vae = served_vae(request)

        def job() -> tuple[torch.Tensor, list[float]]:
            wavs = [audio_gen.decode_audio(d, name=upload.filename or name)[: round(clip_seconds * vae.sample_rate)]
                    for d, upload, name in zip(data, (a, b), ("a", "b"), strict=True)]
            walk = vae.interpolate(*wavs, steps, seed=seed, griffin_lim_iters=griffin_lim_iters)
            return walk["wav_hat"], walk["t"].tolist()

        (wavs, t), timing = await request.app.state.lanes["vae"].run(job, arrived, args.deadline_s)
        timing["total"] = time.monotonic() - arrived
        return clips_response(request, wavs, vae.sample_rate, timing, seed=seed, t=t)

    return app


app = create_app(parse_args([]))  # `uvicorn api:app`: settings from IAG_* variables


# ----------------------------------------------------------------------------
# Main: python api.py [flags]
# ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    try:
        check_bind(args.host, args.port)
        check_startup(args)
    except (image_gen.UsageError, audio_gen.UsageError, OSError) as error:
        print(f"api.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if warning := exposure_warning(args.host):
        print(warning, file=sys.stderr)
    # Every worker process imports api.py afresh and builds its app from the environment: hand the flags over.
    for name, value in vars(args).items():
        if name != "token" and value is not None:
            os.environ[f"IAG_{name.upper()}"] = str(value)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run("api:app", host=args.host, port=args.port, workers=args.workers, log_level="info")


if __name__ == "__main__":
    main()
