"""image_gen.py: the diffusion maths on known inputs, and the real CLI on a few hundred MNIST digits."""

import hashlib
import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image

import image_gen

TINY = ["--subset", "256", "--timesteps", "20", "--base_channels", "16", "--batch_size", "64",
        "--fid_reference_size", "48", "--seed", "3"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_usage_error(result, *fragments: str) -> None:
    """Bad input: exit status 2, exactly one line on stderr that names the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def main_error(capsys, *argv: str) -> str:
    """image_gen.main in this process (no interpreter start-up) on bad input: assert_usage_error's rule."""
    with pytest.raises(SystemExit) as exit_info:
        image_gen.main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_dir):
    """Two tiny epochs with FID at both: the run every CLI test reads from."""
    out = tmp_path_factory.mktemp("trained")
    result = run_script("image_gen.py", "--mode", "train", "--epochs", "2", "--fid_samples", "16",
                        "--num_samples", "10", "--data_dir", str(mnist_dir), "--results_dir", str(out / "results"),
                        "--checkpoint", str(out / "model.pt"), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------
# Maths
# ----------------------------------------------------------------------------
def test_positional_encoding_is_sin_cos_of_scaled_timestep():
    encoding = image_gen.PositionalEncoding(8)
    out = encoding(torch.tensor([0, 5]))
    assert out.shape == (2, 8)
    assert torch.allclose(out[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # t = 0: sin 0, cos 0
    frequencies = 10000 ** (-torch.arange(4) / 4)
    assert torch.allclose(out[1], torch.cat([torch.sin(5 * frequencies), torch.cos(5 * frequencies)]), atol=1e-6)


def test_linear_schedule_matches_ho_et_al():
    schedule = image_gen.NoiseSchedule(1000, "linear")
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert torch.allclose(schedule.alphas_cumprod.double(), expected, rtol=1e-5)
    assert schedule.alphas_cumprod[-1] < 1e-4  # x_T is practically pure noise


def test_cosine_schedule_follows_squared_cosine():
    schedule = image_gen.NoiseSchedule(1000, "cosine")
    t = torch.tensor([0, 250, 500, 999])
    f = lambda s: math.cos((s / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(int(s) + 1) / f(0) for s in t])
    assert torch.allclose(schedule.alphas_cumprod[t], expected.float(), atol=1e-4)
    assert torch.all(schedule.betas <= 0.999) and torch.all(schedule.betas > 0)


def test_q_sample_has_the_forward_process_statistics():
    schedule = image_gen.NoiseSchedule(1000)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 300)
    x_t = schedule.q_sample(x0, t, torch.randn_like(x0))
    alpha_bar = schedule.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(0.5 * math.sqrt(alpha_bar), abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - alpha_bar, abs=0.02)


class OracleDenoiser(torch.nn.Module):
    """The exact eps (or v, or x_0) for a known x_0: a perfect denoiser, so a correct sampler must return x_0."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def forward(self, x, t, labels=None, x0_estimate=None):
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return self.schedule.training_target(self.x0, t, eps)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 0, 0.0), ("ddim", 25, 0.0), ("ddim", 10, 1.0),
                                               ("dpmpp", 10, 0.0), ("dpmpp", 20, 0.0)])
def test_samplers_recover_x0_from_a_perfect_denoiser(sampler, steps, eta, prediction):
    schedule = image_gen.NoiseSchedule(100, prediction=prediction)
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    out = image_gen.sample(OracleDenoiser(schedule, x0), schedule, 4, sampler=sampler, steps=steps or 1, eta=eta,
                           generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 28, 28)
    assert torch.allclose(out, x0, atol=1e-4)


class RecordingDenoiser(OracleDenoiser):
    """The perfect denoiser, noting the x_0 estimate each call receives."""

    def forward(self, x, t, labels=None, x0_estimate=None):
        self.received.append(x0_estimate)
        return super().forward(x, t, labels)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 0), ("ddim", 5), ("dpmpp", 5)])
def test_samplers_hand_each_x0_estimate_to_the_next_step(sampler, steps):
    schedule = image_gen.NoiseSchedule(100, prediction="v")
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    model = RecordingDenoiser(schedule, x0)
    model.received = []
    image_gen.sample(model, schedule, 2, sampler=sampler, steps=steps or 1, generator=torch.Generator().manual_seed(0))
    assert len(model.received) == (100 if sampler == "ddpm" else 5)
    assert model.received[0] is None  # nothing estimated before the first step
    for estimate in model.received[1:]:
        assert torch.allclose(estimate, x0, atol=1e-4)  # a perfect denoiser's estimate is x_0 itself


def test_dpmpp_is_ddim_at_first_order_and_second_order_after():
    """DPM-Solver++'s first-order step is DDIM's (eta 0); from the second step on the two part ways."""
    torch.manual_seed(0)
    model = image_gen.DiffusionModel(base_channels=16)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # an untrained but not silent network
    schedule = image_gen.NoiseSchedule(100)
    draw = lambda sampler, steps: image_gen.sample(model, schedule, 2, sampler=sampler, steps=steps,  # noqa: E731
                                                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(draw("dpmpp", 2), draw("ddim", 2), atol=1e-5)  # first step and last step: first order
    assert not torch.allclose(draw("dpmpp", 4), draw("ddim", 4), atol=1e-3)


def test_v_target_is_the_rotation_of_noise_and_data():
    schedule = image_gen.NoiseSchedule(1000, prediction="v")
    x0, noise = torch.full((2, 1, 1, 1), 0.8), torch.full((2, 1, 1, 1), -0.3)
    t = torch.tensor([0, 999])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(schedule.training_target(x0, t, noise), a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert schedule.training_target(x0, t, noise)[1].item() == pytest.approx(-0.8, abs=0.01)  # x_T: v ~ -x_0
    assert torch.equal(image_gen.NoiseSchedule(1000).training_target(x0, t, noise), noise)


def test_unet_keeps_the_image_shape_and_uses_labels():
    torch.manual_seed(0)
    model = image_gen.DiffusionModel(base_channels=16, attention=True, class_conditional=True)
    torch.nn.init.normal_(model.conv_out.weight)  # the zero-initialised output would hide the label's effect
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999])
    out_a = model(x, t, torch.tensor([1, 2, 3]))
    out_b = model(x, t, torch.tensor([4, 5, 6]))
    assert out_a.shape == (3, 1, 28, 28)
    assert not torch.allclose(out_a, out_b)
    assert model(x, t).shape == (3, 1, 28, 28)  # no labels: the null label


def test_self_conditioned_unet_reads_the_x0_estimate():
    torch.manual_seed(0)
    model = image_gen.DiffusionModel(base_channels=16, self_condition=True)
    torch.nn.init.normal_(model.conv_out.weight)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 500])
    without = model(x, t)
    assert torch.equal(without, model(x, t, x0_estimate=torch.zeros_like(x)))  # no estimate yet = zeros
    assert not torch.allclose(without, model(x, t, x0_estimate=torch.ones_like(x)))


def test_packaged_mnist_is_the_canonical_dataset(mnist_dir):
    images, labels = image_gen.load_mnist(str(mnist_dir), "train")
    test_images, test_labels = image_gen.load_mnist(str(mnist_dir), "test")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert test_images.shape == (10000, 28, 28)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known first training labels
    assert test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert images.max() == 255 and images.min() == 0
    assert torch.bincount(labels).min() > 5000


def test_fid_of_a_set_against_itself_is_near_zero_and_noise_is_far(mnist_dir):
    evaluator = image_gen.FIDEvaluator(str(mnist_dir), 64, torch.device("cpu"))
    test_images, _ = image_gen.load_mnist(str(mnist_dir), "test")
    same = evaluator.score(test_images[:64].unsqueeze(1))
    noise = evaluator.score(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8))
    assert "TF-Inception" in evaluator.extractor
    assert abs(same) < 1.0
    assert noise > 100 * max(abs(same), 1.0)


# ----------------------------------------------------------------------------
# The CLI, end to end
# ----------------------------------------------------------------------------
def test_train_writes_every_output(trained):
    results = trained / "results"
    for name in ["training_loss.png", "final_samples.png", "denoising.gif", "image_metrics.json",
                 "epoch_comparisons/samples_epoch_001.png", "epoch_comparisons/samples_epoch_002.png",
                 "epoch_comparisons/metrics_comparison.png"]:
        assert (results / name).stat().st_size > 500, name
    metrics = json.loads((results / "image_metrics.json").read_text())
    assert [e["epoch"] for e in metrics["history"]] == [1, 2]
    assert all(e["fid"] > 0 and e["loss"] > 0 and e["images_per_second"] > 0 for e in metrics["history"])
    assert metrics["fid_setup"]["samples"] == 16 and metrics["fid_setup"]["reference_size"] == 48
    assert metrics["history"][1]["loss"] < metrics["history"][0]["loss"]
    gif = Image.open(results / "denoising.gif")
    assert gif.n_frames >= 10
    assert len(list((results / "samples").glob("*.png"))) == 10


def test_infer_reads_everything_from_the_checkpoint_and_repeats_exactly(trained, tmp_path):
    runs = []
    for name in ("a", "b"):
        result = run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(trained / "model.pt"),
                            "--num_samples", "10", "--seed", "3", "--results_dir", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(tmp_path / name / "samples")
    files = sorted(p.name for p in runs[0].glob("*.png"))
    assert len(files) == 10
    image = Image.open(runs[0] / files[0])
    assert image.size == (28, 28) and image.mode == "L"
    assert np.asarray(image).std() > 0
    for name in files:  # same seed, same checkpoint: the same digits, bit for bit, also as training drew them
        assert digest(runs[0] / name) == digest(runs[1] / name) == digest(trained / "results" / "samples" / name)


def test_in_memory_surface_draws_the_pixels_infer_writes(trained, tmp_path):
    """load_image_generator + generate (what api.py calls) and --mode infer are one code path."""
    result = run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(trained / "model.pt"), "--sampler",
                        "dpmpp", "--sample_steps", "4", "--digit", "7", "--guidance_scale", "2", "--num_samples", "3",
                        "--seed", "5", "--results_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    written = np.stack([np.asarray(Image.open(tmp_path / "samples" / f"sample_{i:05d}.png")) for i in range(3)])

    generator = image_gen.load_image_generator(trained / "model.pt", device="cpu")
    assert generator.kind == "diffusion" and generator.class_conditional and generator.image_size == 28
    assert generator.samplers == ("ddpm", "ddim", "dpmpp")
    assert generator.sha256 == digest(trained / "model.pt")
    frames = []
    images = generator.generate(3, digit=7, sampler="dpmpp", steps=4, guidance_scale=2.0, seed=5, frames=frames)
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28)
    assert np.array_equal(images, written)
    assert len(frames) == 4 and all(f.dtype == np.uint8 and f.shape == (3, 28, 28) for f in frames)
    assert np.array_equal(frames[-1], images)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"num_samples": 0}, "num_samples"),
    ({"digit": 10}, "digit"),
    ({"sampler": "euler"}, "sampler 'euler'"),
    ({"steps": 0}, "steps"),
    ({"eta": -1.0}, "eta"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"num_samples": 10**9}, "num_samples must be a whole number between 1 and 1,000"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"eta": 2.0}, "eta must be a finite number between 0 and 1"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number between 0 and 20"),
    ({"seed": -1}, "seed"),
    ({"sampler": "ddim", "steps": 21}, "steps 21 exceeds the 20 timesteps"),
])
def test_in_memory_surface_refuses_bad_arguments(trained, kwargs, fragment):
    generator = image_gen.load_image_generator(trained / "model.pt", device="cpu")
    with pytest.raises(image_gen.UsageError, match=fragment):
        generator.generate(**{"num_samples": 2, **kwargs})


def test_in_memory_surface_refuses_bad_checkpoints_and_models(trained, tmp_path):
    with pytest.raises(image_gen.UsageError, match="does not exist"):
        image_gen.load_image_generator(tmp_path / "nope.pt")
    with pytest.raises(image_gen.UsageError, match="model must be"):
        image_gen.load_image_generator(trained / "model.pt", model="vae")
    state = torch.load(trained / "model.pt", weights_only=True)
    state["config"]["class_conditional"] = False
    unconditional = tmp_path / "unconditional.pt"
    torch.save(state, unconditional)
    with pytest.raises(image_gen.UsageError, match="does not match"):  # the label embedding has no place to go
        image_gen.load_image_generator(unconditional)
    network = image_gen.DiffusionModel(16, class_conditional=False)
    drawing = image_gen.ImageGenerator("diffusion", network, image_gen.NoiseSchedule(20), False, torch.device("cpu"))
    with pytest.raises(image_gen.UsageError, match="class-conditional"):
        drawing.generate(1, digit=3)
    assert drawing.generate(1, sampler="ddim", steps=2).shape == (1, 28, 28)


def test_infer_ddim_with_a_digit_and_guidance(trained, tmp_path):
    result = run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(trained / "model.pt"),
                        "--sampler", "ddim", "--sample_steps", "5", "--digit", "3", "--guidance_scale", "2",
                        "--num_samples", "4", "--results_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
    assert (tmp_path / "final_samples.png").is_file()


def test_resume_continues_the_epoch_count_and_history(trained, tmp_path, mnist_dir):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes((trained / "model.pt").read_bytes())
    result = run_script("image_gen.py", "--mode", "train", "--resume", "--epochs", "3", "--fid_samples", "0",
                        "--checkpoint", str(checkpoint), "--data_dir", str(mnist_dir),
                        "--results_dir", str(tmp_path / "results"), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    before = torch.load(trained / "model.pt", weights_only=True)
    after = torch.load(checkpoint, weights_only=True)
    assert before["epoch"] == 2 and after["epoch"] == 3
    assert after["step"] == before["step"] + 4  # 256 images / batch 64
    assert after["history"]["epochs"][:2] == before["history"]["epochs"]
    assert after["history"]["epochs"][2]["epoch"] == 3
    assert after["lr_scheduler"]["last_epoch"] == after["step"]


def test_benchmark_recipe_trains_and_infers_from_its_checkpoint(tmp_path, mnist_dir):
    checkpoint = tmp_path / "model.pt"
    result = run_script("image_gen.py", "--mode", "train", "--epochs", "1", "--fid_samples", "0", "--num_samples", "4",
                        "--prediction", "x0", "--schedule", "cosine", "--self_condition",
                        "--checkpoint", str(checkpoint), "--data_dir", str(mnist_dir),
                        "--results_dir", str(tmp_path / "train"), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    config = torch.load(checkpoint, weights_only=True)["config"]
    assert config["prediction"] == "x0" and config["schedule"] == "cosine" and config["self_condition"]
    result = run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(checkpoint), "--sampler", "ddim",
                        "--sample_steps", "5", "--num_samples", "4", "--results_dir", str(tmp_path / "infer"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "infer" / "samples").glob("*.png"))) == 4


def test_two_process_torchrun_on_cpu(tmp_path, mnist_dir):
    # Self-conditioning too: each rank decides alone when to run its extra estimate pass.
    result = run_script("image_gen.py", "--mode", "train", "--epochs", "1", "--fid_samples", "8",
                        "--num_samples", "4", "--self_condition", "--checkpoint", str(tmp_path / "model.pt"),
                        "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path / "results"), *TINY,
                        torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # 256 images over 2 ranks at batch 64
    metrics = json.loads((tmp_path / "results" / "image_metrics.json").read_text())
    assert metrics["fid_setup"]["samples"] == 8 and metrics["history"][0]["fid"] > 0


# ----------------------------------------------------------------------------
# The GAN: the same CLI, the same outputs
# ----------------------------------------------------------------------------
TINY_GAN = ["--model", "gan", "--subset", "256", "--base_channels", "16", "--batch_size", "64",
            "--fid_reference_size", "48", "--seed", "3"]


@pytest.fixture(scope="session")
def gan_trained(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("gan")
    result = run_script("image_gen.py", "--mode", "train", "--epochs", "2", "--fid_samples", "16",
                        "--num_samples", "10", "--data_dir", str(mnist_dir), "--results_dir", str(out / "results"),
                        "--checkpoint", str(out / "gan_model.pt"), *TINY_GAN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_gan_train_writes_every_output(gan_trained):
    results = gan_trained / "results"
    for name in ["training_loss.png", "final_samples.png", "latent_interpolation.gif", "image_metrics.json",
                 "epoch_comparisons/samples_epoch_001.png", "epoch_comparisons/samples_epoch_002.png",
                 "epoch_comparisons/metrics_comparison.png"]:
        assert (results / name).stat().st_size > 500, name
    assert not (results / "denoising.gif").exists()
    metrics = json.loads((results / "image_metrics.json").read_text())
    assert [e["epoch"] for e in metrics["history"]] == [1, 2]
    assert all(e["fid"] > 0 and e["d_loss"] > 0 and math.isfinite(e["g_loss"]) for e in metrics["history"])
    assert metrics["fid_setup"]["sampler"] == "gan" and metrics["fid_setup"]["samples"] == 16
    state = torch.load(gan_trained / "gan_model.pt", weights_only=True)
    assert state["kind"] == "image_gan" and state["step"] == 8  # 2 epochs of 256 images at batch 64
    assert {"model", "ema", "discriminator", "optimizer", "optimizer_d"} <= state.keys()
    gif = Image.open(results / "latent_interpolation.gif")
    assert gif.n_frames == 48  # 4 legs of 12 frames
    assert len(list((results / "samples").glob("*.png"))) == 10


def test_gan_resume_restores_both_networks_and_optimizers(gan_trained, tmp_path, mnist_dir):
    checkpoint = tmp_path / "gan_model.pt"
    checkpoint.write_bytes((gan_trained / "gan_model.pt").read_bytes())
    result = run_script("image_gen.py", "--mode", "train", "--resume", "--epochs", "3", "--fid_samples", "0",
                        "--checkpoint", str(checkpoint), "--data_dir", str(mnist_dir),
                        "--results_dir", str(tmp_path / "results"), *TINY_GAN)
    assert result.returncode == 0, result.stderr[-3000:]
    before = torch.load(gan_trained / "gan_model.pt", weights_only=True)
    after = torch.load(checkpoint, weights_only=True)
    assert after["epoch"] == 3 and after["step"] == before["step"] + 4
    assert after["history"]["epochs"][:2] == before["history"]["epochs"]
    assert after["optimizer_d"]["state"][0]["step"] == before["optimizer_d"]["state"][0]["step"] + 4


def test_gan_infer_repeats_exactly_and_the_surface_draws_the_same(gan_trained, tmp_path):
    runs = []
    for name in ("a", "b"):
        result = run_script("image_gen.py", "--mode", "infer", "--model", "gan", "--checkpoint",
                            str(gan_trained / "gan_model.pt"), "--num_samples", "10", "--seed", "3",
                            "--results_dir", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(tmp_path / name / "samples")
    for i in range(10):
        name = f"sample_{i:05d}.png"
        assert digest(runs[0] / name) == digest(runs[1] / name) == digest(gan_trained / "results" / "samples" / name)

    generator = image_gen.load_image_generator(gan_trained / "gan_model.pt", model="gan", device="cpu")
    assert generator.kind == "gan" and generator.samplers == ("gan",) and generator.class_conditional
    frames = []
    images = generator.generate(10, seed=3, frames=frames)
    written = np.stack([np.asarray(Image.open(runs[0] / f"sample_{i:05d}.png")) for i in range(10)])
    assert np.array_equal(images, written) and frames == []
    assert np.array_equal(generator.interpolate(10, seed=3)[0], images)  # the walk starts at the samples
    with pytest.raises(image_gen.UsageError, match="sampler 'ddim'"):
        generator.generate(2, sampler="ddim")


def test_gan_two_process_torchrun_on_cpu(tmp_path, mnist_dir):
    result = run_script("image_gen.py", "--mode", "train", "--epochs", "1", "--fid_samples", "8",
                        "--num_samples", "4", "--checkpoint", str(tmp_path / "gan_model.pt"),
                        "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path / "results"), *TINY_GAN,
                        torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "gan_model.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # 256 images over 2 ranks at batch 64
    assert (tmp_path / "results" / "latent_interpolation.gif").is_file()


def test_checkpoints_of_the_other_kind_are_refused(trained, gan_trained, tmp_path, mnist_dir):
    gan = str(gan_trained / "gan_model.pt")
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--checkpoint", gan), "holds a gan model",
                       "--model gan")
    diffusion = str(trained / "model.pt")
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--model", "gan", "--checkpoint", diffusion),
                       "holds a diffusion model", "--model diffusion")
    before = digest(trained / "model.pt")
    result = run_script("image_gen.py", "--mode", "train", "--resume", "--epochs", "5", "--checkpoint", diffusion,
                        "--data_dir", str(mnist_dir), "--results_dir", str(tmp_path), *TINY_GAN)
    assert_usage_error(result, "holds a diffusion model")
    assert digest(trained / "model.pt") == before
    with pytest.raises(image_gen.UsageError, match="holds a gan model"):
        image_gen.load_image_generator(gan)
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--model", "gan", "--sampler", "ddim",
                                  "--checkpoint", gan), "--sampler ddim")


# ----------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing saved is harmed
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--batch_size", "0"], "--batch_size"),
    (["--digit", "11", "--mode", "infer"], "--digit"),
    (["--device", "cuda"], "no CUDA"),
    (["--sampler", "euler"], "invalid choice"),
])
def test_bad_settings_are_rejected(args, fragment, tmp_path):
    result = run_script("image_gen.py", *args, "--checkpoint", str(tmp_path / "model.pt"),
                        "--results_dir", str(tmp_path))
    assert_usage_error(result, fragment)
    assert not (tmp_path / "model.pt").exists()


# Every numeric flag against its LIMITS entry: not finite, out of its meaningful range, or absurdly costly.
# "--device not-a-device" follows each: a value let through by mistake stops there, before any work.
@pytest.mark.parametrize("args,fragment", [
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
    (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
    (["--learning_rate=-1e-3"], "--learning_rate must be a finite number > 0"),
    (["--model", "gan", "--d_learning_rate", "inf"], "--d_learning_rate must be a finite number > 0, got inf"),
    (["--ema_decay", "1"], "--ema_decay must be a finite number >= 0 and < 1"),
    (["--ema_decay", "nan"], "--ema_decay must be a finite number"),
    (["--label_dropout", "1.5"], "--label_dropout must be a finite number between 0 and 1"),
    (["--label_dropout", "-0.1"], "--label_dropout"),
    (["--mode", "infer", "--sampler", "ddim", "--eta", "2"], "--eta must be a finite number between 0 and 1"),
    (["--mode", "infer", "--eta", "nan"], "--eta"),
    (["--mode", "infer", "--guidance_scale", "-1"], "--guidance_scale must be a finite number between 0 and 20"),
    (["--mode", "infer", "--guidance_scale", "inf"], "--guidance_scale"),
    (["--mode", "infer", "--num_samples", "1000000000"], "--num_samples must be a whole number between 1 and 1,000 "
                                                         "(the grid, the animation and the PNGs are drawn as one batch)"),
    (["--mode", "infer", "--num_samples", "0"], "--num_samples"),
    (["--fid_samples", "1000000000"], "--fid_samples must be a whole number between 0 and 50,000 (FID-50k"),
    (["--fid_samples", "-1"], "--fid_samples"),
    (["--fid_samples", "1"], "a covariance needs two images"),
    (["--fid_reference_size", "1"], "--fid_reference_size must be a whole number between 2 and 10,000"),
    (["--fid_reference_size", "60000"], "the MNIST test set has 10,000 images"),
    (["--sample_steps", "0"], "--sample_steps"),
    (["--sample_steps", "1000000000000"], "--sample_steps must be a whole number between 1 and 10,000"),
    (["--timesteps", "20", "--sampler", "ddim", "--sample_steps", "50"], "--sample_steps 50 exceeds --timesteps 20"),
    (["--timesteps", "0"], "--timesteps"),
    (["--timesteps", "1000000000"], "--timesteps must be a whole number between 1 and 10,000"),
    (["--epochs", "1000000000"], "--epochs must be a whole number between 1 and 10,000"),
    (["--batch_size", "1000000000"], "--batch_size must be a whole number between 1 and 4,096"),
    (["--base_channels", "4"], "--base_channels must be a whole number between 8 and 512"),
    (["--base_channels", "1000000"], "--base_channels"),
    (["--base_channels", "12"], "multiple of 8"),
    (["--model", "gan", "--latent_dim", "0"], "--latent_dim must be a whole number between 1 and 1,024"),
    (["--warmup_steps", "-1"], "--warmup_steps must be a whole number between 0 and 10,000,000"),
    (["--subset", "0"], "--subset"),
    (["--subset", "1000000"], "MNIST has 60,000 training images"),
    (["--mode", "infer", "--digit", "-1"], "--digit must be a whole number between 0 and 9"),
    (["--seed", "-1"], "--seed must be a whole number between 0 and 4,294,967,295"),
    (["--seed", str(2**32)], "--seed"),
    (["--epochs", "1.5"], "invalid int value"),
    (["--eta", "lots"], "invalid float value"),
])
def test_every_numeric_flag_is_checked_against_its_range(args, fragment, tmp_path, capsys):
    line = main_error(capsys, *args, "--checkpoint", str(tmp_path / "model.pt"),
                      "--results_dir", str(tmp_path / "results"), "--device", "not-a-device")
    assert fragment in line
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder made


def test_the_reported_commands_end_in_one_line_not_a_traceback(tmp_path):
    """#18's two examples, run as a user would: a NaN learning rate, and a results folder that is a file."""
    result = run_script("image_gen.py", "--mode", "train", "--learning_rate", "nan",
                        "--checkpoint", str(tmp_path / "model.pt"), "--results_dir", str(tmp_path / "results"))
    assert_usage_error(result, "--learning_rate must be a finite number > 0, got nan")
    a_file = tmp_path / "results.txt"
    a_file.write_text("kept")
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--results_dir", str(a_file)),
                       f"--results_dir {a_file} is a file, not a folder")
    assert a_file.read_text() == "kept" and not (tmp_path / "model.pt").exists()


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot create files in: a read-only one, or /proc for root, who writes anywhere else."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder if os.geteuid() != 0 else Path("/proc")
    folder.chmod(0o755)  # so that pytest can remove it


@pytest.mark.parametrize("case", ["results_is_a_file", "results_below_a_file", "samples_is_a_file",
                                  "results_unwritable", "train_checkpoint_is_a_folder", "train_checkpoint_unwritable",
                                  "infer_checkpoint_is_a_folder", "infer_checkpoint_missing",
                                  "result_file_is_a_folder"])
def test_paths_are_checked_for_what_they_must_be(case, tmp_path, unwritable_dir, capsys):
    """Each path is refused in one line before any work, and what was there before is left as it was."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "samples").write_text("kept")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "grids" / "final_samples.png").mkdir(parents=True)
    argv, fragment = {
        "results_is_a_file": (["--mode", "infer", "--results_dir", a_file], f"--results_dir {a_file} is a file"),
        "results_below_a_file": (["--results_dir", a_file / "out"], f": {a_file} is a file, not a folder"),
        "samples_is_a_file": (["--mode", "infer", "--results_dir", tmp_path / "results"],
                              f"{tmp_path / 'results' / 'samples'} is a file, not a folder"),
        "results_unwritable": (["--results_dir", unwritable_dir / "results"], f"cannot write in {unwritable_dir}"),
        "train_checkpoint_is_a_folder": (["--checkpoint", tmp_path / "folder.pt"], "is a folder; name the file"),
        "train_checkpoint_unwritable": (["--checkpoint", unwritable_dir / "models" / "model.pt"],
                                        f"--checkpoint {unwritable_dir / 'models' / 'model.pt'}: cannot write in"),
        "infer_checkpoint_is_a_folder": (["--mode", "infer", "--checkpoint", tmp_path / "folder.pt"],
                                         f"checkpoint {tmp_path / 'folder.pt'} is a folder, not a file"),
        "infer_checkpoint_missing": (["--mode", "infer", "--checkpoint", tmp_path / "nope.pt"], "does not exist"),
        "result_file_is_a_folder": (["--results_dir", tmp_path / "grids"],
                                    f"{tmp_path / 'grids' / 'final_samples.png'} is a folder, where a file is written"),
    }[case]
    argv = [str(arg) for arg in argv]
    if "--results_dir" not in argv:
        argv += ["--results_dir", str(tmp_path / "out")]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", str(tmp_path / "model.pt")]
    before = sorted(tmp_path.rglob("*"))
    assert fragment in main_error(capsys, *argv, "--num_samples", "1", "--sampler", "ddim", "--sample_steps", "1")
    assert sorted(tmp_path.rglob("*")) == before
    assert a_file.read_text() == "kept" and (tmp_path / "results" / "samples").read_text() == "kept"


class PlantedCode:
    """Unpickling this calls open(marker, "w"): a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_checkpoint(case: str, folder: Path) -> Path:
    """A checkpoint file image_gen.py must refuse, built from the shipped models (or audio_gen.py's)."""
    pretrained = image_gen.PRETRAINED_DIR
    path = folder / f"{case}.pt"
    if case == "truncated":
        data = (pretrained / "diffusion_model.pt").read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case in ("audio", "gan"):
        shutil.copy(pretrained / ("audio_autoencoder.pt" if case == "audio" else "gan_model.pt"), path)
    elif case in ("future_format", "huge_config", "unknown_prediction", "nan_weights"):
        state = torch.load(pretrained / "diffusion_model.pt", weights_only=True)
        if case == "future_format":
            state["format_version"] += 1
        elif case == "nan_weights":
            state["model"]["time_embedding.1.weight"][0, 0] = float("nan")
        elif case == "huge_config":
            state["config"]["base_channels"] = 10**9
        else:
            state["config"]["prediction"] = "score"
        torch.save(state, path)
    elif case == "planted_code":
        torch.save({"kind": "image_diffusion", "format_version": 2, "config": PlantedCode(folder / "ran")}, path)
    elif case == "planted_code_plain_pickle":
        path.write_bytes(pickle.dumps({"kind": "image_diffusion", "config": PlantedCode(folder / "ran")}))
    return path


@pytest.mark.parametrize("mode", [["--mode", "infer"], ["--mode", "train", "--resume"]])
@pytest.mark.parametrize("case,fragment", [
    ("truncated", "is not a readable weights-only PyTorch checkpoint (RuntimeError)"),
    ("empty", "is not a readable weights-only PyTorch checkpoint"),
    ("audio", "is not an image_gen.py checkpoint (its kind is 'audio_autoencoder')"),
    ("gan", "holds a gan model, not a diffusion one; pass --model gan"),
    ("future_format", "has format 3 (from a newer image_gen.py), this script reads format 2"),
    ("huge_config", "config base_channels must be a whole number between 8 and 512"),
    ("unknown_prediction", "config prediction is 'score', not one of eps, v, x0"),
    ("nan_weights", "weight time_embedding.1.weight holds NaN or infinity"),
    ("planted_code", "nothing in it was run"),
    ("planted_code_plain_pickle", "nothing in it was run"),
])
def test_hostile_checkpoints_are_refused_and_left_alone(case, fragment, mode, tmp_path, capsys):
    """Refused in one line, before anything is written; the file is byte for byte as it was; no code ran."""
    path = hostile_checkpoint(case, tmp_path)
    before = digest(path)
    line = main_error(capsys, *mode, "--checkpoint", str(path), "--results_dir", str(tmp_path / "results"),
                      "--num_samples", "1", "--sampler", "ddim", "--sample_steps", "1", "--epochs", "1",
                      "--subset", "64", "--fid_samples", "0")
    assert fragment in line
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no marker file, no results folder


@pytest.mark.parametrize("change,fragment", [
    ({}, "holds weights only (no optimizer state)"),  # the shipped model as it is
    ({"optimizer": {}, "epoch": "many"}, "has no usable epoch, step and history"),
    ({"optimizer": {}, "history": []}, "has no usable epoch, step and history"),
])
def test_resume_refuses_a_checkpoint_without_its_training_state(change, fragment, tmp_path, capsys):
    state = torch.load(image_gen.PRETRAINED_DIR / "diffusion_model.pt", weights_only=True)
    path = tmp_path / "model.pt"
    torch.save({**state, **change}, path)
    before = digest(path)
    line = main_error(capsys, "--mode", "train", "--resume", "--checkpoint", str(path),
                      "--results_dir", str(tmp_path / "results"), "--epochs", "1", "--subset", "64", "--fid_samples", "0")
    assert fragment in line
    assert digest(path) == before and not (tmp_path / "results").exists()


def test_fid_reference_in_a_read_only_data_dir_is_computed_but_not_cached(mnist_dir, tmp_path, monkeypatch):
    """A shared, read-only copy of MNIST still works: the reference statistics stay in memory, not on disk."""
    data_dir = tmp_path / "data"
    shutil.copytree(mnist_dir / "MNIST", data_dir / "MNIST")

    def read_only(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(image_gen, "atomic_write", read_only)
    evaluator = image_gen.FIDEvaluator(str(data_dir), 4, torch.device("cpu"))
    assert evaluator.metric.real_features_num_samples == 4
    assert not list(data_dir.glob("fid_reference_*"))


@pytest.mark.parametrize("case,fragment", [("audio", "is not an image_gen.py checkpoint (its kind is 'audio_autoencoder')"),
                                           ("gan", "holds a gan model"), ("truncated", "not a readable")])
def test_training_does_not_overwrite_a_file_that_is_not_its_checkpoint(case, fragment, tmp_path, capsys):
    """Without --resume, training replaces a checkpoint of its own model, but nothing else that is in the way."""
    path = hostile_checkpoint(case, tmp_path)
    before = digest(path)
    line = main_error(capsys, "--mode", "train", "--checkpoint", str(path), "--results_dir", str(tmp_path / "results"),
                      "--epochs", "1", "--subset", "64", "--fid_samples", "0")
    assert f"training would overwrite --checkpoint {path}, so choose another path: checkpoint {path}" in line
    assert fragment in line
    assert digest(path) == before and not (tmp_path / "results").exists()


def test_diffusion_checkpoint_for_the_gan_is_refused_and_left_alone(tmp_path, capsys):
    path = tmp_path / "diffusion_model.pt"
    shutil.copy(image_gen.PRETRAINED_DIR / "diffusion_model.pt", path)
    before = digest(path)
    line = main_error(capsys, "--mode", "infer", "--model", "gan", "--checkpoint", str(path), "--num_samples", "1",
                      "--results_dir", str(tmp_path / "results"))
    assert "holds a diffusion model, not a gan one; pass --model diffusion" in line
    assert digest(path) == before and not (tmp_path / "results").exists()


def test_help_is_a_reference_with_every_default_and_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        image_gen.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    for group in ("what to run, and where:", "model and noise schedule", "training:", "sampling:", "evaluation:"):
        assert group in text
    for name, bounds in image_gen.LIMITS.items():
        assert f"--{name} {name.upper()}" in text and bounds.describe() in text, name
    assert "--eta ETA DDIM noise: 0 deterministic, 1 DDPM-like (default: 0.0; between 0 and 1)" in text
    assert "--learning_rate LEARNING_RATE peak learning rate (default: 1e-3," in text
    assert "(default: None)" not in text and "exit status 2" in text


def test_bad_checkpoints_are_rejected(tmp_path):
    missing = run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(tmp_path / "nope.pt"))
    assert_usage_error(missing, "does not exist")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 100)
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(corrupt)), "readable")

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(foreign)), "not an image_gen")

    older = tmp_path / "older.pt"  # format 1: additive time conditioning, no `prediction` in the config
    torch.save({"kind": "image_diffusion", "format_version": 1, "config": {"base_channels": 32}}, older)
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(older)), "format 1")


def test_incompatible_checkpoint_and_finished_resume_leave_the_file_alone(trained, tmp_path, mnist_dir):
    state = torch.load(trained / "model.pt", weights_only=True)
    state["config"]["base_channels"] = 24  # weights of a 16-wide net under a 24-wide config
    bad = tmp_path / "mismatch.pt"
    torch.save(state, bad)
    assert_usage_error(run_script("image_gen.py", "--mode", "infer", "--checkpoint", str(bad)), "does not match")

    good = tmp_path / "model.pt"
    good.write_bytes((trained / "model.pt").read_bytes())
    before = digest(good)
    result = run_script("image_gen.py", "--mode", "train", "--resume", "--epochs", "2", "--checkpoint", str(good),
                        "--data_dir", str(mnist_dir), *TINY)
    assert_usage_error(result, "already has 2 epochs")
    assert digest(good) == before


def test_unreadable_data_dir(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for names in image_gen.IDX_FILES.values():
        for name in names:
            (raw / name).write_bytes(b"garbage")
    result = run_script("image_gen.py", "--epochs", "1", "--data_dir", str(tmp_path / "data"),
                        "--checkpoint", str(tmp_path / "model.pt"), "--fid_samples", "0")
    assert_usage_error(result, "cannot read MNIST")
    assert not (tmp_path / "model.pt").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path, mnist_dir):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes((trained / "model.pt").read_bytes())
    before = digest(checkpoint)
    result = run_script("image_gen.py", "--mode", "train", "--epochs", "1", "--learning_rate", "1e30",
                        "--checkpoint", str(checkpoint), "--data_dir", str(mnist_dir), "--fid_samples", "0",
                        "--results_dir", str(tmp_path), *TINY)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "loss became" in result.stderr and "Traceback" not in result.stderr
    assert digest(checkpoint) == before


# ----------------------------------------------------------------------------
# The shipped pretrained model
# ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def classifier(mnist_dir):
    """The benchmark's MNIST classifier, trained once per session on 20,000 digits."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_image import train_classifier

    classifier, accuracy = train_classifier(str(mnist_dir), epochs=2, train_images=20000)
    assert accuracy > 0.95
    return classifier


@pytest.mark.parametrize("model,flags", [("diffusion", ["--sampler", "ddim", "--sample_steps", "50"]),
                                         ("gan", [])])
def test_pretrained_model_draws_the_digit_asked_for(model, flags, tmp_path, mnist_dir, classifier):
    """From any folder, infer with no --checkpoint falls back to the shipped model; a classifier reads its 3s."""
    result = run_script("image_gen.py", "--mode", "infer", "--model", model, *flags,
                        "--digit", "3", "--num_samples", "20", "--data_dir", str(mnist_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrained" in result.stdout
    files = sorted((tmp_path / "results" / "samples").glob("*.png"))
    assert len(files) == 20 and (tmp_path / "results" / "final_samples.png").is_file()
    samples = torch.stack([torch.from_numpy(np.asarray(Image.open(f))) for f in files]).unsqueeze(1)
    assert samples.shape == (20, 1, 28, 28)

    with torch.no_grad():
        read_as = classifier(samples).argmax(1)
    assert (read_as == 3).float().mean() >= 0.9, read_as.tolist()
