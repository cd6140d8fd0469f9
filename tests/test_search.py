"""`ovml search` (pipeline/search.py) on Moving Fashion clips tagged by the tagging job with the
committed trained checkpoint: garment queries find the clips holding the garment far above
chance, scores are the tagger's own, the HTML page is self-contained and escaped, and rows
without an embedding or of another model are skipped and counted."""

import base64
import html
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ovml_core import moving_fashion as mf
from ovml_core.config import Config
from ovml_core.evaluation import png_bytes
from ovml_core.metrics import average_precision_per_label
from ovml_core.video import sample_frames
from pipeline.parquet_io import read_tags
from pipeline.search import (
    COLUMNS,
    THUMBNAIL_SIZE,
    Hit,
    SearchError,
    SearchResult,
    encode_query,
    html_page,
    main,
    search,
)
from pipeline.tagging import ModelSource
from tests.videos import read_frame_index, write_indexed_video

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = str(REPO / "models" / "moving-fashion-tiny" / "checkpoint")
CONFIG = str(REPO / "configs" / "moving_fashion" / "demo.yaml")
VOCABULARY = str(REPO / "configs" / "moving_fashion" / "labels.csv")
NUM_CLIPS = 32
LATER_RUN = "29991231T000000000000Z-later0"  # sorts after any real run id

needs_fashion_mnist = pytest.mark.skipif(
    not (mf.DEFAULT_SOURCE / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """(tags directory, {video_id: labels}) of NUM_CLIPS test clips, every label in top_k."""
    from pipeline.tagging import main as tag

    root = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(mf.SIZES, "ci", mf.BenchmarkSize(train=0, val=0, test=NUM_CLIPS))
        mf.build_benchmark(root / "data", "ci", seed=1)
        patch.chdir(REPO)  # the checkpoint names its CLIP weights relative to the repository
        manifest = str(root / "data" / mf.TEST_MANIFEST)
        args = ["--config", CONFIG, "--set", "tag.top_k=18", "--manifest", manifest]
        args += ["--out", str(root / "tags"), "--labels", VOCABULARY, "--checkpoint", CHECKPOINT]
        assert tag(args) == 0
    truth = pq.read_table(manifest, columns=["video_id", "labels"]).to_pylist()
    return str(root / "tags"), {r["video_id"]: set(r["labels"]) for r in truth}


@pytest.fixture(scope="module")
def model(tagged):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return ModelSource(Config.from_yaml(CONFIG).model, CHECKPOINT).load()


@pytest.mark.slow
@needs_fashion_mnist
def test_garment_queries_rank_clips_holding_the_garment_above_chance(tagged, model):
    out, truth = tagged
    tags = read_tags(out, columns=COLUMNS)
    aps, base_rates, precision_at_3 = [], [], []
    for garment in mf.GARMENTS:
        hits = search(model, tags, garment, top=NUM_CLIPS).hits
        assert len(hits) == NUM_CLIPS  # every clip ranked
        holds = np.array([garment in truth[h.video_id] for h in hits], float)
        if not holds.any():
            continue
        scores = np.array([h.score for h in hits])
        assert np.all(np.diff(scores) <= 0)  # best first
        aps.append(average_precision_per_label(scores[:, None], holds[:, None])[0])
        base_rates.append(holds.mean())  # a random ranking's expected AP and precision
        precision_at_3.append(holds[:3].mean())
    print(
        f"garments: mean AP {np.mean(aps):.3f}, p@3 {np.mean(precision_at_3):.3f}, "
        f"base rate {np.mean(base_rates):.3f} over {len(aps)} queries"
    )
    assert len(aps) >= 8
    # Measured on these 32 clips (seed 1): mean AP 0.58, p@3 0.57, base rate 0.22.
    assert np.mean(aps) > 1.8 * np.mean(base_rates)
    assert np.mean(precision_at_3) > 1.8 * np.mean(base_rates)


@pytest.mark.slow
@needs_fashion_mnist
def test_search_scores_are_the_taggers_scores_for_that_label(tagged, model):
    out, _ = tagged
    tags = read_tags(out)
    result = search(model, tags.select(COLUMNS), "dress", top=NUM_CLIPS)
    tagger = {
        r["video_id"]: next(t["score"] for t in r["top_k"] if t["label"] == "dress")
        for r in tags.to_pylist()
    }
    assert result.query == "dress" and result.searched == NUM_CLIPS
    np.testing.assert_allclose(
        [h.score for h in result.hits], [tagger[h.video_id] for h in result.hits], atol=1e-5
    )


@pytest.mark.slow
@needs_fashion_mnist
def test_rows_without_an_embedding_or_of_another_model_are_skipped(tagged, model, tmp_path):
    out, _ = tagged
    copy = tmp_path / "tags"
    shutil.copytree(out, copy)
    current = read_tags(str(copy))
    ids = current["video_id"].to_pylist()
    later = current.set_column(
        current.column_names.index("run_id"), "run_id", pa.array([LATER_RUN] * len(ids))
    )

    def take(names):
        return later.filter(pc.is_in(later["video_id"], pa.array(names)))

    # A file of an older version: no embedding column at all.
    old = take(ids[:3]).drop_columns(["embedding"])
    pq.write_table(old, copy / f"part-{LATER_RUN}-00000.parquet")
    failed = take(ids[3:4])
    failed = failed.set_column(
        failed.column_names.index("embedding"), "embedding", pa.nulls(1, failed["embedding"].type)
    ).set_column(failed.column_names.index("error"), "error", pa.array(["VideoDecodeError: x"]))
    pq.write_table(failed, copy / f"part-{LATER_RUN}-00001.parquet")
    other = take(ids[4:6])
    other = other.set_column(
        other.column_names.index("model_fingerprint"), "model_fingerprint", pa.array(["x"] * 2)
    )
    pq.write_table(other, copy / f"part-{LATER_RUN}-00002.parquet")

    result = search(model, read_tags(str(copy), columns=COLUMNS), "coat", top=NUM_CLIPS)
    assert (result.without_embedding, result.other_model) == (4, 2)
    assert result.searched == len(result.hits) == NUM_CLIPS - 6
    assert not {h.video_id for h in result.hits} & set(ids[:6])


@pytest.mark.slow
@needs_fashion_mnist
def test_main_prints_hits_and_writes_a_self_contained_escaped_page(
    tagged, tmp_path, capsys, monkeypatch
):
    out, _ = tagged
    monkeypatch.chdir(REPO)
    page = tmp_path / "search.html"
    query = "<script>alert(1)</script> trouser"
    args = [query, "--tags", out, "--top", "3", "--html", str(page)]
    assert main([*args, "--config", CONFIG, "--checkpoint", CHECKPOINT]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("search: ") and "skipped 0 without an embedding" in printed[0]
    scores = [float(line.split()[1]) for line in printed[1:4]]
    assert [line.split()[0] for line in printed[1:4]] == ["1", "2", "3"]
    assert scores == sorted(scores, reverse=True) and printed[4] == f"html: {page}"

    text = page.read_text()
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; trouser" in text
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", text)  # nothing fetched
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3  # one thumbnail per hit
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)


@pytest.mark.parametrize(
    ("text", "error"), [("", "empty"), ("  \n", "empty"), ("word " * 200, "text tokens")]
)
def test_a_query_the_label_encoder_cannot_take_is_refused(tiny_model, text, error):
    with pytest.raises(SearchError, match=error):
        encode_query(tiny_model, text)


def test_page_escapes_every_text_and_reports_a_hit_it_cannot_decode(tiny_config, tmp_path):
    clip = write_indexed_video(tmp_path / "clip.mp4", 24)
    hostile = "<img src=x onerror=alert(1)>"
    result = SearchResult(
        query="<script>",
        hits=[Hit(hostile, str(clip), 0.9), Hit("gone", str(tmp_path / "<u>gone</u>.mp4"), 0.5)],
        searched=2,
        without_embedding=0,
        other_model=0,
    )
    page = html_page(tiny_config, result, str(tmp_path))
    assert "<script" not in page and "<u>" not in page and "onerror=alert(1)>" not in page
    assert html.escape(hostile) in page and "&lt;u&gt;gone&lt;/u&gt;.mp4" in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1  # the decodable hit; the other says why it has none
    assert page.count('class="error">no thumbnail: ') == 1
    # The thumbnail is the clip's middle frame: write_indexed_video numbers its frames.
    frame, _ = sample_frames(clip, 1, THUMBNAIL_SIZE)
    assert read_frame_index(frame[0]) in (11, 12)  # of 0..23
    assert base64.b64decode(images[0]) == png_bytes(frame[0])
