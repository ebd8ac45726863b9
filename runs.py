"""
What a run leaves on disk and how its processes meet, shared by train.py and
eval.py: the errors a person can act on and the exit codes that tell a finished
run from a stopped one, the process group, atomic writes, the lock of an output
folder, and checkpoint files.

Nothing written here is ever half a file: every file appears under its name
whole or not at all, and a killed run loses only the iterations since its last
checkpoint.

Map:
    RunError, run_cli      a problem the user can act on (printed without a traceback);
                           exit codes: 0 done, 2 refused, 128 + N stopped by signal N
    check_device           --device, checked against the machine
    setup_distributed      the process group from torchrun's environment
    atomic_write           a file appears whole or not at all
    remove_stale_temporaries, pid_alive
                           the leftovers of writers that were killed
    FolderLock             one run per output folder
    claim_output_dir       lock a folder; refuse to start afresh over a run
    write_checkpoint       a checkpoint and `last_checkpoint`, both atomically
    checkpoints_newest_first, read_checkpoint, check_classes
                           which checkpoint a resume takes, and whether it can be read
"""
import contextlib
import datetime
import errno
import os
import re
import signal
import socket
import sys

import torch
import torch.distributed as dist


class RunError(Exception):
    """A problem the user can act on: its message names the file or flag and the
    fix, and the scripts print it without a traceback."""


# Exit codes, as shells count them: a run that a signal stopped before its end
# (it saved what it had) exits 128 + the signal's number -- 130 for SIGINT (Ctrl-C),
# 143 for SIGTERM -- so that `train.py && eval.py`, a scheduler or experiments.py
# never takes it for a finished one.
EXIT_REFUSED = 2


def stopped_exit_code(signum):
    return 128 + int(signum)


def run_cli(main):
    """Run a script's main and return its exit code: main's own (0 when it returns
    None), 2 for a RunError (its message alone on stderr), 130 for a Ctrl-C that
    reached Python as KeyboardInterrupt."""
    try:
        return main() or 0
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return stopped_exit_code(signal.SIGINT)


# -----------------------------------------------------------------------------
# Devices and processes: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process

def check_device(name):
    """--device checked against this machine: "cpu", "cuda" or "cuda:N" that exists.
    Returns the torch.device; a RunError names what is there instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise RunError(f"--device {name!r} is not a device; pass cpu, cuda or cuda:N") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RunError(f"--device {name}: this code runs on cpu or cuda devices; pass cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RunError(f"--device {name}: this machine has no CUDA device that torch can use "
                       f"(torch.cuda.is_available() is False); pass --device cpu")
    if device.index is not None and device.index >= count:
        raise RunError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def setup_distributed(device, timeout_minutes=10):
    """Join the process group torchrun describes (NCCL on GPUs, gloo on the CPU);
    each rank then reads its own shard of the data. A collective that waits longer
    than `timeout_minutes` (a rank that hangs) fails the run rather than blocking
    the others for torch's default 30 minutes. Returns rank, world, master,
    distributed and the device of this process (its own GPU under torchrun)."""
    distributed = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    device = check_device(device) if isinstance(device, str) else torch.device(device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return dict(rank=rank, world=world, master=rank == 0, distributed=distributed, device=device)


# -----------------------------------------------------------------------------
# Writes: whole or not at all

def atomic_write(path, write, mode="w"):
    """Write a file under a temporary name of this process's, then rename it into
    place: a reader never sees a half-written file -- not after a crash (the data
    is on disk before the rename), nor while another process writes the same file
    at once. On any failure the temporary file goes, and a full disk says so."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if disk_full(error):
            before = "the file there before is intact" if os.path.exists(path) else "nothing was written"
            raise RunError(f"no space left on device while writing {path}; {before}; free some space and run "
                           f"the command again") from error
        raise


def disk_full(error):
    """Whether an exception, or one it was raised from (torch.save and PIL wrap the
    OSError in errors of their own), is ENOSPC (or EDQUOT, a full quota)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def remove_stale_temporaries(folder):
    """Remove the temporary files (NAME.tmpPID) that atomic_write left in `folder`
    when its process was killed mid-write; those of running processes stay."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = re.fullmatch(r".+\.tmp(\d+)", name)
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_output_dir(path, flag="--output-dir"):
    """A folder that can be made or written: a RunError names a file in the way or
    a folder without write permission, before any work is done."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == os.path.abspath(path) and not os.path.isdir(existing):
        raise RunError(f"{flag} {path} is a file, not a folder; pass a folder")
    if not os.path.isdir(existing):
        raise RunError(f"{flag} {path}: {existing} is a file, so no folder can be made under it; pass another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"{flag} {path}: {existing} is not writable by this user; pass another folder")


# -----------------------------------------------------------------------------
# Output folders: one run each

RUN_FILES = re.compile(r"model_(\d+|final)\.pth|last_checkpoint|metrics\.jsonl|eval_(results|\d+)\.json|"
                       r"detections\.json")


class FolderLock:
    """One run per output folder: an exclusively created `lock` file holding this
    process's pid (and host). A lock of a process that no longer runs on this host
    is taken over with a warning."""

    def __init__(self, folder, log):
        self.path, self.held = os.path.join(folder, "lock"), False
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, _, host = ((_read_text(self.path) or "").strip() + "  ").partition(" ")
                if host.strip() == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                    log(f"warning: taking over the lock of process {pid}, which no longer runs ({self.path})")
                    os.remove(self.path)
                    continue
                raise RunError(f"{folder} is in use by another run (process {pid} on {host.strip() or '?'}, "
                               f"{self.path}); wait for it to end, or pass another --output-dir")
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return

    def release(self):
        if self.held:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            self.held = False


def claim_output_dir(output_dir, resume, overwrite, log):
    """Lock the output folder, remove the temporary files of dead processes, and
    refuse to start afresh over a run unless told to overwrite it."""
    os.makedirs(output_dir, exist_ok=True)
    lock = FolderLock(output_dir, log)
    removed = remove_stale_temporaries(output_dir)
    if removed:
        log(f"removed {len(removed)} temporary file(s) of killed saves: {', '.join(sorted(removed)[:5])}")
    found = sorted(n for n in os.listdir(output_dir) if RUN_FILES.fullmatch(n))
    if found and not resume:
        if not overwrite:
            lock.release()
            raise RunError(f"{output_dir} holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
                           f"pass --resume to continue it, --overwrite to delete it and start anew, or another "
                           f"--output-dir")
        for name in found:
            os.remove(os.path.join(output_dir, name))
        log(f"--overwrite: deleted the run in {output_dir} ({len(found)} file(s))")
    return lock


# -----------------------------------------------------------------------------
# Checkpoints: atomic, the newest found by name, checked when read

def write_checkpoint(path, state):
    """torch.save(state) at `path`, then `last_checkpoint` beside it naming the file,
    each atomically: a run killed mid-write loses nothing."""
    atomic_write(path, lambda f: torch.save(state, f), "wb")
    atomic_write(os.path.join(os.path.dirname(path), "last_checkpoint"), lambda f: f.write(os.path.basename(path)))


def checkpoints_newest_first(output_dir, log=print):
    """The checkpoints of a run, newest first: the one named in last_checkpoint,
    then model_final.pth, then model_NNNNNNN.pth by iteration. A last_checkpoint
    that cannot be read, or names no checkpoint of the folder, is said and passed
    over (the files' own names still order them)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    numbered = sorted((int(m.group(1)), n) for n in names if (m := re.fullmatch(r"model_(\d+)\.pth", n)))
    order = ["model_final.pth"] * ("model_final.pth" in names) + [n for _, n in reversed(numbered)]
    last = os.path.join(output_dir, "last_checkpoint")
    if os.path.lexists(last):
        named = _read_text(last)
        if named is not None and named.strip() in order:
            order = [named.strip()] + [n for n in order if n != named.strip()]
        elif order:
            said = "cannot be read as text" if named is None else f"names {named.strip()[:60]!r}, not a checkpoint here"
            log(f"warning: {last} is damaged (it {said}); taking the checkpoints by their names, newest first")
    return [os.path.join(output_dir, n) for n in order]


def _read_text(path):
    """A small text file's content; None where it cannot be read as text (a folder,
    binary garbage, no permission): callers take that for damage, not a crash."""
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


CHECKPOINT_KEYS = ("model", "args", "iteration")


def read_checkpoint(path):
    """A checkpoint that train.py wrote, checked: it exists, is complete, holds
    nothing but tensors and plain values (torch.load's weights_only, so that a
    file with code in it is refused), and has this trainer's keys. Raises a
    RunError that names the file and what is wrong with it."""
    if os.path.isdir(path):
        raise RunError(f"{path} is a folder; pass a checkpoint file in it (model_final.pth, model_NNNNNNN.pth)")
    if not os.path.isfile(path):
        raise RunError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise RunError(f"{path} is empty (a save that never finished)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Unsupported global" in str(error) or "Unsupported operand" in str(error):
            raise RunError(f"{path} holds objects that a checkpoint of train.py does not (torch.load refused "
                           f"them: {str(error).splitlines()[-1][:200]}); load only files you trust") from error
        raise RunError(f"{path} is truncated or corrupt ({type(error).__name__}: "
                       f"{str(error).splitlines()[0][:200] if str(error) else 'no message'})") from error
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in CHECKPOINT_KEYS):
        held = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise RunError(f"{path} is not a checkpoint of train.py (it holds {held}); pass a model_NNNNNNN.pth or "
                       f"model_final.pth that train.py wrote")
    if not isinstance(checkpoint["args"], dict) or not isinstance(checkpoint["model"], dict):
        raise RunError(f"{path} is not a checkpoint of train.py (its 'args' or 'model' is not a dict)")
    return checkpoint


def check_classes(checkpoint, path, dataset, ann_file):
    """The classes a checkpoint was trained on against a dataset's."""
    saved = checkpoint.get("classes")
    if saved is not None and list(saved) != list(dataset.class_names):
        raise RunError(f"{path} was trained on {len(saved)} classes {list(saved)}, but {ann_file} has "
                       f"{len(dataset.class_names)} classes {dataset.class_names}; use the dataset it was trained "
                       f"on (--data, --data-root)")
