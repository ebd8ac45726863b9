"""Every configuration the README documents through every entry point, in fp32 and
under bf16 autocast (forced on, whatever the CPU): a training step with backward,
a resume, fine-tuning from its checkpoint (--weights), the final evaluation with the
FLOPs columns, eval.py with --visualize, eval.py --images, and inference under
autocast. The configurations come from
train.configurations(), the list that the README's switches table and --help are
made from: a new detector or switch joins this test by being added there.

In-process and tiny (64-pixel images, 64 channels, depth 1 where the switch does
not set it), seconds per cell; the command lines run once per detector."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import data
import eval as evaluation
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--backbone", "resnet18", "--channels", "64", "--min-size", "64", "--max-size", "96",
        "--ims-per-batch", "2", "--workers", "0", "--warmup", "1", "--steps", "100"]
PRECISIONS = {"fp32": ["--amp", "off"], "bf16": ["--amp", "on"]}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    data.make_synthetic(str(root), num_train=4, num_val=2, seed=3, size=(64, 96))
    return str(root)


def tiny(flags):
    """The tiny recipe under a configuration's own flags (depth 1 unless it sets one;
    EfficientDet with its own backbone)."""
    recipe = TINY[:2] + TINY[4:] if "efficientdet" in flags else TINY
    return recipe + ([] if "--depth" in flags else ["--depth", "1"]) + list(flags)


def has_gates(flags):
    args = train.get_args(list(flags) + ["--data", "synthetic"])
    return args.head == "dynamic" and bool(args.gated)


def test_the_readme_and_help_show_the_switches_this_test_runs(capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert train.switches_table() in readme  # the README's table is the list's, row for row
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    shown = capsys.readouterr().out
    for switch in train.SWITCHES:
        assert f"{switch.experiment}: {shlex.join(switch.flags) or 'the defaults'}" in shown
    configurations = train.configurations()
    assert len(set(configurations)) == len(configurations) >= len(train.SWITCHES)
    for detector in ("fcos", "retinanet"):  # each detector with its own towers, fixed and dynamic
        for head in (detector, "fixed", "dynamic"):
            assert any(train.get_args(list(f)).detector == detector and train.get_args(list(f)).head == head
                       for f in configurations), (detector, head)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("flags", train.configurations(), ids=lambda f: " ".join(f) or "defaults")
def test_every_configuration_through_every_entry_point(tiny_root, tmp_path, flags, precision):
    out = tmp_path / "run"
    common = tiny(flags) + PRECISIONS[precision] + ["--data-root", tiny_root, "--output-dir", str(out)]
    # a training step with backward, its final evaluation; then a resume that trains on
    assert train.main(common + ["--max-iter", "1"]) == 0
    first = json.loads((out / "eval_results.json").read_text())
    assert train.main(common + ["--max-iter", "2", "--resume"]) == 0
    final = out / "model_final.pth"
    checkpoint = torch.load(final, map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 2 and checkpoint["args"]["amp"] == (precision == "bf16")
    for results in (first, json.loads((out / "eval_results.json").read_text())):
        assert results["head_gflops_min"] <= results["head_gflops_avg"] <= results["head_gflops_max"]
        assert 0 < results["head_gflops_avg"] < results["total_gflops_avg"] and 0 <= results["AP"] <= 1
    # train.py --weights: fine-tuning from it, a fresh schedule on its weights
    tuned = tmp_path / "tuned"
    assert train.main(tiny(flags) + PRECISIONS[precision] + ["--data-root", tiny_root, "--output-dir", str(tuned),
                                                             "--weights", str(final), "--max-iter", "1"]) == 0
    assert torch.load(tuned / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 1
    # eval.py: the model rebuilt from the checkpoint, evaluated, and drawn
    shown = tmp_path / "eval"
    assert evaluation.main(["--checkpoint", str(final), "--workers", "0", "--visualize", "1",
                            "--output-dir", str(shown)]) == 0
    again = json.loads((shown / "eval_results.json").read_text())
    assert again["head_gflops_avg"] == pytest.approx(json.loads((out / "eval_results.json").read_text())
                                                     ["head_gflops_avg"])
    drawn = sorted(p.name for p in (shown / "visualize").iterdir())
    gates = ["1_gates_cls.png", "1_gates_reg.png"] if has_gates(flags) else []
    assert drawn == sorted(["1_detections.png"] + gates)
    # eval.py --images on a picture of its own
    images = tmp_path / "images"
    picture = os.path.join(tiny_root, "val", "000000.jpg")
    assert evaluation.main(["--checkpoint", str(final), "--images", picture, "--output-dir", str(images)]) == 0
    assert sorted(p.name for p in images.iterdir()) == sorted(
        ["000000.json", "000000_detections.png"] + [g.replace("1_", "000000_") for g in gates])
    # inference under autocast (a user's own loop; eval.py runs in fp32)
    model, _ = evaluation.load_model(str(final))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        result = model([data.read_image(picture)])[0]
    assert result["boxes"].shape[1] == 4 and torch.isfinite(result["boxes"]).all()


def run_script(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("detector", ["fcos", "retinanet"])
def test_the_command_lines_of_each_detector(tiny_root, tmp_path, detector):
    out = tmp_path / "run"
    trained = run_script(["train.py", *tiny(["--detector", detector]), "--amp", "on", "--data-root", tiny_root,
                          "--max-iter", "1", "--output-dir", str(out)], timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = str(out / "model_final.pth")
    evaluated = run_script(["eval.py", "--checkpoint", final, "--workers", "0", "--visualize", "2"], timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "FLOPs (1e9 MACs per image, 2 images)" in evaluated.stdout
    assert len([p for p in os.listdir(out / "visualize") if p.endswith("_gates_cls.png")]) == 2
    images = run_script(["eval.py", "--checkpoint", final, "--images", os.path.join(tiny_root, "val")], timeout=300)
    assert images.returncode == 0, images.stderr[-3000:]
    assert sorted(p for p in os.listdir(out / "images") if p.endswith(".json")) == ["000000.json", "000001.json"]
