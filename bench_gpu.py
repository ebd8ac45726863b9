"""
The GPU benchmark, one prepared command for a machine with one GPU (`python
bench.py --part gpu`, sized for 8 minutes on an H100), writing one markdown report as
it goes (a run cut short keeps what it measured):

    (a) the masked conv (sparse_gpu.py's Triton kernel, compaction included) against
        cuDNN's dense conv, then masked, 256 channels on P3 of an 800x1333 input, at
        densities 0.05-1.0, batch 2 and 8, bf16, forward and forward + backward;
    (b) one D8 tower on an 800x1333 pyramid: the fixed tower against the dynamic
        one on the static engine, its gates held to blobs (bench.BlobGates) for
        50/25/10% of its MACs, batch 2 and 8, inference and a training step, eager
        and compiled (torch.compile, both contenders each time);
    (c) the whole detector at COCO scale (synthetic images at 800x1333, 2 per GPU as
        the 1x recipe): s/iter and peak memory of a training step (bf16 autocast,
        SGD) for FCOS's towers, the fixed D8 and the dynamic D8 at ~25% executed;
    (d) the CUDA cases of the test suite.

`--smoke` runs every part at toy sizes on whatever device is there (the CPU
included: the static engine's PyTorch operators stand in for the kernels), to
try the script before a GPU's minutes are spent on it.
"""
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import bench
import dynhead
import sparse
import sparse_gpu


class Report:
    """Markdown lines printed and appended to a file as they come."""

    def __init__(self, path):
        self.path = path
        open(path, "w").close()

    def __call__(self, *lines):
        with open(self.path, "a") as f:
            for line in lines:
                print(line, flush=True)
                f.write(line + "\n")


def conv_part(report, device, dtype, sizes, channels, batches, repeats):
    report("", f"## (a) masked 3x3 conv, {channels} channels, {sizes[0]}x{sizes[1]}, {dtype}; ms, median of {repeats}",
           "", "| batch | density | pass | cuDNN dense, masked | masked (Triton) | speedup | ideal |",
           "|---|---|---|---|---|---|---|")
    for batch in batches:
        x = torch.randn(batch, channels, *sizes, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(channels, channels, 3, 3, device=device, dtype=dtype) * 0.05).requires_grad_()
        dy = torch.randn_like(x)
        for density in (0.05, 0.1, 0.25, 0.5, 1.0):
            mask = bench.blobs(batch, sizes, density, 0, device)
            dense = lambda: F.conv2d(x, w, padding=1) * mask[:, None]
            masked = lambda: sparse_gpu.masked_conv3x3(x, w, *sparse_gpu.compact(mask))
            for name, grad in (("forward", False), ("fwd + bwd", True)):
                fns = [(lambda f=f: torch.autograd.backward(f(), dy)) if grad else f for f in (dense, masked)]
                with torch.set_grad_enabled(grad):
                    t_dense, t_masked = bench.median_times(fns, device, repeats)
                report(f"| {batch} | {density:.2f} | {name} | {t_dense * 1e3:.3f} | {t_masked * 1e3:.3f} | "
                       f"{t_dense / t_masked:.2f}x | {1 / density:.1f}x |")


def tower_part(report, device, dtype, pyramid, channels, depth, batches, targets, repeats, backend):
    report("", f"## (b) one D{depth} tower, {channels} channels, levels {'/'.join(f'{h}x{w}' for h, w in pyramid)}, "
               f"{dtype}; ms, median of {repeats}", "",
           "| batch | executed | mode | compiled | fixed | sparse | speedup | ideal | kernels fixed | kernels sparse |",
           "|---|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        gates = bench.BlobGates(pyramid, batch, device)
        try:
            torch.manual_seed(0)
            make = lambda **kw: dynhead.DynamicHead(channels, depth=depth, **kw).to(device, dtype).to(
                memory_format=torch.channels_last)
            fixed, dynamic = make(gated=()), make()
            feats = [torch.randn(batch, channels, h, w, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last) for h, w in pyramid]
            for target in targets:
                density, executed, ideal = hold_gates(gates, fixed, dynamic, feats, target)
                for train in (False, True):
                    for compile_ in ((False, True) if target == 0.25 else (False,)):
                        run = step_fn(fixed, dynamic, feats, train, backend if compile_ else None)
                        with torch.set_grad_enabled(train):
                            t_fixed, t_sparse = bench.median_times([lambda: run(fixed), lambda: run(dynamic)],
                                                                   device, repeats)
                        kernels = "" if device.type != "cuda" else \
                            f" | {count_kernels(lambda: run(fixed))} | {count_kernels(lambda: run(dynamic))}"
                        report(f"| {batch} | {executed:.1%} | {'train' if train else 'inference'} | "
                               f"{'yes' if compile_ else 'no'} | {t_fixed * 1e3:.2f} | {t_sparse * 1e3:.2f} | "
                               f"{t_fixed / t_sparse:.2f}x | {ideal:.2f}x{kernels} |")
        finally:
            gates.close()


def count_kernels(fn):
    """The CUDA kernels one call of fn launches (torch.profiler's device events)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def hold_gates(gates, fixed, dynamic, feats, target):
    """The blob density that makes the dynamic tower execute `target` of its MACs
    (bisection); returns it, the fraction reached, and the ideal speedup."""
    lo, hi = 0.0, 1.0
    with torch.no_grad():
        fixed(feats)
        for _ in range(10):
            gates.density = (lo + hi) / 2
            dynamic(feats)
            ratio = (dynamic.cost.executed.sum() / dynamic.cost.full.sum()).item()
            lo, hi = (gates.density, hi) if ratio < target else (lo, gates.density)
        dynamic(feats)
    executed = (dynamic.cost.executed.sum() / dynamic.cost.full.sum()).item()
    return gates.density, executed, (fixed.cost.full.sum() / dynamic.cost.executed.sum()).item()


def step_fn(fixed, dynamic, feats, train, backend):
    """One inference forward, or forward + backward, of a tower; compiled per tower
    by torch.compile's `backend` (None: eager)."""
    def step(tower):
        out = tower(feats)
        if train:
            (sum(o.float().mean() for o in out) + tower.cost.soft.mean()).backward()
            tower.zero_grad(set_to_none=True)
    if backend is None:
        return step
    compiled = {id(t): torch.compile(t, backend=backend) for t in (fixed, dynamic)}

    def run(tower):
        out = compiled[id(tower)](feats)
        if train:
            (sum(o.float().mean() for o in out) + tower.cost.soft.mean()).backward()
            tower.zero_grad(set_to_none=True)
    return run


def detector_part(report, device, size, backbone, iterations, batch):
    import fcos
    report("", f"## (c) the detector, {backbone}, {batch} synthetic images at {size[0]}x{size[1]}, bf16 autocast, "
               f"SGD; s/iter over {iterations} steps after 3 of warm-up", "",
           "| head | executed | s/iter | peak memory (MB) |", "|---|---|---|---|")
    import data
    images = [data.synthetic_image(i, size)[0].float().div(255).to(device) for i in range(batch)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 200.0, 300.0], [300.0, 100.0, 700.0, 500.0]], device=device),
                "labels": torch.tensor([0, 1], device=device)} for _ in range(batch)]
    for name, kw in (("FCOS's towers", dict(head="fcos")), ("fixed D8", dict(head="fixed", depth=8)),
                     ("dynamic D8", dict(head="dynamic", depth=8))):
        torch.manual_seed(0)
        model = fcos.FCOS(4, backbone=backbone, pretrained_backbone=False, min_size=size[0], max_size=size[1],
                          **kw).to(device)
        gates = bench.BlobGates([], batch, device) if name == "dynamic D8" else None
        try:
            if gates is not None:  # blobs over ~25% of the gates; the pyramid is known once a batch ran
                model.eval()
                with torch.no_grad():
                    feats = list(model.backbone(model.preprocess(images)[0]).values())
                gates.pyramid = [tuple(f.shape[-2:]) for f in feats]
                gates.density = 0.25
                model.train()
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = sum(model(images, targets).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            for _ in range(3):
                step()
            bench.sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            tic = time.perf_counter()
            for _ in range(iterations):
                step()
            bench.sync(device)
            sec = (time.perf_counter() - tic) / iterations
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
            report(f"| {name} | {model.head_mac_ratio.item():.1%} | {sec:.3f} | {peak:.0f} |")
        finally:
            if gates is not None:
                gates.close()


def tests_part(report, smoke):
    report("", "## (d) the CUDA cases of the test suite", "")
    here = os.path.dirname(os.path.abspath(__file__))
    cases = ["tests/test_sparse_gpu.py"] if smoke else ["tests/test_sparse.py", "tests/test_sparse_gpu.py",
                                                         "tests/test_dynhead.py"]
    select = [] if smoke else ["-k", "cuda or triton or static or compiles or compaction"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *cases, *select], cwd=here, capture_output=True,
                          text=True)
    report("```", *done.stdout.strip().splitlines()[-15:], "```")


def main(args):
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("bench.py --part gpu: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU, "
              "or try the script at toy sizes with --smoke", file=sys.stderr)
        return 2
    report = Report(args.report)
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    report(f"# bench.py --part gpu{' --smoke' if args.smoke else ''}", "",
           f"{name}; torch {torch.__version__}, Triton {triton.__version__}; the dynamic towers on sparse_gpu.py's "
           f"static engine (sparse.STATIC = {sorted(sparse.STATIC | {device.type})})")
    sparse.STATIC = sparse.STATIC | {device.type}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    smoke = args.smoke
    tic = time.perf_counter()
    conv_part(report, device, dtype, (12, 20) if smoke else bench.P3, 32 if smoke else 256,
              [2] if smoke else [2, 8], 2 if smoke else args.repeats)
    pyramid = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)] if smoke else bench.PYRAMID
    tower_part(report, device, dtype, pyramid, 32 if smoke else 256, 2 if smoke else 8, [2] if smoke else [2, 8],
               [0.25] if smoke else [0.5, 0.25, 0.1], 2 if smoke else args.repeats,
               "aot_eager" if smoke else "inductor")
    detector_part(report, device, (128, 192) if smoke else (800, 1333), "resnet18" if smoke else "resnet50",
                  1 if smoke else 10, 2)
    tests_part(report, smoke)
    report("", f"({time.perf_counter() - tic:.0f} s)")
    return 0
