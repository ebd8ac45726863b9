"""
Train FCOS with the fine-grained dynamic head (Song et al., NeurIPS 2020), one
script, single process or torchrun DDP:

    python train.py --data synthetic                      # a CPU demo, minutes
    torchrun --nproc_per_node 8 train.py --depth 8 --lam 0.4   # COCO, the paper's 1x recipe

The loss is Eq. 6: focal + GIoU + centerness + lambda * budget. Only rank 0 logs
and saves. Every flag is checked when it is parsed, every file the run reads
before its first iteration. Checkpoints are written atomically (runs.py); --resume
continues from the newest one, exactly (model, optimizer, schedule, AMP scaler,
data order, RNG states). SIGTERM or Ctrl-C saves a checkpoint and exits with 143
or 130: a stopped run never looks finished.

Map: SWITCHES (the paper's tables as flags), get_args (the recipes as defaults,
every flag checked) -> main: setup (datasets checked), build (backbone weights
checked), resume, the loop (train), then the final checkpoint and evaluation.
"""
import argparse
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import random
import resource
import shlex
import signal
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torchvision

import data
import runs
from eval import evaluate, val_dataset
from fcos import MODEL_KEYS, OWN_HEADS, STYLES, build_model

# The paper's 1x recipe (docs/DESIGN.md §6) and a CPU-sized demo; any flag overrides either.
RECIPES = {
    "coco": dict(backbone="resnet50", pretrained_backbone="true", min_size=800, max_size=1333, channels=256,
                 depth=8, ims_per_batch=16, optimizer="sgd", lr=0.01, max_iter=90000, steps=[60000, 80000],
                 warmup=1000, checkpoint_period=5000, data_root="datasets/coco", workers=4, amp="auto"),
    # workers 0: on a 2-core machine a loader process takes a core from the model's two
    # threads (30-40% slower iterations); its 8 small JPEGs decode in ~40 ms per iteration
    "synthetic": dict(backbone="resnet18", pretrained_backbone="false", min_size=256, max_size=352, channels=128,
                      depth=2, ims_per_batch=8, optimizer="adamw", lr=1e-3, max_iter=500, steps=[400, 470],
                      warmup=50, checkpoint_period=200, data_root="datasets/synthetic", workers=0, amp="auto"),
}
RECIPE_FLAGS = {  # flag -> (help, type, nargs, choices); the defaults come from RECIPES
    "data_root": ("dataset folder (COCO layout; the synthetic set is generated once)", str, None, None),
    "backbone": ("", str, None, ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b1")),
    "pretrained_backbone": ("true (torchvision's ImageNet weights), false, or a file", str, None, None),
    "channels": ("FPN and head width (paper: 256)", int, None, None),
    "depth": ("routers per branch, D (paper: 8)", int, None, None),
    "min_size": ("shorter side of the resized input", int, None, None),
    "max_size": ("cap on its longer side", int, None, None),
    "optimizer": ("", str, None, ("sgd", "adamw")),
    "lr": ("base learning rate", float, None, None),
    "max_iter": ("iterations", int, None, None),
    "steps": ("iterations at which lr drops x0.1", int, "*", None),
    "warmup": ("linear warm-up iterations", int, None, None),
    "ims_per_batch": ("images per iteration, over all processes; the recipe's lr, max-iter, steps and\n"
                      "warmup follow it (linear rule) unless given", int, None, None),
    "checkpoint_period": ("iterations between checkpoints", int, None, None),
    "workers": ("data loader processes per rank", int, None, None),
    "amp": ("mixed precision: bf16 where the device computes it (GPUs from Ampere on; CPUs),\n"
            "fp16 with loss scaling on older GPUs; auto: on for CUDA and for a CPU with\n"
            "AVX512-BF16 or AMX, else fp32 (TF32 for CUDA's fp32 matmuls and convs)", str, "?",
            ("on", "off", "auto")),
}


class Switch(NamedTuple):
    """One row of the paper's tables as a switch of this code (README's table; the
    test of every configuration through every entry point runs each)."""
    experiment: str  # the paper's table and row
    flags: tuple  # train.py's flags for it (the rest as the recipe has it)
    python: str = ""  # the same in Python: the model's keyword arguments


SWITCHES = [
    Switch("Tab. 1, FCOS (4-conv towers)", ("--head", "fcos"), 'FCOS(head="fcos")'),
    Switch("Tab. 1, fixed head (all paths on, no gates; Tab. 3's \"neither\")", ("--head", "fixed"),
           "DynamicHead(gated=())"),
    Switch("Tab. 1, dynamic, fine-grained", (), "DynamicHead()"),
    Switch("Tab. 1, coarse-grained (one gate per image, level, path)", ("--coarse",), "DynamicHead(coarse=True)"),
    Switch("Tab. 2, the proposed activation, its tau", ("--tau", "1.0"), 'DynamicHead(activation="proposed", tau=1.0)'),
    Switch("Tab. 2, restricted tanh", ("--activation", "restricted_tanh"),
           'DynamicHead(activation="restricted_tanh")'),
    Switch("Tab. 2, softmax", ("--activation", "softmax"), 'DynamicHead(activation="softmax")'),
    Switch("Tab. 3, depth paths gated only", ("--gated", "depth"), 'DynamicHead(gated=("depth",))'),
    Switch("Tab. 3, scale paths gated only", ("--gated", "scale"), 'DynamicHead(gated=("scale",))'),
    Switch("Fig. 5, depth D (D2..D8) and budget lambda", ("--depth", "2", "--lam", "0.1"), "FCOS(depth=2, lam=0.1)"),
    Switch("Tab. 4, RetinaNet, torchvision's towers", ("--detector", "retinanet", "--head", "retinanet"),
           'retinanet.RetinaNet(head="retinanet")'),
    Switch("Tab. 4, RetinaNet, fixed head", ("--detector", "retinanet", "--head", "fixed"),
           'retinanet.RetinaNet(head="fixed")'),
    Switch("Tab. 4, RetinaNet, dynamic head", ("--detector", "retinanet"), 'retinanet.RetinaNet(head="dynamic")'),
    Switch("Tab. 4, ATSS (FCOS's losses, ATSS's targets)", ("--assigner", "atss"), 'FCOS(assigner="atss")'),
    Switch("Tab. 4, FreeAnchor, its towers (RetinaNet's, no GroupNorm)", ("--detector", "freeanchor", "--head",
           "retinanet"), 'freeanchor.FreeAnchor(head="retinanet")'),
    Switch("Tab. 4, FreeAnchor, dynamic head", ("--detector", "freeanchor"), 'freeanchor.FreeAnchor(head="dynamic")'),
    Switch("Tab. 4, EfficientDet-D1, its head (separable convs, BN per level)", ("--detector", "efficientdet",
           "--head", "efficientdet"), 'efficientdet.EfficientDet(head="efficientdet")'),
    Switch("Tab. 4, EfficientDet-D1, dynamic head (88 channels)", ("--detector", "efficientdet"),
           'efficientdet.EfficientDet(head="dynamic")'),
    Switch("The authors' conventions (their released models, convert.py)", ("--style", "authors"),
           'FCOS(style="authors")'),
]


def switches_table():
    """SWITCHES as the README's markdown table."""
    rows = ["| experiment | Python | `train.py` |", "|---|---|---|"]
    rows += [f"| {s.experiment} | `{s.python}` | {f'`{shlex.join(s.flags)}`' if s.flags else 'the defaults'} |"
             for s in SWITCHES]
    return "\n".join(rows)


def configurations():
    """Every configuration the README documents, as train.py flags: each switch, and
    each switch of the dynamic head's own options on RetinaNet as well (Tab. 4: the
    head in a detector it was not written for). The matrix test runs them all."""
    chosen = {"--detector", "--head", "--assigner", "--style"}  # FCOS's own: not RetinaNet's
    options = [s.flags for s in SWITCHES if s.flags and not chosen & set(s.flags)]
    return [s.flags for s in SWITCHES] + [("--detector", "retinanet") + flags for flags in options]


# The model's switches: their defaults, filled in after the checks that need to know
# whether a flag was given (a switch of the gates given to a head without gates)
MODEL_DEFAULTS = dict(lam=0.4, tau=1.5, activation="proposed", coarse=False, gated=["depth", "scale"])


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="the paper's tables, as switches:\n" + "\n".join(
                                    f"  {s.experiment}: {shlex.join(s.flags) or 'the defaults'}" for s in SWITCHES))
    p.add_argument("--data", choices=tuple(RECIPES), default="coco", help="the recipe and dataset (default: coco)")
    p.add_argument("--detector", choices=tuple(OWN_HEADS), default="fcos",
                   help="FCOS, or Tab. 4's others: torchvision's RetinaNet, FreeAnchor (RetinaNet with\n"
                        "its loss), EfficientDet-D1 (EfficientNet-B1, BiFPN; its backbone, 88 channels\n"
                        "and input 640 unless given) (default fcos)")
    p.add_argument("--head", choices=tuple(dict.fromkeys(OWN_HEADS.values())) + ("fixed", "dynamic"),
                   default="dynamic",
                   help="the towers: the detector's own (fcos; retinanet for RetinaNet and FreeAnchor;\n"
                        "efficientdet), the fixed routing towers, or the dynamic ones (default dynamic)")
    p.add_argument("--assigner", choices=("fcos", "atss"), default="fcos",
                   help="FCOS's targets: center sampling and size ranges, or ATSS (Tab. 4) (default fcos)")
    p.add_argument("--lam", type=float, help="lambda of Eq. 6, the budget weight (default 0.4)")
    p.add_argument("--tau", type=float, help="tau of the gate activation, Eq. 3 (default 1.5)")
    p.add_argument("--activation", choices=("proposed", "restricted_tanh", "softmax"),
                   help="the gate activation, Tab. 2 (default proposed: Eq. 3)")
    p.add_argument("--coarse", action="store_const", const=True, help="one gate per image and path (Tab. 1 "
                   "coarse-grained)")
    p.add_argument("--style", choices=STYLES, default="torchvision",
                   help="the model's conventions: this project's, or those of the authors' code and\n"
                        "released models (MSRA ResNet, their locations, scale-path statistics,\n"
                        "post-processing and resize; docs/DESIGN.md §8) (default torchvision)")
    p.add_argument("--weights", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (train.py's or convert.py's), with a\n"
                        "fresh optimizer and schedule: fine-tuning; the flags give its architecture")
    p.add_argument("--gated", nargs="*", choices=("depth", "scale"),
                   help="the path types with spatial gates (Tab. 3); the others run everywhere;\n"
                        "none (--gated alone) is the fixed head (default depth scale)")
    for key, (text, kind, nargs, choices) in RECIPE_FLAGS.items():
        shown = "; ".join(f"{name}: {recipe[key]}" for name, recipe in RECIPES.items())
        extra = {"const": "on"} if key == "amp" else {}  # --amp alone: on
        p.add_argument("--" + key.replace("_", "-"), type=kind, nargs=nargs, choices=choices,
                       help=f"{text + ' ' if text else ''}(default {shown})", **extra)
    p.add_argument("--output-dir", default="output", help="(default output)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir where it stopped (its\n"
                   "final evaluation included)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --output-dir and start anew")
    p.add_argument("--dist-timeout", type=float, default=10.0, help="minutes a process waits for the others\n"
                   "(a hung rank then fails the run) (default 10)")
    p.add_argument("--eval-period", type=int, default=0, help="iterations between evaluations; 0: only at the "
                   "end (default 0)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the model for training (--compile alone: inductor; the head's\n"
                        "dynamic towers trace without a graph break on CUDA) (default off)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda where there is one); under torchrun each\n"
                        "process takes the GPU of its LOCAL_RANK")
    args = p.parse_args(argv)
    check_switches(args, p)
    apply_recipe(args, p)
    return args


def check_switches(args, parser):
    """The model's switches against each other, then their defaults filled in: a
    switch of the gates is refused where the head has none (it would be taken and
    do nothing), and tau where the activation has none."""
    gates = args.head == "dynamic" and args.gated != []
    given = {k: getattr(args, k) for k in MODEL_DEFAULTS if getattr(args, k) is not None}
    if not gates and given:
        why = f"--head {args.head} has no gates" if args.head != "dynamic" else "--gated alone makes the fixed head"
        flags = ", ".join(f"--{k}" for k in given if k != "gated" or args.head != "dynamic")
        if flags:
            parser.error(f"{flags}: {why}, so these would do nothing; leave them out, or train the dynamic head")
    if args.tau is not None and (args.activation or "proposed") != "proposed":
        parser.error(f"--tau is Eq. 3's, the proposed activation's; --activation {args.activation} has none")
    for key, value in MODEL_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    for key in ("lam", "tau"):
        if not math.isfinite(getattr(args, key)) or getattr(args, key) < 0:
            parser.error(f"--{key} must be a number of 0 or more, got {getattr(args, key)}")
    if args.head in OWN_HEADS.values() and args.head != OWN_HEADS[args.detector]:
        parser.error(f"--head {args.head} is another detector's own towers; {args.detector}'s own are --head "
                     f"{OWN_HEADS[args.detector]}")
    if args.assigner == "atss" and args.detector != "fcos":
        parser.error(f"--assigner atss is FCOS's; --detector {args.detector} matches its anchors by IoU")
    if args.style == "authors" and args.detector != "fcos":
        parser.error("--style authors is the conventions of the authors' FCOS (their released models); "
                     f"--detector {args.detector} has none")
    if args.weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file; pass a checkpoint of train.py or convert.py")


def apply_recipe(args, parser):
    """Fill what was not given from the recipe, check every number and its fit with
    the others, and scale the recipe's lr and schedule for another --ims-per-batch
    by the linear rule (Goyal et al., 2017; FCOS's advice for fewer GPUs): lr x k,
    iterations / k."""
    recipe = dict(RECIPES[args.data])
    if args.detector == "efficientdet":  # D1: its backbone and width; input 640 in the 1x recipe
        recipe.update(backbone="efficientnet_b1", channels=88)
        if args.data == "coco":
            recipe.update(min_size=640, max_size=640)
    elif args.backbone == "efficientnet_b1":
        parser.error(f"--backbone efficientnet_b1 is EfficientDet's; --detector {args.detector} takes a ResNet")
    if args.detector == "efficientdet" and args.backbone not in (None, "efficientnet_b1"):
        parser.error(f"--detector efficientdet is EfficientDet-D1: its backbone is efficientnet_b1, "
                     f"not {args.backbone}")
    given = {key for key in recipe if getattr(args, key) is not None}
    for key, value in recipe.items():
        if key not in given:
            setattr(args, key, value)
    flag = lambda key: "--" + key.replace("_", "-")
    for key in ("depth", "ims_per_batch", "max_iter", "checkpoint_period", "channels", "min_size", "max_size"):
        if getattr(args, key) < 1:
            parser.error(f"{flag(key)} must be at least 1, got {getattr(args, key)}")
    for key in ("warmup", "eval_period", "workers"):
        if getattr(args, key) < 0:
            parser.error(f"{flag(key)} must be 0 or more, got {getattr(args, key)}")
    for key in ("lr", "dist_timeout"):
        if not math.isfinite(getattr(args, key)) or getattr(args, key) <= 0:
            parser.error(f"{flag(key)} must be a number above 0, got {getattr(args, key)}")
    if any(s < 1 for s in args.steps) or any(b <= a for a, b in zip(args.steps, args.steps[1:])):
        parser.error(f"--steps must be iterations of 1 or more, each after the one before, got {args.steps}")
    if args.max_size < args.min_size:
        parser.error(f"--max-size {args.max_size} is below --min-size {args.min_size}: the longer side is capped "
                     f"below the shorter one; pass a --max-size of at least {args.min_size}")
    # the towers' GroupNorms have 32 groups (EfficientDet's: 8 channels each); in training
    # each needs 2 values at least on P7, the smallest map (stride 128: ceil(min_size / 128)
    # pixels on the shorter side, fewer only where --max-size caps a very long image)
    groups = args.channels // 8 if args.detector == "efficientdet" else 32
    if args.channels % groups or args.channels // groups * math.ceil(args.min_size / 128) ** 2 < 2:
        parser.error(f"--channels {args.channels} with --min-size {args.min_size}: the head's GroupNorms of "
                     f"{groups} groups need a multiple of {groups} channels and 2 values per group on P7's map; "
                     f"use --channels 64 or more (a multiple of 32; EfficientDet: of 8), or --min-size above 128")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them")
    k = args.ims_per_batch / recipe["ims_per_batch"]
    if k != 1:
        args.lr = args.lr if "lr" in given else recipe["lr"] * k
        args.max_iter = args.max_iter if "max_iter" in given else max(1, round(recipe["max_iter"] / k))
        args.warmup = args.warmup if "warmup" in given else round(recipe["warmup"] / k)
        args.steps = args.steps if "steps" in given else [round(s / k) for s in recipe["steps"]]
    pretrained = args.pretrained_backbone.lower()
    args.pretrained_backbone = {"true": True, "false": False}.get(pretrained, args.pretrained_backbone)
    if isinstance(args.pretrained_backbone, str) and not os.path.isfile(args.pretrained_backbone):
        parser.error(f"--pretrained-backbone {args.pretrained_backbone}: no such file; pass the file of torchvision's "
                     f"{args.backbone} ImageNet weights, true (downloaded once) or false")
    try:
        device = runs.check_device(args.device)
    except runs.RunError as error:
        parser.error(str(error))
    if args.amp == "auto":
        args.amp = "on" if device.type == "cuda" or native_bf16() else "off"
    args.amp = args.amp == "on"
    try:
        runs.check_output_dir(args.output_dir)
    except runs.RunError as error:
        parser.error(str(error))


def native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, as Linux lists its
    flags): there bf16 autocast halves a training step; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# -----------------------------------------------------------------------------
# Checkpoints: atomic, newest found by name, configuration checked on resume

def save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, args, run):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "iteration": iteration, "args": vars(args), "world": run.world,
             "classes": run.train_set.class_names, "rng": rng_state()}
    runs.write_checkpoint(path, state)


def check_same_model(saved, args):
    saved = {"style": "torchvision", **saved}  # a checkpoint from before the switch has this project's
    keys = MODEL_KEYS + ("data", "optimizer")
    differ = {k: (saved.get(k), vars(args)[k]) for k in keys if saved.get(k) != vars(args)[k]}
    if differ:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise runs.RunError(f"the checkpoint was trained with another configuration:\n{lines}\n"
                            f"use the same flags, or another --output-dir")


def resume_warnings(checkpoint, args, world):
    """What a resumed run will not continue exactly: said, not refused (a run may
    have to resume on fewer GPUs)."""
    saved, warnings = checkpoint["args"], []
    changed = [f"{k} {saved.get(k)} -> {vars(args)[k]}" for k in ("seed", "ims_per_batch")
               if saved.get(k) != vars(args)[k]]
    if checkpoint.get("world", world) != world:
        changed.append(f"processes {checkpoint['world']} -> {world}")
    if changed:
        warnings.append(f"warning: {', '.join(changed)} since the checkpoint: the images come in another "
                        f"order than in an uninterrupted run")
    if saved.get("lr") != args.lr:
        warnings.append(f"warning: lr {args.lr:g} is not used: the checkpoint's schedule continues from its base "
                        f"lr {saved.get('lr'):g}")
    schedule = [f"{k} {saved.get(k)} -> {vars(args)[k]}" for k in ("max_iter", "steps", "warmup")
                if saved.get(k) != vars(args)[k]]
    if schedule:
        warnings.append(f"warning: {', '.join(schedule)} since the checkpoint: these apply from here on "
                        f"(the iterations already run are not rescaled)")
    return warnings


def rng_state():
    """Every generator's state, in types that torch.load(weights_only=True) reads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(rng):
    torch.set_rng_state(rng["torch"])
    random.setstate(tuple(rng["python"]))
    keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# -----------------------------------------------------------------------------
# The steps of a run

def lr_factor(iteration, args):
    """Linear warm-up from 0.001x, then x0.1 at each step (the 1x schedule)."""
    warm = min(1.0, (iteration + 1) / args.warmup) if args.warmup else 1.0
    warm = 0.001 + (1 - 0.001) * warm
    return warm * 0.1 ** sum(iteration >= s for s in args.steps)


def setup(args):
    """Processes, device, datasets (every file checked), output folder. Returns a
    namespace of the run."""
    run = argparse.Namespace(**runs.setup_distributed(args.device, args.dist_timeout))
    run.log = print if run.master else (lambda *a, **k: None)
    if run.device.type == "cuda":  # fp32 matmuls and convs on tensor cores (TF32), as the 1x recipe is run
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.ims_per_batch % run.world:
        raise runs.RunError(f"--ims-per-batch {args.ims_per_batch} is not divisible by {run.world} processes")
    late = [s for s in args.steps if s >= args.max_iter] + ([args.warmup] if args.warmup >= args.max_iter else [])
    if late:
        run.log(f"warning: of steps {args.steps} and warmup {args.warmup}, {late} lie at or beyond max_iter "
                f"{args.max_iter} (pass --steps and --warmup that fit the run)")
    if args.ims_per_batch != RECIPES[args.data]["ims_per_batch"]:
        run.log(f"{args.ims_per_batch} images per iteration, not the recipe's "
                f"{RECIPES[args.data]['ims_per_batch']}: lr {args.lr:g}, max_iter {args.max_iter}, steps "
                f"{args.steps}, warmup {args.warmup} (the linear rule, where not given)")
    if args.data == "synthetic":
        run.log(f"synthetic demo recipe: {json.dumps({k: getattr(args, k) for k in RECIPES['synthetic']})}")
        if run.master and not os.path.exists(os.path.join(args.data_root, "annotations", "instances_val.json")):
            run.log(f"generating the synthetic dataset under {args.data_root} ...")
            data.make_synthetic(args.data_root)
        if run.distributed:
            dist.barrier()
    train_split = "train2017" if args.data == "coco" else "train"
    run.train_set = data.CocoDetection(*data.coco_paths(args.data_root, train_split), train=True)
    run.val_set = val_dataset(args.data, args.data_root)
    check_datasets(run)
    run.lock = on_master(run, lambda: runs.claim_output_dir(args.output_dir, args.resume, args.overwrite, run.log))
    return run


def check_datasets(run):
    """Everything the run will read, before its first iteration: the final
    evaluation's split has boxes and the training set's classes, and every image
    either names is there, readable, and of the size its annotations say (each rank
    reads the headers of its share; all ranks raise the same error)."""
    train_set, val_set = run.train_set, run.val_set
    if val_set.class_names != train_set.class_names:
        raise runs.RunError(f"{val_set.coco_file} has the classes {val_set.class_names}, but {train_set.coco_file} "
                            f"{train_set.class_names}: the model is evaluated on the classes it learns; use "
                            f"annotation files of the same categories")
    val_set.check_evaluable()
    tic = time.perf_counter()
    found = [dataset.check_images(run.rank, run.world) for dataset in (train_set, val_set)]
    if run.distributed:
        everyone = [None] * run.world
        dist.all_gather_object(everyone, found)
        found = [sum((f[k] for f in everyone), []) for k in range(2)]
    for dataset, problems in zip((train_set, val_set), found):
        dataset.raise_image_problems(problems)
    run.log(f"checked the {len(train_set) + len(val_set)} images of {train_set.image_dir} and {val_set.image_dir} "
            f"in {time.perf_counter() - tic:.1f} s")


def on_master(run, work):
    """work() on rank 0 alone; a RunError it raises is raised on every rank, so
    that no rank waits for a run that rank 0 refused. Returns rank 0's result."""
    result, said = None, None
    if run.master:
        try:
            result = work()
        except runs.RunError as error:
            said = str(error)
    if run.distributed:
        shared = [said]
        dist.broadcast_object_list(shared, src=0)
        said = shared[0]
    if said is not None:
        raise runs.RunError(said)
    return result


def backbone_weights(args):
    """The ImageNet weights the backbone starts from, loaded and checked before a
    run starts: torchvision's (downloaded once), a file, or False. A download that
    fails, a file that is not a state dict of this --backbone: a RunError that says
    how to get the right one."""
    if args.pretrained_backbone is False:
        return False
    weights = torchvision.models.get_model_weights(args.backbone).IMAGENET1K_V1
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if args.pretrained_backbone is True:
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as error:  # no network, a proxy, a partial download, ...
            raise runs.RunError(f"could not download the ImageNet weights of {args.backbone} "
                                f"({type(error).__name__}: {str(error)[:200]}); download {weights.url} on a machine "
                                f"with network and put it at {target}, or pass --pretrained-backbone FILE "
                                f"(or false, to train from scratch)") from error
    else:
        try:
            state = torch.load(args.pretrained_backbone, map_location="cpu", weights_only=True)
        except Exception as error:
            raise runs.RunError(f"--pretrained-backbone {args.pretrained_backbone} cannot be read as a state dict "
                                f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                                f"pass torchvision's {os.path.basename(weights.url)}") from error
    expected = getattr(torchvision.models, args.backbone)(weights=None).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    wrong = sorted(set(expected) ^ set(shapes)) + [k for k in expected if k in shapes and
                                                   shapes[k] != tuple(expected[k].shape)]
    if wrong:
        source = args.pretrained_backbone if args.pretrained_backbone is not True else target
        raise runs.RunError(f"{source} does not hold the weights of torchvision's {args.backbone} ({len(wrong)} "
                            f"tensor(s) missing, unexpected or of another shape, e.g. {wrong[:3]}); pass the file "
                            f"{os.path.basename(weights.url)} of --backbone {args.backbone}")
    return state


# the arguments that fix the model's tensors and what they compute: --weights must match them
ARCHITECTURE = ("detector", "backbone", "head", "depth", "tau", "activation", "coarse", "gated", "channels", "style")


def start_weights(args, run):
    """--weights: the model state of a checkpoint, checked against this run: the
    same architecture and classes (lambda, sizes, the assigner and the recipe may
    differ: they are what fine-tuning changes)."""
    checkpoint = runs.read_checkpoint(args.weights)
    saved = {"style": "torchvision", **checkpoint["args"]}
    ignored = ("tau", "activation", "coarse", "gated") if args.head != "dynamic" else ()  # no gates: unused
    ignored += ("depth",) if args.head in ("fcos", "retinanet") else ()  # 4-conv towers
    differ = [k for k in ARCHITECTURE if k not in ignored and saved.get(k) != vars(args)[k]]
    if differ:
        flag = lambda k, v: (f"--{k}" if v else f"no --{k}") if isinstance(v, bool) else \
            f"--{k} {' '.join(v) if isinstance(v, list) else v}"
        raise runs.RunError(f"--weights {args.weights} holds another model: " + ", ".join(
            f"{flag(k, saved.get(k))} (this run: {vars(args)[k]})" for k in differ) + "; pass its flags")
    runs.check_classes(checkpoint, args.weights, run.train_set, "the training set")
    return checkpoint["model"]


def backbone_of(state, args):
    """The ResNet weights within a model state, as torchvision names them (its
    classifier, which the detector does not use, from a fresh ResNet): they build
    the backbone as ImageNet weights would (frozen BatchNorm, stem and stage 1
    frozen) without a download."""
    prefix = "backbone.body."
    resnet = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    fc = getattr(torchvision.models, args.backbone)(weights=None).fc.state_dict()
    return {**{f"fc.{k}": v for k, v in fc.items()}, **resnet}


def build(args, run):
    """The model (the same initial weights on every rank), optimizer, schedule and
    AMP scaler."""
    state = start_weights(args, run) if args.weights else None
    if state is None:
        weights = backbone_weights(args)
    else:  # a ResNet as from ImageNet (BatchNorm frozen); EfficientDet freezes nothing: its own weights follow
        weights = backbone_of(state, args) if args.pretrained_backbone is not False and \
            args.detector != "efficientdet" else False
    torch.manual_seed(args.seed)
    model = build_model(vars(args), len(run.train_set.label_to_category), pretrained_backbone=weights).to(run.device)
    if state is not None:
        # BatchNorm's batch counter is kept by a trainable BatchNorm only: the one key a
        # checkpoint of a frozen backbone lacks, or has more than a frozen one
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k in missing + unexpected if not k.endswith("num_batches_tracked")]
        if wrong:
            raise runs.RunError(f"--weights {args.weights} does not fit the model: {wrong[:3]} ...")
        run.log(f"starting from the weights of {args.weights}")
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, args))
    # bf16 keeps fp32's range: no loss scaling; fp16 (GPUs before Ampere) needs it
    cuda_bf16 = run.device.type == "cuda" and torch.cuda.is_bf16_supported()
    run.amp_dtype = torch.float16 if run.device.type == "cuda" and not cuda_bf16 else torch.bfloat16
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.amp and run.amp_dtype == torch.float16)
    return model, optimizer, scheduler, scaler


def resume(args, run, model, optimizer, scheduler, scaler):
    """The iteration to start from: 0, or the newest loadable checkpoint's, restored
    exactly. An unreadable newest checkpoint (a truncated file, say) is passed over
    for the next one, with a warning that names both. A run that trained to its end
    but whose final evaluation did not finish (no eval_results.json) resumes at
    max_iter: it evaluates."""
    if not args.resume:
        return 0
    candidates, skipped = runs.checkpoints_newest_first(args.output_dir, run.log), []
    for path in candidates:
        try:
            checkpoint = runs.read_checkpoint(path)
            break
        except runs.RunError as error:
            skipped.append(str(error))
    else:
        if candidates:
            raise runs.RunError(f"--resume: no checkpoint in {args.output_dir} can be read:\n  " + "\n  ".join(skipped))
        run.log(f"--resume: no checkpoint in {args.output_dir}, starting fresh")
        return 0
    for reason in skipped:
        run.log(f"warning: {reason}; resuming from {path} instead")
    check_same_model(checkpoint["args"], args)
    runs.check_classes(checkpoint, path, run.train_set, "the training set")
    finished = os.path.exists(os.path.join(args.output_dir, "eval_results.json"))
    if checkpoint["iteration"] > args.max_iter or checkpoint["iteration"] == args.max_iter and finished:
        raise runs.RunError(f"{path} is at iteration {checkpoint['iteration']}, and --max-iter {args.max_iter} ends "
                            f"there or before: pass a larger --max-iter to train on (a finished run: evaluate it "
                            f"with python eval.py --checkpoint {path})")
    for warning in resume_warnings(checkpoint, args, run.world):
        run.log(warning)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["rng"])
    run.log(f"resuming from {path} at iteration {checkpoint['iteration']}" +
            (": its training is done, its final evaluation runs" if checkpoint["iteration"] == args.max_iter else ""))
    return checkpoint["iteration"]


def train(args, run, model, optimizer, scheduler, scaler, start, stop):
    """Iterations start..max_iter, then model_final.pth; returns True if a signal
    stopped the run first."""
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda"
                                                    else None) if run.distributed else model
    if args.compile:
        ddp = torch.compile(ddp, backend=args.compile)  # checkpoints and evaluation keep the plain model
    saved = [start]  # the iteration of the newest checkpoint

    def save(iteration, name=None):
        if run.master:
            name = name or f"model_{iteration:07d}.pth"
            save_checkpoint(os.path.join(args.output_dir, name), model, optimizer, scheduler, scaler, iteration,
                            args, run)
            run.log(f"saved {name}")
        saved[0] = iteration

    batches = iter(data.make_loader(run.train_set, args.ims_per_batch // run.world, args.seed, run.rank, run.world,
                                    start, args.workers))
    run.log(f"training {args.detector} with {args.head} towers (depth {args.depth}, lambda {args.lam}) on "
            f"{len(run.train_set)} images, "
            f"{run.world} process(es), iterations {start}..{args.max_iter}")
    with MetricLog(args, run, start) as log:
        for iteration in range(start, args.max_iter):
            t0 = time.perf_counter()
            images, targets = next(batches)
            data_time = time.perf_counter() - t0
            with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=args.amp):
                losses = ddp([img.to(run.device, non_blocking=True) for img in images], targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {iteration}: "
                                         f"{ {k: v.item() for k, v in losses.items()} }; the last checkpoint in "
                                         f"{args.output_dir} is intact; try a lower --lr or a longer --warmup")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = iteration + 1
            log.step(done, loss, losses, optimizer, model, data_time)
            if done % args.checkpoint_period == 0 and done < args.max_iter:
                save(done)
            if args.eval_period and done % args.eval_period == 0 and done < args.max_iter:
                run_eval(model, run, args, stop, f"eval_{done:07d}.json")
                model.train()
            if stopping(stop, run):
                if saved[0] != done:  # a stop on a checkpoint iteration saves once
                    save(done)
                run.log(f"stopped by signal {stop['signal'] or 'on another rank'} after iteration {done}; "
                        f"--resume continues from here")
                return True
    save(args.max_iter, "model_final.pth")
    return False


class MetricLog:
    """Every 20 iterations rank 0 prints and appends to metrics.jsonl the losses, lr,
    the head's executed/full MAC ratio, s/iter, data time, ETA, and the memory in
    use and its peak (the only host syncs of the loop, besides the finite-loss
    check); every TRIM_EVERY iterations each rank hands its heap's free pages back."""

    def __init__(self, args, run, start):
        self.args, self.run, self.start, self.tic = args, run, start, time.perf_counter()
        self.trim_heap = heap_trimmer()
        self.file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a", buffering=1) if run.master else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()

    def step(self, done, loss, losses, optimizer, model, data_time):
        self.log(done, loss, losses, optimizer, model, data_time)
        if done % TRIM_EVERY == 0:
            self.trim_heap()  # every rank; after the record, whose mem_mb is what the steps since kept

    def log(self, done, loss, losses, optimizer, model, data_time):
        if not self.run.master or not (done % 20 == 0 or done == self.args.max_iter):
            return
        sec = (time.perf_counter() - self.tic) / (done - self.start)
        record = {"iteration": done, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                  "lr": optimizer.param_groups[0]["lr"], "head_mac_ratio": model.head_mac_ratio.item(),
                  "s_per_iter": sec, "data_time": data_time, "mem_mb": memory_mb(self.run.device),
                  "peak_mem_mb": peak_memory_mb(self.run.device)}
        eta = datetime.timedelta(seconds=int(sec * (self.args.max_iter - done)))
        self.run.log(f"iter {done}/{self.args.max_iter}  eta {eta}  " + "  ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k != "iteration"))
        self.file.write(json.dumps(record) + "\n")


class stop_signals:
    """SIGTERM / Ctrl-C: training finishes its iteration, saves and exits (all ranks
    agree each iteration); an evaluation stops at its next image. The previous
    handlers come back on exit."""

    def __enter__(self):
        self.stop = {"signal": None}
        self.previous = {sig: signal.signal(sig, lambda s, f: self.stop.update(signal=s))
                         for sig in (signal.SIGTERM, signal.SIGINT)}
        return self.stop

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stopping(stop, run):
    flag = torch.tensor([stop["signal"] is not None], dtype=torch.int32, device=run.device)
    if run.distributed:
        dist.all_reduce(flag)
    return bool(flag.item())


def run_eval(model, run, args, stop, name="eval_results.json"):
    """Evaluate on the val split and write the results to `name` in the output
    folder (eval_results.json: the run's final evaluation, which marks it done).
    Returns False if a signal interrupted it."""
    results = evaluate(model, run.val_set, run.device, workers=args.workers, stop=stop)
    if not run.master:
        return stop["signal"] is None
    if results.get("interrupted"):
        print(f"evaluation interrupted by signal {stop['signal']}; the checkpoint is saved: --resume runs this "
              f"evaluation again")
        return False
    path = os.path.join(args.output_dir, name)
    runs.atomic_write(path, lambda f: json.dump(results, f, indent=1))
    print(f"AP {results['AP']:.4f}  AP50 {results['AP50']:.4f}  -> {path}")
    return True


# -----------------------------------------------------------------------------
# Memory that stays flat over a long run on the CPU
#
# The sparse head's gathered GEMMs change shape every step, as the gates move. oneDNN
# and PyTorch's ideep keep a compiled primitive per shape they meet, up to 1024 each
# by default at about 0.3 MB apiece, and those allocations, amid tensors of ever-new
# sizes, pin glibc's heap: the demo's resident memory grew by a quarter from iteration
# 100 to 400. Caches of CACHED_SHAPES shapes (a step of the demo, or of a D8 head,
# reuses about 155 and meets up to ~60 new ones) and the heap's free pages handed
# back every TRIM_EVERY iterations keep it flat (BENCHMARKS.md). Each hand-back costs
# the next step ~0.2 s of page faults (its working set comes back): ~0.3% per
# iteration at this period.
CACHED_SHAPES = 256
TRIM_EVERY = 100


def bound_native_caches():
    """Cap oneDNN's and ideep's caches of primitives, unless the environment sets
    them; both read these variables when first used, so this runs before any op."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(CACHED_SHAPES))


def heap_trimmer():
    """glibc's malloc_trim(0), which returns the heap's free pages to the system
    (without it glibc keeps them for allocations that rarely fit again); a no-op
    where the C library has none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def memory_mb(device):
    """Memory in use now: on a GPU the tensors' bytes, on the CPU the process's
    resident set (Linux's /proc; None elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None):
    """Train and evaluate; returns the exit code: 0 done, 128 + N if signal N stopped
    the run before its end (it saved a checkpoint; --resume continues)."""
    bound_native_caches()
    args = get_args(argv)
    run = setup(args)
    try:
        model, optimizer, scheduler, scaler = build(args, run)
        start = resume(args, run, model, optimizer, scheduler, scaler)
        with stop_signals() as stop:
            stopped = train(args, run, model, optimizer, scheduler, scaler, start, stop) or \
                not run_eval(model, run, args, stop)
        return runs.stopped_exit_code(stop["signal"] or signal.SIGTERM) if stopped else 0
    except RuntimeError as error:
        if run.distributed and "timed out" in str(error).lower():
            raise runs.RunError(f"a process waited more than --dist-timeout {args.dist_timeout:g} minutes for the "
                                f"others (one hung or died): {str(error).splitlines()[0][:200]}; the last "
                                f"checkpoint in {args.output_dir} is intact, --resume continues") from error
        raise
    finally:
        if run.lock:
            run.lock.release()
        if run.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(runs.run_cli(main))
