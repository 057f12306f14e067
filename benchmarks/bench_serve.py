"""Serving benchmark: a real api.py on 127.0.0.1 under 1, 4 and 16 concurrent clients, for images, audio
reconstruction and, where a VAE is served, audio samples.

    python benchmarks/bench_serve.py                             # the figures in docs/serving.md
    python benchmarks/bench_serve.py --requests 5 --soak 100     # a quick look
    python benchmarks/bench_serve.py --kinds vae --clients 1 4 --soak 0 --vae_checkpoint models/audio_vae.pt

For each endpoint and client count: throughput, p50 / p99 latency and the answers by status; then the
server's resident memory (RSS) before and after a soak of `--soak` requests; and, as the yardstick of a
single request's latency, the same call timed in-process on the scripts' surfaces (target: within 1.5x).
Every request is bounded in count and time and goes to 127.0.0.1 only; the server is stopped at the end.
"""

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import audio_gen  # noqa: E402
import image_gen  # noqa: E402

IMAGE_REQUEST = {"num_samples": 10, "sampler": "ddim", "steps": 20, "seed": 0}  # one of each digit, DDIM-20
AUDIO_SECONDS, AUDIO_ITERS = 5.0, 32  # a 5-s clip, Griffin-Lim's default iterations
SOAK_IMAGE = {"num_samples": 1, "sampler": "ddim", "steps": 5}
SOAK_AUDIO_SECONDS, SOAK_ITERS = 1.0, 4
VAE_REQUEST = {"num_samples": 1, "seconds": AUDIO_SECONDS, "griffin_lim_iters": AUDIO_ITERS}  # one 5-s clip
SOAK_VAE = {"num_samples": 1, "seconds": SOAK_AUDIO_SECONDS, "griffin_lim_iters": SOAK_ITERS}
KINDS = ("image", "audio", "vae")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per run")
    p.add_argument("--requests", type=int, default=8, help="requests each client sends per run")
    p.add_argument("--soak", type=int, default=1000,
                   help="requests of the RSS soak, split evenly among the --kinds run (0: no soak)")
    p.add_argument("--queue_size", type=int, default=8, help="the server's --queue_size")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                   help="endpoints to load (default: image and audio, and vae where a VAE is served)")
    p.add_argument("--vae_checkpoint", default=None,
                   help="the VAE the server and the in-process yardstick load (default: the one api.py picks)")
    p.add_argument("--out", default="results/bench_serve.json", help="where the figures go as JSON")
    args = p.parse_args()
    for name in ("requests", "queue_size", "soak"):
        if not 0 <= getattr(args, name) <= 100_000 or (name == "requests" and args.requests < 1):
            p.error(f"--{name} must be a whole number from {int(name == 'requests')} to 100,000")
    if not all(1 <= clients <= 256 for clients in args.clients):
        p.error("--clients must each be from 1 to 256")
    return args


def clip_wav(seconds: float) -> bytes:
    """A voiced, vibrato tone with a syllable-rate envelope: speech-like enough for the mel path."""
    t = np.arange(int(seconds * audio_gen.SAMPLE_RATE)) / audio_gen.SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * h * (140 * t + 4 * np.sin(2 * np.pi * 3 * t))) / h for h in range(1, 8))
    wav = 0.1 * voice * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2)
    buffer = io.BytesIO()
    sf.write(buffer, wav, audio_gen.SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, Python {platform.python_version()}"


# ----------------------------------------------------------------------------
# The yardstick: the same calls in-process, one thread, interleaved with the server's (the load on a shared
# machine drifts, so each server request is paired with an in-process call made just before it)
# ----------------------------------------------------------------------------
class InProcess:
    def __init__(self, vae: audio_gen.AudioModel | None):
        torch.set_num_threads(1)
        self.generator = image_gen.load_image_generator(device="cpu")
        self.model = audio_gen.load_audio_model(device="cpu")
        self.vae = vae
        self.wav = audio_gen.decode_audio(CLIPS[AUDIO_SECONDS])
        self.generator.generate(1, sampler="ddim", steps=1)
        self.model.reconstruct(self.wav, griffin_lim_iters=1)
        if vae is not None:
            vae.sample(1, seconds=1.0, griffin_lim_iters=1)

    def seconds(self, kind: str) -> float:
        start = time.perf_counter()
        if kind == "image":
            self.generator.generate(IMAGE_REQUEST["num_samples"], sampler="ddim", steps=IMAGE_REQUEST["steps"])
        elif kind == "vae":
            self.vae.sample(VAE_REQUEST["num_samples"], seconds=VAE_REQUEST["seconds"],
                            griffin_lim_iters=VAE_REQUEST["griffin_lim_iters"])
        else:
            self.model.reconstruct(self.wav, griffin_lim_iters=AUDIO_ITERS)
        return time.perf_counter() - start


def single_client(url: str, kind: str, requests: int, local: InProcess) -> dict:
    """One client, each request preceded by the same call in-process; latency ratio of the medians."""
    served, alone, statuses = [], [], Counter()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            await one(http, kind)  # the connection, opened once
            for _ in range(requests):
                alone.append(local.seconds(kind))
                status, seconds = await one(http, kind)
                statuses[status] += 1
                served.append(seconds)

    start = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - start - sum(alone)
    return {"kind": kind, "clients": 1, "requests": requests, "wall_s": wall, "ok_per_s": statuses[200] / wall,
            "p50_s": float(np.percentile(served, 50)), "p99_s": float(np.percentile(served, 99)),
            "statuses": dict(statuses), "in_process_p50_s": statistics.median(alone),
            "single_vs_in_process": statistics.median(served) / statistics.median(alone)}


# ----------------------------------------------------------------------------
# Load against the server
# ----------------------------------------------------------------------------
async def one(http: httpx.AsyncClient, kind: str, soak: bool = False) -> tuple[int, float]:
    start = time.perf_counter()
    if kind == "image":
        response = await http.post("/v1/images/generate", json=SOAK_IMAGE if soak else IMAGE_REQUEST,
                                   headers={"Accept": "image/png"})
    elif kind == "vae":
        response = await http.post("/v1/audio/sample", json=SOAK_VAE if soak else VAE_REQUEST,
                                   headers={"Accept": "audio/wav"})
    else:
        seconds, iters = (SOAK_AUDIO_SECONDS, SOAK_ITERS) if soak else (AUDIO_SECONDS, AUDIO_ITERS)
        response = await http.post("/v1/audio/reconstruct", files={"file": ("clip.wav", CLIPS[seconds], "audio/wav")},
                                   data={"griffin_lim_iters": str(iters)})
    return response.status_code, time.perf_counter() - start


async def run_clients(url: str, kind: str, clients: int, requests: int) -> dict:
    async def client(http: httpx.AsyncClient) -> list[tuple[int, float]]:
        return [await one(http, kind) for _ in range(requests)]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[client(http) for _ in range(clients)]) for r in rs]
        wall = time.perf_counter() - start
    ok = sorted(seconds for status, seconds in results if status == 200)
    return {"kind": kind, "clients": clients, "requests": len(results), "wall_s": wall,
            "ok_per_s": len(ok) / wall, "p50_s": float(np.percentile(ok, 50)) if ok else None,
            "p99_s": float(np.percentile(ok, 99)) if ok else None,
            "statuses": dict(Counter(status for status, _ in results))}


async def soak(url: str, total: int, kinds_run: list[str], clients: int = 4) -> Counter:
    kinds = [kinds_run[i % len(kinds_run)] for i in range(total)]
    statuses: Counter = Counter()

    async def client(http: httpx.AsyncClient, mine: list[str]) -> None:
        for kind in mine:
            status, _ = await one(http, kind, soak=True)
            statuses[status] += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*[client(http, kinds[i::clients]) for i in range(clients)])
    return statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIPS = {AUDIO_SECONDS: clip_wav(AUDIO_SECONDS), SOAK_AUDIO_SECONDS: clip_wav(SOAK_AUDIO_SECONDS)}


def main() -> None:
    args = parse_args()
    import api  # after the flags: api.py reads its own settings from IAG_* at import

    print(f"machine: {machine()}")
    print(f"image request {IMAGE_REQUEST}; audio request a {AUDIO_SECONDS:g}-s clip, {AUDIO_ITERS} GL iterations; "
          f"vae request {VAE_REQUEST}")
    try:
        vae = api.load_vae(args.vae_checkpoint, "cpu")
    except audio_gen.UsageError as error:
        raise SystemExit(f"error: {error}") from None
    kinds = args.kinds or ["image", "audio", *(["vae"] if vae else [])]
    if "vae" in kinds and vae is None:
        raise SystemExit("error: --kinds vae, but no VAE is trained or shipped: give --vae_checkpoint")
    if vae is not None:
        print(f"vae: {vae.checkpoint} (sha256 {vae.sha256[:12]}, epoch {vae.epoch})")
    local = InProcess(vae)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "api.py"), "--port", str(port), "--queue_size",
                               str(args.queue_size), "--vae_checkpoint", str(vae.checkpoint) if vae else "none"],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit("error: the server was not ready within 120 s")
        rows = []
        for kind in kinds:
            for clients in args.clients:
                if clients == 1:
                    row = single_client(url, kind, args.requests, local)
                else:
                    row = asyncio.run(run_clients(url, kind, clients, args.requests))
                rows.append(row)
                ratio = (f", p50 / in-process {row['in_process_p50_s'] * 1000:.0f} ms = "
                         f"{row['single_vs_in_process']:.2f}x") if clients == 1 else ""
                print(f"{kind:5s} {clients:2d} clients x {args.requests}: {row['ok_per_s']:6.2f} ok/s, "
                      f"p50 {row['p50_s'] * 1000:7.0f} ms, p99 {row['p99_s'] * 1000:7.0f} ms, "
                      f"statuses {row['statuses']}{ratio}", flush=True)
        before = rss_mb(server.pid)
        statuses = asyncio.run(soak(url, args.soak, kinds)) if args.soak else Counter()
        after = rss_mb(server.pid)
        print(f"soak: {args.soak} requests ({dict(statuses)}), RSS {before:.0f} -> {after:.0f} MB "
              f"({(after / before - 1) * 100:+.1f} %)")
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "image_request": IMAGE_REQUEST, "audio_seconds": AUDIO_SECONDS,
                               "griffin_lim_iters": AUDIO_ITERS, "vae_request": VAE_REQUEST if vae else None,
                               "vae_checkpoint": str(vae.checkpoint) if vae else None,
                               "vae_sha256": vae.sha256 if vae else None, "runs": rows,
                               "soak": {"requests": args.soak, "kinds": kinds, "statuses": dict(statuses), "rss_before_mb": before,
                                        "rss_after_mb": after}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
