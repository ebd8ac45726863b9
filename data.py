"""
Data for training and evaluating FCOS with the dynamic head: COCO-format
datasets through pycocotools, checked entry by entry and file by file before a
run starts; a deterministic sampler that shards the data across ranks and
resumes exactly; and a built-in synthetic dataset in the COCO layout.

Map:
    read_image           any image file -> (3, H, W) float in [0, 1], 16-bit grey included
    CocoDetection        images + instances JSON -> (image, target); check_images
                         reads every image's header before a run uses them
    check_annotations    an instances JSON, every entry checked
    TrainBatches         infinite, seeded, sharded per rank, aspect-ratio grouped
    make_loader          the DataLoader around them (eval_loader: one image per batch)
    make_synthetic       writes a synthetic COCO-format dataset (JPEGs + JSON)
"""
import atexit
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import numbers
import os
import signal
import warnings

import numpy as np

import torch
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from runs import RunError, atomic_write

LAYOUT = """expected layout:
    {root}/annotations/instances_train{year}.json
    {root}/annotations/instances_val{year}.json
    {root}/train{year}/*.jpg
    {root}/val{year}/*.jpg
{source}"""
SOURCES = {"2017": "(COCO 2017 from https://cocodataset.org/#download)",
           "": "(the synthetic set: delete the folder and train.py --data synthetic writes it anew)"}


# -----------------------------------------------------------------------------
# Images

GREY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit grey PNGs and TIFFs


def read_image(path, upright=False):
    """(3, H, W) float in [0, 1] from any image file PIL reads: 8-bit modes (grey,
    palette, RGB, RGBA, CMYK, ...) through RGB, 16-bit grey with its real values
    (PIL's convert("RGB") would clip them to 255: an all-white image); a mode that
    holds no such values is refused by name. upright: turned as its EXIF
    orientation says (a camera's photo as it is shown); a dataset's images are
    read as stored, the frame of their annotations."""
    try:
        with Image.open(path) as f:
            f.load()
            if upright:
                f = ImageOps.exif_transpose(f)
            if f.mode in GREY16:
                values = np.asarray(f)
                if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
                    raise RunError(f"image {path}: mode {f.mode} holds values outside 0..65535; "
                                   f"save it as 8- or 16-bit")
                grey = torch.from_numpy(values.astype(np.float32) / 65535)
                return grey[None].expand(3, -1, -1).contiguous()
            if f.mode == "F":
                raise RunError(f"image {path}: 32-bit float images (mode F) have no range to read them in; "
                               f"save it as 8- or 16-bit")
            return TF.pil_to_tensor(f.convert("RGB")).float() / 255
    except RunError:
        raise
    except Exception as error:
        raise RunError(f"could not read image {path}: {error}") from error


# -----------------------------------------------------------------------------
# COCO-format datasets

class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset, checked when it loads. Items are (image,
    target): image a float (3, H, W) tensor in [0, 1]; target a dict with boxes
    (N, 4) xyxy, labels (N,) in 0..K-1 (contiguous), iscrowd (N,) and image_id.
    `label_to_category` maps labels back to the JSON's category ids.

    train=True drops images with no usable (non-crowd, non-empty) box and flips
    horizontally when the sampler asks for it.
    """

    def __init__(self, image_dir, ann_file, train=False):
        for path in (image_dir, ann_file):
            if not os.path.exists(path):
                root = os.path.dirname(os.path.dirname(os.path.abspath(ann_file)))
                year = "2017" if ann_file.endswith("2017.json") else ""
                raise RunError(f"{path} not found; " + LAYOUT.format(root=root, year=year, source=SOURCES[year]))
        self.image_dir, self.train, self.coco_file = image_dir, train, ann_file
        self.coco = COCO()
        self.coco.dataset = check_annotations(ann_file)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # pycocotools prints
            self.coco.createIndex()
        self.label_to_category = sorted(self.coco.getCatIds())
        self.category_to_label = {c: i for i, c in enumerate(self.label_to_category)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.label_to_category]
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
            if not ids:
                raise RunError(f"{ann_file}: no image has a box to train on (every box is a crowd region)")
        self.ids = ids
        self.flip = v2.RandomHorizontalFlip(p=1.0)

    def __len__(self):
        return len(self.ids)

    def check_images(self, rank=0, world=1, threads=16):
        """Every image this dataset will read (this rank's strided share of them),
        checked by its header: image_problem's findings as (file, problem) pairs."""
        infos = [self.coco.imgs[i] for i in self.ids[rank::world]]
        paths = [os.path.join(self.image_dir, info["file_name"]) for info in infos]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # file system latency, not CPU
            found = pool.map(image_problem, paths, [i["width"] for i in infos], [i["height"] for i in infos])
            return [(f"{path} (image id {info['id']})", problem)
                    for path, info, problem in zip(paths, infos, found) if problem]

    def raise_image_problems(self, found):
        problems = Problems(self.image_dir)
        for name, problem in found:
            problems.add(f"{name}: {problem}")
        problems.raise_if_any(f"restore or replace these files, or correct (or remove) their entries in "
                              f"{self.coco_file}", total=len(self.ids))

    def check_evaluable(self):
        """COCO's AP needs ground truth: a split without a single box would score -1."""
        if not any(not a.get("iscrowd", 0) for a in self.coco.dataset["annotations"]):
            raise RunError(f"{self.coco_file} has no annotated boxes, so COCO's AP cannot be computed on it; "
                           f"evaluate on a split with annotations (to run a model on images alone: "
                           f"eval.py --checkpoint ... --images FOLDER)")

    def aspect_group(self, index):
        info = self.coco.imgs[self.ids[index]]
        return int(info["width"] >= info["height"])  # landscape or portrait

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        image_id = self.ids[index]
        image = read_image(os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"]))
        anns = self.coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
                  "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.long),
                  "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.long),
                  "image_id": image_id}
        if flip:
            image, target = self.flip(image, target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        return image, target


def check_annotations(ann_file):
    """An instances JSON, checked entry by entry: it parses; it lists images (each
    with an id, a file_name, and a width and height in pixels, the ids unique) and
    categories (an id and a name each); every annotation names a listed image and
    category and has a bbox of four finite numbers. What is malformed is refused in
    one message naming the first entries at fault and the fix. Boxes of zero or
    negative size are dropped and boxes beyond their image clipped to it (dropped
    when entirely outside), counted and reported once: COCO itself has a few.
    Returns the (mended) dataset dict."""
    try:
        with open(ann_file, "rb") as f:
            dataset = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{ann_file} is not valid JSON: {error}") from error
    except OSError as error:
        raise RunError(f"{ann_file} cannot be read: {error}") from error
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list) or \
            not isinstance(dataset.get("annotations", []), list) or not isinstance(dataset.get("categories"), list):
        raise RunError(f"{ann_file} is not a COCO instances file: expected a dict with lists 'images', "
                       f"'annotations' and 'categories'")
    if not dataset["images"]:
        raise RunError(f"{ann_file} lists no images")
    if not dataset["categories"]:
        raise RunError(f"{ann_file} lists no categories")
    problems = Problems(ann_file)
    images, categories = {}, {}
    # an entry at fault is still listed under its id where it has one: the annotations
    # that name it are not reported again
    for n, c in enumerate(dataset["categories"]):
        key = c.get("id") if isinstance(c, dict) and _is_id(c.get("id")) else None
        if key in categories:
            problems.add(f"categories[{n}]: id {key} appears twice")
            continue
        if key is None or not isinstance(c.get("name"), str):
            problems.add(f"categories[{n}] = {_short(c)}: expected {{'id': an integer, 'name': a string}}")
        if key is not None:
            categories[key] = c
    for n, image in enumerate(dataset["images"]):
        key = image.get("id") if isinstance(image, dict) and _is_id(image.get("id")) else None
        if key in images:
            problems.add(f"images[{n}] ({image.get('file_name')}): id {key} appears twice")
            continue
        bad = key is None or not isinstance(image.get("file_name"), str) or not image["file_name"] or \
            not all(_is_size(image.get(k)) for k in ("width", "height"))
        if bad:
            problems.add(f"images[{n}] = {_short(image)}: expected an integer id, a file_name, and a width and "
                         f"height above 0 (the image's size in pixels)")
        if key is not None:
            images[key] = None if bad else image  # None: its annotations are skipped, not reported
    kept, degenerate, clipped, outside = [], 0, 0, 0
    for n, a in enumerate(dataset.get("annotations", [])):
        if not isinstance(a, dict):
            problems.add(f"annotations[{n}] = {_short(a)}: expected a dict with image_id, category_id and bbox")
            continue
        name = f"annotations[{n}] (id {a.get('id')}, image {a.get('image_id')})"
        if a.get("category_id") not in categories:
            problems.add(f"{name} has category_id {a.get('category_id')!r}, not among the categories "
                         f"{sorted(categories)[:20]}")
            continue
        if a.get("image_id") not in images:
            problems.add(f"{name} is of image {a.get('image_id')!r}, which the file does not list")
            continue
        if images[a["image_id"]] is None:  # an image entry at fault, reported above
            continue
        box = a.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_finite(v) for v in box):
            problems.add(f"{name} has bbox {_short(box)}: expected [x, y, width, height], four finite numbers")
            continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            degenerate += 1
            continue
        info = images[a["image_id"]]
        x1, y1 = max(x, 0), max(y, 0)
        x2, y2 = min(x + w, info["width"]), min(y + h, info["height"])
        if x2 <= x1 or y2 <= y1:
            outside += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            clipped += 1
            a = {**a, "bbox": [x1, y1, x2 - x1, y2 - y1]}
        kept.append(a)
    problems.raise_if_any(f"correct these entries of {ann_file} (or remove them)")
    if degenerate or clipped or outside:
        warnings.warn(f"{ann_file}: {degenerate} box(es) of zero or negative size and {outside} entirely outside "
                      f"their image dropped; {clipped} reaching beyond their image clipped to it", stacklevel=2)
    return {**dataset, "annotations": kept}


class Problems:
    """What is wrong with a file's entries, gathered so that one message names the
    first few and counts the rest."""
    SHOWN = 5

    def __init__(self, source):
        self.source, self.found = source, []

    def add(self, problem):
        self.found.append(problem)

    def raise_if_any(self, fix, total=None):
        if self.found:
            more = len(self.found) - self.SHOWN
            lines = "\n  ".join(self.found[:self.SHOWN] + ([f"... and {more} more"] if more > 0 else []))
            raise RunError(f"{self.source}: {len(self.found)} entr{'y' if len(self.found) == 1 else 'ies'}"
                           f"{f' of {total}' if total else ''} cannot be used:\n  {lines}\n{fix}")


def _is_id(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_size(v):
    return _is_id(v) and v > 0


def _is_finite(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _short(value, width=80):
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def image_problem(path, width, height):
    """Why an image file named in the annotations cannot be used, or None: it is
    missing, its header does not read, its pixels are a kind read_image refuses, or
    its size differs from the annotations' (whose boxes would then be clipped to
    the wrong size, or found outside). Reads the header only (fast)."""
    try:
        with Image.open(path) as f:
            size, mode = f.size, f.mode
    except FileNotFoundError:
        return "no such file"
    except Exception as error:  # PIL's UnidentifiedImageError, a folder, permissions, ...
        return f"cannot be read as an image ({type(error).__name__}: {str(error)[:120]})"
    if mode == "F":
        return "is a 32-bit float image (mode F), which has no range to read it in; save it as 8- or 16-bit"
    if size != (width, height):
        return f"is {size[0]}x{size[1]} pixels, but the annotations say {width}x{height}"
    return None


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


def _visible(objects, size):
    """An object counts if at least 40% of its box is not covered by later ones."""
    owner = torch.full(size, -1)
    for j, (_, x, y, w, h) in enumerate(objects):
        owner[y:y + h, x:x + w] = j
    return [(owner[y:y + h, x:x + w] == j).float().mean().item() >= 0.4 for j, (_, x, y, w, h) in enumerate(objects)]
