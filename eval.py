"""
COCO evaluation of FCOS with the dynamic head: pycocotools' mAP and the FLOPs
columns of Tab. 1 (head MACs per image: average, min, max; and the total with
backbone + FPN), in units of 1e9 MACs ("GFLOPs" as detectron2 and fvcore count).

    python eval.py --checkpoint output/model_final.pth [--data synthetic] [--visualize 8]
    torchrun --nproc_per_node 8 eval.py --checkpoint model_final.pth --data-root datasets/coco
    python eval.py --checkpoint output/model_final.pth --images photo.jpg more_photos/

Each rank evaluates a shard of the images, one image at a time (as the paper
tests); rank 0 gathers the detections and runs COCOeval. --visualize N writes
PNGs of N images with their detections, and of the spatial gates of the
dynamic head per depth step and level (Fig. 4). --images runs the model on image
files instead (no dataset: the class names come from the checkpoint) and writes,
per image, the detections drawn, the gate maps, and the detections as JSON.
"""
import argparse
import contextlib
import collections
import functools
import io
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools.cocoeval import COCOeval
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, make_grid

import data
import runs
from fcos import build_model

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def val_dataset(kind, root):
    split = "val2017" if kind == "coco" else "val"
    return data.CocoDetection(*data.coco_paths(root, split), train=False)


@torch.no_grad()
def evaluate(model, dataset, device, workers=2, visualize=0, output_dir=None, stop=None):
    """mAP and MACs on `dataset`, sharded over the ranks. Returns the results dict
    on rank 0 (None elsewhere): the 12 COCOeval numbers and the FLOPs columns, or
    {"interrupted": True} when `stop` (a dict a signal handler fills) ended the
    evaluation of some rank before its last image."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model.eval()
    detections, macs, interrupted = [], [], False
    for n, (images, targets) in enumerate(data.eval_loader(dataset, rank, world, workers)):
        if stop is not None and stop["signal"] is not None:
            interrupted = True
            break
        out = model([img.to(device) for img in images])[0]
        image_id = targets[0]["image_id"]
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            x1, y1, x2, y2 = box
            detections.append({"image_id": image_id, "category_id": dataset.label_to_category[label],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        macs.append((out["head_macs"], backbone_macs(model, out["input_size"])))
        if rank == 0 and n < visualize:
            save_visualization(model, images[0], out, dataset.class_names, os.path.join(output_dir, "visualize"),
                               image_id)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (detections, macs, interrupted))
        detections = [d for part in gathered for d in part[0]]
        macs = [m for part in gathered for m in part[1]]
        interrupted = any(part[2] for part in gathered)
    if rank != 0:
        return None
    if interrupted:
        return {"interrupted": True}
    if not macs:
        raise runs.RunError(f"{dataset.image_dir}: the evaluation set has no images to evaluate")
    results = coco_stats(dataset.coco, detections)
    head = torch.tensor([m[0] for m in macs], dtype=torch.float64) / 1e9
    total = head + torch.tensor([m[1] for m in macs], dtype=torch.float64) / 1e9
    results.update(head_gflops_avg=head.mean().item(), head_gflops_min=head.min().item(),
                   head_gflops_max=head.max().item(), total_gflops_avg=total.mean().item())
    print(f"FLOPs (1e9 MACs per image, {len(macs)} images): head avg {results['head_gflops_avg']:.2f} "
          f"(min {results['head_gflops_min']:.2f}, max {results['head_gflops_max']:.2f}); "
          f"total avg {results['total_gflops_avg']:.2f}")
    if output_dir:
        runs.atomic_write(os.path.join(output_dir, "detections.json"), lambda f: json.dump(detections, f))
    return results


@functools.lru_cache(maxsize=64)  # one count per padded input size
def backbone_macs(model, size):
    """MACs of backbone + FPN for one padded input size (Tab. 1's total FLOPs), from
    torch's FLOP counter (which counts a multiply-add as 2 FLOPs)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.backbone(next(model.backbone.parameters()).new_zeros(1, 3, *size))
    return counter.get_total_flops() / 2


def coco_stats(coco, detections):
    """Run COCOeval (bbox) and print its summary; the 12 numbers by name."""
    if not detections:  # pycocotools cannot load an empty result list
        print("no detections: every AP and AR is 0")
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco.loadRes([dict(d) for d in detections])  # loadRes adds keys to the dicts it gets
    evaluator = COCOeval(coco, coco_dt, "bbox")  # over every image of the split
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}


def save_visualization(model, image, out, class_names, output_dir, image_id, min_score=0.3):
    """The image with its detections above min_score, and the gate maps of Fig. 4
    of each tower that has gates; each PNG written whole or not at all."""
    os.makedirs(output_dir, exist_ok=True)
    keep = out["scores"] > min_score
    labels = [f"{class_names[l]} {s:.2f}" for l, s in zip(out["labels"][keep].tolist(), out["scores"][keep].tolist())]
    drawn = (image * 255).to(torch.uint8)
    if keep.any():  # (torchvision warns on an empty list of boxes)
        drawn = draw_bounding_boxes(drawn, out["boxes"][keep].cpu(), labels, width=2)
    save_png(drawn, os.path.join(output_dir, f"{image_id}_detections.png"))
    for branch, tower in getattr(model, "module", model).towers.items():
        gates = getattr(tower, "gates", None)  # a tower without gates (FCOS's, RetinaNet's, fixed) has none
        if gates:
            save_png(gate_grid(gates), os.path.join(output_dir, f"{image_id}_gates_{branch}.png"))


def save_png(picture, path):
    """A (C, H, W) uint8 picture as a PNG, atomically: a full disk leaves no empty file."""
    runs.atomic_write(path, lambda f: to_pil_image(picture).save(f, format="PNG"), "wb")


def gate_grid(gates):
    """Rows: depth steps; columns: levels P3..P7, each upsampled (nearest) to P3's
    size, and P3 to 96 pixels high at least. White = gate 1, black = 0 (skipped).
    The depth paths' gates, or for a head whose scale paths alone are gated
    (Tab. 3) the scale-down gates, then the scale-up gates below them; a level
    that lacks the path (P7 has no coarser neighbour) stays grey."""
    paths = ["depth"] if "depth" in gates[0] else ["down", "up"]
    maps = [m for step in gates for path in paths for m in step[path] if m is not None]
    h, w = maps[0].shape[-2:]
    zoom = max(1, -(-96 // h))  # small inputs: a few pixels per cell, so that each can be seen
    size = (max(h * zoom, 32), max(w * zoom, 32))  # coarse gates (one value per image) are 1x1
    grey = torch.full((1, *size), 0.5, device=maps[0].device)
    tiles = [grey if m is None else F.interpolate(m[:1].float(), size=size, mode="nearest")[0]
             for step in gates for path in paths for m in step[path]]
    grid = make_grid(tiles, nrow=len(gates[0][paths[0]]), padding=2, pad_value=0.5)
    return (grid[:1].clamp(0, 1) * 255).to(torch.uint8).cpu()


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_files(paths):
    """The image files that --images names: files as given, folders' image files by
    suffix (not recursing), each file once. A path that is not there, or a folder
    with no image in it, is refused before any image is run."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES)
                           and os.path.isfile(os.path.join(path, n)))
            if not found:
                raise runs.RunError(f"--images {path}: the folder holds no image files (by suffix: "
                                    f"{' '.join(IMAGE_SUFFIXES)}); pass image files or folders of them")
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise runs.RunError(f"--images {path}: no such file or folder")
    seen = set()
    return [f for f in files if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]


def output_names(files):
    """A distinct output name per file: its stem (photo.jpg -> photo); where stems
    collide, the suffix joins it (x.jpg, x.png -> x_jpg, x_png), then as many of
    the folders above it as tell them apart (a/x.jpg, b/x.jpg -> a_x_jpg, b_x_jpg)."""
    def name(path, level):
        folders = os.path.abspath(path).split(os.sep)[1:-1]
        stem, suffix = os.path.splitext(os.path.basename(path))
        if level == 0:
            return stem
        return "_".join(folders[max(0, len(folders) - level + 1):] + [stem + suffix.replace(".", "_")])

    levels = [0] * len(files)
    while True:  # ends: distinct files have distinct absolute paths, the last level
        names = [name(f, level) for f, level in zip(files, levels)]
        counts = collections.Counter(names)
        clashes = [i for i, n in enumerate(names) if counts[n] > 1]
        if not clashes:
            return names
        for i in clashes:
            levels[i] += 1


@torch.no_grad()
def run_on_images(model, paths, class_names, device, output_dir, min_score=0.3):
    """Detections on image files (a folder: its image files, by suffix): per image
    NAME_detections.png (drawn above min_score), NAME_gates_cls/reg.png (Fig. 4) and
    NAME.json (every detection: box xyxy in the image's pixels, score, class), NAME
    as output_names gives it. A file that cannot be read is named on stderr and the
    others still run. Returns the number of files that failed."""
    files = image_files(paths)
    model.eval()
    failed = 0
    for path, name in zip(files, output_names(files)):
        try:
            image = data.read_image(path, upright=True)
        except runs.RunError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        out = model([image.to(device)])[0]
        save_visualization(model, image, out, class_names, output_dir, name, min_score)
        found = [{"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label,
                  "class": class_names[label]}
                 for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist())]
        runs.atomic_write(os.path.join(output_dir, f"{name}.json"),
                          lambda f: json.dump({"image": path, "height": image.shape[1], "width": image.shape[2],
                                               "detections": found}, f, indent=1))
        print(f"{path}: {sum(d['score'] > min_score for d in found)} detections above {min_score} -> "
              f"{os.path.join(output_dir, name)}_detections.png")
    return failed


def load_model(path, num_classes=None, sizes=None):
    """The model of a checkpoint, its weights loaded; num_classes: the checkpoint's;
    sizes: {"min_size": ..., "max_size": ...} in place of the checkpoint's input size."""
    checkpoint = runs.read_checkpoint(path)
    classes = checkpoint.get("classes")
    if num_classes is None and classes is None:
        raise runs.RunError(f"{path} records no class names; evaluate it on its dataset (--data, --data-root)")
    run = {**checkpoint["args"], **{k: v for k, v in (sizes or {}).items() if v is not None}}
    model = build_model(run, num_classes or len(classes), pretrained_backbone=False)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise runs.RunError(f"{path} does not fit the model its arguments describe: "
                            f"{str(error).splitlines()[0]}") from error
    return model, checkpoint


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on COCO val (or the synthetic val split), "
                                                 "or run it on image files")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders to run the model on")
    parser.add_argument("--min-score", type=float, default=0.3, help="draw detections above it (default 0.3)")
    parser.add_argument("--data", choices=("coco", "synthetic"), help="default: the checkpoint's")
    parser.add_argument("--data-root", help="default: the checkpoint's")
    parser.add_argument("--output-dir", help="default: the checkpoint's folder (--images: its images/ folder)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="PNGs of the first N images (of rank 0's shard under torchrun)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default cuda where there is one)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes per rank (default 2)")
    parser.add_argument("--min-size", type=int, help="the input's shorter side (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, help="the cap on its longer side (default: the checkpoint's; Tab. 4 "
                        "counts EfficientDet's FLOPs at --min-size 600 --max-size 600)")
    args = parser.parse_args(argv)
    for key in ("min_size", "max_size"):
        if getattr(args, key) is not None and getattr(args, key) < 32:
            parser.error(f"--{key.replace('_', '-')} must be 32 or more, got {getattr(args, key)}")
    if not 0 <= args.min_score <= 1:
        parser.error(f"--min-score is a score between 0 and 1, got {args.min_score}")
    for key in ("visualize", "workers"):
        if getattr(args, key) < 0:
            parser.error(f"--{key} must be 0 or more, got {getattr(args, key)}")
    if args.images:
        given = [flag for flag, value in (("--data", args.data), ("--data-root", args.data_root),
                                          ("--visualize", args.visualize)) if value]
        if given:
            parser.error(f"{', '.join(given)}: --images runs the model on image files and draws each of them; "
                         f"these flags choose and draw a dataset's images: pass one or the other")
    try:
        runs.check_device(args.device)
        if args.output_dir:
            runs.check_output_dir(args.output_dir)
    except runs.RunError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    args = get_args(argv)
    output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    if args.images:
        files = image_files(args.images)  # refused before the model loads: a wrong path is found at once
        output_dir = args.output_dir or os.path.join(output_dir, "images")
        model, checkpoint = load_model(args.checkpoint, sizes=sizes(args))
        os.makedirs(output_dir, exist_ok=True)
        return 1 if run_on_images(model.to(args.device), files, checkpoint["classes"], args.device,
                                  output_dir, args.min_score) else 0
    processes = runs.setup_distributed(args.device)
    device = processes["device"]
    try:
        checkpoint = runs.read_checkpoint(args.checkpoint)
        run = checkpoint["args"]
        dataset = val_dataset(args.data or run["data"], args.data_root or run["data_root"])
        runs.check_classes(checkpoint, args.checkpoint, dataset, dataset.coco_file)
        dataset.check_evaluable()
        check_images(dataset, processes)
        model, _ = load_model(args.checkpoint, len(dataset.label_to_category), sizes(args))
        os.makedirs(output_dir, exist_ok=True)
        results = evaluate(model.to(device), dataset, device, args.workers, args.visualize, output_dir)
        if results is not None:
            path = os.path.join(output_dir, "eval_results.json")
            runs.atomic_write(path, lambda f: json.dump(results, f, indent=1))
            print(json.dumps(results, indent=1))
            print(f"-> {path}")
    finally:
        if processes["distributed"]:
            dist.destroy_process_group()
    return 0


def sizes(args):
    return {"min_size": args.min_size, "max_size": args.max_size}


def check_images(dataset, processes):
    """Every image of the split, by its header, before the evaluation starts (each
    rank its share; every rank raises the same error)."""
    found = dataset.check_images(processes["rank"], processes["world"])
    if processes["distributed"]:
        everyone = [None] * processes["world"]
        dist.all_gather_object(everyone, found)
        found = sum(everyone, [])
    dataset.raise_image_problems(found)


if __name__ == "__main__":
    sys.exit(runs.run_cli(main))
