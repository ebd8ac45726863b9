"""
The authors' seven released COCO models (Song et al.'s cvpods FCOS: FCOS D2, fixed
D4 and D8, dynamic D4 and D8; docs/DESIGN.md §8) as checkpoints of this project:
eval.py evaluates them, train.py --weights fine-tunes from them, bench.py times
the head on the gates they produce.

    python convert.py their_model.pth converted/model_final.pth --lam 0.1
    python eval.py --checkpoint converted/model_final.pth --data-root datasets/coco

Every tensor of their checkpoints maps one-to-one onto this project's FCOS built
with style="authors" (their conventions, fcos.py); the one tensor that changes is
conv1, into which their input convention is folded exactly. The architecture
(head, depth, backbone, classes, width) is read from the tensor names and shapes;
what no tensor records -- the budget weight lambda, the gate activation -- comes
from the flags (their released models: the proposed activation, tau 1.5; lambda
from a file name such as "...dynamic.d8.lambda-0_1..." where it is there).

Map:
    COCO_CLASSES     their 80 classes, in the order of their class scores
    read_authors     the file -> a plain state dict (their checkpoint dict, a bare
                     state dict, `module.` prefixes, numpy arrays)
    architecture     head, depth, backbone, classes, channels from the names
    fold_conv1       their BGR 0-255 input folded into conv1 for RGB [0, 1] input
    target_name      each of their tensor names -> this project's parameter
    convert          all of it, checked against the model, written atomically
"""
import argparse
import os
import re
import sys

import numpy as np
import torch

import runs
from fcos import IMAGENET_STD

# COCO's 80 categories in the order of their category ids: the order of the class
# scores of every COCO detector of detectron2's family, theirs included
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush"]

# Their input: BGR, 0-255, minus this mean, std 1 (DESIGN §8, convention 2): 255 x
# ImageNet's mean, reversed -- which is what makes the fold into conv1 exact
AUTHORS_MEAN_BGR = (103.53, 116.28, 123.675)
STEM = "backbone.bottom_up.stem.conv1.weight"
RESNET_BLOCKS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}  # res2..res5


def read_authors(path, unsafe=False):
    """Their file as a flat {name: tensor}: the dict torch.save wrote in training
    ({"model": ..., "optimizer": ..., ...}), or a bare state dict; `module.`
    prefixes (a model saved inside DDP) dropped; numpy arrays made tensors."""
    if not os.path.isfile(path):
        raise runs.RunError(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as error:
        if "Unsupported global" in str(error) or "weights_only" in str(error):
            raise runs.RunError(f"{path} holds objects other than tensors and plain values (torch.load refused "
                                f"them: {str(error).splitlines()[-1][:200]}); if you trust the file, pass "
                                f"--unsafe to load it with pickle") from error
        raise runs.RunError(f"{path} is truncated or not a PyTorch file ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200] if str(error) else 'no message'})") from error
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise runs.RunError(f"{path} holds a {type(loaded).__name__}, not a state dict or a checkpoint dict with "
                            f"'model'")
    flat = {}
    for name, value in state.items():
        name = str(name)
        while name.startswith("module."):
            name = name[len("module."):]
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise runs.RunError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor")
        flat[name] = value
    if STEM not in flat:
        held = ", ".join(sorted(flat)[:4])
        raise runs.RunError(f"{path} is not one of the authors' FCOS models: it has no tensor {STEM} (it holds "
                            f"{len(flat)} tensors, e.g. {held}); pass one of the seven files of their README")
    return flat


# -----------------------------------------------------------------------------
# The architecture, from the names

def architecture(state):
    """What the names and shapes say: a dict of train.py's model arguments
    (head, depth, backbone, channels) and the number of classes."""
    blocks = []
    for stage in range(2, 6):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"backbone\.bottom_up\.res{stage}\.(\d+)\.", k))}
        blocks.append(len(found))
    backbone = RESNET_BLOCKS.get(tuple(blocks))
    if backbone is None or "backbone.bottom_up.res2.0.conv3.weight" not in state:
        raise runs.RunError(f"a ResNet of {blocks} bottleneck blocks in res2..res5: not ResNet-50 (3, 4, 6, 3) or "
                            f"-101 (3, 4, 23, 3), the backbones of their models and of this converter")
    if "head.cls_score.weight" not in state:
        raise runs.RunError("no tensor head.cls_score.weight: not an FCOS head of theirs")
    num_classes, channels = state["head.cls_score.weight"].shape[:2]
    routers = {int(m.group(1)) for k in state if (m := re.match(r"head\.cls_subnet\.(\d+)\.depth_module\.", k))}
    if routers:
        head = "dynamic" if "head.cls_subnet.0.depth_module.gate.gate_conv.weight" in state else "fixed"
        depth = len(routers)
    elif "head.cls_subnet.0.weight" in state:
        head, depth = "fcos", 2  # FCOS's 4-conv tower: D2 in the paper's terms (FLOP-equivalent)
    else:
        raise runs.RunError("the head's towers are neither FCOS's 4 convs (head.cls_subnet.0.weight) nor routers "
                            "(head.cls_subnet.0.depth_module...): not an FCOS head of theirs")
    return dict(backbone=backbone, head=head, depth=depth, channels=int(channels)), int(num_classes)


def fold_conv1(weight):
    """Their conv1 reads BGR pixels in 0-255 minus AUTHORS_MEAN_BGR; ours reads RGB in
    [0, 1], minus ImageNet's mean, over its std. Since their mean is 255 x ImageNet's
    (reversed), their input at channel c is 255 * std_k * (ours at channel k = 2 - c):
    flip the input channels and scale each by 255 x std (DESIGN §8, convention 2)."""
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return (weight.double().flip(1) * (255 * std)[None, :, None, None]).to(weight.dtype)


# -----------------------------------------------------------------------------
# Names: theirs (detectron2's ResNet and FPN, cvpods' FCOS head) -> this project's

BACKBONE_RULES = [  # (their pattern, ours); detectron2's ResNet -> torchvision's
    (r"backbone\.bottom_up\.stem\.conv1\.weight", r"backbone.body.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.body.bn1.\1"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}"
                                                                         f".conv{m[3]}.weight"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)", lambda m: f"backbone.body.layer{int(m[1]) - 1}."
                                                                              f"{m[2]}.bn{m[3]}.{m[4]}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}"
                                                                         f".downsample.0.weight"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)", lambda m: f"backbone.body.layer{int(m[1]) - 1}."
                                                                              f"{m[2]}.downsample.1.{m[3]}"),
    # detectron2's FPN: one lateral 1x1 and one output 3x3 conv per level, C3 first
    (r"backbone\.fpn_lateral(\d)\.(\w+)", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 3}.0.{m[2]}"),
    (r"backbone\.fpn_output(\d)\.(\w+)", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 3}.0.{m[2]}"),
    (r"backbone\.top_block\.(p6|p7)\.(\w+)", r"backbone.fpn.extra_blocks.\1.\2"),
]
HEAD_RULES = [  # within head.{cls,bbox}_subnet.: FCOS's tower, or a router i
    (r"(\d+)\.(weight|bias)", r"tower.\1.\2"),  # FCOS D2: (conv, GN, ReLU) x 4, the same indices as ours
    (r"(\d+)\.output_weight", r"routers.\1.beta"),  # Eq. 2's weight of the router input
    (r"(\d+)\.scale_weight", r"routers.\1.alpha"),  # and of the scale paths' arrivals
    (r"(\d+)\.depth_module\.bottleneck\.conv(\d)\.weight", r"routers.\1.depth.conv\2.weight"),
    (r"(\d+)\.depth_module\.bottleneck\.conv(\d)\.norm\.(\w+)", r"routers.\1.depth.gn\2.\3"),
    (r"(\d+)\.depth_module\.gate\.gate_conv\.(\w+)", r"routers.\1.depth_gate.conv.\2"),
    # scale paths: index 0 is sent to the coarser level (our down path), 1 to the finer (up);
    # their conv + GN as dynamic_convs.{s}.convs (dynamic) or convs.{s} (fixed)
    (r"(\d+)\.(?:dynamic_convs\.(\d)\.convs|convs\.(\d))\.0\.(\w+)",
     lambda m: f"routers.{m[1]}.{'down' if (m[2] or m[3]) == '0' else 'up'}.conv.{m[4]}"),
    (r"(\d+)\.(?:dynamic_convs\.(\d)\.convs|convs\.(\d))\.1\.(\w+)",
     lambda m: f"routers.{m[1]}.{'down' if (m[2] or m[3]) == '0' else 'up'}.gn.{m[4]}"),
    # one 1-channel gate conv per scale path; ours is one conv of 2 channels (down, up)
    (r"(\d+)\.dynamic_convs\.(\d)\.gate\.gate_conv\.(\w+)", r"routers.\1.scale_gate.conv.\3[\2]"),
]
PREDICTOR_RULES = [
    (r"head\.cls_score\.(\w+)", r"predictors.cls.\1"),
    (r"head\.bbox_pred\.(\w+)", r"predictors.box.\1"),
    (r"head\.centerness\.(\w+)", r"predictors.ctr.\1"),
    (r"head\.scales\.(\d)\.scale", r"predictors.scales[\1]"),  # one (1,) tensor per level; ours one (5,) tensor
]


def target_name(name):
    """Our parameter for one of their tensors, as "name" or "name[i]" (the i-th
    row of our tensor); None for a name none of the rules knows."""
    tower = re.match(r"head\.(cls|bbox)_subnet\.(.*)", name)
    rules, rest, prefix = (HEAD_RULES, tower[2], {"cls": "cls_tower.", "bbox": "reg_tower."}[tower[1]]) if tower \
        else (BACKBONE_RULES + PREDICTOR_RULES, name, "")
    for pattern, ours in rules:
        m = re.fullmatch(pattern, rest)
        if m:
            return prefix + (ours(m) if callable(ours) else m.expand(ours))
    return None


def assign(state, model_state):
    """Each of their tensors into a copy of our model's state: a dict of our full
    names -> tensors. Raises a RunError naming the first tensor that no rule
    maps, that lands nowhere in our model, or whose shape does not fit; and one
    naming our parameters that none of their tensors filled."""
    out = {k: v.clone() for k, v in model_state.items()}
    filled = set()
    for name, value in sorted(state.items()):
        ours = target_name(name)
        if ours is None:
            raise runs.RunError(f"unexpected tensor {name} {tuple(value.shape)}: no parameter of this project's "
                                f"FCOS matches it; the file is not one of the authors' seven FCOS models")
        row = re.fullmatch(r"(.*)\[(\d+)\]", ours)
        key, index = (row[1], int(row[2])) if row else (ours, None)
        if key not in out:
            raise runs.RunError(f"tensor {name} maps to {key}, which the model the file's names describe does not "
                                f"have; the file mixes tensors of several models")
        if ours in filled:
            raise runs.RunError(f"tensor {name} fills {ours}, which another tensor of the file filled already; "
                                f"the file holds one model twice (with and without a prefix?)")
        target = out[key] if index is None else out[key][index]
        if name == STEM:
            value = fold_conv1(value)
        if tuple(value.shape) != tuple(target.shape) and not (index is not None and value.numel() == target.numel()):
            raise runs.RunError(f"tensor {name} has shape {tuple(value.shape)}, but {ours} has {tuple(target.shape)}: "
                                f"the file does not fit the architecture its names describe")
        target.copy_(value.reshape(target.shape))
        filled.add(ours)
    expected = set()
    for key, value in out.items():
        if not key.endswith("num_batches_tracked"):  # BatchNorm's counter: theirs is frozen, ours unused in eval
            expected |= {f"{key}[{i}]" for i in range(len(value))} if _per_row(key) else {key}
    missing = sorted(expected - filled)
    if missing:
        raise runs.RunError(f"missing tensor(s): nothing in the file fills {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); the file is incomplete")
    return out


def _per_row(key):
    """Our parameters that their file holds row by row: the per-level scales and
    the scale gates (one conv per path there)."""
    return key == "predictors.scales" or key.endswith("scale_gate.conv.weight") or key.endswith("scale_gate.conv.bias")


# -----------------------------------------------------------------------------
# The command

def lambda_from_name(path):
    """lambda in a name like their projects' "...dynamic.d8.lambda-0_1": 0.1; else None."""
    m = re.search(r"lambda[-_]?(\d+(?:[._]\d+)?)", os.path.basename(os.path.dirname(path)) + os.path.basename(path))
    return float(m[1].replace("_", ".")) if m else None


def convert(path, out, lam=None, activation="proposed", tau=1.5, unsafe=False, log=print):
    """Reads their file, writes our checkpoint at `out` (atomically; nothing is
    written if anything does not fit). Returns the checkpoint written."""
    import train  # train.py's parser makes the run arguments, as a run of it would record them
    state = read_authors(path, unsafe)
    arch, num_classes = architecture(state)
    if num_classes != len(COCO_CLASSES):
        raise runs.RunError(f"{num_classes} class scores; the authors' models are COCO's {len(COCO_CLASSES)}")
    if lam is None and arch["head"] == "dynamic":
        lam = lambda_from_name(path)
        if lam is None:
            log("warning: the budget weight lambda is not in the file's name; recorded as 0 (it matters only for "
                "fine-tuning: pass --lam)")
            lam = 0.0
    flags = ["--data", "coco", "--style", "authors", "--head", arch["head"], "--backbone", arch["backbone"],
             "--channels", str(arch["channels"]), "--output-dir", os.path.dirname(os.path.abspath(out)),
             "--device", "cpu"]
    if arch["head"] != "fcos":
        flags += ["--depth", str(arch["depth"])]
    if arch["head"] == "dynamic":
        flags += ["--lam", str(lam), "--activation", activation] + (["--tau", str(tau)] if activation == "proposed"
                                                                     else [])
    args = vars(train.get_args(flags))
    from fcos import build_model
    model = build_model(args, num_classes, pretrained_backbone=False)  # as eval.py builds it
    converted = assign(state, model.state_dict())
    model.load_state_dict(converted)  # strict: every parameter and buffer
    checkpoint = {"model": converted, "args": args, "iteration": 0, "classes": list(COCO_CLASSES),
                  "converted_from": os.path.basename(path)}
    if os.path.dirname(os.path.abspath(out)):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runs.atomic_write(out, lambda f: torch.save(checkpoint, f), "wb")
    log(f"{path}: FCOS {arch['head']} head" + (f", D{arch['depth']}" if arch["head"] != "fcos" else "") +
        (f", lambda {lam:g}" if arch["head"] == "dynamic" else "") + f", {arch['backbone']}, {len(state)} tensors "
        f"-> {out}")
    return checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="one of the authors' files (their checkpoint, or a bare state dict)")
    parser.add_argument("output", help="the checkpoint to write (e.g. converted/model_final.pth)")
    parser.add_argument("--lam", type=float, help="lambda the model was trained with (their models: 0.8, 0.1 or "
                        "0; default: from the file's name where it says, else 0); only fine-tuning uses it")
    parser.add_argument("--activation", choices=("proposed", "restricted_tanh", "softmax"), default="proposed",
                        help="the gate activation (their models: proposed, tau 1.5)")
    parser.add_argument("--tau", type=float, default=1.5)
    parser.add_argument("--unsafe", action="store_true", help="load a file that holds more than tensors with "
                        "pickle (only a file you trust)")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output):
        parser.error(f"{args.output} is a folder; pass the checkpoint's file name, e.g. "
                     f"{os.path.join(args.output, 'model_final.pth')}")
    convert(args.source, args.output, args.lam, args.activation, args.tau, args.unsafe)
    return 0


if __name__ == "__main__":
    sys.exit(runs.run_cli(main))
