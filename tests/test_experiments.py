"""experiments.py: the paper's rows and numbers in a dry run, and a tiny table end
to end (every row trained and evaluated, the table written, finished runs skipped)."""
import os
import re
import sys

import data
import experiments

TINY = ["--backbone", "resnet18", "--channels", "64", "--depth", "1", "--min-size", "96", "--max-size", "128",
        "--ims-per-batch", "2", "--workers", "0", "--warmup", "1", "--steps", "100", "--amp", "off",
        "--max-iter", "2"]


def test_dry_run_prints_every_row_with_the_papers_numbers(capsys):
    assert experiments.main(["tab2", "--dry-run", "--launcher", "torchrun --nproc_per_node 8"]) == 0
    said = capsys.readouterr().out
    for name, paper in (("softmax", "40.2"), ("restricted_tanh", "41.4"), ("tau_0.5", "41.4"), ("tau_1.0", "41.5"),
                        ("tau_1.5", "42.0"), ("tau_2.0", "41.8")):
        assert re.search(rf"^{re.escape(name)}  \[paper: {paper} mAP", said, re.M), name
    assert said.count("torchrun --nproc_per_node 8 train.py --data coco") == 6
    experiments.main(["tab1", "--dry-run"])
    said = capsys.readouterr().out
    assert "fine_low  [paper: 41.0 mAP, 203.6 avg (144.7 min, 336.0 max)]" in said
    assert "--coarse --lam 0 --depth 8" in said and "fixed_d8  [paper: 39.5 mAP, 512.5 total]" in said
    experiments.main(["tab3", "--dry-run"])
    said = capsys.readouterr().out
    assert [line.split()[0] for line in said.splitlines() if not line.startswith(" ")] == \
        ["gated_neither", "gated_scale", "gated_depth", "gated_both"]
    assert "train.py --data coco --gated --depth 8" in said and "446.6 total" in said
    experiments.main(["tab4", "--dry-run"])  # Tab. 4: five detectors, each without and with the head
    said = capsys.readouterr().out
    rows = re.findall(r"^(\w+)  \[paper: ([\d.]+) mAP", said, re.M)
    assert rows == [("retinanet", "35.8"), ("retinanet_dynamic", "38.2"), ("freeanchor", "38.3"),
                    ("freeanchor_dynamic", "39.0"), ("fcos_r101", "41.0"), ("fcos_r101_dynamic", "42.8"),
                    ("atss_r101", "41.2"), ("atss_r101_dynamic", "43.2"), ("efficientdet_d1", "38.2"),
                    ("efficientdet_d1_dynamic", "38.8")]
    assert "--detector efficientdet --lam 0.1 --depth 8 --max-iter 282000" in said


def test_tab3_end_to_end_on_a_tiny_set_then_skipped(tmp_path, capsys, monkeypatch):
    # run from a folder of the user's, with relative paths: they mean what they mean there
    monkeypatch.chdir(tmp_path)
    data.make_synthetic("synthetic", num_train=4, num_val=2, seed=1, size=(96, 128))
    args = ["tab3", "--data", "synthetic", "--output-dir", "exp", "--", *TINY, "--data-root", "synthetic"]
    assert experiments.main(args) == 0
    table = (tmp_path / "exp" / "tab3.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| gated_")]
    assert [r.split("|")[1].strip() for r in rows] == ["gated_neither", "gated_scale", "gated_depth", "gated_both"]
    assert all(re.search(r"\| \d\.\d{3} \| \d\.\d{3} \| \d+\.\d{3} \(", r) for r in rows)  # AP, AP50, GFLOPs
    assert "| 512.5 total |" in rows[0] and "| 446.6 total |" in rows[3]
    assert "(--depth replaced)" in rows[0] and "Flags given to every run: `--backbone resnet18" in table
    for name in ("gated_neither", "gated_both"):
        assert (tmp_path / "exp" / "tab3" / name / "eval_results.json").exists()
    # a row whose final evaluation was interrupted finishes it on the next run
    os.remove(tmp_path / "exp" / "tab3" / "gated_depth" / "eval_results.json")
    capsys.readouterr()
    assert experiments.main(args) == 0
    said = capsys.readouterr().out
    assert said.count("finished, skipped") == 3 and "gated_depth: " in said
    log = (tmp_path / "exp" / "tab3" / "gated_depth" / "log.txt").read_text()
    assert "at iteration 2: its training is done, its final evaluation runs" in log
    assert (tmp_path / "exp" / "tab3" / "gated_depth" / "eval_results.json").exists()
    capsys.readouterr()
    assert experiments.main(args) == 0
    said = capsys.readouterr().out
    assert said.count("finished, skipped") == 4 and "train.py" not in said


def test_flags_after_the_dashes_that_make_two_rows_one_run_are_refused(tmp_path, capsys):
    # fig5's fixed D2 and D4 rows differ by their depth alone: -- --depth 2 makes them one run
    code = experiments.main(["fig5", "--data", "synthetic", "--output-dir", str(tmp_path / "exp"), "--",
                             "--depth", "2"])
    said = capsys.readouterr()
    assert code == 2 and "rows fixed_d2 and fixed_d4 are the same run once the flags after -- (--depth 2)" in said.err
    assert not (tmp_path / "exp").exists()  # nothing ran
    code = experiments.main(["tab1", "--output-dir", str(tmp_path / "exp"), "--", "--lam", "0.2"])
    assert code == 2 and "row fcos: train.py refuses its flags" in capsys.readouterr().err  # --lam on FCOS's towers


def test_a_stopped_run_stops_the_table_with_its_exit_code(tmp_path, capsys):
    # a "launcher" that behaves as train.py stopped by SIGTERM: saves nothing, exits 143
    fake = tmp_path / "stopped.py"
    fake.write_text("import sys; sys.exit(143)\n")
    code = experiments.main(["tab3", "--data", "synthetic", "--output-dir", str(tmp_path / "exp"),
                             "--launcher", f"{sys.executable} {fake}"])
    said = capsys.readouterr().out
    assert code == 143 and "gated_neither: stopped by signal 15 (exit code 143)" in said
    assert "gated_scale" not in said.split("-> ")[0]  # the next rows did not start
    assert "| gated_neither |" in (tmp_path / "exp" / "tab3.md").read_text()


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    # three rows finished already (skipped), the fourth's folder holds a corrupt
    # checkpoint, so its resume fails: reported, and the table still written
    root = tmp_path / "synthetic"
    data.make_synthetic(str(root), num_train=4, num_val=2, seed=1, size=(96, 128))
    results = '{"AP": 0.5, "AP50": 0.8, "head_gflops_avg": 1.0, "head_gflops_min": 0.5, "head_gflops_max": 2.0}'
    for name in ("gated_neither", "gated_scale", "gated_both"):
        os.makedirs(tmp_path / "exp" / "tab3" / name)
        (tmp_path / "exp" / "tab3" / name / "eval_results.json").write_text(results)
    os.makedirs(tmp_path / "exp" / "tab3" / "gated_depth")
    (tmp_path / "exp" / "tab3" / "gated_depth" / "model_final.pth").write_bytes(b"not a checkpoint")
    code = experiments.main(["tab3", "--data", "synthetic", "--output-dir", str(tmp_path / "exp"), "--", *TINY,
                             "--data-root", str(root)])
    said = capsys.readouterr().out
    assert code == 1 and "gated_depth: FAILED (exit code 2)" in said and "failed: gated_depth" in said
    assert said.count("finished, skipped") == 3
    log = (tmp_path / "exp" / "tab3" / "gated_depth" / "log.txt").read_text()
    assert "no checkpoint in" in log and "gated_depth/model_final.pth" in log  # train.py's own words
    table = (tmp_path / "exp" / "tab3.md").read_text()
    assert "| gated_depth |" in table and "failed (2)" in table and table.count("| 0.500 | 0.800 |") == 3
