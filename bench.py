"""
Benchmarks of the sparse execution (sparse.py) against what a user would otherwise
run: how much of the gates' sparsity (§2.2.3) turns into wall-clock time and memory.

    python bench.py                      # both parts, on CUDA if present, else the CPU
    python bench.py --part head          # the whole tower (BENCHMARKS.md)
    python bench.py --part head --checkpoint output/model_final.pth [--images PATH ...]
    python bench.py --part conv --device cpu --dtype float32
    python bench.py --part memory --iterations 1000   # a long training run's memory (minutes)
    python bench.py --part gpu                  # on one GPU (sized for 8 minutes): bench_gpu.md

Part (a), `conv`: one 3x3 256->256 conv and one depthwise 3x3 conv on a P3-sized
map (100x168, an 800x1333 image), batch 1 and 8, masks shaped like real gates
(smooth blobs). Columns: the dense conv (cuDNN's or oneDNN's), then masked; the
gather kernel forced on; masked_conv2d as dispatched (gather or dense,
sparse.DENSE_ABOVE); speedup of the dispatched call over the dense conv; ideal
speedup 1/density; their ratio; peak memory of dense and dispatched calls.

Part (b), `head`: one D8 tower on the five levels of an 800x1333 image. The
baseline is the fixed tower of the same depth (plain convs and GroupNorms, every
path on: Tab. 1's FCOS-D8); against it, the dynamic tower as sparse.py runs it,
with its gates held off outside smooth blobs so that about 50%, 25% and 10% of
its MACs are executed; and, for reference, the same dynamic tower computed densely
level by level (dynhead.py alone: the correctness reference, not a baseline).
Columns: times, speedup of sparse over fixed, the ideal speedup (the fixed
tower's MACs over the executed MACs), their ratio, peak memory. Inference forward,
and a training step (forward + backward).

With --checkpoint, part (b) runs on a trained model's own gates instead of blobs:
its FPN features and the gates its towers compute, image by image (--images, or
the first --num-images of its validation split), its towers as sparse.py runs
them against fixed towers of the same depth and width; per image the executed
fraction of the towers' MACs, the times, the speedup and the ideal one.

Part (c), `ops`: the aten ops that one inference forward and one training step
of both D8 towers dispatch (views excluded), counted on the CPU with the GPU's
dispatch rule in force (every conv dense): on a GPU each op is a kernel launch,
and the head is launch-bound there. The fixed towers against the dynamic ones.

Part (d), `memory`: resident memory over a long run of the demo recipe
(`train.py --data synthetic` at a fixed 256x256 input, bf16 autocast where the CPU
computes it), logged every 20 iterations in metrics.jsonl: as train.py runs, and
with its bounds on native caches and its heap trimming switched off, in turns,
--rounds times each; their s/iter from iteration 100 on.

Times are medians of --repeats runs, the contenders interleaved in one process.
Peak memory, in a second pass: of the tensors allocated, from CUDA's allocator
statistics, or on the CPU from the profiler's record of allocations and frees.
"""
import argparse
import contextlib
import ctypes
import os
import statistics
import sys
import time

import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dynhead
import runs
import sparse

P3 = (100, 168)  # stride 8 of an 800x1333 image, padded to a multiple of 32
PYRAMID = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]  # P3..P7


def blobs(batch, size, density, seed, device):
    """(B, H, W) bool masks of smooth random blobs covering `density` of each image."""
    H, W = size
    g = torch.Generator().manual_seed(seed)
    if density >= 1:
        return torch.ones(batch, H, W, dtype=torch.bool, device=device)
    field = torch.randn(batch, 1, H // 12 + 2, W // 12 + 2, generator=g)
    field = F.interpolate(field, size=(H, W), mode="bicubic", align_corners=False)[:, 0]
    k = max(1, round(density * H * W))
    threshold = field.reshape(batch, -1).topk(k, dim=1).values[:, -1]
    return (field >= threshold[:, None, None]).to(device)


# -----------------------------------------------------------------------------
# Measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, device, repeats):
    """Median seconds of each function, the functions interleaved run by run."""
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def peak_memory(fn, device):
    """Peak bytes of the tensors `fn` allocates, above what is already allocated.
    CUDA: the caching allocator's statistics. CPU: the profiler's record of every
    allocation and free, summed in time order: live tensors, as on CUDA, measured
    between ops (scratch memory that lives and dies inside one op, such as a conv's
    own workspace, is not seen, on either path)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # an op's allocations less its frees; "[memory]" events: frees
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs every start and stop to stderr, hundreds of
    lines in a memory pass: send them to /dev/null (Python's exceptions still
    print once stderr is back)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _libc():
    return ctypes.CDLL("libc.so.6")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_memory():
    """For the timing pass: malloc keeps and reuses freed memory (as PyTorch's CUDA
    caching allocator does), so that page faults of fresh allocations -- which
    depend on what ran before -- do not blur the comparison."""
    if sys.platform.startswith("linux"):
        _libc().mallopt(M_MMAP_MAX, 0)
        _libc().mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)


def mb(n):
    return f"{n / 2 ** 20:.0f}"


# -----------------------------------------------------------------------------
# (a) one conv

def conv_cases(device, dtype, batches, densities):
    """One case per (kind, batch, density): the dense conv, the gather kernel
    forced on, and masked_conv2d as dispatched."""
    forced = {k: 1.0 for k in sparse.DENSE_ABOVE}
    for kind, groups in (("conv", 1), ("depthwise", 256)):
        for batch in batches:
            x = torch.randn(batch, 256, *P3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(256, 256 // groups, 3, 3, device=device, dtype=dtype) * 0.02).contiguous(
                memory_format=torch.channels_last)  # as the head keeps its weights (fcos.py)
            for density in densities:
                mask = blobs(batch, P3, density, seed=batch, device=device)

                def dense(x=x, w=w, mask=mask, groups=groups):  # the best dense can do: conv, then mask
                    return F.conv2d(x, w, padding=1, groups=groups) * mask[:, None].to(x.dtype)

                def masked(x=x, w=w, mask=mask, groups=groups):  # as a lone call: index the mask, then dispatch
                    return sparse.masked_conv2d(x, sparse.ActiveSet(mask), w, groups=groups)

                def gather(masked=masked):
                    saved, sparse.DENSE_ABOVE = sparse.DENSE_ABOVE, forced
                    try:
                        return masked()
                    finally:
                        sparse.DENSE_ABOVE = saved

                dense_path = sparse.DENSE_ABOVE.get((device.type, kind), 0.0) <= 0 or \
                    sparse.use_dense(sparse.ActiveSet(mask).density, kind, device)
                yield dict(kind=kind, batch=batch, density=density, path="dense" if dense_path else "gather",
                           fns={"dense": dense, "gather": gather, "masked": masked})


def print_conv(cases, device, dtype):
    print(f"\n(a) one 3x3 conv on a {P3[0]}x{P3[1]} map (P3 of 800x1333), 256 channels, "
          f"{device.type} {dtype}, channels_last, gate-shaped masks; times in ms")
    crossover, heading = {}, None
    for c in cases:
        if heading != (c["kind"], c["batch"]):
            heading = (c["kind"], c["batch"])
            print(f"\n{c['kind']}, batch {c['batch']}")
            print(f"{'density':>7} {'dense':>8} {'gather':>8} {'masked':>8} {'path':>6} {'speedup':>7} "
                  f"{'ideal':>6} {'ratio':>6} {'MB dense':>8} {'MB masked':>9}")
        t, m = c["time"], c["memory"]
        speedup, ideal = t["dense"] / t["masked"], 1 / c["density"]
        print(f"{c['density']:7.2f} {t['dense'] * 1e3:8.2f} {t['gather'] * 1e3:8.2f} {t['masked'] * 1e3:8.2f} "
              f"{c['path']:>6} {speedup:6.2f}x {ideal:5.1f}x {speedup / ideal:6.2f} "
              f"{mb(m['dense']):>8} {mb(m['masked']):>9}")
        if t["gather"] < t["dense"]:
            crossover[heading] = max(crossover.get(heading, 0.0), c["density"])
    rule = {k: v for (d, k), v in sparse.DENSE_ABOVE.items() if d == device.type}
    print(f"\nhighest density at which gathering beat dense, per (kind, batch): {crossover or 'none'}")
    print(f"the dispatch rule in use, sparse.DENSE_ABOVE for {device.type}: {rule}")


# -----------------------------------------------------------------------------
# (b) the whole head

class BlobGates:
    """Holds every spatial gate off outside fixed smooth blobs of `density`, the
    same blobs whether the head runs level by level (dynhead.py) or on sparse.py's
    canvas, keeping the gate convs (and their cost and gradients) in place."""

    def __init__(self, pyramid, batch, device):
        self.pyramid, self.batch, self.device = [tuple(s) for s in pyramid], batch, device
        self.density, self.cache = 1.0, {}
        self.original = dynhead.SpatialGate.activate
        outer = self

        def activate(gate_module, v):
            gate, active = outer.original(gate_module, v)
            keep = outer.keep(gate_module, tuple(v.shape))
            return gate * keep, active & keep

        dynhead.SpatialGate.activate = activate

    def blob(self, gate_module, level, path):
        key = (id(gate_module), level, path, self.density)
        if key not in self.cache:
            seed = hash(key[:3]) % 2 ** 31
            self.cache[key] = blobs(self.batch, self.pyramid[level], self.density, seed, self.device)
        return self.cache[key]

    def keep(self, gate_module, shape):
        """(B, P, H, W) bool for the logits of one level, or of the whole canvas."""
        B, P, H, W = shape
        if (H, W) in self.pyramid:  # one level; at P3 and P7 a scale gate has one path of two
            level = self.pyramid.index((H, W))
            paths = range(P) if P == gate_module.conv.out_channels else [0] if level == 0 else [1]
            return torch.stack([self.blob(gate_module, level, p) for p in paths], 1)
        key = (id(gate_module), "canvas", self.density)
        if key not in self.cache:
            canvas = sparse.Canvas.of(tuple(self.pyramid), B, self.device)
            keep = torch.zeros(shape, dtype=torch.bool, device=self.device)
            for n in range(len(self.pyramid)):
                for p in range(P):
                    canvas.region(keep, n)[:, p] = self.blob(gate_module, n, p)
            self.cache[key] = keep
        return self.cache[key]

    def close(self):
        dynhead.SpatialGate.activate = self.original


def head_cases(device, dtype, batch, targets, gates):
    """One case per (target executed fraction, inference/train): the fixed tower,
    the dynamic tower computed densely level by level, and as sparse.py runs it.
    The gate density that gives each target is found by bisection; each case
    re-installs it."""
    torch.manual_seed(0)
    make = lambda **kw: dynhead.DynamicHead(256, depth=8, **kw).to(device, dtype).to(
        memory_format=torch.channels_last)
    fixed, dynamic = make(gated=()), make()
    features = [torch.randn(batch, 256, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                for h, w in PYRAMID]

    def executed():
        with torch.no_grad():
            dynamic(features)
        return (dynamic.cost.executed.sum() / dynamic.cost.full.sum()).item()

    def run(tower, density, train, dense=False):
        gates.density, tower.dense = density, dense
        with torch.set_grad_enabled(train):
            out = tower(features)
            if train:
                (sum(o.float().mean() for o in out) + tower.cost.soft.mean()).backward()
                tower.zero_grad(set_to_none=True)

    with torch.no_grad():
        fixed(features)
    for target in targets:
        lo, hi = 0.0, 1.0
        for _ in range(12):
            gates.density = (lo + hi) / 2
            lo, hi = (gates.density, hi) if executed() < target else (lo, gates.density)
        density, ratio = gates.density, executed()
        ideal = (fixed.cost.full.sum() / dynamic.cost.executed.sum()).item()
        for train in (False, True):
            yield dict(executed=ratio, ideal=ideal, mode="train" if train else "inference", fns={
                "fixed": lambda d=density, t=train: run(fixed, d, t),
                "reference": lambda d=density, t=train: run(dynamic, d, t, dense=True),
                "sparse": lambda d=density, t=train: run(dynamic, d, t)})


def checkpoint_cases(path, images, num_images, device):
    """Part (b) on a checkpoint's own gates: one case per image (batch 1, inference),
    its FPN features computed once; the model's towers (sparse.py) against fixed
    towers of the same depth and width (weights of no matter: every path runs)."""
    import data
    import eval as evaluation
    model, checkpoint = evaluation.load_model(path)
    model.eval().to(device)
    towers = list(model.towers.values())
    if not all(isinstance(t, dynhead.DynamicHead) and t.dynamic for t in towers):
        raise runs.RunError(f"{path}: its head ({checkpoint['args'].get('head')}) has no gates; --checkpoint times "
                            f"the dynamic head on the gates it computes: pass a checkpoint of --head dynamic")
    if images:
        pictures = [(f, data.read_image(f, upright=True)) for f in evaluation.image_files(images)]
    else:
        run = checkpoint["args"]
        split = evaluation.val_dataset(run["data"], run["data_root"])
        pictures = [(split.coco.imgs[split.ids[i]]["file_name"], split[i][0]) for i in range(min(num_images, len(split)))]
    t = towers[0]
    fixed = [dynhead.DynamicHead(t.channels, len(t.routers), t.num_levels, gated=(),
                                 gn_groups=t.routers[0].depth.gn1.num_groups).to(device).to(
        memory_format=torch.channels_last) for _ in towers]

    def run_all(heads, features):
        for head in heads:
            head(features)

    for name, image in pictures:
        with torch.no_grad():
            if hasattr(model, "preprocess"):  # FCOS
                batch = model.preprocess([image.to(device)])[0]
            else:  # torchvision's detectors (RetinaNet, FreeAnchor, EfficientDet): their transform
                batch = model.transform([image.to(device)])[0].tensors
            features = [f.contiguous(memory_format=torch.channels_last) for f in model.backbone(batch).values()]
            run_all(towers + fixed, features)
        executed = sum(t.cost.executed.sum() for t in towers) / sum(t.cost.full.sum() for t in towers)
        ideal = sum(f.cost.full.sum() for f in fixed) / sum(t.cost.executed.sum() for t in towers)
        yield dict(image=os.path.basename(name), size=tuple(batch.shape[-2:]), executed=executed.item(),
                   ideal=ideal.item(), kind="checkpoint", fns={"fixed": lambda f=features: run_all(fixed, f),
                                                              "sparse": lambda f=features: run_all(towers, f)})


def print_checkpoint(cases, path, device):
    print(f"\n(b) the towers of {path} on their own gates, both branches, batch 1, {device.type} fp32, inference; "
          f"times in ms. fixed: fixed towers of the same depth and width; sparse: the checkpoint's, as sparse.py "
          f"runs them; executed: of the towers' MACs")
    print(f"{'image':>24} {'input':>9} {'executed':>8} {'fixed':>7} {'sparse':>7} {'speedup':>7} {'ideal':>6}")
    for c in cases:
        t = c["time"]
        print(f"{c['image'][-24:]:>24} {'x'.join(map(str, c['size'])):>9} {c['executed']:8.1%} "
              f"{t['fixed'] * 1e3:7.1f} {t['sparse'] * 1e3:7.1f} {t['fixed'] / t['sparse']:6.2f}x {c['ideal']:5.2f}x")
    fixed, sparse_time = sum(c["time"]["fixed"] for c in cases), sum(c["time"]["sparse"] for c in cases)
    print(f"{'all':>24} {'':>9} {statistics.mean(c['executed'] for c in cases):8.1%} {fixed * 1e3:7.1f} "
          f"{sparse_time * 1e3:7.1f} {fixed / sparse_time:6.2f}x")


def print_head(cases, device, dtype, batch):
    print(f"\n(b) one D8 tower, 256 channels, levels {'/'.join(f'{h}x{w}' for h, w in PYRAMID)} (800x1333), "
          f"batch {batch}, {device.type} {dtype}, channels_last; times in ms. fixed: the fixed tower (every path "
          f"on, no gates); reference: the dynamic tower computed densely level by level; sparse: sparse.py")
    print(f"{'executed':>8} {'mode':>9} {'fixed':>7} {'reference':>9} {'sparse':>7} {'speedup':>7} {'ideal':>6} "
          f"{'ratio':>6} {'MB fixed':>8} {'MB sparse':>9}")
    for c in cases:
        t, m = c["time"], c["memory"]
        speedup = t["fixed"] / t["sparse"]
        print(f"{c['executed']:8.1%} {c['mode']:>9} {t['fixed'] * 1e3:7.0f} {t['reference'] * 1e3:9.0f} "
              f"{t['sparse'] * 1e3:7.0f} {speedup:6.2f}x {c['ideal']:5.2f}x {speedup / c['ideal']:6.2f} "
              f"{mb(m['fixed']):>8} {mb(m['sparse']):>9}")


# -----------------------------------------------------------------------------
# (c) ops dispatched per forward, as a GPU runs it

class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched, views excluded: on a GPU each is a launch."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_dispatch_rule():
    """sparse.py on the CPU as it runs on a GPU: every conv dense, the gate convs too,
    the GroupNorms' statistics of all segments at once, the gates' 3x3 max one pool."""
    saved = sparse.DENSE_ABOVE, sparse.gate_conv2d, sparse.BLOCK_NORM, sparse.max3x3
    sparse.DENSE_ABOVE = {k: 0.0 for k in sparse.DENSE_ABOVE}
    sparse.gate_conv2d = lambda x, w, b: F.conv2d(x, w, b, padding=1)
    sparse.BLOCK_NORM = {k: False for k in sparse.BLOCK_NORM}
    sparse.max3x3 = lambda gate: F.max_pool2d(gate, 3, 1, 1)
    try:
        yield
    finally:
        sparse.DENSE_ABOVE, sparse.gate_conv2d, sparse.BLOCK_NORM, sparse.max3x3 = saved


def count_ops(gated, train, channels=64, batch=2):
    """Ops dispatched by both D8 towers of FCOS (batch 2, 64 channels, a 256x384
    pyramid, ~40% of the dynamic towers' MACs executed) in their second forward
    (the first builds the canvas tables), under the GPU's dispatch rule. Returns
    (ops, Counter by op, executed fraction of MACs)."""
    torch.manual_seed(0)
    towers = [dynhead.DynamicHead(channels, depth=8, gated=gated, gn_groups=32) for _ in range(2)]
    for tower in towers:
        for module in tower.modules():
            if isinstance(module, dynhead.SpatialGate):
                torch.nn.init.normal_(module.conv.weight, std=0.05)
                torch.nn.init.constant_(module.conv.bias, -0.5)
    feats = [torch.randn(batch, channels, h, w) for h, w in [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]]
    with gpu_dispatch_rule():
        for _ in range(2):
            counter = OpCount()
            with torch.set_grad_enabled(train), counter:
                outs = [tower(feats) for tower in towers]
                if train:
                    (sum(o.mean() for out in outs for o in out) + sum(t.cost.soft.mean() for t in towers)).backward()
    executed = sum(t.cost.executed.sum() for t in towers) / sum(t.cost.full.sum() for t in towers)
    return sum(counter.ops.values()), counter.ops, executed.item()


def print_ops():
    print("\n(c) aten ops dispatched (views excluded) by both D8 towers, batch 2, 64 channels, levels "
          "32x48..2x3, counted on the CPU: the dynamic towers as sparse.py runs them under the GPU's dispatch "
          "rule (every conv dense), and on the GPU's static engine (sparse_gpu.py, each masked conv one op)")
    print(f"{'tower':>8} {'engine':>7} {'executed':>8} {'inference':>9} {'train step':>10}  most frequent in a "
          f"training step")
    for name, gated, engine in (("fixed", (), "-"), ("dynamic", ("depth", "scale"), "sparse"),
                                ("dynamic", ("depth", "scale"), "static")):
        static = sparse.STATIC
        sparse.STATIC = static | {"cpu"} if engine == "static" else static
        try:
            (infer, _, executed), (step, ops, _) = count_ops(gated, False), count_ops(gated, True)
        finally:
            sparse.STATIC = static
        common = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
        print(f"{name:>8} {engine:>7} {executed:8.1%} {infer:9d} {step:10d}  {common}")


# -----------------------------------------------------------------------------
# (d) memory over a long run

MEMORY_RUN = """import sys, train
if {unbounded}:  # the bounds switched off: oneDNN's and ideep's default caches, glibc's heap untrimmed
    train.bound_native_caches = lambda: None
    train.heap_trimmer = lambda: (lambda: None)
sys.exit(train.main({argv!r}))"""


def memory_runs(iterations, rounds):
    """Train the demo recipe `rounds` times as train.py runs it and as many without
    its memory bounds, in turns; yield (name, metrics records) of each run."""
    import json
    import shutil
    import subprocess
    import tempfile
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(rounds):
        for name, unbounded in (("train.py", False), ("unbounded", True)):
            out = tempfile.mkdtemp(prefix="bench_memory_")
            argv = ["--data", "synthetic", "--min-size", "256", "--max-size", "256", "--max-iter", str(iterations),
                    "--checkpoint-period", str(iterations + 1), "--output-dir", out, "--overwrite"]
            try:
                subprocess.run([sys.executable, "-c", MEMORY_RUN.format(unbounded=unbounded, argv=argv)], cwd=here,
                               check=True, stdout=subprocess.DEVNULL)
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    yield name, [json.loads(line) for line in f]
            finally:
                shutil.rmtree(out, ignore_errors=True)


def print_memory(runs, iterations):
    marks = sorted({i for i in (100, 200, 400, 600, 800, 1000, iterations) if i <= iterations})
    print("\n(d) resident memory (MB) of the demo recipe at 256x256 by iteration; s/iter from iteration 100 on")
    print("| run | " + " | ".join(str(i) for i in marks) + f" | {marks[-1]} / 100 | s/iter |")
    print("|---|" + "---|" * (len(marks) + 2))
    for name, records in runs:
        mem = {r["iteration"]: r["mem_mb"] for r in records}
        total = {r["iteration"]: r["s_per_iter"] * r["iteration"] for r in records}  # the log's running mean
        last = max(total)
        sec = (total[last] - total[100]) / (last - 100) if 100 in total and last > 100 else float("nan")
        ratio = mem[marks[-1]] / mem[100] if 100 in mem and marks[-1] in mem else float("nan")
        print(f"| {name} | " + " | ".join(f"{mem[i]:.0f}" if i in mem else "-" for i in marks) +
              f" | {ratio:.2f} | {sec:.3f} |")


def measure(cases, device, repeats):
    """Times first (the process's usual allocator), then peak memory."""
    for c in cases:
        with torch.no_grad() if "kind" in c else torch.enable_grad():
            c["time"] = dict(zip(c["fns"], median_times(list(c["fns"].values()), device, repeats)))
    for c in cases:
        with torch.no_grad() if "kind" in c else torch.enable_grad():
            c["memory"] = {k: peak_memory(fn, device) for k, fn in c["fns"].items()
                           if k not in ("gather", "reference")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("conv", "head", "ops", "memory", "gpu", "all"), default="all",
                        help="all: conv, head and ops (memory takes a long training run, gpu a GPU: ask for them)")
    parser.add_argument("--smoke", action="store_true", help="--part gpu at toy sizes on any device (a try-out)")
    parser.add_argument("--report", default="bench_gpu.md", help="--part gpu's markdown report (default bench_gpu.md)")
    parser.add_argument("--iterations", type=int, default=1000, help="iterations of each run of part (d)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of part (d) of each kind, in turns")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batches of part (a)")
    parser.add_argument("--head-batch", type=int, help="batch of part (b); default 1 on the CPU, 8 on CUDA")
    parser.add_argument("--executed", type=float, nargs="+", default=[0.5, 0.25, 0.1],
                        help="the executed fractions of part (b)")
    parser.add_argument("--checkpoint", help="part (b) on this checkpoint's own gates (a dynamic head)")
    parser.add_argument("--images", nargs="+", metavar="PATH", help="with --checkpoint: image files or folders "
                        "(default: its validation split's first --num-images)")
    parser.add_argument("--num-images", type=int, default=4)
    args = parser.parse_args(argv)
    if (args.images or args.checkpoint) and args.part != "head":
        parser.error("--checkpoint and --images time part (b): pass --part head")
    if args.images and not args.checkpoint:
        parser.error("--images are run through a model's backbone and towers: pass --checkpoint too")
    if args.checkpoint:
        device = torch.device(args.device)
        cases = list(checkpoint_cases(args.checkpoint, args.images, args.num_images, device))
        with torch.no_grad():
            for c in cases:
                c["time"] = dict(zip(c["fns"], median_times(list(c["fns"].values()), device, args.repeats)))
        print_checkpoint(cases, args.checkpoint, device)
        return 0
    if args.part == "gpu":
        import bench_gpu
        return bench_gpu.main(args)
    if args.part == "memory":
        print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; the demo's synthetic set under "
              f"datasets/synthetic")
        runs = list(memory_runs(args.iterations, args.rounds))
        print_memory(runs, args.iterations)
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    head_batch = args.head_batch or (8 if device.type == "cuda" else 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats} runs")
    if device.type == "cpu":
        keep_freed_memory()
    torch.nn.functional.conv2d(torch.randn(1, 256, *P3, device=device, dtype=dtype),
                               torch.randn(256, 256, 3, 3, device=device, dtype=dtype), padding=1)  # warm-up
    conv, head, gates = [], [], BlobGates(PYRAMID, head_batch, device)
    try:
        if args.part in ("conv", "all"):
            conv = list(conv_cases(device, dtype, args.batches, [1.0, 0.5, 0.25, 0.1, 0.05]))
        if args.part in ("head", "all"):
            head = list(head_cases(device, dtype, head_batch, args.executed, gates))
        measure(conv + head, device, args.repeats)
    finally:
        gates.close()
    if conv:
        print_conv(conv, device, dtype)
    if head:
        print_head(head, device, dtype, head_batch)
    if args.part in ("ops", "all"):
        print_ops()


if __name__ == "__main__":
    sys.exit(runs.run_cli(main))
