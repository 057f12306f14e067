"""api.py: every endpoint and every refusal through FastAPI's TestClient, then a real uvicorn on 127.0.0.1.

The models are the ones the server would load (the checkpoints --mode infer picks), plus a tiny VAE trained
here in seconds, so that the tests pass with or without the shipped one; requests stay tiny (DDIM with a few
steps, clips of a second or two, a few Griffin-Lim iterations) so the file runs in seconds.
"""

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import ROOT, free_port, run_script
from fastapi.testclient import TestClient
from PIL import Image

import api
import audio_gen

TINY_IMAGES = {"num_samples": 2, "sampler": "ddim", "steps": 3}
TINY_SAMPLE = {"num_samples": 2, "seconds": 1.0, "griffin_lim_iters": 2}
PRETRAINED = ROOT / "models" / "pretrained"


def tone_wav(seconds: float = 1.5, rate: int = 16_000, channels: int = 1, subtype: str = "PCM_16",
             amplitude: float = 0.3) -> bytes:
    """A vibrato tone as an in-memory file; amplitude 0 gives silence."""
    t = np.arange(int(seconds * rate)) / rate
    wav = amplitude * np.sin(2 * np.pi * (220 * t + 3 * np.sin(2 * np.pi * 2 * t)))
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(wav[:, None], channels, axis=1), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def wait_ready(client: TestClient) -> None:
    for _ in range(600):
        if client.get("/readyz").status_code == 200:
            return
        assert client.app.state.load_error is None, client.app.state.load_error
        time.sleep(0.1)
    raise AssertionError("models did not load within 60 s")


def assert_problem(response: httpx.Response, status: int) -> dict:
    """An RFC 9457 problem: the status, application/problem+json, and a one-line detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    assert body["detail"] and "\n" not in body["detail"] and "Traceback" not in body["detail"]
    return body


@pytest.fixture(scope="module")
def client(tiny_vae):
    with TestClient(api.create_app(api.parse_args(["--vae_checkpoint", str(tiny_vae)]))) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def strict():
    """A server with a small upload limit, one waiting place per model, a half-second deadline and no VAE."""
    args = api.parse_args(["--queue_size", "1", "--deadline_s", "0.5", "--max_upload_mb", "0.05",
                           "--vae_checkpoint", "none"])
    with TestClient(api.create_app(args)) as client:
        wait_ready(client)
        yield client


@contextlib.contextmanager
def occupied(client: TestClient, lane: str, calls: int = 1):
    """Hold a model's lane with `calls` real lane calls that block until the block exits."""
    release, started = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(30)

    futures = [client.portal.start_task_soon(client.app.state.lanes[lane].run, job, time.monotonic(), 60)
               for _ in range(calls)]
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()
        for future in futures:
            future.result(timeout=30)


# ----------------------------------------------------------------------------
# Health, models, docs
# ----------------------------------------------------------------------------
def test_health_and_readiness_before_and_after_loading(client):
    unloaded = TestClient(api.create_app(api.parse_args([])))  # lifespan not entered: nothing loaded
    assert unloaded.get("/healthz").json() == {"status": "ok"}
    body = assert_problem(unloaded.get("/readyz"), 503)
    assert "loading" in body["detail"]
    assert unloaded.get("/readyz").headers["retry-after"] == "5"
    assert_problem(unloaded.get("/v1/models"), 503)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}


def test_models_names_checkpoints_by_sha256(client):
    body = client.get("/v1/models").json()
    diffusion = body["images"]["diffusion"]
    generator = client.app.state.models["images"]["diffusion"]
    assert diffusion["sha256"] == hashlib.sha256(Path(generator.checkpoint).read_bytes()).hexdigest()
    assert diffusion["image_size"] == 28 and "ddim" in diffusion["samplers"]
    audio = client.app.state.models["audio"]
    assert body["audio"]["sha256"] == hashlib.sha256(Path(audio.checkpoint).read_bytes()).hexdigest()
    assert body["audio"]["sample_rate"] == audio_gen.SAMPLE_RATE
    assert body["audio"]["experts"] == [e["name"] for e in audio.config["experts"]]  # shipped: ["synthetic"]
    assert body["limits"]["max_num_samples"] == api.MAX_NUM_SAMPLES


def test_models_lists_the_vae_when_one_is_served(client, tiny_vae, strict):
    vae = client.get("/v1/models").json()["vae"]
    assert vae["sha256"] == hashlib.sha256(tiny_vae.read_bytes()).hexdigest() and vae["checkpoint"] == "vae.pt"
    assert vae["kind"] == "vae" and vae["latent_dim"] == 64 and vae["sample_rate"] == audio_gen.SAMPLE_RATE
    assert vae["prior"] == "mixture" and vae["priors"] == ["mixture", "standard"] and vae["prior_components"] == 16
    body = strict.get("/v1/models").json()
    assert body["vae"] is None and body["limits"]["max_generated_seconds"] == api.MAX_GENERATED_SECONDS


def test_limits_are_the_scripts_own_where_they_mean_the_same():
    assert api.MAX_GUIDANCE_SCALE == api.image_gen.LIMITS["guidance_scale"].high
    image = api.ImageRequest.model_json_schema()["properties"]
    assert image["eta"]["maximum"] == api.image_gen.LIMITS["eta"].high
    assert image["seed"]["maximum"] == api.image_gen.LIMITS["seed"].high
    sample = api.AudioSampleRequest.model_json_schema()["properties"]
    assert sample["temperature"]["maximum"] == api.AUDIO_LIMITS["temperature"].high == 10
    assert sample["seconds"]["minimum"] == api.AUDIO_LIMITS["seconds"].low == audio_gen.MIN_INPUT_SECONDS


def test_openapi_shows_the_limits_and_docs_need_no_network(client):
    schema = client.get("/openapi.json").json()
    image = schema["components"]["schemas"]["ImageRequest"]["properties"]
    assert image["num_samples"]["maximum"] == api.MAX_NUM_SAMPLES and image["steps"]["maximum"] == api.MAX_STEPS
    assert str(api.MAX_SAMPLE_STEPS) in schema["components"]["schemas"]["ImageRequest"]["description"].replace(",", "")
    upload = next(s for name, s in schema["components"]["schemas"].items() if "reconstruct" in name)
    assert upload["properties"]["griffin_lim_iters"]["maximum"] == api.MAX_GRIFFIN_LIM_ITERS
    assert upload["properties"]["refine_steps"]["maximum"] == api.MAX_REFINE_STEPS
    assert "60 s" in schema["info"]["description"] and "10 MB" in schema["info"]["description"]
    sample = schema["components"]["schemas"]["AudioSampleRequest"]
    assert sample["properties"]["num_samples"]["maximum"] == api.MAX_AUDIO_SAMPLES and "30 s" in sample["description"]
    assert sample["properties"]["temperature"]["maximum"] == 10 and sample["properties"]["seconds"]["maximum"] == 30
    walk = next(s for name, s in schema["components"]["schemas"].items() if "interpolate" in name)
    assert walk["properties"]["steps"]["maximum"] == api.MAX_INTERPOLATION_STEPS and set(walk["required"]) == {"a", "b"}
    assert {"audio/wav", "application/json"} <= schema["paths"]["/v1/audio/sample"]["post"]["responses"]["200"]["content"].keys()
    docs = client.get("/docs").text
    assert "/static/swagger-ui-bundle.js" in docs and "cdn" not in docs
    assert client.get("/static/swagger-ui-bundle.js").status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc would fetch its script from a CDN


def test_streamlit_upload_limit_matches_the_api():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == api.MAX_UPLOAD_MB
    assert config["browser"]["gatherUsageStats"] is False


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------
def test_generate_json_returns_decodable_pngs_the_same_for_the_same_seed(client):
    request = {**TINY_IMAGES, "digit": 7, "seed": 3}
    body = client.post("/v1/images/generate", json=request).json()
    assert body["seed"] == 3 and body["sampler"] == "ddim" and body["steps"] == 3
    images = [np.array(Image.open(io.BytesIO(base64.b64decode(png)))) for png in body["images"]]
    assert len(images) == 2 and all(image.shape == (28, 28) and image.dtype == np.uint8 for image in images)
    assert body["timing"]["model_s"] > 0 and body["timing"]["total_s"] >= body["timing"]["model_s"]
    again = client.post("/v1/images/generate", json=request).json()
    assert again["images"] == body["images"]
    other = client.post("/v1/images/generate", json={**request, "seed": 4}).json()
    assert other["images"] != body["images"]


def test_generate_png_with_accept_header_is_a_grid_one_digit_per_row(client):
    response = client.post("/v1/images/generate", json={**TINY_IMAGES, "num_samples": 10},
                           headers={"Accept": "image/png"})
    assert response.headers["content-type"] == "image/png"
    assert "model;dur=" in response.headers["server-timing"]
    grid = np.array(Image.open(io.BytesIO(response.content)))
    assert grid.shape == (10 * 30 + 2, 1 * 30 + 2)  # 28 px and 2 px of padding per cell
    one = client.post("/v1/images/generate", json={**TINY_IMAGES, "num_samples": 1}, headers={"Accept": "image/png"})
    assert Image.open(io.BytesIO(one.content)).size == (28, 28)  # a single image is the image itself


@pytest.mark.parametrize("accept, png", [
    ("image/png", True), ("image/*", True), ("application/json", False), ("*/*", False), ("", False),
    ("application/json;q=0.5, image/png", True), ("image/png;q=0.2, application/json", False),
    ("image/png;q=nan", False), ("image/png;q=inf, application/json", False), ("image/png;q=x", False),
])
def test_accept_negotiation(accept, png):
    assert api.wants_png(accept) is png
    assert api.prefers(accept.replace("image/png", "audio/wav").replace("image/*", "audio/*"), "audio/wav") is png


@pytest.mark.parametrize("body, field", [
    ({"digit": 10}, "digit"), ({"digit": -1}, "digit"), ({"num_samples": 0}, "num_samples"),
    ({"num_samples": api.MAX_NUM_SAMPLES + 1}, "num_samples"), ({"steps": 0}, "steps"),
    ({"steps": api.MAX_STEPS + 1}, "steps"), ({"num_samples": 11, "sampler": "ddpm"}, "exceeds"),
    ({"num_samples": 100, "steps": 101}, "exceeds"), ({"guidance_scale": -1}, "guidance_scale"),
    ({"guidance_scale": 1e9}, "guidance_scale"), ({"eta": 2}, "eta"), ({"seed": -1}, "seed"),
    ({"sampler": "euler"}, "sampler"), ({"sampler": "gan"}, "does not draw"), ({"num_samples": "many"}, "num_samples"),
    ({"colour": "red"}, "colour"), ({"model": "vae"}, "model"), ({"seed": 10**30}, "seed"),
    ({"seed": 2**32}, "seed"), ({"num_samples": 1.5}, "num_samples"), ({"digit": True}, "digit"),
])
def test_generate_refuses_bad_parameters_with_422(client, body, field):
    assert field in assert_problem(client.post("/v1/images/generate", json=body), 422)["detail"]


@pytest.mark.parametrize("raw", [b'{"guidance_scale": NaN}', b'{"eta": Infinity}', b'{"guidance_scale": -Infinity}',
                                 b'{"eta": 1e309}', b'{"seed": 1e400}', b"{not json", b"[1, 2]", b"",
                                 b'{"num_samples": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000])
def test_generate_refuses_non_finite_numbers_and_broken_json(client, raw):
    response = client.post("/v1/images/generate", content=raw, headers={"Content-Type": "application/json"})
    assert_problem(response, 422)


@pytest.mark.parametrize("path", ["/v1/images/generate", "/v1/audio/sample"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_a_json_body_sent_as_another_media_type_is_415(client, path, content_type):
    response = client.post(path, content=b'{"num_samples": 1}', headers={"Content-Type": content_type})
    assert f"send the body as application/json, not {content_type}" in assert_problem(response, 415)["detail"]
    assert client.post(path, content=b'{"num_samples": 1}', headers={"Content-Type": "application/json; charset=utf-8",
                                                                    "Accept": "application/json"}).status_code == 200


def test_generate_with_the_gan_when_one_is_served(client):
    if "gan" not in client.app.state.models["images"]:
        pytest.skip("no GAN checkpoint is trained or shipped (models/gan_model.pt, models/pretrained/gan_model.pt)")
    body = client.post("/v1/images/generate", json={"model": "gan", "num_samples": 3, "digit": 4}).json()
    assert body["sampler"] == "gan" and len(body["images"]) == 3
    assert "diffusion model only" in assert_problem(
        client.post("/v1/images/generate", json={"model": "gan", "guidance_scale": 2}), 422)["detail"]


def test_generate_refuses_a_model_that_is_not_served():
    """--gan_checkpoint none serves no GAN even where one ships: a request for it is the client's mistake."""
    with TestClient(api.create_app(api.parse_args(["--gan_checkpoint", "none", "--vae_checkpoint", "none"]))) as bare:
        wait_ready(bare)
        assert list(bare.get("/v1/models").json()["images"]) == ["diffusion"]
        detail = assert_problem(bare.post("/v1/images/generate", json={"model": "gan"}), 422)["detail"]
    assert "not served" in detail


# ----------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------
def test_reconstruct_returns_a_16khz_mono_wav_of_the_same_length(client):
    upload = tone_wav(1.5, rate=44_100, channels=2)
    response = client.post("/v1/audio/reconstruct", files={"file": ("tone.wav", upload, "audio/wav")},
                           data={"griffin_lim_iters": "4"})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    assert float(response.headers["x-audio-duration-seconds"]) == pytest.approx(1.5)
    assert "model;dur=" in response.headers["server-timing"]
    wav, rate = sf.read(io.BytesIO(response.content))
    assert rate == audio_gen.SAMPLE_RATE and wav.ndim == 1 and len(wav) == int(1.5 * audio_gen.SAMPLE_RATE)
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0.01
    unrefined = client.post("/v1/audio/reconstruct", files={"file": ("tone.wav", upload, "audio/wav")},
                            data={"griffin_lim_iters": "4", "refine_steps": "0"})
    assert unrefined.status_code == 200 and unrefined.content != response.content  # the field reaches the model
    assert len(sf.read(io.BytesIO(unrefined.content))[0]) == len(wav)


def test_reconstruct_judges_audio_by_content_not_by_name(client):
    flac = io.BytesIO()
    sf.write(flac, np.sin(np.arange(16_000) * 0.1) * 0.3, 16_000, format="FLAC")
    response = client.post("/v1/audio/reconstruct", files={"file": ("upload.txt", flac.getvalue(), "text/plain")},
                           data={"griffin_lim_iters": "2"})
    assert response.status_code == 200
    for name, content in [("notes.txt", b"just some text\n" * 20), ("speech.wav", b"RIFF....WAVEfmt garbage")]:
        response = client.post("/v1/audio/reconstruct", files={"file": (name, content, "audio/wav")})
        assert "does not decode" in assert_problem(response, 415)["detail"]


def nan_wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.full(16_000, np.nan, dtype=np.float32), 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@pytest.mark.parametrize("upload, form, words", [
    (lambda: tone_wav(amplitude=0.0), {}, "silent"),
    (lambda: tone_wav(0.2), {}, "lasts"),
    (lambda: tone_wav(31, rate=8000, subtype="PCM_U8"), {}, "at most 30 s"),
    (nan_wav, {}, "NaN"),
    (tone_wav, {"griffin_lim_iters": "0"}, "griffin_lim_iters"),
    (tone_wav, {"griffin_lim_iters": str(api.MAX_GRIFFIN_LIM_ITERS + 1)}, "griffin_lim_iters"),
    (tone_wav, {"griffin_lim_iters": "lots"}, "griffin_lim_iters"),
    (tone_wav, {"refine_steps": "-1"}, "refine_steps"),
    (tone_wav, {"refine_steps": str(api.MAX_REFINE_STEPS + 1)}, "refine_steps"),
])
def test_reconstruct_refuses_bad_audio_and_parameters_with_422(client, upload, form, words):
    response = client.post("/v1/audio/reconstruct", files={"file": ("clip.wav", upload(), "audio/wav")}, data=form)
    assert words in assert_problem(response, 422)["detail"]


def test_reconstruct_without_a_file_is_422(client):
    assert "file" in assert_problem(client.post("/v1/audio/reconstruct", data={"griffin_lim_iters": "4"}), 422)["detail"]


# ----------------------------------------------------------------------------
# The audio VAE: sample and interpolate
# ----------------------------------------------------------------------------
def decoded(wav_b64: str) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(base64.b64decode(wav_b64)))


def test_sample_returns_n_wavs_of_the_length_and_rate_asked_the_same_for_the_same_seed(client):
    request = {**TINY_SAMPLE, "num_samples": 3, "seconds": 1.25, "seed": 5}
    response = client.post("/v1/audio/sample", json=request)
    body = response.json()
    assert response.headers["content-type"] == "application/json" and "model;dur=" in response.headers["server-timing"]
    assert body["prior"] == "mixture" and body["temperature"] == 1 and body["seed"] == 5
    assert body["sample_rate"] == 16_000 and body["clip_seconds"] == 1.25 and len(body["wavs"]) == 3
    for wav_b64 in body["wavs"]:
        wav, rate = decoded(wav_b64)
        assert rate == 16_000 and wav.shape == (20_000,) and np.isfinite(wav).all() and np.abs(wav).max() > 0
    assert client.post("/v1/audio/sample", json=request).json()["wavs"] == body["wavs"]
    assert client.post("/v1/audio/sample", json={**request, "seed": 6}).json()["wavs"] != body["wavs"]
    standard = client.post("/v1/audio/sample", json={**request, "prior": "standard", "temperature": 0.5}).json()
    assert standard["prior"] == "standard" and standard["wavs"] != body["wavs"]


def test_sample_as_audio_wav_is_the_clip_or_the_clips_in_a_row(client):
    one = client.post("/v1/audio/sample", json={**TINY_SAMPLE, "num_samples": 1}, headers={"Accept": "audio/wav"})
    wav, rate = sf.read(io.BytesIO(one.content))
    assert one.headers["content-type"] == "audio/wav" and rate == 16_000 and wav.shape == (16_000,)
    assert one.headers["x-audio-clips"] == "1" and float(one.headers["x-audio-clip-seconds"]) == 1.0
    two = client.post("/v1/audio/sample", json=TINY_SAMPLE, headers={"Accept": "audio/*"})
    wav, _ = sf.read(io.BytesIO(two.content))
    gap = int(api.CLIP_GAP_SECONDS * 16_000)
    assert two.headers["x-audio-clips"] == "2" and wav.shape == (2 * 16_000 + gap,)
    assert np.all(wav[16_000:16_000 + gap] == 0)  # the silence between the clips


@pytest.mark.parametrize("body, words", [
    ({"num_samples": 0}, "num_samples"), ({"num_samples": api.MAX_AUDIO_SAMPLES + 1}, "num_samples"),
    ({"seconds": 0.1}, "seconds"), ({"seconds": api.MAX_AUDIO_SECONDS + 1}, "seconds"),
    ({"num_samples": 7, "seconds": 5}, "exceeds 30 s"), ({"temperature": -0.5}, "temperature"),
    ({"temperature": 11}, "temperature"), ({"prior": "uniform"}, "prior"), ({"seed": -1}, "seed"),
    ({"seed": 10**40}, "seed"), ({"griffin_lim_iters": 0}, "griffin_lim_iters"),
    ({"griffin_lim_iters": api.MAX_GRIFFIN_LIM_ITERS + 1}, "griffin_lim_iters"), ({"num_samples": "two"}, "num_samples"),
    ({"steps": 3}, "steps"), ({"seconds": True}, "seconds"),
])
def test_sample_refuses_bad_parameters_with_422(client, body, words):
    assert words in assert_problem(client.post("/v1/audio/sample", json=body), 422)["detail"]


@pytest.mark.parametrize("raw", [b'{"temperature": NaN}', b'{"temperature": Infinity}', b'{"seconds": -Infinity}',
                                 b'{"seconds": 1e309}', b'{"num_samples": 1e400}', b"{broken"])
def test_sample_refuses_non_finite_numbers_and_broken_json(client, raw):
    response = client.post("/v1/audio/sample", content=raw, headers={"Content-Type": "application/json"})
    assert_problem(response, 422)


def test_sample_refuses_the_mixture_prior_of_a_vae_without_one(client, monkeypatch):
    vae = client.app.state.models["vae"]
    monkeypatch.setattr(vae, "prior", None)
    assert "no learned mixture prior" in assert_problem(
        client.post("/v1/audio/sample", json={**TINY_SAMPLE, "prior": "mixture"}), 422)["detail"]
    assert client.post("/v1/audio/sample", json=TINY_SAMPLE).json()["prior"] == "standard"  # the default follows
    assert client.get("/v1/models").json()["vae"]["priors"] == ["standard"]


def test_without_a_vae_sample_and_interpolate_are_404_problems(strict):
    detail = assert_problem(strict.post("/v1/audio/sample", json=TINY_SAMPLE), 404)["detail"]
    assert "no VAE is served" in detail and "--vae_checkpoint" in detail
    files = {"a": ("a.wav", tone_wav(0.6), "audio/wav"), "b": ("b.wav", tone_wav(0.6), "audio/wav")}
    assert_problem(strict.post("/v1/audio/interpolate", files=files), 404)
    assert_problem(strict.post("/v1/audio/sample", json={"temperature": -1}), 422)  # a bad request is still a 422


def test_a_vae_is_served_only_where_a_checkpoint_exists(tmp_path, monkeypatch, tiny_vae):
    monkeypatch.setattr(audio_gen, "PRETRAINED_DIR", tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)
    assert api.load_vae(None, "cpu") is None and api.load_vae("none", "cpu") is None  # nothing trained or shipped
    (tmp_path / "models").mkdir()
    shutil.copy(PRETRAINED / "audio_autoencoder.pt", tmp_path / "models" / "audio_vae.pt")
    assert api.load_vae(None, "cpu") is None  # a default file that is no VAE is skipped (and logged)
    with pytest.raises(audio_gen.UsageError, match="autoencoder"):
        api.load_vae(str(tmp_path / "models" / "audio_vae.pt"), "cpu")  # ... but refused when named
    shutil.copy(tiny_vae, tmp_path / "models" / "audio_vae.pt")
    assert api.load_vae(None, "cpu").kind == "vae"


def test_the_vae_has_its_own_lane_and_sheds_with_503_when_it_is_full(client):
    with occupied(client, "vae", calls=9):  # one running, eight waiting: every place is taken
        response = client.post("/v1/audio/sample", json=TINY_SAMPLE)
        assert "vae model" in assert_problem(response, 503)["detail"] and int(response.headers["retry-after"]) >= 1
        reconstructed = client.post("/v1/audio/reconstruct", files={"file": ("t.wav", tone_wav(1.0), "audio/wav")},
                                    data={"griffin_lim_iters": "2"})
        assert reconstructed.status_code == 200  # the autoencoder's lane still answers


def test_the_shipped_vae_is_served_by_default_where_it_exists():
    default = audio_gen.default_checkpoint(None, "vae")
    if not default.exists():
        pytest.skip("no VAE is trained or shipped (models/audio_vae.pt, models/pretrained/audio_vae.pt)")
    vae = api.load_vae(None, "cpu")
    assert vae.checkpoint == default and api.describe_vae(vae)["kind"] == "vae"
    out = vae.sample(2, seconds=1.0, griffin_lim_iters=2, seed=1)
    assert out["wav_hat"].shape == (2, 16_000) and out["wav_hat"].isfinite().all()


def test_interpolate_walks_from_a_to_b_in_steps_plus_one_clips(client):
    files = {"a": ("a.wav", tone_wav(1.5), "audio/wav"), "b": ("b.flac", flac_noise(2.0), "audio/flac")}
    body = client.post("/v1/audio/interpolate", files=files, data={"steps": "3", "griffin_lim_iters": "2"}).json()
    assert body["t"] == pytest.approx([0, 1 / 3, 2 / 3, 1]) and len(body["wavs"]) == 4
    assert body["clip_seconds"] == 1.5  # the shorter clip
    for wav_b64 in body["wavs"]:
        wav, rate = decoded(wav_b64)
        assert rate == 16_000 and wav.shape == (24_000,) and np.isfinite(wav).all()
    walk = client.post("/v1/audio/interpolate", files=files, headers={"Accept": "audio/wav"},
                       data={"steps": "2", "seconds": "1", "griffin_lim_iters": "2"})
    wav, _ = sf.read(io.BytesIO(walk.content))
    assert walk.headers["x-audio-clips"] == "3" and wav.shape == (3 * 16_000 + 2 * int(api.CLIP_GAP_SECONDS * 16_000),)


def flac_noise(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.random.default_rng(0).normal(0, 0.1, int(seconds * 16_000)), 16_000, format="FLAC")
    return buffer.getvalue()


@pytest.mark.parametrize("a, b, form, status, words", [
    (tone_wav, tone_wav, {"steps": "0"}, 422, "steps"),
    (tone_wav, tone_wav, {"steps": str(api.MAX_INTERPOLATION_STEPS + 1)}, 422, "steps"),
    (tone_wav, tone_wav, {"seconds": "nan"}, 422, "seconds"),
    (tone_wav, tone_wav, {"seconds": "inf"}, 422, "seconds"),
    (tone_wav, tone_wav, {"seconds": "0.1"}, 422, "seconds"),
    (tone_wav, tone_wav, {"seed": "-1"}, 422, "seed"),
    (tone_wav, tone_wav, {"griffin_lim_iters": "1e3"}, 422, "griffin_lim_iters"),
    (lambda: tone_wav(5), lambda: tone_wav(5), {"steps": "6"}, 422, "exceeds 30 s"),
    (tone_wav, lambda: b"not audio at all" * 10, {}, 415, "does not decode"),
    (tone_wav, lambda: tone_wav(amplitude=0), {}, 422, "silent"),
    (tone_wav, lambda: tone_wav(0.2), {}, 422, "lasts"),
    (tone_wav, lambda: tone_wav(31, rate=8000, subtype="PCM_U8"), {}, 422, "at most 30 s"),
    (tone_wav, nan_wav, {}, 422, "NaN"),
])
def test_interpolate_refuses_bad_uploads_and_parameters(client, a, b, form, status, words):
    files = {"a": ("a.wav", a(), "audio/wav"), "b": ("b.wav", b(), "audio/wav")}
    form = {"griffin_lim_iters": "2", **form}
    assert words in assert_problem(client.post("/v1/audio/interpolate", files=files, data=form), status)["detail"]


def test_interpolate_without_its_second_file_is_422(client):
    response = client.post("/v1/audio/interpolate", files={"a": ("a.wav", tone_wav(), "audio/wav")})
    assert "b" in assert_problem(response, 422)["detail"]


# ----------------------------------------------------------------------------
# Limits on load: body size, queue, deadline
# ----------------------------------------------------------------------------
def test_oversized_body_is_413_by_length_and_while_streaming(strict):
    upload = tone_wav(2.0)  # 64 KB against a 50 KB limit
    response = strict.post("/v1/audio/reconstruct", files={"file": ("clip.wav", upload, "audio/wav")})
    assert "0.05 MB" in assert_problem(response, 413)["detail"]
    sent = []

    def chunks():  # no Content-Length: the server must count the bytes as they arrive
        for _ in range(1000):
            sent.append(1)
            yield b"x" * 1000

    response = strict.post("/v1/audio/reconstruct", content=chunks(),
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_problem(response, 413)


def test_full_queue_is_503_with_retry_after(strict):
    with occupied(strict, "diffusion", calls=2):  # one running, one waiting: the single place is taken
        response = strict.post("/v1/images/generate", json=TINY_IMAGES)
        assert_problem(response, 503)
        assert int(response.headers["retry-after"]) >= 1
        # the other model has its own lane and still answers (here: its own refusal of a silent clip)
        silent = strict.post("/v1/audio/reconstruct", files={"file": ("s.wav", tone_wav(0.5, amplitude=0), "x")})
        assert_problem(silent, 422)


def test_request_waiting_past_its_deadline_is_504(strict):
    with occupied(strict, "diffusion"):
        body = assert_problem(strict.post("/v1/images/generate", json=TINY_IMAGES), 504)
        assert "0.5 s" in body["detail"]


# ----------------------------------------------------------------------------
# Security: token, CORS, bind address; misc HTTP errors
# ----------------------------------------------------------------------------
def test_bearer_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("IAG_API_TOKEN", "s3cret")
    guarded = TestClient(api.create_app(api.parse_args([])))
    response = guarded.get("/v1/models")
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert_problem(guarded.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(guarded.post("/v1/images/generate", json=TINY_IMAGES), 401)
    assert guarded.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 503  # not loaded
    assert guarded.get("/healthz").status_code == 200  # probes need no token


def test_cors_is_off_unless_origins_are_given():
    preflight = {"Origin": "http://127.0.0.1:8501", "Access-Control-Request-Method": "POST"}
    closed = TestClient(api.create_app(api.parse_args([])))
    assert "access-control-allow-origin" not in closed.options("/v1/images/generate", headers=preflight).headers
    open_ = TestClient(api.create_app(api.parse_args(["--cors_origins", "http://127.0.0.1:8501"])))
    response = open_.options("/v1/images/generate", headers=preflight)
    assert response.headers["access-control-allow-origin"] == "http://127.0.0.1:8501"


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/v2/everything"), 404)
    assert_problem(client.get("/v1/images/generate"), 405)


def test_binding_beyond_loopback_warns():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert api.exposure_warning(host) is None
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.org"):
        assert "other machines" in api.exposure_warning(host)


@pytest.mark.parametrize("flags, words", [
    (["--workers", "0"], "--workers"), (["--workers", "65"], "about 0.5 GB"), (["--port", "70000"], "--port"),
    (["--port", "0"], "--port"), (["--port", "eighty"], "--port"), (["--torch_threads", "0"], "--torch_threads"),
    (["--torch_threads", "100000"], "--torch_threads"), (["--deadline_s", "nan"], "--deadline_s"),
    (["--deadline_s", "0"], "--deadline_s"), (["--deadline_s", "-5"], "--deadline_s"),
    (["--deadline_s", "inf"], "--deadline_s"), (["--deadline_s", "86400"], "--deadline_s"),
    (["--queue_size", "-1"], "--queue_size"), (["--queue_size", "10000000"], "holds its body in memory"),
    (["--max_upload_mb", "inf"], "--max_upload_mb"), (["--max_upload_mb", "0"], "--max_upload_mb"),
    (["--max_upload_mb", "-infinity"], "--max_upload_mb"), (["--max_upload_mb", "1e6"], "in memory"),
    (["--cors_origins", "127.0.0.1:8501"], "not an origin"), (["--cors_origins", "http://a.example/path"], "origin"),
    (["--image_checkpoint", "missing.pt"], "not a file"), (["--vae_checkpoint", "missing.pt"], "not a file"),
    (["--audio_checkpoint", "tests"], "is a folder"), (["--vae_checkpoint", "models"], "is a folder"),
    (["--gan_checkpoint", "."], "is a folder"),
])
def test_bad_flags_are_one_sentence_and_exit_2(flags, words, capsys):
    with pytest.raises(SystemExit) as stop:
        api.parse_args(flags)
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_help_shows_each_flags_range(capsys):
    with pytest.raises(SystemExit) as stop:
        api.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0 and "[between 1 and 64]" in text and "[> 0 and <= 3,600]" in text
    assert "'none': no VAE" in text


def test_bad_environment_settings_are_refused_like_flags(monkeypatch, capsys):
    for name, value, words in [("IAG_PORT", "http", "--port"), ("IAG_DEADLINE_S", "NaN", "--deadline_s"),
                               ("IAG_VAE_CHECKPOINT", "/nonexistent/vae.pt", "not a file")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as stop:
            api.parse_args([])
        assert stop.value.code == 2 and words in capsys.readouterr().err
        monkeypatch.delenv(name)


def test_bad_flag_on_the_command_line_prints_one_error_line():
    result = run_script("api.py", "--workers", "0", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "api.py: error: --workers must be a whole number between 1 and 64, got 0"


def test_a_checkpoint_from_the_other_script_stops_the_server_before_it_serves():
    result = run_script("api.py", "--audio_checkpoint", str(PRETRAINED / "diffusion_model.pt"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("api.py: error: checkpoint") and "audio_gen.py" in last


@pytest.mark.parametrize("flag, path, words", [
    ("--vae_checkpoint", lambda tmp: str(tmp), "is a folder, not a checkpoint file"),
    ("--image_checkpoint", lambda tmp: truncated(tmp, "diffusion_model.pt"), "readable"),
])
def test_a_folder_or_a_truncated_checkpoint_on_the_command_line_is_one_error_line(flag, path, words, tmp_path):
    result = run_script("api.py", flag, path(tmp_path), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("api.py: error: ") and words in last


def test_a_port_in_use_stops_main_before_the_models_load(monkeypatch, capsys):
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("uvicorn started"))
    monkeypatch.setattr(api, "check_startup", lambda args: pytest.fail("models loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as stop:
            api.main(["--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "cannot listen on 127.0.0.1:" in err[0], err


def truncated(tmp_path: Path, name: str) -> str:
    (tmp_path / name).write_bytes((PRETRAINED / name).read_bytes()[:4096])
    return str(tmp_path / name)


@pytest.mark.parametrize("flag, checkpoint, words", [
    ("--image_checkpoint", lambda tmp: truncated(tmp, "diffusion_model.pt"), "readable"),
    ("--gan_checkpoint", lambda tmp: truncated(tmp, "gan_model.pt"), "readable"),
    ("--audio_checkpoint", lambda tmp: truncated(tmp, "audio_autoencoder.pt"), "not readable"),
    ("--vae_checkpoint", lambda tmp: truncated(tmp, "audio_autoencoder.pt"), "not readable"),
    ("--image_checkpoint", lambda tmp: str(PRETRAINED / "audio_autoencoder.pt"), "audio"),
    ("--gan_checkpoint", lambda tmp: str(PRETRAINED / "diffusion_model.pt"), "diffusion"),
    ("--vae_checkpoint", lambda tmp: str(PRETRAINED / "audio_autoencoder.pt"), "autoencoder"),
    ("--vae_checkpoint", lambda tmp: str(PRETRAINED / "gan_model.pt"), "not an audio_gen.py checkpoint"),
    ("--device", lambda tmp: "quantum", "not a device name"),
])
def test_a_checkpoint_that_does_not_load_stops_main_with_one_error_line(flag, checkpoint, words, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("uvicorn started"))
    with pytest.raises(SystemExit) as stop:
        api.main([flag, checkpoint(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("api.py: error: ") and words in err[0], err


# ----------------------------------------------------------------------------
# A real server: python api.py on 127.0.0.1 at a free port, stopped by the fixture
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_vae):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "api.py"), "--host", "127.0.0.1", "--port", str(port),
                                "--max_upload_mb", "1", "--vae_checkpoint", str(tiny_vae)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the server was not ready within 120 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_generates_a_png(server):
    response = httpx.post(f"{server}/v1/images/generate", json={**TINY_IMAGES, "digit": 3},
                          headers={"Accept": "image/png"}, timeout=60)
    image = Image.open(io.BytesIO(response.content))
    assert response.status_code == 200 and image.format == "PNG" and image.mode == "L"


def test_server_round_trips_a_wav(server):
    response = httpx.post(f"{server}/v1/audio/reconstruct", files={"file": ("tone.wav", tone_wav(), "audio/wav")},
                          data={"griffin_lim_iters": "4"}, timeout=60)
    wav, rate = sf.read(io.BytesIO(response.content))
    assert response.status_code == 200 and rate == 16_000 and len(wav) == 24_000


def test_server_refuses_oversized_and_non_audio_uploads(server):
    big = tone_wav(40, rate=16_000)  # 1.3 MB against the 1 MB limit
    response = httpx.post(f"{server}/v1/audio/reconstruct", files={"file": ("big.wav", big, "audio/wav")}, timeout=60)
    assert_problem(response, 413)
    response = httpx.post(f"{server}/v1/audio/reconstruct", files={"file": ("a.wav", b"plain text", "audio/wav")},
                          timeout=60)
    assert_problem(response, 415)


def test_server_answers_8_concurrent_requests_or_sheds_them_with_503(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            images = [http.post("/v1/images/generate", json={**TINY_IMAGES, "seed": i}) for i in range(4)]
            audio = [http.post("/v1/audio/reconstruct", files={"file": ("t.wav", tone_wav(1.0), "audio/wav")},
                               data={"griffin_lim_iters": "4"}) for _ in range(4)]
            return await asyncio.gather(*images, *audio)

    responses = asyncio.run(burst())
    for response in responses:
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
    assert sum(r.status_code == 200 for r in responses) >= 2  # each model answered at least its first
    for seed, response in enumerate(responses[:4]):  # each answer belongs to its own request
        assert response.status_code != 200 or json.loads(response.content)["seed"] == seed


def test_server_samples_wavs_from_the_vae_and_refuses_nan_with_422(server):
    response = httpx.post(f"{server}/v1/audio/sample", json={**TINY_SAMPLE, "num_samples": 3, "seconds": 0.75},
                          timeout=60)
    wavs = [decoded(wav_b64) for wav_b64 in response.json()["wavs"]]
    assert response.status_code == 200 and len(wavs) == 3
    assert all(rate == 16_000 and wav.shape == (12_000,) for wav, rate in wavs)
    response = httpx.post(f"{server}/v1/audio/sample", content=b'{"temperature": NaN}', timeout=60,
                          headers={"Content-Type": "application/json", "Accept": "audio/wav"})
    assert "temperature" in assert_problem(response, 422)["detail"]
    assert httpx.get(f"{server}/v1/models", timeout=60).json()["vae"]["kind"] == "vae"
