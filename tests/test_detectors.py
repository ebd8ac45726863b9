"""The dynamic head beyond FCOS (Tab. 4): ATSS targets against a loop written from
its paper's rules, torchvision's RetinaNet with the dynamic towers (retinanet.py
with only dynhead.py beside it), both through the trainer and the evaluator, and
inference on image files."""
import errno
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import fcos
import runs
import train
from fcos import assign_targets_atss, locations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--backbone", "resnet18", "--channels", "64", "--depth", "1",
        "--min-size", "96", "--max-size", "128", "--ims-per-batch", "2", "--workers", "0",
        "--warmup", "2", "--steps", "100", "--amp", "off"]


def run_script(args, cwd=ROOT, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)


# -- ATSS --------------------------------------------------------------------------------

def atss_by_hand(points, levels, boxes, k=9):
    """ATSS, box by box and location by location, in Python floats: the 9 nearest
    points of each level (to the box centre) are candidates; positive where the
    square anchor (8 strides) has IoU >= mean + sample std of the candidates' IoUs
    and the point lies inside the box; the largest IoU wins."""
    points, levels = points.tolist(), levels.tolist()
    matched, best = [-1] * len(points), [-1.0] * len(points)

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    for m, box in enumerate(boxes.tolist()):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        candidates = []
        for level in range(len(fcos.STRIDES)):
            at = [i for i in range(len(points)) if levels[i] == level]
            at.sort(key=lambda i: (points[i][0] - cx) ** 2 + (points[i][1] - cy) ** 2)
            candidates += at[:k]
        ious = []
        for i in candidates:
            half = fcos.STRIDES[levels[i]] * 8 / 2
            x, y = points[i]
            ious.append(iou([x - half, y - half, x + half, y + half], box))
        threshold = statistics.mean(ious) + statistics.stdev(ious)
        for i, u in zip(candidates, ious):
            x, y = points[i]
            inside = box[0] < x < box[2] and box[1] < y < box[3]
            if u >= threshold and inside and u > best[i]:
                matched[i], best[i] = m, u
    return matched


@pytest.mark.parametrize("seed", range(4))
def test_atss_targets_match_the_rules_by_hand(seed):
    # boxes at random (off-grid) places and sizes, overlapping: no ties in distance
    g = torch.Generator().manual_seed(seed)
    points, levels = locations([(256 // s, 256 // s) for s in fcos.STRIDES], "cpu")
    xy = torch.rand(4, 2, generator=g) * 180
    wh = 12 + torch.rand(4, 2, generator=g) * 160
    boxes = torch.cat([xy, (xy + wh).clamp(max=255.5)], 1)
    matched, ltrb = assign_targets_atss(points, levels, boxes, torch.arange(4))
    assert matched.tolist() == atss_by_hand(points, levels, boxes)
    pos = matched >= 0
    assert pos.sum() >= 4  # every box has some positives here
    for i in pos.nonzero()[:, 0].tolist():
        x1, y1, x2, y2 = boxes[matched[i]].tolist()
        x, y = points[i].tolist()
        assert ltrb[i].tolist() == pytest.approx([x - x1, y - y1, x2 - x, y2 - y])


def test_atss_gives_a_location_to_the_box_of_largest_iou():
    # two boxes of the same centre, one nearly the size of a P3 anchor (64 px), one
    # twice as large: both pick P3's centre cells as candidates; each cell, positive
    # for both, goes to the box its anchor overlaps more
    points, levels = locations([(256 // s, 256 // s) for s in fcos.STRIDES], "cpu")
    boxes = torch.tensor([[97.3, 95.1, 158.9, 161.7], [65.2, 63.8, 190.6, 192.2]])
    matched, _ = assign_targets_atss(points, levels, boxes, torch.tensor([0, 1]))
    assert matched.tolist() == atss_by_hand(points, levels, boxes)
    both = (matched == 0).nonzero()[:, 0]
    assert len(both) > 0 and (levels[both] == 0).all()  # the small box keeps P3


def test_atss_without_boxes_is_background():
    points, levels = locations([(64 // s, 64 // s) for s in fcos.STRIDES[:4]] + [(1, 1)], "cpu")
    matched, _ = assign_targets_atss(points, levels, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (matched == -1).all()


def test_fcos_with_atss_trains():
    torch.manual_seed(0)
    model = fcos.FCOS(3, backbone="resnet18", head="dynamic", depth=1, pretrained_backbone=False, assigner="atss",
                      min_size=128, max_size=128, channels=32)
    img = torch.rand(3, 128, 128)
    target = {"boxes": torch.tensor([[10., 12, 60, 50], [40, 30, 120, 110]]), "labels": torch.tensor([1, 0])}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(12):
        losses = model([img], [target])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(h) for h in history) and history[-1] < 0.8 * history[0]


# -- RetinaNet with the dynamic head, with only dynhead.py beside it -----------------------

OVERFIT = textwrap.dedent("""
    import json, torch
    from torchvision.ops import box_iou
    import retinanet

    g = torch.Generator().manual_seed(0)
    img = 0.3 + 0.1 * torch.rand(3, 192, 192, generator=g)
    boxes = torch.tensor([[150., 20, 175, 45], [100, 100, 180, 180], [10, 50, 160, 180]])  # P3, P4, P5 anchors
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9]])
    for j in (2, 1, 0):
        x1, y1, x2, y2 = boxes[j].int().tolist()
        img[:, y1:y2, x1:x2] = colours[j][:, None, None]
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2])}
    result = {}
    for lam, steps in ((0.4, 120), (0.0, 60)):  # without the budget: to step 60, compared there
        torch.manual_seed(0)
        model = retinanet.RetinaNet(3, backbone="resnet18", head="dynamic", depth=2, lam=lam,
                                    pretrained_backbone=False, min_size=192, max_size=192, channels=64)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        first = None
        for step in range(steps):
            losses = model([img], [target])
            if step == 59:
                at_60 = model.head_mac_ratio.item()  # executed / full head MACs of this forward
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first or {k: v.item() for k, v in losses.items()}
        model.eval()
        with torch.no_grad():
            det = model([img])[0]
        iou = box_iou(boxes, det["boxes"])
        found = [bool(((iou[j] >= 0.7) & (det["labels"] == j) & (det["scores"] >= 0.3)).any()) for j in range(3)]
        result[str(lam)] = dict(found=found, ratio=at_60, first=first,
                                last={k: v.item() for k, v in losses.items()}, modules=sorted(__import__("sys").modules))
    print(json.dumps(result))
""")


def test_retinanet_with_dynhead_alone_overfits_one_image(tmp_path):
    # resnet18 from scratch, D2 towers, 120 Adam steps at 1e-3 on one 192x192 image with
    # a box for each of P3's, P4's and P5's anchors; in an empty folder but for dynhead.py
    for name in ("retinanet.py", "dynhead.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "overfit.py").write_text(OVERFIT)
    res = run_script(["overfit.py"], cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.splitlines()[-1])
    budget, free = result["0.4"], result["0.0"]
    assert budget["found"] == [True] * 3  # every box at IoU >= 0.7, its label, score >= 0.3
    assert {"classification", "bbox_regression", "loss_budget"} <= set(budget["last"])  # torchvision's + Eq. 6
    assert budget["last"]["loss_budget"] < budget["first"]["loss_budget"] and free["last"]["loss_budget"] == 0
    assert budget["ratio"] < 0.8 * free["ratio"]  # at step 60 the budget has switched gates off
    assert not {"sparse", "fcos", "data", "train"} & set(budget["modules"])  # nothing else of this project


# -- the trainer and the evaluator, every detector ------------------------------------------

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(str(root), num_train=8, num_val=4, seed=1, size=(96, 128))
    return str(root)


def test_bad_detector_combinations_are_refused(capsys):
    for flags, said in ((["--detector", "retinanet", "--assigner", "atss"], "--assigner atss is FCOS's"),
                        (["--head", "retinanet"], "--head retinanet is another detector's own towers"),
                        (["--detector", "freeanchor", "--head", "efficientdet"], "freeanchor's own are --head "
                                                                                 "retinanet"),
                        (["--detector", "efficientdet", "--backbone", "resnet50"], "its backbone is efficientnet_b1"),
                        (["--backbone", "efficientnet_b1"], "--backbone efficientnet_b1 is EfficientDet's"),
                        (["--detector", "freeanchor", "--style", "authors"], "--style authors is the conventions"),
                        (["--detector", "efficientdet", "--channels", "90"], "GroupNorms of 11 groups")):
        with pytest.raises(SystemExit):
            train.get_args(flags)
        assert said in capsys.readouterr().err


def test_eval_on_image_files(tiny_root, tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--data-root", tiny_root, "--output-dir", str(out), "--max-iter", "1"])
    photo = tmp_path / "photo.jpg"
    shutil.copy(os.path.join(tiny_root, "val", "000000.jpg"), photo)
    grey = tmp_path / "pictures" / "grey.png"
    grey.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((70, 90)) * 255).astype(np.uint8), mode="L").save(grey)
    broken = tmp_path / "pictures" / "notes.png"
    broken.write_text("not an image")
    images = tmp_path / "found"
    res = run_script(["eval.py", "--checkpoint", str(out / "model_final.pth"), "--images", str(photo),
                      str(grey.parent), "--output-dir", str(images), "--min-score", "0.0"], timeout=300)
    assert res.returncode == 1  # one file failed; the others ran
    assert f"could not read image {broken}" in res.stderr and "Traceback" not in res.stderr
    names = sorted(p.name for p in images.iterdir())
    assert names == ["grey.json", "grey_detections.png", "grey_gates_cls.png", "grey_gates_reg.png",
                     "photo.json", "photo_detections.png", "photo_gates_cls.png", "photo_gates_reg.png"]
    found = json.loads((images / "grey.json").read_text())
    assert (found["height"], found["width"]) == (70, 90)
    assert all(set(d) == {"box", "score", "label", "class"} and d["class"] in ("box", "disc", "triangle", "ring")
               for d in found["detections"])
    assert Image.open(images / "grey_detections.png").size == (90, 70)


@pytest.fixture(scope="module")
def tiny_model(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "run"
    train.main(TINY + ["--data-root", tiny_root, "--output-dir", str(out), "--max-iter", "1"])
    return str(out / "model_final.pth")


def test_images_of_the_same_name_get_outputs_of_their_own(tiny_root, tiny_model, tmp_path):
    # a/x.jpg and b/x.jpg once wrote the same x.json; x.png beside them too
    picture = Image.open(os.path.join(tiny_root, "val", "000000.jpg"))
    for folder, name in (("a", "x.jpg"), ("b", "x.jpg"), ("c", "x.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        picture.save(tmp_path / folder / name)
    files = [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b"), str(tmp_path / "c" / "x.png"),
             str(tmp_path / "a" / "x.jpg")]  # given twice: run once
    out = tmp_path / "out"
    assert evaluation.main(["--checkpoint", tiny_model, "--images", *files, "--output-dir", str(out)]) == 0
    written = {json.loads((out / f"{n}.json").read_text())["image"] for n in ("a_x_jpg", "b_x_jpg", "x_png")}
    assert written == {str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.jpg"), str(tmp_path / "c" / "x.png")}
    assert len(list(out.glob("*.json"))) == 3 and len(list(out.glob("*_detections.png"))) == 3
    assert evaluation.output_names(["p/photo.jpg", "q/photo.jpg", "r/other.jpg"]) == ["p_photo_jpg", "q_photo_jpg",
                                                                                       "other"]


@pytest.mark.parametrize("what,said", [("empty", "the folder holds no image files"),
                                       ("missing", "no such file or folder")])
def test_images_that_are_not_there_are_refused_at_once(tiny_model, tmp_path, what, said):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    path = tmp_path / what
    res = run_script(["eval.py", "--checkpoint", tiny_model, "--images", str(path), "--output-dir",
                      str(tmp_path / "out")], timeout=120)
    assert res.returncode == 2 and f"--images {path}: {said}" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["images", "visualize"])
def test_a_full_disk_while_drawing_is_said_and_leaves_no_empty_file(tiny_root, tiny_model, tmp_path, monkeypatch,
                                                                     entry):
    save = Image.Image.save

    def disk_fills(image, f, **kw):  # the first bytes reach the file, then the disk is full
        save(image, f, **kw)
        f.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_fills)
    out = tmp_path / "out"
    flags = ["--images", os.path.join(tiny_root, "val")] if entry == "images" else ["--visualize", "2", "--workers", "0"]
    with pytest.raises(runs.RunError, match=r"no space left on device while writing .*_detections.png; nothing was "
                                            r"written; free some space"):
        evaluation.main(["--checkpoint", tiny_model, *flags, "--output-dir", str(out)])
    left = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in left if p.suffix == ".png" or ".tmp" in p.name], left
