"""Moving Fashion: IDX reading, deterministic clips, labels that match the pixels, splits."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ovml_core import moving_fashion as mf
from ovml_core.video import sample_frames

REPO = Path(__file__).resolve().parents[1]
HAS_DEBIAN_DATA = (mf.DEFAULT_SOURCE / "train-labels-idx1-ubyte.gz").is_file()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.fixture(scope="module")
def idx_source(tmp_path_factory) -> Path:
    """Small IDX files in the original layout: 6 images per class, random textures."""
    folder = tmp_path_factory.mktemp("fashion-idx")
    rng = np.random.default_rng(0)
    for part, compress in (("train", True), ("t10k", False)):
        labels = np.tile(np.arange(10), 6)
        images = rng.integers(0, 256, size=(labels.size, 28, 28))
        write_idx(folder / f"{part}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{part}-labels-idx1-ubyte", labels, compress)
    return folder


def test_reads_original_idx_files_plain_and_gzipped(idx_source):
    images, labels = mf.load_fashion_mnist(idx_source, "train")  # .gz
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    images, _ = mf.load_fashion_mnist(idx_source, "t10k")  # uncompressed
    assert images.shape == (60, 28, 28)


@pytest.mark.skipif(not HAS_DEBIAN_DATA, reason="apt-get install dataset-fashion-mnist")
def test_reads_the_debian_package():
    images, labels = mf.load_fashion_mnist(mf.DEFAULT_SOURCE, "t10k")
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(mf.FashionMNISTMissingError, match="apt-get install dataset-fashion-mnist"):
        mf.split_pools(tmp_path)
    result = subprocess.run(
        [sys.executable, "jobs/make_benchmark.py", "--out", str(tmp_path / "out")]
        + ["--source", str(tmp_path / "nowhere")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "--source" in result.stderr


def dot_pool(offset: tuple[int, int] = (0, 0)) -> mf.ImagePool:
    """One image per class: a 4x4 bright square at the centre shifted by `offset` (row, col)."""
    image = np.zeros((28, 28), np.uint8)
    r, c = 12 + offset[0], 12 + offset[1]
    image[r : r + 4, c : c + 4] = 255
    return mf.ImagePool.of(np.stack([image] * 10), np.arange(10))


def one_track_clip(pool: mf.ImagePool, motion: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    poses = tuple(mf.motion_poses(motion, rng, mf.NUM_FRAMES))
    track = mf.Track(0, mf.GARMENTS[0], motion, (1.0, 1.0, 1.0), poses)
    return mf.render(mf.ClipSpec("x", "test", (track,)), pool.images).astype(np.float64)


def centre_of_mass(frame: np.ndarray) -> tuple[float, float]:
    grey = frame.mean(axis=-1)
    rows, cols = np.mgrid[: grey.shape[0], : grey.shape[1]] + 0.5  # pixel centres
    return (grey * cols).sum() / grey.sum(), (grey * rows).sum() / grey.sum()


@pytest.mark.parametrize(
    "motion, axis, sign",
    [("moving right", 0, 1), ("moving left", 0, -1), ("moving down", 1, 1), ("moving up", 1, -1)],
)
def test_translations_move_the_garment_the_way_their_label_says(motion, axis, sign):
    frames = one_track_clip(dot_pool(), motion)
    path = np.array([centre_of_mass(f)[axis] for f in frames])
    steps = np.diff(path) * sign
    assert (steps > 1.0).all(), path
    assert path[-1] - path[0] == pytest.approx(sign * mf.SHIFT, abs=1.0)


@pytest.mark.parametrize("motion, sign", [("zooming in", 1), ("zooming out", -1)])
def test_zoom_changes_the_garment_size(motion, sign):
    mass = one_track_clip(dot_pool(), motion).sum(axis=(1, 2, 3))
    assert (np.diff(mass) * sign > 0).all(), mass


@pytest.mark.parametrize("motion", ["rotating clockwise", "rotating counterclockwise"])
def test_rotation_direction_as_seen_on_screen(motion):
    # A dot above the centre: turning clockwise on screen sends it right (then down).
    frames = one_track_clip(dot_pool(offset=(-8, 0)), motion)
    centres = [centre_of_mass(f) for f in frames]
    cx, cy = mf.motion_poses(motion, np.random.default_rng(0), mf.NUM_FRAMES)[0][:2]
    angles = np.unwrap([np.arctan2(-(y - cy), x - cx) for x, y in centres])  # ccw, y up
    turn = np.degrees(angles[-1] - angles[0])
    expected = mf.TURN if motion == "rotating counterclockwise" else -mf.TURN
    assert turn == pytest.approx(expected, abs=5.0)


@pytest.mark.parametrize("pair", mf.ORDER_ONLY_PAIRS)
def test_twin_motions_are_the_same_frames_in_reverse_order(pair):
    """What makes frame-mean pooling blind to these labels."""
    pool = dot_pool(offset=(-6, 3))
    first, second = (one_track_clip(pool, motion, seed=7) for motion in pair)
    assert np.abs(first - second[::-1]).max() <= 1.0
    assert np.abs(first - second).max() > 50  # but the clips differ


@pytest.fixture(scope="module")
def benchmark(idx_source, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setitem(mf.SIZES, "tiny", mf.BenchmarkSize(train=24, val=12, test=12))
    out = tmp_path_factory.mktemp("mf")
    mf.build_benchmark(out / "a", "tiny", seed=3, source=idx_source)
    mf.build_benchmark(out / "b", "tiny", seed=3, source=idx_source)
    mf.build_benchmark(out / "c", "tiny", seed=4, source=idx_source)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_same_seed_same_benchmark_other_seed_other(benchmark):
    a, b, c = (pq.read_table(benchmark / d / mf.MANIFEST) for d in "abc")
    assert a.equals(b)
    assert a["labels"] != c["labels"]
    for video_id in ("train-00000", "test-00011"):
        frames = [
            sample_frames(benchmark / d / "videos" / f"{video_id}.mp4", mf.NUM_FRAMES, 48)[0]
            for d in "abc"
        ]
        assert np.array_equal(frames[0], frames[1])
        assert not np.array_equal(frames[0], frames[2])


def test_clips_decode_to_what_was_rendered(benchmark, idx_source):
    pools = mf.split_pools(idx_source)
    spec = mf.sample_clip(3, "val", 5, pools["val"])
    rendered = mf.render(spec, pools["val"].images)
    decoded, meta = sample_frames(benchmark / "a" / "videos" / "val-00005.mp4", mf.NUM_FRAMES, 48)
    assert meta["frame_count"] == mf.NUM_FRAMES
    assert np.abs(decoded.astype(int) - rendered).mean() < 2.0  # yuv420p chroma only


def test_manifest_labels_are_the_clip_contents(benchmark, idx_source):
    pools = mf.split_pools(idx_source)
    rows = pq.read_table(benchmark / "a" / mf.MANIFEST).to_pylist()
    assert len(rows) == 24 + 12 + 12
    for row in rows:
        split, index = row["video_id"].split("-")
        spec = mf.sample_clip(3, split, int(index), pools[split])
        garments = {t.garment for t in spec.tracks}
        motions = {t.motion for t in spec.tracks}
        assert 1 <= len(spec.tracks) <= 3 and len(garments) == len(spec.tracks)
        assert set(row["labels"]) == garments | motions
        assert row["split"] == split
        assert (benchmark / "a" / row["uri"]).is_file()


def test_novel_labels_never_reach_the_train_split(benchmark):
    table = pq.read_table(benchmark / "a" / mf.MANIFEST).to_pylist()
    novel = set(mf.novel_labels())
    assert novel and not novel & set(mf.base_labels())
    train = [r for r in table if r["split"] == "train"]
    assert all(not novel & set(r["labels"]) for r in train)
    held_out = {label for r in table if r["split"] != "train" for label in r["labels"]}
    assert held_out & set(mf.NOVEL_GARMENTS) and held_out & set(mf.NOVEL_MOTIONS)
    test = pq.read_table(benchmark / "a" / mf.TEST_MANIFEST).to_pylist()
    assert [r["video_id"] for r in test] == [r["video_id"] for r in table if r["split"] == "test"]


def test_vocabulary_types_every_label(benchmark):
    lines = (benchmark / "a" / mf.VOCABULARY).read_text().splitlines()
    assert lines[0] == "label,type"
    typed = dict(line.rsplit(",", 1) for line in lines[1:])
    assert set(typed) == set(mf.GARMENTS + mf.MOTIONS)
    assert {typed[g] for g in mf.GARMENTS} == {"garment"}
    assert {typed[m] for m in mf.MOTIONS} == {"motion"}


def test_committed_vocabulary_is_the_benchmark_vocabulary(tmp_path):
    """configs/moving_fashion/labels.csv (the demo's vocabulary) is what make_benchmark writes."""
    mf.write_vocabulary(tmp_path / "labels.csv")
    committed = REPO / "configs" / "moving_fashion" / "labels.csv"
    assert committed.read_text() == (tmp_path / "labels.csv").read_text()


UNSEEN_VOCABULARY = REPO / "configs" / "moving_fashion" / "unseen_labels.csv"
# Words that carry no label meaning; every other word of an unseen label is a content word.
STOP_WORDS = {"a", "an", "the", "of", "to", "with", "and"}


def every_stage0_caption() -> set[str]:
    """Every caption `ovml_core.pretrain` can train on: a template around a garment followed
    by an ordered choice of at most one fact of each opposite pair, plus the class captions."""
    from itertools import permutations, product

    from ovml_core.pretrain import CAPTION_TEMPLATES, FACT_PAIRS, class_captions

    fact_lists = set()
    for choice in product(*[(None, *pair) for pair in FACT_PAIRS]):
        facts = [fact for fact in choice if fact is not None]
        fact_lists |= set(permutations(facts))
    captions = {c.text for c in class_captions()}
    for template, garment, facts in product(CAPTION_TEMPLATES, mf.GARMENTS, fact_lists):
        captions.add(template.format(" ".join([garment, *facts])))
    return captions


def test_enumerated_captions_cover_what_stage0_draws():
    """The enumeration is the real caption space: captions drawn by `caption_for` for random
    stills all lie in it."""
    from ovml_core.pretrain import Caption, caption_for, facts_of

    rng = np.random.default_rng(0)
    captions = every_stage0_caption()
    for _ in range(3000):
        pose = (*rng.uniform(0, mf.CANVAS, size=2), rng.uniform(0, 360), rng.uniform(0.6, 1.2))
        truth = Caption(str(rng.choice(mf.GARMENTS)), facts_of(pose), "")
        assert caption_for(rng, truth).text in captions


def test_unseen_wording_names_every_label_in_words_stage0_never_read():
    """Every word and every BPE token of the unseen vocabulary's content words is absent from
    every stage-0 caption: the text tower never trained on them."""
    import csv

    from open_clip.tokenizer import SimpleTokenizer

    with open(UNSEEN_VOCABULARY, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["means"] for r in rows) == sorted(mf.GARMENTS + mf.MOTIONS)  # each once
    assert all(r["type"] == mf.label_type(r["means"]) for r in rows)
    captions = every_stage0_caption()
    assert len(captions) > 10_000
    caption_words = {w for c in captions for w in c.replace(".", " ").replace("-", " ").split()}
    tokenizer = SimpleTokenizer()
    caption_tokens = set(tokenizer.encode(" ".join(sorted(caption_words | {".", "-"}))))
    assert tokenizer.encode("counterclockwise")[0] in caption_tokens  # sub-word tokens count
    for row in rows:
        content = [w for w in row["label"].split() if w not in STOP_WORDS]
        assert content, row
        assert not set(content) & caption_words, row
        for word in content:
            assert not set(tokenizer.encode(word)) & caption_tokens, (row, word)
        assert row["label"] not in mf.GARMENTS + mf.MOTIONS
