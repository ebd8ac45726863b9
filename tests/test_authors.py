"""The authors' released models (convert.py) and their conventions (fcos.py's
style="authors"), against references written here: their checkpoint layout built
from their tensor names and shapes (docs/DESIGN.md §8, random values), the conv1
fold in fp64, the MSRA bottleneck by hand, their rounding and post-processing
order on hand-made boxes."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import convert
import data
import dynhead
import eval as evaluation
import fcos
import runs
import train

C = 256  # their models' FPN and head width
STAGES = {2: (3, 64), 3: (4, 128), 4: (6, 256), 5: (3, 512)}  # ResNet-50: res{s}: (blocks, bottleneck width)


# -- their checkpoint layout, from DESIGN §8's names and shapes --------------------------

def authors_state(head, depth=0, seed=0):
    """A state dict as their FCOS saves it: detectron2's ResNet-50 and FPN names,
    cvpods' head, FrozenBN's four tensors; random values (gate biases below 0, so
    that most gates are off and the head runs quickly)."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def put(name, *shape, scale=0.05, positive=False):
        t = torch.randn(*shape, generator=g) * scale
        state[name] = t.abs() + 0.5 if positive else t

    def norm(prefix, n):  # FrozenBN or GroupNorm
        put(f"{prefix}.weight", n, scale=0.1), put(f"{prefix}.bias", n, scale=0.1)

    def frozen_bn(prefix, n):
        norm(prefix, n)
        put(f"{prefix}.running_mean", n, scale=0.1), put(f"{prefix}.running_var", n, positive=True)

    bb = "backbone.bottom_up"
    put(f"{bb}.stem.conv1.weight", 64, 3, 7, 7)
    frozen_bn(f"{bb}.stem.conv1.norm", 64)
    inplanes = 64
    for s, (blocks, w) in STAGES.items():
        for b in range(blocks):
            for k, shape in ((1, (w, inplanes if b == 0 else 4 * w, 1, 1)), (2, (w, w, 3, 3)), (3, (4 * w, w, 1, 1))):
                put(f"{bb}.res{s}.{b}.conv{k}.weight", *shape)
                frozen_bn(f"{bb}.res{s}.{b}.conv{k}.norm", shape[0])
            if b == 0:
                put(f"{bb}.res{s}.0.shortcut.weight", 4 * w, inplanes, 1, 1)
                frozen_bn(f"{bb}.res{s}.0.shortcut.norm", 4 * w)
        inplanes = 4 * w
    for level, c in ((3, 512), (4, 1024), (5, 2048)):
        put(f"backbone.fpn_lateral{level}.weight", C, c, 1, 1), put(f"backbone.fpn_lateral{level}.bias", C)
        put(f"backbone.fpn_output{level}.weight", C, C, 3, 3), put(f"backbone.fpn_output{level}.bias", C)
    put("backbone.top_block.p6.weight", C, 2048, 3, 3), put("backbone.top_block.p6.bias", C)
    put("backbone.top_block.p7.weight", C, C, 3, 3), put("backbone.top_block.p7.bias", C)
    for branch in ("cls", "bbox"):
        t = f"head.{branch}_subnet"
        if head == "fcos":
            for i in (0, 3, 6, 9):
                put(f"{t}.{i}.weight", C, C, 3, 3, scale=0.01), put(f"{t}.{i}.bias", C)
                norm(f"{t}.{i + 1}", C)
            continue
        for i in range(depth):
            put(f"{t}.{i}.output_weight", 1, positive=True)
            for k in (1, 2):
                put(f"{t}.{i}.depth_module.bottleneck.conv{k}.weight", C, C, 3, 3, scale=0.01)
                norm(f"{t}.{i}.depth_module.bottleneck.conv{k}.norm", C)
            paths = f"{t}.{i}.dynamic_convs.{{}}.convs" if head == "dynamic" else f"{t}.{i}.convs.{{}}"
            for s in (0, 1):
                put(f"{paths.format(s)}.0.weight", C, 1, 3, 3), put(f"{paths.format(s)}.0.bias", C)
                norm(f"{paths.format(s)}.1", C)
            if head == "dynamic":
                put(f"{t}.{i}.scale_weight", 1)
                gates = [f"{t}.{i}.depth_module.gate"] + [f"{t}.{i}.dynamic_convs.{s}.gate" for s in (0, 1)]
                for gate in gates:
                    put(f"{gate}.gate_conv.weight", 1, C, 3, 3, scale=0.01)
                    state[f"{gate}.gate_conv.bias"] = -torch.rand(1, generator=g) - 0.2  # mostly off
    put("head.cls_score.weight", 80, C, 3, 3, scale=0.01), put("head.cls_score.bias", 80)
    put("head.bbox_pred.weight", 4, C, 3, 3, scale=0.01), put("head.bbox_pred.bias", 4)
    put("head.centerness.weight", 1, C, 3, 3, scale=0.01), put("head.centerness.bias", 1)
    for level in range(5):
        put(f"head.scales.{level}.scale", 1, positive=True)
    return state


ARCHITECTURES = {"fcos": ("fcos", 0), "fixed D4": ("fixed", 4), "fixed D8": ("fixed", 8),
                 "dynamic D4": ("dynamic", 4), "dynamic D8": ("dynamic", 8)}


def our_name(theirs):
    """Where each of their tensors belongs in this project's FCOS, written out
    family by family (independently of convert.py's rules): (name, row or None)."""
    n = theirs
    for a, b in (("backbone.bottom_up.stem.conv1.norm.", "backbone.body.bn1."),
                 ("backbone.bottom_up.stem.conv1.", "backbone.body.conv1."), ("backbone.top_block.", "backbone.fpn.extra_blocks."),
                 ("head.cls_score.", "predictors.cls."), ("head.bbox_pred.", "predictors.box."),
                 ("head.centerness.", "predictors.ctr."), ("head.cls_subnet.", "cls_tower."),
                 ("head.bbox_subnet.", "reg_tower.")):
        n = n.replace(a, b)
    for s in range(2, 6):
        n = n.replace(f"backbone.bottom_up.res{s}.", f"backbone.body.layer{s - 1}.")
    n = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", n) if n.startswith("backbone.body") else n
    n = n.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
    n = re.sub(r"backbone\.fpn_lateral(\d)\.", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 3}.0.", n)
    n = re.sub(r"backbone\.fpn_output(\d)\.", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 3}.0.", n)
    if m := re.fullmatch(r"head\.scales\.(\d)\.scale", n):
        return "predictors.scales", int(m[1])
    if m := re.fullmatch(r"(\w+_tower)\.(\d+)\.(weight|bias)", n):  # FCOS's 4-conv tower
        return f"{m[1]}.tower.{m[2]}.{m[3]}", None
    m = re.fullmatch(r"(\w+_tower)\.(\d+)\.(.*)", n)
    if not m:
        return n, None
    tower, i, rest = m[1], m[2], m[3]
    router = f"{tower}.routers.{i}."
    simple = {"output_weight": "beta", "scale_weight": "alpha",
              "depth_module.bottleneck.conv1.weight": "depth.conv1.weight",
              "depth_module.bottleneck.conv2.weight": "depth.conv2.weight",
              "depth_module.bottleneck.conv1.norm.weight": "depth.gn1.weight",
              "depth_module.bottleneck.conv1.norm.bias": "depth.gn1.bias",
              "depth_module.bottleneck.conv2.norm.weight": "depth.gn2.weight",
              "depth_module.bottleneck.conv2.norm.bias": "depth.gn2.bias",
              "depth_module.gate.gate_conv.weight": "depth_gate.conv.weight",
              "depth_module.gate.gate_conv.bias": "depth_gate.conv.bias"}
    if rest in simple:
        return router + simple[rest], None
    m = re.fullmatch(r"dynamic_convs\.(\d)\.gate\.gate_conv\.(\w+)", rest)
    if m:
        return router + f"scale_gate.conv.{m[2]}", int(m[1])
    m = re.fullmatch(r"(?:dynamic_convs\.(\d)\.convs|convs\.(\d))\.(\d)\.(\w+)", rest)
    path = ["down", "up"][int(m[1] or m[2])]  # 0: sent to the coarser level
    return router + f"{path}.{['conv', 'gn'][int(m[3])]}.{m[4]}", None


def folded_by_hand(w):
    """conv1 for RGB in [0, 1] normalised by ImageNet's mean and std, from theirs
    for BGR 0-255 minus their mean: input channel k of ours is their channel 2 - k,
    times 255 x std_k."""
    out = torch.empty_like(w, dtype=torch.float64)
    for k in range(3):
        out[:, k] = w[:, 2 - k].double() * 255 * fcos.IMAGENET_STD[k]
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each architecture's file in their layout, and its conversion."""
    root = tmp_path_factory.mktemp("authors")
    out = {}
    for name, (head, depth) in ARCHITECTURES.items():
        state = authors_state(head, depth, seed=len(out))
        source = root / f"fcos.res50.1x.{name.replace(' ', '.').lower()}.lambda-0_1.pth"
        torch.save({"model": state, "optimizer": {}, "scheduler": {}, "iteration": 90000}, source)
        target = root / name.replace(" ", "_") / "model_final.pth"
        convert.convert(str(source), str(target), log=lambda *a: None)
        out[name] = (state, target)
    return out


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_tensor_lands_where_its_name_says(converted, name):
    state, target = converted[name]
    checkpoint = runs.read_checkpoint(str(target))  # what eval.py reads
    ours = checkpoint["model"]
    head, depth = ARCHITECTURES[name]
    run = checkpoint["args"]
    assert (run["head"], run["style"], run["backbone"]) == (head, "authors", "resnet50")
    assert head == "fcos" or run["depth"] == depth
    assert head != "dynamic" or run["lam"] == 0.1  # from the file's name
    assert checkpoint["classes"][0] == "person" and len(checkpoint["classes"]) == 80
    filled = set()
    for theirs, value in state.items():
        key, row = our_name(theirs)
        found = ours[key] if row is None else ours[key][row]
        expected = folded_by_hand(value) if theirs == convert.STEM else value.double()
        assert torch.allclose(found.double().reshape(expected.shape), expected, rtol=0, atol=1e-6
                              if theirs == convert.STEM else 0), theirs  # unchanged, but conv1 (fp32 of the fold)
        filled.add((key, row))
    # and nothing of ours is left unfilled (BatchNorm's counter aside): the load is strict
    rows = {(k, r) for k, v in ours.items() if not k.endswith("num_batches_tracked")
            for r in ([None] if k != "predictors.scales" and "scale_gate" not in k else range(len(v)))}
    assert rows == filled
    model, _ = evaluation.load_model(str(target))
    assert model.style == "authors" and model.head == head


def test_the_conv1_fold_is_exact():
    g = torch.Generator().manual_seed(0)
    theirs = torch.randn(64, 3, 7, 7, generator=g, dtype=torch.float64)
    rgb = torch.rand(1, 3, 20, 24, generator=g, dtype=torch.float64)  # [0, 1]
    bgr = rgb.flip(1) * 255 - torch.tensor(convert.AUTHORS_MEAN_BGR, dtype=torch.float64)[None, :, None, None]
    mean = torch.tensor(fcos.IMAGENET_MEAN, dtype=torch.float64)[None, :, None, None]
    std = torch.tensor(fcos.IMAGENET_STD, dtype=torch.float64)[None, :, None, None]
    a = F.conv2d(bgr, theirs, stride=2, padding=3)
    b = F.conv2d((rgb - mean) / std, convert.fold_conv1(theirs), stride=2, padding=3)
    assert (a - b).abs().max() < 1e-10 * a.abs().max()


def test_the_msra_bottleneck_against_one_by_hand():
    model = fcos.FCOS(80, backbone="resnet50", head="fcos", pretrained_backbone=False, style="authors").eval()
    block = model.backbone.body.layer2[0]  # res3's first block: it halves the size
    x = torch.randn(1, 256, 16, 20)

    def bn(y, m):
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_var, 0.5, 2), torch.nn.init.normal_(m.running_mean, std=0.1)
    # MSRA: the stride sits in the first 1x1 conv
    y = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2), block.bn1))
    y = F.relu(bn(F.conv2d(y, block.conv2.weight, padding=1), block.bn2))
    y = bn(F.conv2d(y, block.conv3.weight), block.bn3)
    shortcut = bn(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1])
    with torch.no_grad():
        assert torch.allclose(block(x.contiguous(memory_format=torch.channels_last)), F.relu(y + shortcut), atol=1e-5)
    torchvision_style = fcos.FCOS(80, backbone="resnet50", head="fcos", pretrained_backbone=False)
    assert torchvision_style.backbone.body.layer2[0].conv2.stride == (2, 2)


def test_locations_at_offset_zero():
    points, levels = fcos.locations([(2, 3), (1, 2)], "cpu", centred=False)
    by_hand = [(x * 8, y * 8) for y in range(2) for x in range(3)] + [(x * 16, 0) for x in range(2)]
    assert points.tolist() == [list(map(float, p)) for p in by_hand] and levels.tolist() == [0] * 6 + [1] * 2
    centred, _ = fcos.locations([(2, 3), (1, 2)], "cpu")
    assert torch.equal(centred - points, torch.tensor([[4.0, 4.0]] * 6 + [[8.0, 8.0]] * 2))


def test_the_scale_path_takes_its_statistics_over_every_pixel():
    torch.manual_seed(0)
    path = dynhead.ScalePath(16, 4, dense_norm=True)
    torch.nn.init.normal_(path.conv.bias)
    x, gate = torch.randn(2, 16, 9, 11), torch.rand(2, 1, 9, 11)
    gate[gate < 0.5] = 0
    by_hand = gate * F.group_norm(F.conv2d(x, path.conv.weight, path.conv.bias, padding=1, groups=16), 4,
                                  path.gn.weight, path.gn.bias)
    assert torch.allclose(path(x, gate, gate[:, 0] > 0), by_hand, atol=1e-6)
    ours = dynhead.ScalePath(16, 4)
    ours.load_state_dict(path.state_dict())
    assert not torch.allclose(ours(x, gate, gate[:, 0] > 0), by_hand, atol=1e-3)  # statistics of the kept pixels


def test_the_authors_size():
    assert fcos.authors_size(480, 640, 800, 1333) == (800, 1067)  # 1066.67 + 0.5
    assert fcos.authors_size(500, 1500, 800, 1333) == (444, 1333)  # 800 x 2400 capped: 444.33
    assert fcos.authors_size(640, 427, 800, 1333) == (1199, 800)  # 1199.06


def test_the_authors_post_processing_clips_after_nms(monkeypatch):
    # one level of 4 cells, 2 classes; the image 100 x 100 (not resized). Cell 0's box
    # crosses the left border, cell 1's lies inside: their IoU is 0.5 as predicted, 1
    # once clipped. Cell 2's box lies wholly outside the image; cell 3 scores too low.
    points = torch.tensor([[0.0, 50.0], [25.0, 50.0], [-60.0, 50.0], [50.0, 50.0]])
    ltrb = torch.tensor([[50.0, 10, 50, 10], [25, 10, 25, 10], [20, 10, 10, 10], [5, 5, 5, 5]])
    logit = lambda p: math.log(p / (1 - p))
    cls = torch.tensor([[logit(0.9), -9], [logit(0.8), -9], [logit(0.7), -9], [logit(0.01), -9]])
    ctr = torch.full((4,), 20.0)  # centerness ~1: the score is the probability's root
    levels = torch.zeros(4, dtype=torch.long)
    monkeypatch.setattr(fcos, "STRIDES", (8,))  # one level
    args = (cls[None], ltrb[None], ctr[None], points, levels, [(100, 100)], [(1.0, 1.0)], [(100, 100)])
    theirs = fcos.PostProcess(authors=True)(*args)[0]
    ours = fcos.PostProcess()(*args)[0]
    # theirs: both kept (NMS on the boxes as predicted), then clipped; the outside box dropped
    assert theirs["boxes"].tolist() == [[0.0, 40, 50, 60], [0, 40, 50, 60]]
    assert torch.allclose(theirs["scores"], torch.tensor([0.9, 0.8]).sqrt(), atol=1e-6)
    # ours: clipped first, so the two are one box, and NMS keeps the better; the outside
    # box is clipped to zero width and kept by NMS, as torchvision's FCOS does
    assert ours["boxes"][:1].tolist() == [[0.0, 40, 50, 60]] and len(ours["boxes"]) == 2
    assert ours["boxes"][1, 2] == ours["boxes"][1, 0] == 0


def test_the_authors_candidates_are_the_top_by_probability_then_the_threshold(monkeypatch):
    post = fcos.PostProcess(top_per_level=3, authors=True)
    cls = torch.tensor([[2.0, 1.0], [-9.0, 0.5], [-9.0, -9.0]])  # 3 cells x 2 classes
    points, levels = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    monkeypatch.setattr(fcos, "STRIDES", (8,))
    boxes, scores, labels = post.by_probability(cls, torch.ones(3, 4), torch.zeros(3), points, levels)
    # the top 3 of 6 pairs by probability: (0, 0), (0, 1), (1, 1); all above 0.05
    probs = torch.sigmoid(torch.tensor([2.0, 1.0, 0.5]))
    assert labels.tolist() == [0, 1, 1] and torch.allclose(scores, (probs * 0.5).sqrt())


def test_bad_files_are_refused_and_nothing_is_written(tmp_path):
    good = authors_state("fcos")
    cases = {}
    path = tmp_path / "truncated.pth"
    torch.save({"model": good}, path)
    path.write_bytes(path.read_bytes()[:5000])
    cases["truncated"] = (path, "truncated")
    other = tmp_path / "other.pth"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), other)
    cases["another model"] = (other, "not one of the authors' FCOS models")
    wrong = dict(good, **{"backbone.fpn_output4.weight": torch.zeros(C, C, 1, 1)})
    torch.save({"model": wrong}, tmp_path / "wrong.pth")
    cases["wrong shape"] = (tmp_path / "wrong.pth", "backbone.fpn_output4.weight has shape (256, 256, 1, 1)")
    missing = {k: v for k, v in good.items() if k != "head.centerness.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    cases["missing"] = (tmp_path / "missing.pth", "predictors.ctr.bias")
    extra = dict(good, **{"head.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    cases["unexpected"] = (tmp_path / "extra.pth", "unexpected tensor head.extra.weight")
    for name, (source, said) in cases.items():
        out = tmp_path / name.replace(" ", "_") / "model_final.pth"
        with pytest.raises(runs.RunError, match=re.escape(said)):
            convert.convert(str(source), str(out), log=lambda *a: None)
        assert not out.exists(), name


def test_a_bare_state_dict_with_module_prefixes_converts(tmp_path):
    state = authors_state("fixed", 2)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pth")
    checkpoint = convert.convert(str(tmp_path / "bare.pth"), str(tmp_path / "out.pth"), log=lambda *a: None)
    assert checkpoint["args"]["head"] == "fixed" and checkpoint["args"]["depth"] == 2
    assert torch.equal(checkpoint["model"]["reg_tower.routers.1.down.gn.bias"],
                       state["head.bbox_subnet.1.convs.0.1.bias"])


def coco_like_split(root, size=(48, 64)):
    """A val split in COCO's layout with COCO's 80 categories: two images, a box each."""
    os.makedirs(root / "val2017"), os.makedirs(root / "annotations")
    images, annotations = [], []
    for i in range(2):
        Image.new("RGB", size[::-1], (40 * i, 120, 200)).save(root / "val2017" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": size[0], "width": size[1]})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 20, 20], "area": 400,
                            "iscrowd": 0})
    ids = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80 ids
    categories = [{"id": c, "name": n} for c, n in zip(ids, convert.COCO_CLASSES)]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.mark.parametrize("name", ["fcos", "dynamic D8"])
def test_eval_evaluates_a_converted_file(converted, tmp_path, name):
    coco_like_split(tmp_path / "coco")
    out = tmp_path / "eval"
    assert evaluation.main(["--checkpoint", str(converted[name][1]), "--data", "coco", "--data-root",
                            str(tmp_path / "coco"), "--workers", "0", "--output-dir", str(out)]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert 0 <= results["AP"] <= 1 and results["head_gflops_avg"] > 0


class FakeRun:
    """What train.build needs of a run: the training set's classes, a device."""
    def __init__(self, classes):
        self.train_set = type("Split", (), {"class_names": classes, "label_to_category": list(range(len(classes)))})
        self.device, self.log = torch.device("cpu"), lambda *a: None


def test_train_starts_from_a_converted_file(converted):
    state, target = converted["dynamic D4"]
    args = train.get_args(["--style", "authors", "--depth", "4", "--lam", "0.2", "--weights", str(target),
                           "--device", "cpu"])
    model, optimizer, _, _ = train.build(args, FakeRun(convert.COCO_CLASSES))
    saved = runs.read_checkpoint(str(target))["model"]
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in saved.items() if not k.endswith("num_batches_tracked"))
    # started as from ImageNet weights: BatchNorm frozen, stem and first stage frozen (§3.1)
    assert isinstance(model.backbone.body.bn1, fcos.FrozenBatchNorm2d)
    assert not model.backbone.body.conv1.weight.requires_grad and model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert model.criterion.lam == 0.2  # fine-tuning may change lambda
    with pytest.raises(runs.RunError, match="--depth 4 \\(this run: 8\\)"):
        train.build(train.get_args(["--style", "authors", "--weights", str(target), "--device", "cpu"]),
                    FakeRun(convert.COCO_CLASSES))


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data.make_synthetic(str(root / "data"), num_train=4, num_val=3, seed=3, size=(64, 96))
    flags = ["--data", "synthetic", "--data-root", str(root / "data"), "--backbone", "resnet18", "--channels", "64",
             "--min-size", "64", "--max-size", "96", "--ims-per-batch", "2", "--workers", "0", "--warmup", "1",
             "--steps", "100", "--depth", "2", "--amp", "off", "--max-iter", "2", "--output-dir", str(root / "run")]
    assert train.main(flags) == 0
    return root, flags


def test_fine_tuning_from_a_checkpoint_of_train(demo_checkpoint):
    root, flags = demo_checkpoint
    final = str(root / "run" / "model_final.pth")
    tuned = flags[:-1] + [str(root / "tuned"), "--weights", final, "--max-iter", "1"]
    args = train.get_args(tuned)
    run = FakeRun(data.CocoDetection(*data.coco_paths(str(root / "data"), "train"), train=True).class_names)
    model, *_ = train.build(args, run)
    saved = torch.load(final, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert train.main(tuned) == 0
    assert torch.load(root / "tuned" / "model_final.pth", weights_only=True)["iteration"] == 1  # a fresh schedule


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_bench_times_the_head_on_a_checkpoints_own_gates(demo_checkpoint, capsys, detector):
    root, flags = demo_checkpoint
    final = str(root / "run" / "model_final.pth")
    if detector != "fcos":  # a torchvision detector: its own input transform
        assert train.main(flags[:-1] + [str(root / detector), "--detector", detector, "--max-iter", "1"]) == 0
        final = str(root / detector / "model_final.pth")
    capsys.readouterr()
    assert bench.main(["--part", "head", "--checkpoint", final, "--repeats", "1", "--num-images", "2",
                       "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    model, checkpoint = evaluation.load_model(final)
    model.eval()
    split = evaluation.val_dataset("synthetic", checkpoint["args"]["data_root"])
    for i in range(2):
        with torch.no_grad():
            model([split[i][0]])
        towers = model.towers.values()
        executed = sum(t.cost.executed.sum() for t in towers) / sum(t.cost.full.sum() for t in towers)
        name = split.coco.imgs[split.ids[i]]["file_name"]
        line = next(line for line in shown.splitlines() if line.strip().startswith(name))
        assert f"{executed.item():.1%}" in line and line.rstrip().endswith("x")
    assert re.search(r"^\s+all .* \d+\.\d\dx$", shown, re.M)
    if detector != "fcos":
        return
    with pytest.raises(runs.RunError, match="has no gates"):
        fixed = root / "fixed"
        assert train.main(demo_checkpoint[1][:-1] + [str(fixed), "--head", "fixed", "--max-iter", "1"]) == 0
        bench.main(["--part", "head", "--checkpoint", str(fixed / "model_final.pth")])


def test_eval_at_another_input_size(demo_checkpoint, tmp_path):
    # eval.py --min-size / --max-size: the checkpoint's model at another input size (Tab. 4
    # counts EfficientDet's FLOPs at 600x600); the FLOPs follow the size
    root, _ = demo_checkpoint
    final = str(root / "run" / "model_final.pth")
    totals = []
    for extra in ([], ["--min-size", "32", "--max-size", "48"]):
        out = tmp_path / ("small" if extra else "default")
        assert evaluation.main(["--checkpoint", final, "--workers", "0", "--output-dir", str(out)] + extra) == 0
        totals.append(json.loads((out / "eval_results.json").read_text())["total_gflops_avg"])
    model, _ = evaluation.load_model(final, sizes={"min_size": 32, "max_size": 48})
    assert (model.min_size, model.max_size) == (32, 48)
    assert totals[1] < 0.5 * totals[0]  # 32x48 (padded 32x64) against 64x96
