"""Training-step throughput and peak memory of our SE-DenseNet-121 (SE on/off x efficient on/off)
against torchvision's densenet121 (plain and memory_efficient=True), same settings, one run.

    python3 -m bench.model                                      # GPU: 224 px, batch 128, bf16, channels_last
    python3 -m bench.model --compile reduce-overhead --variants tv,ours-se
    python3 -m bench.model --device cpu --batch 4 --size 64 --steps 3

One step = forward + cross-entropy + backward + SGD(momentum) step on a synthetic batch.
GPU: timed with CUDA events; peak memory = torch.cuda.max_memory_allocated() counted from
before the model is built, so weights, grads, momentum, the batch, warm-up and CUDA-graph
capture are all in it (under CUDA graphs the pool is allocated at capture, see
shared/notes/gpu-anchors.md). CPU: perf_counter; memory is the peak of one eager forward +
backward as torch's MemTracker counts it (weights, grads, activations, checkpoint caches).

--max-batch also finds, per variant, the largest batch whose eager training step fits in the
GPU's memory (doubling, then bisection), and extrapolates the compiled one from the measured
peak (peak = fixed + batch x per-image; the fixed part is measured at batch 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from trainer.training.model import SqueezeExcite, se_densenet

VARIANTS: dict[str, Callable[[int], nn.Module]] = {
    "tv": lambda nc: torchvision.models.densenet121(weights=None, num_classes=nc),
    "tv-eff": lambda nc: torchvision.models.densenet121(weights=None, num_classes=nc, memory_efficient=True),
    "ours": lambda nc: se_densenet(121, nc, se=False),
    "ours-eff": lambda nc: se_densenet(121, nc, se=False, efficient=True),
    "ours-se": lambda nc: se_densenet(121, nc, se=True),
    "ours-se-eff": lambda nc: se_densenet(121, nc, se=True, efficient=True),
    "cand-se-sumfc": lambda nc: with_sum_fc_se(se_densenet(121, nc, se=True)),
    "ours-se-sharedbn": lambda nc: se_densenet(121, nc, se=True, shared_bn=True),  # compiled only differs
    "ours-se-eff-sharedbn": lambda nc: se_densenet(121, nc, se=True, efficient=True, shared_bn=True),
}
BASELINE = "tv"


# ----------------------------------------------------------------------------- candidates
# Fast paths not in the model yet: measured here first, moved into trainer/training/model.py when they win.
# Each must compute the model's own function; check_candidates() verifies that before timing.


class SumFCSqueezeExcite(SqueezeExcite):
    """SE whose two tiny Linear layers are written as multiply-and-sum. Same function; compiled,
    inductor fuses them into its own small kernels instead of four cuBLAS calls per layer (the
    batch x k x k/r products are far too small for a GEMM), which under CUDA graphs is what SE
    costs in the deep blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        h = F.relu((s[:, None, :] * self.fc1.weight).sum(-1) + self.fc1.bias)
        g = torch.sigmoid((h[:, None, :] * self.fc2.weight).sum(-1) + self.fc2.bias)
        return x * g[:, :, None, None].to(x.dtype)


def with_sum_fc_se(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is SqueezeExcite:
            m.__class__ = SumFCSqueezeExcite
    return model


CANDIDATES = {"cand-se-sumfc": "ours-se"}  # candidate -> the variant whose function it must equal


def check_candidates(names: list[str]) -> None:
    """Outputs and gradients of each candidate equal its reference's, on CPU in float64."""
    for name in names:
        if name not in CANDIDATES:
            continue
        reference, candidate = VARIANTS[CANDIDATES[name]](10).double(), VARIANTS[name](10).double()
        candidate.load_state_dict(reference.state_dict())
        x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
        outputs = [m(x) for m in (reference, candidate)]
        for out in outputs:
            out.square().sum().backward()
        torch.testing.assert_close(outputs[1], outputs[0])
        for (key, a), b in zip(reference.named_parameters(), candidate.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=f"{name}: gradient of {key}")
        print(f"{name}: same outputs and gradients as {CANDIDATES[name]}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224, help="input side, px")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 6 on GPU, 1 on CPU)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="bf16 = autocast (default on GPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default="none")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {','.join(VARIANTS)}")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch that fits (GPU)")
    p.add_argument("--profile", default=None, metavar="VARIANT", help="also print the top kernels of one step")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results here")
    args = p.parse_args()
    on_gpu = args.device.startswith("cuda")
    args.warmup = args.warmup if args.warmup is not None else (6 if on_gpu else 1)
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if on_gpu and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible; use --device cpu with small sizes")
    return args


def peak_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> int:
    """CPU memory: peak bytes alive during one eager forward + backward (MemTracker)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, autocast():
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]


class Timer:
    """CUDA events on GPU (no host sync inside the timed loop), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def bench_variant(name: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    model = VARIANTS[name](args.num_classes).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fn = model if args.compile == "none" else torch.compile(model, mode=args.compile)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        if args.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            loss = F.cross_entropy(fn(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    with Timer(device) as timer:
        for _ in range(args.steps):
            step()

    result = {
        "variant": name,
        "img_s": args.batch * args.steps / timer.seconds,
        "step_ms": 1000 * timer.seconds / args.steps,
        "warmup_s": warmup_s,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if cuda:
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        result["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        result["peak_mib"] = peak_bytes(model, x, y, autocast) / 2**20
    if args.profile == name:
        profile_step(step, cuda)
    del model, opt, fn, x, y
    torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph pools before the next variant
    if args.max_batch and cuda:
        add_max_batch(result, args)
    return result


def eager_peak(name: str, args: argparse.Namespace, batch: int) -> int | None:
    """Peak bytes of two eager training steps at `batch`, or None if it runs out of memory."""
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = opt = x = y = None
    try:
        model = VARIANTS[name](args.num_classes).to(device, memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
        y = torch.randint(0, args.num_classes, (batch,), device=device)
        for _ in range(2):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, opt, x, y
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(name: str, args: argparse.Namespace, step: int = 8) -> int:
    """The largest multiple of `step` whose eager training step fits: double, then bisect."""
    fits, fails = 0, args.batch
    while eager_peak(name, args, fails) is not None:
        fits, fails = fails, 2 * fails
    while fails - fits > step:
        mid = (fits + fails) // 2 // step * step
        if eager_peak(name, args, mid) is None:
            fails = mid
        else:
            fits = mid
    return fits


def add_max_batch(result: dict, args: argparse.Namespace) -> None:
    """Eager: found by trying. Compiled: the total memory over the per-image bytes measured at
    --batch (weights, grads and momentum are the fixed part), rounded down to 8: an estimate."""
    if args.compile == "none":
        result["max_batch"] = largest_batch(result["variant"], args)
        return
    total = torch.cuda.mem_get_info()[1]
    fixed = 3 * 4 * result["params"]
    per_image = (result["peak_gib"] * 2**30 - fixed) / args.batch
    result["max_batch_estimate"] = int((total - fixed) / per_image) // 8 * 8


def profile_step(step: Callable[[], None], cuda: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


def print_table(results: list[dict], cuda: bool) -> None:
    base = next((r for r in results if r["variant"] == BASELINE), None)
    mem_key, mem_name = ("peak_gib", "peak GiB") if cuda else ("peak_mib", "peak MiB*")
    biggest = next((k for k in ("max_batch", "max_batch_estimate") if k in results[0]), None)
    extra = {"max_batch": " largest batch |", "max_batch_estimate": " largest batch (estimate) |"}.get(biggest, "")
    print(f"\n| variant | img/s | step ms | {mem_name} | img/s vs tv | mem vs tv | params |{extra}")
    print("|---|---|---|---|---|---|---|" + ("---|" if biggest else ""))
    for r in results:
        speed = f"{r['img_s'] / base['img_s']:.2f}x" if base else "-"
        mem = f"{r[mem_key] / base[mem_key]:.2f}x" if base else "-"
        print(
            f"| {r['variant']} | {r['img_s']:,.{0 if r['img_s'] >= 100 else 1}f} | {r['step_ms']:.1f} | {r[mem_key]:.2f} | {speed} | {mem} "
            f"| {r['params']:,} |" + (f" {r[biggest]:,} |" if biggest else "")
        )
    if not cuda:
        print("* CPU: peak of one eager forward + backward as MemTracker counts it")


def main() -> None:
    args = parse_args()
    cuda = args.device.startswith("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    meta = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(json.dumps(meta), flush=True)
    check_candidates(args.variants)
    results = []
    for name in args.variants:
        results.append(bench_variant(name, args))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[-1].items()}), flush=True)
        if args.json:  # after every variant, so a run cut short still leaves its numbers
            args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print_table(results, cuda)


if __name__ == "__main__":
    main()
