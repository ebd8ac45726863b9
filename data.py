"""
Data for training and evaluating FCOS with the dynamic head: COCO through
pycocotools, a deterministic sampler that shards the data across ranks and
resumes exactly, and a built-in synthetic dataset in the COCO layout.

Map:
    setup_distributed    the process group from torchrun's environment (train and eval)
    CocoDetection        images + instances JSON -> (image, target), labels 0..K-1
    TrainBatches         infinite, seeded, sharded per rank, aspect-ratio grouped
    make_loader          the DataLoader around them
    make_synthetic       writes a synthetic COCO-format dataset (JPEGs + JSON)
    atomic_write         a file appears whole or not at all (checkpoints too)
"""
import atexit
import contextlib
import json
import math
import multiprocessing
import os
import signal

import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

LAYOUT = """expected layout:
    {root}/annotations/instances_train{year}.json
    {root}/annotations/instances_val{year}.json
    {root}/train{year}/*.jpg
    {root}/val{year}/*.jpg
{source}"""
SOURCES = {"2017": "(COCO 2017 from https://cocodataset.org/#download)",
           "": "(the synthetic set: delete the folder and train.py --data synthetic writes it anew)"}


# -----------------------------------------------------------------------------
# Processes: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process

def setup_distributed(device):
    """Join the process group torchrun describes (NCCL on GPUs, gloo on the CPU);
    each rank then reads its own shard of the data. Returns rank, world, master,
    distributed and the device of this process (its own GPU under torchrun)."""
    distributed = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    device = torch.device(device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dict(rank=rank, world=world, master=rank == 0, distributed=distributed, device=device)


# -----------------------------------------------------------------------------
# COCO-format datasets

class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset. Items are (image, target): image a float
    (3, H, W) tensor in [0, 1]; target a dict with boxes (N, 4) xyxy, labels (N,)
    in 0..K-1 (contiguous), iscrowd (N,) and image_id. `label_to_category` maps
    labels back to the JSON's category ids.

    train=True drops images with no usable (non-crowd, non-empty) box and flips
    horizontally when the sampler asks for it.
    """

    def __init__(self, image_dir, ann_file, train=False):
        for path in (image_dir, ann_file):
            if not os.path.exists(path):
                root = os.path.dirname(os.path.dirname(os.path.abspath(ann_file)))
                year = "2017" if ann_file.endswith("2017.json") else ""
                raise FileNotFoundError(f"{path} not found; " + LAYOUT.format(root=root, year=year,
                                                                              source=SOURCES[year]))
        self.image_dir, self.train = image_dir, train
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # pycocotools prints
            self.coco = COCO(ann_file)
        self.label_to_category = sorted(self.coco.getCatIds())
        self.category_to_label = {c: i for i, c in enumerate(self.label_to_category)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.label_to_category]
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
                                         for a in self.coco.imgToAnns[i])]
        self.ids = ids
        self.flip = v2.RandomHorizontalFlip(p=1.0)

    def __len__(self):
        return len(self.ids)

    def aspect_group(self, index):
        info = self.coco.imgs[self.ids[index]]
        return int(info["width"] >= info["height"])  # landscape or portrait

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        image_id = self.ids[index]
        path = os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])
        try:
            with Image.open(path) as f:
                image = TF.pil_to_tensor(f.convert("RGB"))  # (3, H, W) uint8
        except Exception as error:
            raise RuntimeError(f"could not read image {path}: {error}") from error
        anns = [a for a in self.coco.imgToAnns[image_id] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
                  "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.long),
                  "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.long),
                  "image_id": image_id}
        if flip:
            image, target = self.flip(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        return image.float() / 255, target


def coco_paths(root, split):
    """(image_dir, ann_file) of a split ("train2017", "val2017", "train", "val")."""
    return os.path.join(root, split), os.path.join(root, "annotations", f"instances_{split}.json")


# -----------------------------------------------------------------------------
# Sampling: infinite, seeded, sharded, aspect-ratio grouped, resumable

class TrainBatches(torch.utils.data.Sampler):
    """Batches of (index, flip) for one rank, forever. Each epoch is a seeded
    permutation of the dataset; rank r takes every world_size-th image of it
    (disjoint shards); images go into a landscape or a portrait bucket, and a
    full bucket becomes a batch (aspect-ratio grouping, as detectron2 does).
    Everything is drawn from one seeded generator, flips included, so that
    `start` batches can be skipped on resume and the run continues exactly."""

    def __init__(self, dataset, batch_size, seed, rank=0, world_size=1, start=0):
        self.groups = [dataset.aspect_group(i) for i in range(len(dataset))]
        if len(self.groups) < world_size:
            raise ValueError(f"{len(self.groups)} training images cannot be shared among {world_size} ranks")
        self.batch_size, self.seed, self.rank, self.world_size, self.start = batch_size, seed, rank, world_size, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        buckets, produced = ([], []), 0
        while True:  # one seeded permutation (and coin flips) per epoch
            order = torch.randperm(len(self.groups), generator=g)
            flips = torch.rand(len(self.groups), generator=g) < 0.5
            for i in order[self.rank::self.world_size].tolist():
                bucket = buckets[self.groups[i]]
                bucket.append((i, bool(flips[i])))
                if len(bucket) == self.batch_size:
                    if produced >= self.start:
                        yield list(bucket)
                    produced += 1
                    bucket.clear()


def collate(batch):
    return tuple(zip(*batch))


def ignore_sigterm(worker_id):
    """Loader workers leave SIGTERM to the trainer. torchrun, Slurm and `kill -TERM
    -PGID` signal the whole process group; a worker that died of it would make
    the trainer fail mid-iteration instead of saving its checkpoint. The trainer
    shuts its workers down (or, at exit, `_kill_workers`), and a worker exits when
    its parent dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit handler, so it runs before it
def _kill_workers():
    """At exit, kill the loader workers still running. After an error the loader
    may never shut them down (the traceback keeps it alive), and multiprocessing's
    exit handler ends daemon processes with SIGTERM, which they ignore: the
    process would wait for them forever."""
    if hasattr(signal, "SIGCHLD"):  # the loader's handler would report the kills as failures
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()


def make_loader(dataset, batch_size, seed, rank, world_size, start, workers):
    sampler = TrainBatches(dataset, batch_size, seed, rank, world_size, start)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       persistent_workers=workers > 0, worker_init_fn=ignore_sigterm)


def eval_loader(dataset, rank, world_size, workers):
    """Each rank a strided shard of the evaluation set, one image per batch."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers, collate_fn=collate,
                                       worker_init_fn=ignore_sigterm)


# -----------------------------------------------------------------------------
# Synthetic data in the COCO layout

SHAPES = ("box", "disc", "triangle", "ring")  # one class each
COLOURS = torch.tensor([[0.90, 0.20, 0.15], [0.15, 0.65, 0.25], [0.20, 0.35, 0.90], [0.95, 0.80, 0.10]])


def _shape_mask(kind, h, w):
    """Boolean (h, w) silhouette of one object filling its box."""
    y = (torch.arange(h).float()[:, None] + 0.5) / h * 2 - 1
    x = (torch.arange(w).float()[None, :] + 0.5) / w * 2 - 1
    if kind == "box":
        return torch.ones(h, w, dtype=torch.bool)
    r = x ** 2 + y ** 2
    if kind == "disc":
        return r <= 1
    if kind == "ring":
        return (r <= 1) & (r >= 0.35)
    return (y >= -1) & (x.abs() <= (y + 1) / 2)  # triangle, apex up


def _texture(kind_index, h, w, g):
    """Each class has its own texture over its colour: flat, stripes, checks, dots."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    period = int(torch.randint(4, 9, (1,), generator=g))
    pattern = [torch.zeros(h, w), ((xx + yy) // period % 2).float(),
               ((xx // period + yy // period) % 2).float(), ((xx % period < 2) & (yy % period < 2)).float()]
    return 1 - 0.35 * pattern[kind_index]


def synthetic_image(seed, size=(320, 416), max_objects=6):
    """One image (3, H, W) uint8 and its objects [(kind, x, y, w, h)]."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    coarse = torch.rand(3, H // 32 + 2, W // 32 + 2, generator=g)
    image = torch.nn.functional.interpolate(coarse[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    image = 0.25 + 0.35 * image + 0.08 * torch.rand(3, H, W, generator=g)  # cluttered background
    for _ in range(int(torch.randint(3, 9, (1,), generator=g))):  # faint distractor strokes
        y0, x0 = int(torch.randint(0, H, (1,), generator=g)), int(torch.randint(0, W, (1,), generator=g))
        image[:, y0:y0 + 3, max(0, x0 - 60):x0 + 60] *= 0.7
    objects = []
    for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
        kind = int(torch.randint(0, len(SHAPES), (1,), generator=g))
        # log-uniform sizes from ~8 px to most of the image
        side = math.exp(math.log(8) + float(torch.rand(1, generator=g)) * (math.log(0.9 * min(H, W)) - math.log(8)))
        aspect = math.exp(float(torch.rand(1, generator=g)) * 0.8 - 0.4)
        w, h = max(6, min(W - 1, round(side * aspect))), max(6, min(H - 1, round(side / aspect)))
        x, y = int(torch.randint(0, W - w + 1, (1,), generator=g)), int(torch.randint(0, H - h + 1, (1,), generator=g))
        mask = _shape_mask(SHAPES[kind], h, w)
        colour = COLOURS[kind][:, None, None] * (0.85 + 0.3 * float(torch.rand(1, generator=g)))
        patch = (colour * _texture(kind, h, w, g)).clamp(0, 1)
        region = image[:, y:y + h, x:x + w]
        image[:, y:y + h, x:x + w] = torch.where(mask, patch, region)
        objects.append((kind, x, y, w, h))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), objects


def make_synthetic(root, num_train=600, num_val=100, seed=0, size=(320, 416)):
    """Write a synthetic COCO-format dataset under `root` (train/, val/,
    annotations/instances_{train,val}.json), deterministically from `seed`.
    Objects may overlap; an object mostly hidden by later ones is dropped."""
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)]
    for split, count, offset in (("train", num_train, 0), ("val", num_val, 10 ** 6)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for n in range(count):
            image, objects = synthetic_image(seed * 10 ** 7 + offset + n, size)
            name = f"{n:06d}.jpg"
            atomic_write(os.path.join(root, split, name),
                         lambda f: TF.to_pil_image(image).save(f, format="JPEG", quality=92), "wb")
            images.append({"id": n + 1, "file_name": name, "height": size[0], "width": size[1]})
            visible = _visible(objects, size)
            for (kind, x, y, w, h), keep in zip(objects, visible):
                if keep:
                    annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": kind + 1,
                                        "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        atomic_write(os.path.join(root, "annotations", f"instances_{split}.json"),
                     lambda f: json.dump({"images": images, "annotations": annotations, "categories": categories}, f))


def atomic_write(path, write, mode="w"):
    """Write a file under a temporary name of this process's, then rename it into
    place: a reader never sees a half-written file -- not after a crash (the data
    is on disk before the rename), nor while another process (a lambda sweep
    sharing datasets/synthetic) writes the same file at once."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _visible(objects, size):
    """An object counts if at least 40% of its box is not covered by later ones."""
    owner = torch.full(size, -1)
    for j, (_, x, y, w, h) in enumerate(objects):
        owner[y:y + h, x:x + w] = j
    return [(owner[y:y + h, x:x + w] == j).float().mean().item() >= 0.4 for j, (_, x, y, w, h) in enumerate(objects)]
