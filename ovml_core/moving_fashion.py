"""Moving Fashion: a controlled multi-label, open-vocabulary video benchmark.

Each clip shows 1-3 real Fashion-MNIST garments on a dark canvas, each with its own motion.
Its labels are the garment classes and the motions in it. Every motion has a twin that is the
same clip played backwards (left/right, up/down, clockwise/counterclockwise, in/out): the
frames of a clip and of its time reversal are the same set, so a frame-mean model cannot tell
twins apart (`ORDER_ONLY_PAIRS`); only temporal order can.

Base/novel: training clips use only base garments and base motions; validation and test clips
use all of them, so novel labels are seen at evaluation only. Training clips are drawn from the
Fashion-MNIST training images, validation and test clips from disjoint halves of its test
images. Every clip is a pure function of (seed, split, index): quick is a prefix of full.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ovml_core.video_writer import write_video

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST class ids 0..9, as label texts.
GARMENTS = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating clockwise",
    "rotating counterclockwise",
    "zooming in",
    "zooming out",
)
NOVEL_GARMENTS = ("shirt", "sandal", "bag")
NOVEL_MOTIONS = ("moving down", "zooming out")
ORDER_ONLY_PAIRS = (
    ("moving left", "moving right"),
    ("moving up", "moving down"),
    ("rotating clockwise", "rotating counterclockwise"),
    ("zooming in", "zooming out"),
)
SPLITS = ("train", "val", "test")

CANVAS = 48
NUM_FRAMES = 8
GARMENT_SIZE = 20  # pixels a 28x28 garment covers at zoom 1
SHIFT = 16  # pixels a translating garment travels
TURN = 90.0  # degrees a rotating garment turns
ZOOM_RANGE = (0.6, 1.2)
FPS = 8


@dataclass(frozen=True)
class BenchmarkSize:
    train: int
    val: int
    test: int


SIZES = {
    "quick": BenchmarkSize(train=600, val=120, test=240),
    "full": BenchmarkSize(train=3000, val=300, test=600),
}


class FashionMNISTMissingError(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where they were looked for."""


# ---------------------------------------------------------------- labels


def base_labels() -> list[str]:
    return [g for g in GARMENTS if g not in NOVEL_GARMENTS] + [
        m for m in MOTIONS if m not in NOVEL_MOTIONS
    ]


def novel_labels() -> list[str]:
    return list(NOVEL_GARMENTS + NOVEL_MOTIONS)


def label_type(label: str) -> str:
    if label in GARMENTS:
        return "garment"
    if label in MOTIONS:
        return "motion"
    raise ValueError(f"{label!r} is not a Moving Fashion label")


# ---------------------------------------------------------------- source images


def _idx_file(source: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (source / name).is_file():
            return source / name
    raise FashionMNISTMissingError(
        f"Fashion-MNIST file {stem}[.gz] not found in {source}. Install the Debian package "
        "(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist) "
        "or download the four IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder and "
        "pass it with --source."
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (big-endian header: magic with type and rank, then the dimensions)."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if body.size != math.prod(shape):
        raise ValueError(f"{path}: {body.size} values for shape {shape}")
    return body.reshape(shape)


def load_fashion_mnist(source: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], class ids [N]) of the Fashion-MNIST `part` (train | t10k)."""
    source = Path(source)
    images = _read_idx(_idx_file(source, f"{part}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(source, f"{part}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{source}: {part} images {images.shape} and labels {labels.shape}")
    return images, labels.astype(np.int64)


@dataclass
class ImagePool:
    """The source images one split draws from, indexed by class."""

    images: np.ndarray  # uint8 [N, 28, 28]
    by_class: list[np.ndarray]  # class id -> indices into images

    @classmethod
    def of(cls, images: np.ndarray, labels: np.ndarray) -> ImagePool:
        return cls(images, [np.flatnonzero(labels == c) for c in range(len(GARMENTS))])


def split_pools(source: str | Path) -> dict[str, ImagePool]:
    """train <- Fashion-MNIST train images; val/test <- the two halves of its test images."""
    train_images, train_labels = load_fashion_mnist(source, "train")
    test_images, test_labels = load_fashion_mnist(source, "t10k")
    half = len(test_images) // 2
    return {
        "train": ImagePool.of(train_images, train_labels),
        "val": ImagePool.of(test_images[:half], test_labels[:half]),
        "test": ImagePool.of(test_images[half:], test_labels[half:]),
    }


# ---------------------------------------------------------------- clips


@dataclass(frozen=True)
class Track:
    """One garment in a clip: which image, its motion, and its pose in every frame."""

    image: int  # index into the split's ImagePool.images
    garment: str
    motion: str | None  # None for a still
    tint: tuple[float, float, float]
    poses: tuple[tuple[float, float, float, float], ...]  # per frame: cx, cy, degrees ccw, zoom


@dataclass(frozen=True)
class ClipSpec:
    video_id: str
    split: str
    tracks: tuple[Track, ...]

    @property
    def labels(self) -> list[str]:
        garments = [t.garment for t in self.tracks]
        motions = [t.motion for t in self.tracks if t.motion is not None]
        return list(dict.fromkeys(garments + motions))


def motion_poses(
    motion: str, rng: np.random.Generator, num_frames: int
) -> list[tuple[float, float, float, float]]:
    """Per-frame poses for `motion`. A twin draws the same path and walks it backwards."""
    s = np.linspace(0.0, 1.0, num_frames)
    half = GARMENT_SIZE / 2
    if motion.startswith("moving"):
        start = rng.uniform(half, CANVAS - half - SHIFT)
        other = rng.uniform(half, CANVAS - half)
        forward = motion in ("moving right", "moving down")  # +x, +y (image rows grow down)
        along = start + SHIFT * (s if forward else 1 - s)
        across = np.full(num_frames, other)
        xs, ys = (along, across) if motion in ("moving left", "moving right") else (across, along)
        return [(x, y, 0.0, 1.0) for x, y in zip(xs, ys, strict=True)]
    zoom_half = half * ZOOM_RANGE[1]
    cx, cy = rng.uniform(zoom_half, CANVAS - zoom_half, size=2)
    if motion.startswith("rotating"):
        start = rng.uniform(0.0, 360.0)
        counter = motion == "rotating counterclockwise"
        angles = start + TURN * (s if counter else 1 - s)
        return [(cx, cy, a, 1.0) for a in angles]
    if motion.startswith("zooming"):
        low, high = ZOOM_RANGE
        grow = motion == "zooming in"
        zooms = low + (high - low) * (s if grow else 1 - s)
        return [(cx, cy, 0.0, z) for z in zooms]
    raise ValueError(f"unknown motion {motion!r}")


def still_pose(rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A pose any clip frame could have: where garments are, turned and zoomed as in motion."""
    zoom = rng.uniform(*ZOOM_RANGE)
    half = GARMENT_SIZE / 2 * zoom
    cx, cy = rng.uniform(half, CANVAS - half, size=2)
    angle = rng.uniform(0.0, 360.0) if rng.random() < 0.5 else 0.0
    return (cx, cy, angle, zoom)


def _tint(rng: np.random.Generator) -> tuple[float, float, float]:
    return tuple(float(c) for c in rng.uniform(0.55, 1.0, size=3))


def _pick_garments(
    rng: np.random.Generator, pool: ImagePool, garments: list[str], count: int
) -> list[tuple[int, str]]:
    """`count` different garment classes of `garments`, each with a random image of its class."""
    chosen = rng.choice(len(garments), size=min(count, len(garments)), replace=False)
    picked = []
    for j in chosen:
        indices = pool.by_class[GARMENTS.index(garments[j])]
        picked.append((int(indices[rng.integers(len(indices))]), garments[j]))
    return picked


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sample_clip(
    seed: int, split: str, index: int, pool: ImagePool, num_frames: int = NUM_FRAMES
) -> ClipSpec:
    """Clip `index` of `split`: train uses base garments and motions only, val/test all."""
    rng = clip_rng(seed, split, index)
    novel = split != "train"
    garments = [g for g in GARMENTS if novel or g not in NOVEL_GARMENTS]
    motions = [m for m in MOTIONS if novel or m not in NOVEL_MOTIONS]
    tracks = []
    for image, garment in _pick_garments(rng, pool, garments, int(rng.integers(1, 4))):
        motion = motions[int(rng.integers(len(motions)))]
        poses = motion_poses(motion, rng, num_frames)
        tracks.append(Track(image, garment, motion, _tint(rng), tuple(poses)))
    return ClipSpec(f"{split}-{index:05d}", split, tuple(tracks))


def sample_still(rng: np.random.Generator, pool: ImagePool) -> ClipSpec:
    """A one-frame picture of one garment of any class, posed as in the clips (stage 0's
    "web" images: one subject and its caption)."""
    ((image, garment),) = _pick_garments(rng, pool, list(GARMENTS), 1)
    return ClipSpec(
        "still", "train", (Track(image, garment, None, _tint(rng), (still_pose(rng),)),)
    )


def render(spec: ClipSpec, images: np.ndarray) -> np.ndarray:
    """uint8 frames [T, CANVAS, CANVAS, 3]; overlapping garments keep the brighter pixel."""
    sources = torch.from_numpy(images[[t.image for t in spec.tracks]]).float()[:, None] / 255
    poses = torch.tensor([t.poses for t in spec.tracks], dtype=torch.float32)  # [K, T, 4]
    k, num_frames = poses.shape[:2]
    centres = torch.arange(CANVAS, dtype=torch.float32) + 0.5
    dy, dx = torch.meshgrid(centres, centres, indexing="ij")  # [H, W]
    cx, cy, degrees, zoom = (poses[..., i, None, None] for i in range(4))  # [K, T, 1, 1]
    ox, oy = dx - cx, dy - cy  # canvas offset from the garment centre, y down
    # Undo a counterclockwise (on screen) turn: rotate the offset clockwise, in y-up terms.
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    gx = cos * ox - sin * oy
    gy = sin * ox + cos * oy
    # Source pixels per canvas pixel; grid_sample's [-1, 1] spans the 28 source pixels.
    half_extent = GARMENT_SIZE * zoom / 2
    grid = torch.stack([gx / half_extent, gy / half_extent], dim=-1)  # [K, T, H, W, 2]
    layers = F.grid_sample(
        sources.repeat_interleave(num_frames, dim=0),
        grid.reshape(k * num_frames, CANVAS, CANVAS, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).reshape(k, num_frames, CANVAS, CANVAS, 1)
    tints = torch.tensor([t.tint for t in spec.tracks]).view(k, 1, 1, 1, 3)
    frames = (layers * tints).amax(dim=0)
    return (frames * 255).round().clamp(0, 255).to(torch.uint8).numpy()


# ---------------------------------------------------------------- the benchmark on disk


@dataclass(frozen=True)
class BenchmarkInfo:
    size: str
    seed: int
    counts: dict[str, int]
    base_labels: list[str]
    novel_labels: list[str]
    num_frames: int = NUM_FRAMES
    canvas: int = CANVAS


MANIFEST = "manifest.parquet"  # every split, with a `split` column (training reads train/val)
TEST_MANIFEST = "test.parquet"  # the test split alone (what the tagging job tags)
VOCABULARY = "vocabulary.csv"  # every label with its type (garment | motion)
INFO = "benchmark.json"


def manifest_table(specs: list[ClipSpec]) -> pa.Table:
    return pa.table(
        {
            "video_id": [s.video_id for s in specs],
            "uri": [f"videos/{s.video_id}.mp4" for s in specs],  # relative to the manifest
            "labels": pa.array([s.labels for s in specs], pa.list_(pa.string())),
            "split": [s.split for s in specs],
        }
    )


def write_vocabulary(path: Path) -> None:
    rows = [f"{label},{label_type(label)}" for label in GARMENTS + MOTIONS]
    path.write_text("label,type\n" + "\n".join(rows) + "\n")


def write_clip(spec: ClipSpec, pool: ImagePool, folder: Path) -> Path:
    """Render `spec` and encode it as `folder/<video_id>.mp4`."""
    return write_video(folder / f"{spec.video_id}.mp4", render(spec, pool.images), fps=FPS)


def build_benchmark(
    out: str | Path, size: str = "quick", seed: int = 0, source: str | Path = DEFAULT_SOURCE
) -> BenchmarkInfo:
    """Render and encode every clip of `size`, then write manifests, vocabulary and info."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    pools = split_pools(source)
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    counts = asdict(SIZES[size])
    specs = []
    for split in SPLITS:
        for index in range(counts[split]):
            spec = sample_clip(seed, split, index, pools[split])
            write_clip(spec, pools[split], out / "videos")
            specs.append(spec)
    table = manifest_table(specs)
    pq.write_table(table, out / MANIFEST)
    pq.write_table(table.filter(pc.equal(table["split"], "test")), out / TEST_MANIFEST)
    write_vocabulary(out / VOCABULARY)
    info = BenchmarkInfo(size, seed, counts, base_labels(), novel_labels())
    (out / INFO).write_text(json.dumps(asdict(info), indent=1) + "\n")
    return info
