"""data.py, train.py and eval.py end to end on a tiny synthetic set: torchrun with
two CPU processes, checkpoints and exact resume, pycocotools fed correctly, and
the faults a long run meets."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from pycocotools.cocoeval import COCOeval

import data
import runs
import eval as evaluation
import fcos
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--backbone", "resnet18", "--channels", "64", "--depth", "1",
        "--min-size", "96", "--max-size", "128", "--ims-per-batch", "2", "--workers", "0",
        "--warmup", "2", "--steps", "100"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(str(root), num_train=8, num_val=4, seed=1, size=(96, 128))
    return str(root)


# -- the synthetic generator ----------------------------------------------------------

def test_synthetic_is_deterministic_and_boxes_lie_inside(tmp_path):
    for name in ("a", "b"):
        data.make_synthetic(str(tmp_path / name), num_train=3, num_val=2, seed=7, size=(64, 80))
    for split in ("train", "val"):
        a = json.loads((tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text())
        assert a == json.loads((tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text())
        for img in a["images"]:
            assert (tmp_path / "a" / split / img["file_name"]).read_bytes() == \
                   (tmp_path / "b" / split / img["file_name"]).read_bytes()
        for ann in a["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 80 and y + h <= 64
    assert len({ann["category_id"] for ann in a["annotations"]}) >= 2


def test_synthetic_writer_never_exposes_a_half_written_file(tmp_path, monkeypatch):
    # a second run may write the same set while this one reads it: each file
    # appears whole, under its name, or not at all (here: a writer killed mid-file)
    data.make_synthetic(str(tmp_path), num_train=2, num_val=1, seed=7, size=(64, 80))
    before = (tmp_path / "train" / "000000.jpg").read_bytes()
    save = data.Image.Image.save

    def dies_halfway(image, f, **kw):
        save(image, f, **kw)
        f.truncate(len(before) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(data.Image.Image, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        data.make_synthetic(str(tmp_path), num_train=2, num_val=1, seed=7, size=(64, 80))
    assert (tmp_path / "train" / "000000.jpg").read_bytes() == before


def test_dataset_reads_boxes_and_flips(tiny_root):
    ds = data.CocoDetection(*data.coco_paths(tiny_root, "train"), train=True)
    image, target = ds[0]
    flipped, ftarget = ds[(0, True)]
    assert image.shape == (3, 96, 128) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(flipped, image.flip(-1))
    x1, y1, x2, y2 = target["boxes"].unbind(1)
    assert torch.equal(ftarget["boxes"], torch.stack([128 - x2, y1, 128 - x1, y2], 1))


def test_ranks_see_disjoint_images(tiny_root):
    ds = data.CocoDetection(*data.coco_paths(tiny_root, "train"), train=True)
    seen = []
    for rank in range(2):
        batches = iter(data.TrainBatches(ds, 1, seed=3, rank=rank, world_size=2))
        seen.append([next(batches)[0][0] for _ in range(len(ds) // 2)])  # one epoch's shard
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(ds)))


# -- the evaluator is fed correctly -----------------------------------------------------

class Oracle(torch.nn.Module):
    """Returns the ground truth of each image (in the model's output convention),
    shifted by `shift` pixels. Its "backbone", a 1x1 conv 3 -> 8 on the padded input
    of 40 x 50, costs 3 * 8 * 2000 = 48000 MACs."""

    def __init__(self, dataset, shift=0.0):
        super().__init__()
        self.dataset, self.shift, self.seen = dataset, shift, 0
        self.backbone = torch.nn.Conv2d(3, 8, 1, bias=False)
        self.register_buffer("mean", torch.zeros(3, 1, 1))

    def forward(self, images):
        _, target = self.dataset[self.seen]
        self.seen += 1
        n = len(target["labels"])
        return [{"boxes": target["boxes"] + self.shift, "scores": torch.linspace(1, 0.5, n),
                 "labels": target["labels"], "head_macs": 2e9, "head_macs_full": 4e9, "input_size": (40, 50)}]


def test_ground_truth_detections_give_ap_1(tiny_root):
    ds = evaluation.val_dataset("synthetic", tiny_root)
    results = evaluation.evaluate(Oracle(ds), ds, "cpu", workers=0)
    assert results["AP"] == pytest.approx(1.0) and results["AP50"] == pytest.approx(1.0)
    assert results["head_gflops_avg"] == pytest.approx(2.0)
    assert results["total_gflops_avg"] == pytest.approx(2.0 + 48000 / 1e9, rel=1e-12)  # head + backbone


def test_shifted_detections_match_pycocotools(tiny_root, tmp_path):
    ds = evaluation.val_dataset("synthetic", tiny_root)
    results = evaluation.evaluate(Oracle(ds, shift=3.0), ds, "cpu", workers=0, output_dir=str(tmp_path))
    # the same detections written by hand in COCO's own format, then pycocotools alone
    coco = ds.coco
    dets = []
    for image_id in sorted(coco.getImgIds()):
        anns = coco.imgToAnns[image_id]
        for ann, score in zip(anns, torch.linspace(1, 0.5, len(anns)).tolist()):
            x, y, w, h = ann["bbox"]
            dets.append({"image_id": image_id, "category_id": ann["category_id"], "bbox": [x + 3, y + 3, w, h],
                         "score": score})
    reference = COCOeval(coco, coco.loadRes(dets), "bbox")
    reference.evaluate(), reference.accumulate(), reference.summarize()
    assert 0 < results["AP"] < 1
    assert [results[n] for n in evaluation.STAT_NAMES] == pytest.approx(list(reference.stats), abs=1e-9)
    with open(tmp_path / "detections.json") as f:
        written = json.load(f)
    assert len(written) == len(dets)  # as given: pycocotools' additions (area, segmentation, ...) not written
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in written)


def test_gate_grid_draws_each_level_and_greys_missing_ones():
    # a head of scale paths only (Tab. 3): rows down, up; P5 has no coarser
    # neighbour here, P3 no finer one; constant gates read back tile by tile
    const = lambda v, s: torch.full((2, 1, s, s), v)
    gates = [{"down": [const(0.0, 8), const(1.0, 4), None], "up": [None, const(0.25, 4), const(1.0, 2)]}]
    grid = evaluation.gate_grid(gates)
    # tiles of 96 px (the largest map, 8 px, zoomed 12x to be seen), 2 px apart
    assert grid.shape == (1, 2 + 2 * 98, 2 + 3 * 98)
    centre = lambda row, col: grid[0, 2 + 98 * row + 48, 2 + 98 * col + 48].item()
    assert [[centre(r, c) for c in range(3)] for r in range(2)] == [[0, 255, 127], [127, 63, 255]]


# -- training, checkpoints, resume ------------------------------------------------------

def weights(output_dir, name):
    return torch.load(os.path.join(output_dir, name), map_location="cpu", weights_only=True)["model"]


def test_resume_is_exact(tiny_root, tmp_path):
    common = TINY + ["--data-root", tiny_root, "--checkpoint-period", "100"]
    train.main(common + ["--max-iter", "4", "--output-dir", str(tmp_path / "straight")])
    train.main(common + ["--max-iter", "2", "--output-dir", str(tmp_path / "split")])
    halfway = weights(tmp_path / "split", "model_final.pth")
    train.main(common + ["--max-iter", "4", "--output-dir", str(tmp_path / "split"), "--resume"])
    a, b = weights(tmp_path / "straight", "model_final.pth"), weights(tmp_path / "split", "model_final.pth")
    assert a.keys() == b.keys()
    assert not torch.equal(halfway["predictors.cls.weight"], b["predictors.cls.weight"])  # it did train on
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k
    results = json.loads((tmp_path / "split" / "eval_results.json").read_text())
    assert set(evaluation.STAT_NAMES) | {"head_gflops_avg", "head_gflops_min", "head_gflops_max",
                                         "total_gflops_avg"} <= set(results)


def test_resume_refuses_another_configuration(tiny_root, tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--output-dir", out])
    with pytest.raises(runs.RunError, match=r"depth: checkpoint 1, now 2"):
        train.main(TINY + ["--data-root", tiny_root, "--max-iter", "2", "--output-dir", out, "--resume",
                           "--depth", "2"])


def test_resume_says_what_it_cannot_continue_exactly(tiny_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--output-dir", out])
    capsys.readouterr()
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "2", "--output-dir", out, "--resume",
                       "--ims-per-batch", "1", "--lr", "0.5"])
    said = capsys.readouterr().out
    assert "ims_per_batch 2 -> 1 since the checkpoint: the images come in another order" in said
    assert "lr 0.5 is not used: the checkpoint's schedule continues from its base lr 0.00025" in said
    assert "max_iter 1 -> 2 since the checkpoint: these apply from here on" in said
    assert "of steps [100] and warmup 2, [100, 2] lie at or beyond max_iter 2" in said


def test_ims_per_batch_scales_the_recipe_by_the_linear_rule():
    paper = train.get_args([])
    assert (paper.ims_per_batch, paper.lr, paper.max_iter, paper.steps, paper.warmup) == \
        (16, 0.01, 90000, [60000, 80000], 1000)  # §3.1, docs/DESIGN.md §6
    half = train.get_args(["--ims-per-batch", "8"])
    assert (half.lr, half.max_iter, half.steps, half.warmup) == (0.005, 180000, [120000, 160000], 2000)
    given = train.get_args(["--ims-per-batch", "8", "--lr", "0.02", "--steps", "5"])
    assert (given.lr, given.max_iter, given.steps) == (0.02, 180000, [5])


@pytest.mark.parametrize("flag,value,said", [("--checkpoint-period", "0", "at least 1"),
                                             ("--ims-per-batch", "-2", "at least 1"),
                                             ("--workers", "-1", "0 or more")])
def test_bad_numbers_are_refused(flag, value, said, capsys):
    with pytest.raises(SystemExit):
        train.get_args([flag, value])
    assert f"{flag} must be {said}, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("channels,min_size", [("32", "96"), ("48", "256")])
def test_a_width_groupnorm_cannot_normalise_is_refused(tiny_root, tmp_path, channels, min_size, capsys):
    # 32 channels at --min-size 96: P7 is 1x1, one value per group of GroupNorm(32);
    # 48 channels do not divide into 32 groups
    with pytest.raises(SystemExit):
        train.get_args(TINY + ["--data-root", tiny_root, "--channels", channels, "--min-size", min_size,
                               "--max-size", "256", "--output-dir", str(tmp_path / "out")])
    said = capsys.readouterr().err
    assert re.search(rf"--channels {channels} with --min-size {min_size}: .* use --channels 64", said), said
    assert not (tmp_path / "out").exists()  # refused at parse time


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tiny_root, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--output-dir", out])
    before = (tmp_path / "run" / "model_final.pth").read_bytes()
    losses = fcos.Criterion.forward
    monkeypatch.setattr(fcos.Criterion, "forward", lambda self, *a: {**losses(self, *a), "loss_cls": torch.tensor(float("nan"))})
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 1"):
        train.main(TINY + ["--data-root", tiny_root, "--max-iter", "3", "--output-dir", out, "--resume"])
    assert (tmp_path / "run" / "model_final.pth").read_bytes() == before


def test_a_failed_run_with_loader_workers_exits(tiny_root, tmp_path):
    # the workers ignore SIGTERM (for a signal to the whole group); after an error
    # the process must still end them and exit, not wait for them forever
    script = (f"import sys, torch, fcos, train; losses = fcos.Criterion.forward; "
              f"fcos.Criterion.forward = lambda self, *a: {{**losses(self, *a), 'loss_cls': torch.tensor(float('nan'))}}; "
              f"sys.exit(train.main({TINY + ['--data-root', tiny_root, '--output-dir', str(tmp_path), '--workers', '1']!r}))")
    failed = run_module(["-c", script], timeout=120)
    assert failed.returncode == 1 and "non-finite loss at iteration 0" in failed.stderr


def test_missing_dataset_prints_layout(tmp_path, tiny_root):
    with pytest.raises(runs.RunError, match=r"expected layout(.|\n)*train2017/\*\.jpg(.|\n)*COCO 2017"):
        train.main(["--data", "coco", "--data-root", str(tmp_path / "nowhere"), "--pretrained-backbone", "false"])
    import shutil
    root = tmp_path / "partial"
    shutil.copytree(tiny_root, root)
    os.remove(root / "annotations" / "instances_train.json")
    with pytest.raises(runs.RunError, match=r"instances_train.json not found(.|\n)*val/\*\.jpg(.|\n)*synthetic"):
        train.main(TINY + ["--data-root", str(root), "--output-dir", str(tmp_path / "out")])


def test_unreadable_image_is_named(tiny_root, tmp_path):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(tiny_root, root)
    (root / "train" / "000000.jpg").write_bytes(b"not a jpeg")
    ds = data.CocoDetection(*data.coco_paths(str(root), "train"), train=True)
    with pytest.raises(runs.RunError, match="could not read image .*000000.jpg"):
        ds[0]


def run_module(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def test_torchrun_two_processes_train_resume_and_evaluate(tiny_root, tmp_path):
    out = str(tmp_path / "ddp")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train.py"]
    first = run_module(torchrun + TINY + ["--data-root", tiny_root, "--max-iter", "3", "--checkpoint-period", "2",
                                          "--output-dir", out], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es)" in first.stdout and os.path.exists(os.path.join(out, "model_0000002.pth"))
    second = run_module(torchrun + TINY + ["--data-root", tiny_root, "--max-iter", "5", "--output-dir", out,
                                           "--resume"], timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "at iteration 3" in second.stdout
    assert weights(out, "model_final.pth").keys()
    evaluated = run_module(["eval.py", "--checkpoint", os.path.join(out, "model_final.pth"), "--workers", "0",
                            "--visualize", "1"], timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # 5 iterations leave every class probability near its prior 0.01, below the 0.05
    # that makes a candidate: eval.py still reports every column (pycocotools itself
    # is checked against known detections above)
    assert "FLOPs (1e9 MACs per image, 4 images)" in evaluated.stdout
    results = json.loads(open(os.path.join(out, "eval_results.json")).read())  # eval.py writes it beside the checkpoint
    assert set(evaluation.STAT_NAMES) | {"head_gflops_avg", "total_gflops_avg"} <= set(results)
    pngs = os.listdir(os.path.join(out, "visualize"))
    assert any(p.endswith("_detections.png") for p in pngs) and any("_gates_" in p for p in pngs)


@pytest.mark.parametrize("workers,group", [(0, False), (1, True)])
def test_sigterm_saves_a_checkpoint_and_exits(tiny_root, tmp_path, workers, group):
    # group: SIGTERM to the whole process group, loader workers included, as
    # torchrun and cluster schedulers send it
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--data-root", tiny_root, "--max-iter", "100000",
                             "--output-dir", str(out), "--workers", str(workers)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # wait until it trains
        if line.startswith("training"):
            break
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143  # 128 + SIGTERM: a stopped run is not a finished one
    assert "stopped by signal" in rest
    saved = (out / "last_checkpoint").read_text()
    iteration = torch.load(out / saved, weights_only=True)["iteration"]
    assert iteration > 0 and saved == f"model_{iteration:07d}.pth"


def test_amp_on_the_cpu_trains(tiny_root, tmp_path):
    out = tmp_path / "amp"
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "2", "--output-dir", str(out), "--amp"])
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["iteration"] == 2 and all(torch.isfinite(torch.tensor(v)) for k, v in record.items()
                                            if k.startswith("loss"))
    assert 0 < record["mem_mb"] <= record["peak_mem_mb"]  # resident memory now, beside its peak


def test_compile_trains_as_eager(tiny_root, tmp_path):
    # --compile BACKEND: aot_eager traces forward and backward as inductor would, without
    # its code generation (minutes on 2 cores); one step lands on eager's weights
    common = TINY + ["--data-root", tiny_root, "--max-iter", "1"]
    train.main(common + ["--output-dir", str(tmp_path / "eager")])
    assert train.main(common + ["--output-dir", str(tmp_path / "compiled"), "--compile", "aot_eager"]) == 0
    a, b = weights(tmp_path / "eager", "model_final.pth"), weights(tmp_path / "compiled", "model_final.pth")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k
    assert runs.read_checkpoint(str(tmp_path / "compiled" / "model_final.pth"))["args"]["compile"] == "aot_eager"
