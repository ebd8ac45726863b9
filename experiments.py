"""
The paper's tables from one command each: every row trained and evaluated by
train.py in its own folder, then a table of this code's results beside the paper's.

    python experiments.py tab1 --launcher "torchrun --nproc_per_node 8"   # COCO, the 1x recipe
    python experiments.py fig5 --data synthetic                          # Fig. 5's core on a CPU
    python experiments.py tab2 --dry-run                                 # the commands, not run
    python experiments.py tab4 --dry-run                                 # Tab. 4's ten rows
    python experiments.py tab3 --data synthetic -- --max-iter 100        # flags for every run

Every row's command is checked by train.py's own parser before the first run
starts. A finished run (its eval_results.json written) is skipped, an interrupted
one resumes where it stopped (train.py --resume: its training, or its final
evaluation), a failed one is reported and the others go on; a run stopped by
Ctrl-C or SIGTERM stops the table too (exit code 130 or 143; run the command again
to go on). Then OUTPUT_DIR/<table>.md holds, per row, the paper's mAP and FLOPs
beside this code's AP, AP50 and head GFLOPs (average, min, max); for fig5 also
fig5.png (with matplotlib, if installed).

Map: Row, TABLES (the rows and the paper's numbers) -> check_rows -> run_row ->
write_table, plot_fig5
"""
import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))


class Row(NamedTuple):
    name: str
    flags: tuple  # train.py flags of this row
    paper_map: float = None  # the paper's mAP (COCO val)
    paper_flops: str = ""  # and its FLOPs, as it gives them
    kind: str = ""  # fig5: "fixed", "dynamic", "coarse"


D8 = ("--depth", "8")
EFFDET_SCHEDULE = ("--max-iter", "282000", "--steps", "188000", "250667")
# Tab. 1's budgets: low as the authors' lambda 0.1 (41.2 mAP at 83.9 head GFLOPs in their
# README; Tab. 1: 41.0 at 203.6 total), high as lambda 0 (42.0 in both)
TABLES = {
    "tab1": [
        Row("fcos", ("--head", "fcos"), 38.7, "216.7 total"),
        Row("fixed_d8", ("--head", "fixed") + D8, 39.5, "512.5 total"),
        Row("coarse_low", ("--coarse", "--lam", "0.1") + D8),
        Row("coarse_high", ("--coarse", "--lam", "0") + D8, 41.4, "471.2 avg"),
        Row("fine_low", ("--lam", "0.1") + D8, 41.0, "203.6 avg (144.7 min, 336.0 max)"),
        Row("fine_high", ("--lam", "0") + D8, 42.0, "446.6 avg"),
    ],
    "tab2": [  # the gate activations, at the high budget (tau 1.5: Tab. 1's 42.0)
        Row("softmax", ("--activation", "softmax", "--lam", "0") + D8, 40.2),
        Row("restricted_tanh", ("--activation", "restricted_tanh", "--lam", "0") + D8, 41.4),
        Row("tau_0.5", ("--tau", "0.5", "--lam", "0") + D8, 41.4),
        Row("tau_1.0", ("--tau", "1.0", "--lam", "0") + D8, 41.5),
        Row("tau_1.5", ("--tau", "1.5", "--lam", "0") + D8, 42.0),
        Row("tau_2.0", ("--tau", "2.0", "--lam", "0") + D8, 41.8),
    ],
    "tab3": [  # which path types are gated; every router keeps all three paths
        Row("gated_neither", ("--gated",) + D8, None, "512.5 total"),
        Row("gated_scale", ("--gated", "scale", "--lam", "0") + D8, None, "512.0 total"),
        Row("gated_depth", ("--gated", "depth", "--lam", "0") + D8, None, "476.0 total"),
        Row("gated_both", ("--gated", "depth", "scale", "--lam", "0") + D8, None, "446.6 total"),
    ],
    # Tab. 4: the head in other detectors, D8 at lambda 0.1 (the rows' FLOPs fit it); FLOPs
    # totals at 1333x800, EfficientDet's at 600x600 (eval.py --min-size 600 --max-size 600)
    "tab4": [
        Row("retinanet", ("--detector", "retinanet", "--head", "retinanet"), 35.8, "249.2 total"),
        Row("retinanet_dynamic", ("--detector", "retinanet", "--lam", "0.1") + D8, 38.2, "245.3 total"),
        Row("freeanchor", ("--detector", "freeanchor", "--head", "retinanet"), 38.3),
        Row("freeanchor_dynamic", ("--detector", "freeanchor", "--lam", "0.1") + D8, 39.0),
        Row("fcos_r101", ("--head", "fcos", "--backbone", "resnet101"), 41.0, "296.0 total"),
        Row("fcos_r101_dynamic", ("--backbone", "resnet101", "--lam", "0.1") + D8, 42.8, "278.9 total"),
        Row("atss_r101", ("--head", "fcos", "--assigner", "atss", "--backbone", "resnet101"), 41.2, "296.0 total"),
        Row("atss_r101_dynamic", ("--assigner", "atss", "--backbone", "resnet101", "--lam", "0.1") + D8, 43.2,
            "289.4 total"),
        # 282k iterations as Tab. 4 says; the lr steps where the 1x recipe has them (2/3, 8/9)
        Row("efficientdet_d1", ("--detector", "efficientdet", "--head", "efficientdet") + EFFDET_SCHEDULE, 38.2,
            "at 600x600"),
        Row("efficientdet_d1_dynamic", ("--detector", "efficientdet", "--lam", "0.1") + D8 + EFFDET_SCHEDULE, 38.8,
            "at 600x600"),
    ],
    "fig5": [  # the fixed heads D2-D8 against the dynamic D8 over lambda (head-only FLOPs)
        Row("fixed_d2", ("--head", "fixed", "--depth", "2"), None, "98.0 head (FCOS's tower: 38.7)", "fixed"),
        Row("fixed_d4", ("--head", "fixed", "--depth", "4"), None, "198.6 head", "fixed"),
        Row("fixed_d6", ("--head", "fixed", "--depth", "6"), None, "", "fixed"),
        Row("fixed_d8", ("--head", "fixed") + D8, 39.5, "397.2 head", "fixed"),
        Row("dynamic_lam0.8", ("--lam", "0.8") + D8, 40.2, "33.3 head", "dynamic"),
        Row("dynamic_lam0.4", ("--lam", "0.4") + D8, None, "", "dynamic"),
        Row("dynamic_lam0.1", ("--lam", "0.1") + D8, 41.2, "83.9 head", "dynamic"),
        Row("dynamic_lam0", ("--lam", "0") + D8, 42.0, "277.5 head", "dynamic"),
    ],
}
# Fig. 5's core at CPU scale (the synthetic set, 64 channels, D4 for the dynamic heads):
# the fixed D2 and D4, the dynamic D4 over four lambdas, Tab. 1's coarse-grained row at
# one budget, and a second seed of one configuration for the run-to-run spread
D4, NARROW = ("--depth", "4"), ("--channels", "64")
SYNTHETIC = {"fig5": [
    Row("fixed_d2", ("--head", "fixed", "--depth", "2") + NARROW, kind="fixed"),
    Row("fixed_d4", ("--head", "fixed") + D4 + NARROW, kind="fixed"),
    Row("dynamic_lam0.8", ("--lam", "0.8") + D4 + NARROW, kind="dynamic"),
    Row("dynamic_lam0.4", ("--lam", "0.4") + D4 + NARROW, kind="dynamic"),
    Row("dynamic_lam0.4_seed1", ("--lam", "0.4", "--seed", "1") + D4 + NARROW, kind="dynamic"),
    Row("dynamic_lam0.1", ("--lam", "0.1") + D4 + NARROW, kind="dynamic"),
    Row("dynamic_lam0", ("--lam", "0") + D4 + NARROW, kind="dynamic"),
    Row("coarse_lam0.1", ("--coarse", "--lam", "0.1") + D4 + NARROW, kind="coarse"),
]}
# The paper's Fig. 5 points that docs/DESIGN.md §7 holds (head-only GFLOPs, 2^30 MACs; mAP)
PAPER_FIG5 = {"fixed": [(98.0, 38.7), (397.2, 39.5)], "dynamic": [(33.3, 40.2), (83.9, 41.2), (277.5, 42.0)]}


def rows_of(table, data):
    return SYNTHETIC.get(table, TABLES[table]) if data == "synthetic" else TABLES[table]


def folder_of(row, args):
    return os.path.join(args.output_dir, args.table, row.name)


def command(row, args, extra):
    """The train.py command of a row: the launcher, the row's flags, the flags given
    after --, and --resume (a folder with no checkpoint yet starts fresh). Runs in
    the caller's working directory: relative paths mean what they mean there."""
    folder = folder_of(row, args)
    script = os.path.relpath(os.path.join(HERE, "train.py"))  # "train.py" where this file lies
    return shlex.split(args.launcher) + [script, *train_flags(row, args, extra)], folder


def train_flags(row, args, extra):
    return ["--data", args.data, *row.flags, *extra, "--output-dir", folder_of(row, args), "--resume"]


def overridden(row, extra):
    """The row's own flags that the flags after -- replace (the later flag wins)."""
    given = {f for f in extra if f.startswith("--")}
    return [f for f in row.flags if f.startswith("--") and f in given]


def check_rows(rows, args, extra):
    """Every row's train.py flags through train.py's own parser, before any run
    starts: a bad flag after -- is found now, not after hours of the first rows.
    Flags after -- that replace a row's own are said; where they make two rows the
    same run, the table would claim what was not run, so it is refused. Returns
    what is wrong, or None."""
    import train  # its parser; imported here, for torch loads slowly and --dry-run is quick without it
    seen = {}
    for row in rows:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                config = vars(train.get_args(train_flags(row, args, extra)))
        except SystemExit:  # argparse printed what is wrong
            return f"row {row.name}: train.py refuses its flags (above): {shlex.join(train_flags(row, args, extra))}"
        same = seen.get(repr(sorted((k, v) for k, v in config.items() if k != "output_dir")))
        if same is not None:
            return (f"rows {same} and {row.name} are the same run once the flags after -- ({shlex.join(extra)}) "
                    f"replace their own ({', '.join(overridden(row, extra))}): the table would show two rows of one "
                    f"configuration; leave those flags out")
        seen[repr(sorted((k, v) for k, v in config.items() if k != "output_dir"))] = row.name
        if overridden(row, extra):
            print(f"note: row {row.name}: flags after -- replace its own {', '.join(overridden(row, extra))}")
    return None


def run_row(row, args, extra):
    """Train and evaluate one row, unless its results exist. Returns its status and
    the run's exit code. A Ctrl-C reaches the run as well (one process group) and a
    SIGTERM to this process is passed on to it: the run saves, exits 130 or 143, and
    this table stops with it."""
    cmd, folder = command(row, args, extra)
    if os.path.exists(os.path.join(folder, "eval_results.json")):
        print(f"{row.name}: finished, skipped")
        return "done", 0
    os.makedirs(folder, exist_ok=True)
    print(f"{row.name}: {shlex.join(cmd)}", flush=True)
    with open(os.path.join(folder, "log.txt"), "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        previous = signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
        try:
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # the run got the same Ctrl-C: wait while it saves
                code = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        print(f"{row.name}: stopped by signal {code - 128} (exit code {code}); its checkpoint is saved: run this "
              f"command again to go on", flush=True)
        return f"stopped ({code})", code
    if code or not os.path.exists(os.path.join(folder, "eval_results.json")):
        why = f"exit code {code}" if code else f"exit code 0, but no eval_results.json in {folder}"
        print(f"{row.name}: FAILED ({why}); see {os.path.join(folder, 'log.txt')}", flush=True)
        return f"failed ({code})", code
    return "done", 0


def results_of(row, args):
    path = os.path.join(folder_of(row, args), "eval_results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_table(rows, args, status, extra=()):
    """OUTPUT_DIR/<table>.md: per row the paper's numbers and this code's, and the
    flags every run was given (a row's own flags that they replaced are struck)."""
    lines = [f"# {args.table} on {args.data}", "",
             "The paper's mAP and FLOPs are COCO val's (ResNet-50, 1x; GFLOPs as the paper gives them, "
             "for 1333x800 inputs); this code's AP, AP50 and head GFLOPs (1e9 MACs per image, the gate convs "
             "and predictors included) are from `eval_results.json` of each run.", "",
             f"Flags given to every run: `{shlex.join(extra)}`." if extra else "", "",
             "| row | flags | paper mAP | paper GFLOPs | AP | AP50 | head GFLOPs avg (min, max) | status |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = results_of(row, args)
        ours = ["-", "-", "-"] if r is None else [
            f"{r['AP']:.3f}", f"{r['AP50']:.3f}",
            f"{r['head_gflops_avg']:.3f} ({r['head_gflops_min']:.3f}, {r['head_gflops_max']:.3f})"]
        paper = "-" if row.paper_map is None else f"{row.paper_map:.1f}"
        replaced = overridden(row, extra)
        flags = f"`{' '.join(row.flags)}`" + (f" ({', '.join(replaced)} replaced)" if replaced else "")
        lines.append(f"| {row.name} | {flags} | {paper} | {row.paper_flops or '-'} | "
                     f"{' | '.join(ours)} | {status.get(row.name, '-')} |")
    path = os.path.join(args.output_dir, f"{args.table}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"-> {path}")


def plot_fig5(rows, args):
    """fig5.png: AP against head GFLOPs, this code's fixed heads as a curve and its
    dynamic (and coarse) heads as points, the paper's beside them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fig5.png needs matplotlib, which is not installed: pip install matplotlib, then run this command "
              "again (finished runs are skipped); the table is written")
        return
    points = {}
    for row in rows:
        r = results_of(row, args)
        if r is not None:
            points.setdefault(row.kind, []).append((r["head_gflops_avg"], 100 * r["AP"], row))
    fig, (ours, paper) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"fixed": ("o-", "fixed head (D2, D4, ...)"), "dynamic": ("s", "dynamic, fine-grained"),
             "coarse": ("^", "dynamic, coarse-grained")}
    for kind, found in points.items():
        found.sort(key=lambda p: p[0])
        ours.plot([p[0] for p in found], [p[1] for p in found], style[kind][0], label=style[kind][1])
        for x, y, row in found:
            ours.annotate(row.name.replace("dynamic_", "").replace("fixed_", ""), (x, y), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    ours.set(xlabel="head GFLOPs per image (1e9 MACs)", ylabel="AP (%)", title=f"this code, {args.data}")
    for kind, marker in (("fixed", "o-"), ("dynamic", "s")):
        xs, ys = zip(*PAPER_FIG5[kind])
        paper.plot(xs, ys, marker, label=style[kind][1])
    paper.set(xlabel="head GFLOPs (2^30 MACs, 1333x800)", ylabel="mAP (%)", title="the paper, COCO val")
    for axis in (ours, paper):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.output_dir, "fig5.png")
    fig.savefig(path, dpi=120)
    print(f"-> {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=tuple(TABLES))
    p.add_argument("--data", choices=("coco", "synthetic"), default="coco")
    p.add_argument("--launcher", default=shlex.quote(sys.executable), help='e.g. "torchrun --nproc_per_node 8"')
    p.add_argument("--output-dir", default="experiments")
    p.add_argument("--dry-run", action="store_true", help="print each row's command and the paper's numbers")
    args = p.parse_args(argv)
    rows = rows_of(args.table, args.data)
    if args.dry_run:
        for row in rows:
            paper = "-" if row.paper_map is None else f"{row.paper_map:.1f} mAP"
            print(f"{row.name}  [paper: {paper}, {row.paper_flops or '- GFLOPs'}]\n    "
                  f"{shlex.join(command(row, args, extra)[0])}")
        return 0
    refused = check_rows(rows, args, extra)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    status, stopped = {}, 0
    for row in rows:
        status[row.name], code = run_row(row, args, extra)
        if code > 128:
            stopped = code
            break
    write_table(rows, args, status, extra)
    if args.table == "fig5":
        plot_fig5(rows, args)
    failed = [name for name, s in status.items() if s.startswith("failed")]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return stopped or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
