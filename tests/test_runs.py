"""No run lost, no raw traceback: protected output folders, checked checkpoints,
datasets checked when they load, clean failures of writes, and signals during
evaluation -- each fault made by hand and the outcome checked."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
import eval as evaluation
import runs
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--backbone", "resnet18", "--channels", "64", "--depth", "1",
        "--min-size", "96", "--max-size", "128", "--ims-per-batch", "2", "--workers", "0",
        "--warmup", "2", "--steps", "100", "--amp", "off"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(str(root), num_train=8, num_val=4, seed=1, size=(96, 128))
    return str(root)


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory):
    """A run of 2 iterations with a checkpoint at each: model_0000001.pth, model_final.pth."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "2", "--checkpoint-period", "1",
                       "--output-dir", str(out)])
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def run_script(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- output folders -----------------------------------------------------------------

def test_a_fresh_start_into_a_run_is_refused_and_overwrite_starts_anew(finished, tiny_root, tmp_path):
    out = copy_run(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(runs.RunError, match=r"holds a run \(.*model_0000001.pth.*\): pass --resume to continue it, "
                                            r"--overwrite to delete it and start anew, or another --output-dir"):
        train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--seed", "5", "--output-dir", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte for byte
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--seed", "5", "--output-dir", str(out),
                       "--overwrite"])
    assert not (out / "model_0000001.pth").exists()  # the old run's checkpoints are gone
    assert runs.read_checkpoint(str(out / "model_final.pth"))["args"]["seed"] == 5
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # a new log, not appended to the old


def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    host = os.uname().nodename
    (out / "lock").write_text(f"{os.getpid()} {host}")  # a live process holds it
    with pytest.raises(runs.RunError, match=rf"in use by another run \(process {os.getpid()} on {host}"):
        train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--output-dir", str(out)])
    stale = dead_pid()
    (out / "lock").write_text(f"{stale} {host}")
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--output-dir", str(out)])
    assert f"taking over the lock of process {stale}, which no longer runs" in capsys.readouterr().out
    assert not (out / "lock").exists()  # released at the end


def test_stale_temporaries_of_killed_saves_are_removed(tiny_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / f"model_0000004.pth.tmp{dead_pid()}").write_bytes(b"half a checkpoint")
    (out / f"model_0000008.pth.tmp{os.getpid()}").write_bytes(b"a save in progress")
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "1", "--output-dir", str(out)])
    assert sorted(p.name for p in out.glob("*.tmp*")) == [f"model_0000008.pth.tmp{os.getpid()}"]


def test_resume_with_max_iter_at_or_below_the_checkpoint_is_refused(finished, tiny_root, tmp_path):
    out = copy_run(finished, tmp_path)
    before = (out / "model_final.pth").read_bytes()
    for max_iter in ("1", "2"):
        with pytest.raises(runs.RunError, match=r"model_final.pth is at iteration 2, and --max-iter \d ends there"):
            train.main(TINY + ["--data-root", tiny_root, "--max-iter", max_iter, "--output-dir", str(out), "--resume"])
    assert (out / "model_final.pth").read_bytes() == before  # not relabelled


# -- checkpoints ----------------------------------------------------------------------

def test_resume_passes_over_a_truncated_checkpoint_and_says_so(finished, tiny_root, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # named in last_checkpoint, cut short
    capsys.readouterr()
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "3", "--output-dir", str(out), "--resume"])
    said = capsys.readouterr().out
    assert f"{final} is truncated or corrupt" in said and f"resuming from {out / 'model_0000001.pth'} instead" in said
    assert f"resuming from {out / 'model_0000001.pth'} at iteration 1" in said


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "not ours"])
def test_an_unreadable_checkpoint_is_named_without_a_traceback(finished, tiny_root, tmp_path, damage):
    out = copy_run(finished, tmp_path)
    for path in out.glob("model_*.pth"):
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:2000])
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "text":
            path.write_text("hello, I am not a checkpoint\n")
        else:
            torch.save({"weight": torch.zeros(3)}, path)  # a state dict without the trainer's keys
    said = {"truncated": "is truncated or corrupt", "empty": "is empty", "text": "is truncated or corrupt",
            "not ours": "is not a checkpoint of train.py"}[damage]
    res = run_script(["train.py", *TINY, "--data-root", tiny_root, "--max-iter", "3", "--output-dir", str(out),
                      "--resume"], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert said in res.stderr and "model_final.pth" in res.stderr and "model_0000001.pth" in res.stderr
    res = run_script(["eval.py", "--checkpoint", str(out / "model_final.pth"), "--workers", "0"], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and said in res.stderr, res.stderr


@pytest.mark.parametrize("damage", ["empty", "binary", "a missing file"])
def test_a_damaged_last_checkpoint_is_said_and_the_newest_file_taken(finished, tiny_root, tmp_path, capsys, damage):
    out = copy_run(finished, tmp_path)
    last = out / "last_checkpoint"
    last.write_bytes({"empty": b"", "binary": bytes(range(256)), "a missing file": b"model_0000009.pth"}[damage])
    assert train.main(TINY + ["--data-root", tiny_root, "--max-iter", "3", "--output-dir", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"warning: {last} is damaged" in said and "taking the checkpoints by their names" in said
    assert "at iteration 2" in said  # model_final.pth, newest by name


def test_eval_on_a_dataset_of_other_classes_says_classes(finished, tiny_root, tmp_path):
    root = tmp_path / "five"
    shutil.copytree(tiny_root, root)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        dataset = json.loads(path.read_text())
        dataset["categories"].append({"id": 5, "name": "star"})
        path.write_text(json.dumps(dataset))
    res = run_script(["eval.py", "--checkpoint", str(finished / "model_final.pth"), "--data-root", str(root),
                      "--workers", "0", "--output-dir", str(tmp_path / "eval")], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "was trained on 4 classes ['box', 'disc', 'triangle', 'ring'], but" in res.stderr
    assert "has 5 classes" in res.stderr


# -- datasets, checked when they load --------------------------------------------------

def write_annotations(root, split, edit):
    path = root / "annotations" / f"instances_{split}.json"
    dataset = json.loads(path.read_text())
    edit(dataset)
    path.write_text(json.dumps(dataset))
    return path


def test_a_category_outside_categories_is_refused_before_training(tiny_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny_root, root)
    path = write_annotations(root, "train", lambda d: d["annotations"][-1].update(category_id=99))
    with pytest.raises(runs.RunError, match=rf"{path}: 1 entry cannot be used:\n  annotations\[\d+\] \(id \d+, image "
                                            r"\d+\) has category_id 99, not among the categories \[1, 2, 3, 4\]"):
        train.main(TINY + ["--data-root", str(root), "--max-iter", "1", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_annotation_files_are_named(tiny_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny_root, root)
    image_dir, ann_file = data.coco_paths(str(root), "val")
    with open(ann_file, "w") as f:
        f.write('{"images": [')
    with pytest.raises(runs.RunError, match=rf"{ann_file} is not valid JSON"):
        data.CocoDetection(image_dir, ann_file)
    write = lambda d: open(ann_file, "w").write(json.dumps(d))
    write({"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}]})
    with pytest.raises(runs.RunError, match=rf"{ann_file} lists no images"):
        data.CocoDetection(image_dir, ann_file)


def test_boxes_of_no_size_or_beyond_the_image_are_dropped_or_clipped_and_reported(tiny_root, tmp_path):
    root = tmp_path / "boxes"
    shutil.copytree(tiny_root, root)

    def edit(d):
        image = d["images"][0]
        W, H = image["width"], image["height"]
        d["annotations"] = [
            {"id": 1, "image_id": image["id"], "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": image["id"], "category_id": 2, "bbox": [5, 5, -3, 10], "area": 0, "iscrowd": 0},
            {"id": 3, "image_id": image["id"], "category_id": 3, "bbox": [W - 10, H - 10, 30, 30], "area": 900,
             "iscrowd": 0},
            {"id": 4, "image_id": image["id"], "category_id": 4, "bbox": [W + 5, 0, 10, 10], "area": 100, "iscrowd": 0}]
    path = write_annotations(root, "train", edit)
    with pytest.warns(UserWarning, match=rf"{path}: 1 box\(es\) of zero or negative size and 1 entirely outside "
                                         r"their image dropped; 1 reaching beyond their image clipped to it"):
        ds = data.CocoDetection(*data.coco_paths(str(root), "train"), train=True)
    image, target = ds[0]
    H, W = image.shape[-2:]
    assert target["boxes"].tolist() == [[10, 10, 30, 30], [W - 10, H - 10, W, H]]
    assert target["labels"].tolist() == [0, 2]


def test_a_16_bit_grey_png_reads_with_its_real_values(tmp_path):
    values = np.array([[0, 1000, 65535], [30000, 12345, 40000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    image = data.read_image(str(tmp_path / "grey16.png"))
    assert image.shape == (3, 2, 3)
    assert torch.allclose(image, torch.from_numpy(values / 65535).float().expand(3, -1, -1), atol=1e-7)
    Image.fromarray(np.zeros((2, 3), dtype=np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(runs.RunError, match=r"float.tiff: 32-bit float images \(mode F\)"):
        data.read_image(str(tmp_path / "float.tiff"))


@pytest.mark.parametrize("edit,said", [
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id 1, image 1\) has bbox null: expected \[x, y, "
                                               r"width, height\], four finite numbers"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotations\[1\] .* has bbox \[1, 2, 3\]"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, "3", 4]), r"annotations\[1\] .* has bbox \[1, 2, \"3\", 4\]"),
    (lambda d: d["images"][0].pop("file_name"), r"images\[0\] = .*: expected an integer id, a file_name, and a width"),
    (lambda d: d["images"][1].update(height=0), r"images\[1\] = .*: expected an integer id, a file_name, and a width"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"images\[\d+\] \(000000.jpg\): id 1 appears twice"),
    (lambda d: d["categories"][0].pop("name"), r"categories\[0\] = .*: expected \{'id': an integer, 'name': a string\}"),
    (lambda d: d["annotations"].append("box"), r"annotations\[\d+\] = \"box\": expected a dict"),
])
def test_malformed_annotation_entries_are_named_before_training(tiny_root, tmp_path, edit, said):
    root = tmp_path / "bad"
    shutil.copytree(tiny_root, root)
    path = write_annotations(root, "val", edit)
    with pytest.raises(runs.RunError, match=rf"{path}: 1 entry cannot be used:\n  {said}(.|\n)*correct these entries "
                                            rf"of {path}"):
        train.main(TINY + ["--data-root", str(root), "--max-iter", "1", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_image_is_checked_before_the_first_iteration(tiny_root, tmp_path, split):
    # a missing file, one of another size than its annotations say (its boxes would be
    # clipped to the wrong size), one that is not an image: all three named at once,
    # before training -- not at the iteration that samples them or after the whole
    # training, at the final evaluation
    root = tmp_path / "bad"
    shutil.copytree(tiny_root, root)
    os.remove(root / split / "000000.jpg")
    Image.new("RGB", (256, 192)).save(root / split / "000001.jpg")
    (root / split / "000002.jpg").write_text("not an image")
    with pytest.raises(runs.RunError) as refused:
        train.main(TINY + ["--data-root", str(root), "--max-iter", "1", "--output-dir", str(tmp_path / "out")])
    said = str(refused.value)
    assert said.startswith(f"{root / split}: 3 entries of ") and "cannot be used" in said
    assert f"{root / split / '000000.jpg'} (image id 1): no such file" in said
    assert f"{root / split / '000001.jpg'} (image id 2): is 256x192 pixels, but the annotations say 128x96" in said
    assert f"{root / split / '000002.jpg'} (image id 3): cannot be read as an image" in said
    assert f"correct (or remove) their entries in {root / 'annotations' / f'instances_{split}.json'}" in said
    assert not (tmp_path / "out").exists()
    res = run_script(["eval.py", "--checkpoint", "nothing.pth", "--workers", "0"], timeout=120)  # eval.py too:
    assert res.returncode == 2 and "nothing.pth: no such checkpoint file" in res.stderr  # (its own check first)


def test_eval_checks_the_images_before_it_evaluates(finished, tiny_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny_root, root)
    os.remove(root / "val" / "000003.jpg")
    res = run_script(["eval.py", "--checkpoint", str(finished / "model_final.pth"), "--data-root", str(root),
                      "--workers", "0", "--output-dir", str(tmp_path / "eval")], timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{root / 'val' / '000003.jpg'} (image id 4): no such file" in res.stderr
    assert "FLOPs" not in res.stdout  # refused before the first image


def test_a_val_split_without_boxes_is_refused(finished, tiny_root, tmp_path):
    root = tmp_path / "bare"
    shutil.copytree(tiny_root, root)
    path = write_annotations(root, "val", lambda d: d.update(annotations=[]))
    with pytest.raises(runs.RunError, match=rf"{path} has no annotated boxes, so COCO's AP cannot be computed"):
        train.main(TINY + ["--data-root", str(root), "--max-iter", "1", "--output-dir", str(tmp_path / "out")])
    res = run_script(["eval.py", "--checkpoint", str(finished / "model_final.pth"), "--data-root", str(root),
                      "--workers", "0", "--output-dir", str(tmp_path / "eval")], timeout=120)
    assert res.returncode == 2 and "has no annotated boxes" in res.stderr and "--images" in res.stderr


# -- flags, checked when they are parsed -------------------------------------------------

@pytest.mark.parametrize("flags,said", [
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    (["--device", "gpu"], "--device 'gpu' is not a device; pass cpu, cuda or cuda:N"),
    (["--pretrained-backbone", "no/such/file.pth"], "--pretrained-backbone no/such/file.pth: no such file"),
    (["--lr", "0"], "--lr must be a number above 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a number above 0, got nan"),
    (["--lam", "-0.1"], "--lam must be a number of 0 or more, got -0.1"),
    (["--tau", "-1"], "--tau must be a number of 0 or more, got -1.0"),
    (["--steps", "30", "20"], "--steps must be iterations of 1 or more, each after the one before, got [30, 20]"),
    (["--steps", "0"], "--steps must be iterations of 1 or more"),
    (["--min-size", "800", "--max-size", "600"], "--max-size 600 is below --min-size 800"),
    (["--head", "fixed", "--lam", "0.1"], "--lam: --head fixed has no gates, so these would do nothing"),
    (["--head", "fcos", "--coarse", "--tau", "1"], "--tau, --coarse: --head fcos has no gates"),
    (["--gated", "--activation", "softmax"], "--activation: --gated alone makes the fixed head"),
    (["--activation", "softmax", "--tau", "1"], "--tau is Eq. 3's, the proposed activation's; --activation softmax"),
    (["--output-dir", "README.md"], "--output-dir README.md is a file, not a folder"),
])
def test_flags_out_of_range_or_at_odds_are_refused_at_parse_time(flags, said, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    if flags[:1] == ["--device"] and flags[1] == "cuda:7":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        said += " 1 CUDA device(s), cuda:0..cuda:0"
    with pytest.raises(SystemExit):
        train.get_args(flags)
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("flags,said", [
    (["--min-score", "2"], "--min-score is a score between 0 and 1, got 2.0"),
    (["--visualize", "-1"], "--visualize must be 0 or more, got -1"),
    (["--images", "x.jpg", "--visualize", "2"], "--visualize: --images runs the model on image files"),
    (["--images", "x.jpg", "--data", "coco"], "--data: --images runs the model on image files"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--output-dir", "README.md"], "--output-dir README.md is a file, not a folder"),
])
def test_eval_flags_out_of_range_or_at_odds_are_refused(flags, said, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        evaluation.get_args(["--checkpoint", "model_final.pth"] + flags)
    assert said in capsys.readouterr().err


def test_backbone_weights_that_cannot_be_had_are_said_before_training(tiny_root, tmp_path, monkeypatch):
    common = TINY + ["--data-root", tiny_root, "--max-iter", "1"]
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)  # another ResNet's weights
    with pytest.raises(runs.RunError, match=rf"{other} does not hold the weights of torchvision's resnet18 .* pass the "
                                            r"file resnet18-f37072fd.pth of --backbone resnet18"):
        train.main(common + ["--pretrained-backbone", str(other), "--output-dir", str(tmp_path / "a")])
    (tmp_path / "text.pth").write_text("weights")
    with pytest.raises(runs.RunError, match=r"text.pth cannot be read as a state dict"):
        train.main(common + ["--pretrained-backbone", str(tmp_path / "text.pth"), "--output-dir", str(tmp_path / "b")])

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(runs.RunError, match=r"could not download the ImageNet weights of resnet18 \(OSError: network "
                                            r"is unreachable\); download https://.*resnet18-f37072fd.pth on a machine "
                                            r"with network and put it at .*, or pass --pretrained-backbone FILE"):
        train.main(common + ["--pretrained-backbone", "true", "--output-dir", str(tmp_path / "c")])
    assert not any((tmp_path / n / "model_final.pth").exists() for n in "abc")


# -- writes ---------------------------------------------------------------------------

def test_atomic_write_leaves_nothing_behind_when_the_write_fails(tmp_path):
    path = tmp_path / "out.bin"

    def fails(f):
        f.write(b"half")
        raise ValueError("the writer broke")

    with pytest.raises(ValueError, match="the writer broke"):
        runs.atomic_write(str(path), fails, "wb")
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"before")

    def disk_full(f):  # as torch.save reports it: its own error, raised from the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from error

    with pytest.raises(runs.RunError, match=rf"no space left on device while writing {path}; the file there before "
                                            r"is intact"):
        runs.atomic_write(str(path), disk_full, "wb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"] and path.read_bytes() == b"before"


def test_a_stop_on_a_checkpoint_iteration_saves_once(tiny_root, tmp_path, monkeypatch):
    saves = []
    save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, *a: saves.append(os.path.basename(path)) or save(path, *a))
    monkeypatch.setattr(train, "stopping", lambda stop, run: stop.update(signal=signal.SIGTERM) or True)
    out = tmp_path / "run"
    train.main(TINY + ["--data-root", tiny_root, "--max-iter", "5", "--checkpoint-period", "1", "--output-dir", str(out)])
    assert saves == ["model_0000001.pth"]


# -- signals during evaluation ------------------------------------------------------------

def test_ctrl_c_during_the_final_evaluation_ends_it_within_seconds(tmp_path):
    root = tmp_path / "many"
    data.make_synthetic(str(root), num_train=4, num_val=400, seed=2, size=(96, 128))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--data-root", str(root), "--max-iter", "1",
                             "--output-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:  # the evaluation starts once the final checkpoint is saved
        lines.append(line)
        if "saved model_final.pth" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    rest, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10  # 400 images would take far longer
    assert proc.returncode == 130, "".join(lines) + rest  # 128 + SIGINT: the run did not reach its end
    assert "evaluation interrupted by signal 2" in rest
    assert not (out / "eval_results.json").exists() and runs.read_checkpoint(str(out / "model_final.pth"))
    # --resume finishes what was left: the final evaluation, not a refusal of a finished run
    small = tmp_path / "few"
    shutil.copytree(root, small)
    for split in ("val",):  # 400 images take a minute here: the same run evaluated on 4 of them
        path = small / "annotations" / f"instances_{split}.json"
        dataset = json.loads(path.read_text())
        dataset["images"] = dataset["images"][:4]
        dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] <= 4]
        path.write_text(json.dumps(dataset))
    assert train.main(TINY + ["--data-root", str(small), "--max-iter", "1", "--output-dir", str(out), "--resume"]) == 0
    assert json.loads((out / "eval_results.json").read_text())["head_gflops_avg"] > 0
    assert runs.read_checkpoint(str(out / "model_final.pth"))["iteration"] == 1
