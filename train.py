"""
Train FCOS with the fine-grained dynamic head (Song et al., NeurIPS 2020), one
script, single process or torchrun DDP:

    python train.py --data synthetic                      # a CPU demo, minutes
    torchrun --nproc_per_node 8 train.py --depth 8 --lam 0.4   # COCO, the paper's 1x recipe

The loss is Eq. 6: focal + GIoU + centerness + lambda * budget. Only rank 0 logs
and saves. Checkpoints are written atomically; --resume continues from the newest
one, exactly (model, optimizer, schedule, AMP scaler, data order, RNG states).
SIGTERM or Ctrl-C saves a checkpoint before exiting.
"""
import argparse
import datetime
import glob
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import data
from eval import MODEL_KEYS, build_model, evaluate, val_dataset

# The paper's 1x recipe (DESIGN §6) and a CPU-sized demo; any flag overrides either.
RECIPES = {
    "coco": dict(backbone="resnet50", pretrained_backbone="true", min_size=800, max_size=1333, channels=256,
                 ims_per_batch=16, optimizer="sgd", lr=0.01, max_iter=90000, steps=[60000, 80000], warmup=1000,
                 checkpoint_period=5000, data_root="datasets/coco", workers=4),
    "synthetic": dict(backbone="resnet18", pretrained_backbone="false", min_size=256, max_size=352, channels=128,
                      depth=2, ims_per_batch=8, optimizer="adamw", lr=1e-3, max_iter=500, steps=[400, 470],
                      warmup=50, checkpoint_period=200, data_root="datasets/synthetic", workers=1),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", choices=tuple(RECIPES), default="coco")
    p.add_argument("--data-root", help="coco: datasets/coco; synthetic: datasets/synthetic (generated once)")
    p.add_argument("--head", choices=("fcos", "fixed", "dynamic"), default="dynamic")
    p.add_argument("--depth", type=int, help="routers per branch, D (paper: 8)")
    p.add_argument("--lam", type=float, default=0.4, help="lambda of Eq. 6, the budget weight")
    p.add_argument("--tau", type=float, default=1.5, help="tau of the gate activation, Eq. 3")
    p.add_argument("--activation", choices=("proposed", "restricted_tanh", "softmax"), default="proposed")
    p.add_argument("--coarse", action="store_true", help="one gate per image and path (Tab. 1 coarse-grained)")
    p.add_argument("--gated", nargs="*", choices=("depth", "scale"), default=["depth", "scale"],
                   help="the path types with spatial gates (Tab. 3); the others run everywhere;\n"
                        "none (--gated alone) is the fixed head")
    p.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    p.add_argument("--pretrained-backbone", help="true (torchvision's ImageNet weights), false, or a file")
    p.add_argument("--channels", type=int, help="FPN and head width (paper: 256)")
    p.add_argument("--min-size", type=int, help="shorter side of the resized input")
    p.add_argument("--max-size", type=int, help="cap on its longer side")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on the CPU)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--steps", type=int, nargs="*", help="iterations at which lr drops x0.1")
    p.add_argument("--warmup", type=int, help="linear warm-up iterations")
    p.add_argument("--max-iter", type=int)
    p.add_argument("--ims-per-batch", type=int, help="images per iteration, over all processes; the recipe's lr,\n"
                   "max-iter, steps and warmup follow it (linear rule) unless given")
    p.add_argument("--output-dir", default="output")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--checkpoint-period", type=int)
    p.add_argument("--eval-period", type=int, default=0, help="0: evaluate only at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, help="data loader processes per rank")
    args = p.parse_args(argv)
    recipe = RECIPES[args.data]
    given = {key for key in recipe if getattr(args, key) is not None}
    for key, value in dict(recipe, depth=recipe.get("depth", 8)).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("depth", "ims_per_batch", "max_iter", "checkpoint_period", "channels", "min_size", "max_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for key in ("warmup", "eval_period", "workers"):
        if getattr(args, key) < 0:
            p.error(f"--{key.replace('_', '-')} must be 0 or more, got {getattr(args, key)}")
    # The recipe's lr and schedule are for its batch (coco: 16 images, §3.1). Another
    # --ims-per-batch scales what was not given by the linear rule (Goyal et al.,
    # 2017; FCOS's advice for fewer GPUs): lr x k, iterations / k.
    k = args.ims_per_batch / recipe["ims_per_batch"]
    if k != 1:
        args.lr = args.lr if "lr" in given else recipe["lr"] * k
        args.max_iter = args.max_iter if "max_iter" in given else max(1, round(recipe["max_iter"] / k))
        args.warmup = args.warmup if "warmup" in given else round(recipe["warmup"] / k)
        args.steps = args.steps if "steps" in given else [round(s / k) for s in recipe["steps"]]
    pretrained = args.pretrained_backbone.lower()
    args.pretrained_backbone = {"true": True, "false": False}.get(pretrained, args.pretrained_backbone)
    return args


# -----------------------------------------------------------------------------
# Checkpoints: atomic, newest found by name, configuration checked on resume

def save_checkpoint(path, model, optimizer, scheduler, scaler, iteration, args, world):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "iteration": iteration, "args": vars(args), "world": world,
             "rng": rng_state()}
    data.atomic_write(path, lambda f: torch.save(state, f), "wb")  # a run killed mid-write loses nothing
    data.atomic_write(os.path.join(os.path.dirname(path), "last_checkpoint"),
                      lambda f: f.write(os.path.basename(path)))


def newest_checkpoint(output_dir):
    """The checkpoint named in last_checkpoint, else the highest model_NNNNNNN.pth."""
    last = os.path.join(output_dir, "last_checkpoint")
    if os.path.exists(last):
        with open(last) as f:
            return os.path.join(output_dir, f.read().strip())
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "model_*.pth"))
             if (m := re.search(r"model_(\d+)\.pth$", p))]
    return max(found)[1] if found else None


def check_same_model(saved, args):
    keys = MODEL_KEYS + ("data", "optimizer")
    differ = {k: (saved.get(k), vars(args)[k]) for k in keys if saved.get(k) != vars(args)[k]}
    if differ:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"the checkpoint was trained with another configuration:\n{lines}\n"
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

def lr_factor(iteration, args):
    """Linear warm-up from 0.001x, then x0.1 at each step (the 1x schedule)."""
    warm = min(1.0, (iteration + 1) / args.warmup) if args.warmup else 1.0
    warm = 0.001 + (1 - 0.001) * warm
    return warm * 0.1 ** sum(iteration >= s for s in args.steps)


def main(argv=None):
    args = get_args(argv)
    # DDP from torchrun's environment; a plain `python train.py` is one process
    distributed = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    device = torch.device(args.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.ims_per_batch % world:
        raise ValueError(f"--ims-per-batch {args.ims_per_batch} is not divisible by {world} processes")
    os.makedirs(args.output_dir, exist_ok=True)
    late = [s for s in args.steps if s >= args.max_iter] + ([args.warmup] if args.warmup >= args.max_iter else [])
    if late:
        log(f"warning: of steps {args.steps} and warmup {args.warmup}, {late} lie at or beyond max_iter "
            f"{args.max_iter} (pass --steps and --warmup that fit the run)")
    if args.ims_per_batch != RECIPES[args.data]["ims_per_batch"]:
        log(f"{args.ims_per_batch} images per iteration, not the recipe's {RECIPES[args.data]['ims_per_batch']}: "
            f"lr {args.lr:g}, max_iter {args.max_iter}, steps {args.steps}, warmup {args.warmup} "
            f"(the linear rule, where not given)")
    if args.data == "synthetic":
        log(f"synthetic demo recipe: {json.dumps({k: getattr(args, k) for k in RECIPES['synthetic']})}")
        if master and not os.path.exists(os.path.join(args.data_root, "annotations", "instances_val.json")):
            log(f"generating the synthetic dataset under {args.data_root} ...")
            data.make_synthetic(args.data_root)
        if distributed:
            dist.barrier()
    train_split = "train2017" if args.data == "coco" else "train"
    train_set = data.CocoDetection(*data.coco_paths(args.data_root, train_split), train=True)
    val_set = val_dataset(args.data, args.data_root)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(vars(args), len(train_set.label_to_category)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, args))
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    start = 0
    path = newest_checkpoint(args.output_dir) if args.resume else None
    if path:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        check_same_model(checkpoint["args"], args)
        for warning in resume_warnings(checkpoint, args, world):
            log(warning)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start = checkpoint["iteration"]
        restore_rng(checkpoint["rng"])
        log(f"resuming from {path} at iteration {start}")
    elif args.resume:
        log(f"--resume: no checkpoint in {args.output_dir}, starting fresh")
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if distributed else model

    # SIGTERM / Ctrl-C: finish the iteration, save, exit (all ranks agree each iteration)
    stop = {"signal": None}
    previous = {sig: signal.signal(sig, lambda s, f: stop.update(signal=s)) for sig in (signal.SIGTERM, signal.SIGINT)}

    def save(iteration, name=None):
        if master:
            name = name or f"model_{iteration:07d}.pth"
            save_checkpoint(os.path.join(args.output_dir, name), model, optimizer, scheduler, scaler, iteration, args,
                            world)
            log(f"saved {name}")

    try:
        loader = data.make_loader(train_set, args.ims_per_batch // world, args.seed, rank, world, start, args.workers)
        batches = iter(loader)
        metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "a", buffering=1) if master else None
        log(f"training {args.head} head (depth {args.depth}, lambda {args.lam}) on {len(train_set)} images, "
            f"{world} process(es), iterations {start}..{args.max_iter}")
        tic = time.perf_counter()
        for iteration in range(start, args.max_iter):
            t0 = time.perf_counter()
            images, targets = next(batches)
            data_time = time.perf_counter() - t0
            images = [img.to(device, non_blocking=True) for img in images]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                losses = ddp(images, targets)
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

            if master and (done % 20 == 0 or done == args.max_iter):
                sec = (time.perf_counter() - tic) / (done - start)
                record = {"iteration": done, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                          "lr": optimizer.param_groups[0]["lr"], "head_mac_ratio": model.head_mac_ratio,
                          "s_per_iter": sec, "data_time": data_time, "peak_mem_mb": peak_memory_mb(device)}
                eta = datetime.timedelta(seconds=int(sec * (args.max_iter - done)))
                log(f"iter {done}/{args.max_iter}  eta {eta}  " + "  ".join(
                    f"{k} {v:.4g}" for k, v in record.items() if k not in ("iteration",)))
                metrics.write(json.dumps(record) + "\n")
            if done % args.checkpoint_period == 0 and done < args.max_iter:
                save(done)
            if args.eval_period and done % args.eval_period == 0 and done < args.max_iter:
                run_eval(model, val_set, device, args, master)
                model.train()
            if stopping(stop, distributed, device):
                save(done)
                log(f"stopped by signal {stop['signal'] or 'on another rank'} after iteration {done}; "
                    f"--resume continues from here")
                break
        else:  # not stopped: the final checkpoint and the evaluation
            save(args.max_iter, "model_final.pth")
            run_eval(model, val_set, device, args, master)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if distributed:
        dist.destroy_process_group()


def stopping(stop, distributed, device):
    flag = torch.tensor([stop["signal"] is not None], dtype=torch.int32, device=device)
    if distributed:
        dist.all_reduce(flag)
    return bool(flag.item())


def run_eval(model, val_set, device, args, master):
    results = evaluate(model, val_set, device, workers=args.workers)
    if master:
        path = os.path.join(args.output_dir, "eval_results.json")
        data.atomic_write(path, lambda f: json.dump(results, f, indent=1))
        print(f"AP {results['AP']:.4f}  AP50 {results['AP50']:.4f}  -> {path}")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


if __name__ == "__main__":
    sys.exit(main())
