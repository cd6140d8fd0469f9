"""`ovml search "text" --tags OUT`: text-to-video retrieval over the stored video embeddings.

    python -m pipeline.search "red dress" --tags runs/tags --config C [--checkpoint CKPT]
        [--top N] [--html FILE]

Nothing is decoded to search: the query is encoded as a label, by the model's own label
encoder (`LabelEmbedder`, the path the label bank takes, so the query is normalised and
checked against the text context like a vocabulary label), and scored against the `embedding`
of every current row (`read_tags`) with the model's scale and bias (`OVMLModel.score`): the
score is the probability the tagger would give that label. Rows without an embedding (error
rows, rows tagged with tag.emit_embedding off or by older versions) and rows of another model
(their embeddings live in another space) are skipped and counted. Only the hits are decoded, for
the HTML page: one middle frame each, inlined as a PNG data URI, so the page is one file that
needs no network; every text on it is HTML-escaped (video ids, URIs and the query are input).
The current embeddings are held in memory (float16: 2 x D bytes per video, ~1 GB for a million
512-d videos) and scored in float32 chunks of SCORE_CHUNK rows.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ovml_core.checkpoint import model_fingerprint
from ovml_core.config import Config
from ovml_core.evaluation import png_bytes
from ovml_core.label_embedder import LabelEmbedder, clip_token_budget
from ovml_core.model import OVMLModel
from ovml_core.vocabulary import normalise_label
from pipeline.cli import EXIT_OK, job_parser, run_job
from pipeline.decode import decode_video
from pipeline.parquet_io import read_tags, write_text_atomic
from pipeline.tagging import ModelSource, printable

logger = logging.getLogger(__name__)

COLUMNS = ["video_id", "uri", "embedding", "error", "model_fingerprint"]
SCORE_CHUNK = 65536  # stored rows converted to float32 and scored at a time
THUMBNAIL_SIZE = 160


class SearchError(ValueError):
    """The search cannot run; the message names the input at fault."""


@dataclass(frozen=True)
class Hit:
    video_id: str
    uri: str
    score: float  # the model's probability for the query as a label


@dataclass
class SearchResult:
    query: str  # as encoded: normalised like a vocabulary label
    hits: list[Hit]  # best first
    searched: int  # rows scored
    without_embedding: int  # skipped: error rows, or no embedding stored
    other_model: int  # skipped: embedded by another model


def encode_query(model: OVMLModel, text: str) -> tuple[str, np.ndarray]:
    """(the query normalised as a label, its L2-normalised float32 embedding [D])."""
    label = normalise_label(text)
    if not label:
        raise SearchError("the query is empty")
    tokens_needed, context = clip_token_budget(model)
    if tokens_needed(label) > context:
        raise SearchError(
            f"the query needs {tokens_needed(label)} text tokens; the model's context holds "
            f"{context}: shorten it"
        )
    embeddings, _ = LabelEmbedder(model).embed([label])
    return label, embeddings[0]


def searchable_rows(tags: pa.Table, fingerprint: str) -> tuple[pa.Table, int, int]:
    """(rows with an embedding by the model `fingerprint`, rows without one, other model's)."""
    has = pc.and_(pc.is_valid(tags["embedding"]), pc.is_null(tags["error"]))
    has = pc.fill_null(has, False)
    ours = pc.equal(tags["model_fingerprint"], fingerprint)
    kept = tags.filter(pc.and_(has, ours))
    without = tags.num_rows - pc.sum(has.cast(pa.int64())).as_py()
    return kept, without, tags.num_rows - without - kept.num_rows


def score_rows(model: OVMLModel, rows: pa.Table, query: np.ndarray) -> np.ndarray:
    """float32 [N]: `OVMLModel.score` of every stored embedding against the query."""
    embeddings = rows["embedding"].combine_chunks()
    dim = embeddings.type.list_size
    if dim != query.shape[0]:
        raise SearchError(f"stored embeddings have {dim} dimensions, the model's {query.shape[0]}")
    stored = embeddings.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    label = torch.from_numpy(np.asarray(query, np.float32)[None, :])
    scores = np.empty(len(stored), np.float32)
    with torch.inference_mode():
        for start in range(0, len(stored), SCORE_CHUNK):
            video = torch.from_numpy(stored[start : start + SCORE_CHUNK].astype(np.float32))
            scores[start : start + len(video)] = model.score(video, label)[:, 0].numpy()
    return scores


def top_hits(rows: pa.Table, scores: np.ndarray, top: int) -> list[Hit]:
    """The `top` best rows, highest score first (ties by video_id, so the order is stable)."""
    if len(scores) > top:
        chosen = np.argpartition(-scores, top - 1)[:top]
    else:
        chosen = np.arange(len(scores))
    ids, uris = rows["video_id"].to_pylist(), rows["uri"].to_pylist()
    hits = [Hit(ids[i], uris[i], float(scores[i])) for i in chosen]
    return sorted(hits, key=lambda h: (-h.score, h.video_id))


def search(model: OVMLModel, tags: pa.Table, text: str, top: int = 10) -> SearchResult:
    """The `top` current rows of `tags` (read_tags) that best match `text`."""
    if top < 1:
        raise SearchError(f"--top must be >= 1, got {top}")
    query, embedding = encode_query(model, text)
    rows, without, other = searchable_rows(tags, model_fingerprint(model))
    if without or other:
        logger.warning(
            "skipped %d rows without an embedding and %d of another model", without, other
        )
    scores = score_rows(model, rows, embedding) if rows.num_rows else np.empty(0, np.float32)
    return SearchResult(query, top_hits(rows, scores, top), rows.num_rows, without, other)


def thumbnail_uri(cfg: Config, uri: str) -> tuple[str | None, str | None]:
    """(a PNG data URI of the video's middle frame, None) or (None, the decode error)."""
    decoded = decode_video(
        {"uri": uri},
        num_frames=1,  # one frame at the centre of the one segment: the middle frame
        size=THUMBNAIL_SIZE,
        limits=cfg.video,
        allowed_schemes=cfg.tag.allowed_schemes,
    )
    if decoded["error"] is not None:
        return None, decoded["error"]
    png = base64.b64encode(png_bytes(decoded["frames"][0])).decode()
    return f"data:image/png;base64,{png}", None


def html_page(cfg: Config, result: SearchResult, out: str) -> str:
    """A self-contained page: the hits with a middle-frame thumbnail each, all text escaped."""
    items = []
    for hit in result.hits:
        image, error = thumbnail_uri(cfg, hit.uri)
        picture = (
            f'<img alt="middle frame" src="{image}">'
            if image
            else f'<p class="error">no thumbnail: {html.escape(error)}</p>'
        )
        items.append(
            f"<li>{picture}<p><b>{hit.score:.4f}</b> {html.escape(hit.video_id)}<br>"
            f"<small>{html.escape(hit.uri)}</small></p></li>"
        )
    query = html.escape(result.query)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>ovml search: {query}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "ol{display:flex;flex-wrap:wrap;gap:1em;list-style:none;padding:0}"
        "li{width:180px}img{width:160px;height:160px;image-rendering:pixelated}"
        ".error{color:#a00}</style></head>"
        f"<body><h1>{query}</h1><p>{html.escape(_counts(result, out))}</p>"
        f"<ol>{''.join(items)}</ol></body></html>"
    )


def _counts(result: SearchResult, out: str) -> str:
    return (
        f"{len(result.hits)} best of {result.searched} videos in {out}; skipped "
        f"{result.without_embedding} without an embedding, {result.other_model} of another model"
    )


def format_result(result: SearchResult, out: str) -> str:
    lines = [f"search: {printable(result.query)!r}: {printable(_counts(result, out))}"]
    lines += [
        f"{rank:3d}  {hit.score:.4f}  {printable(hit.video_id)}  {printable(hit.uri)}"
        for rank, hit in enumerate(result.hits, 1)
    ]
    return "\n".join(lines)


def run_search(
    cfg: Config,
    text: str,
    tags_dir: str,
    *,
    top: int = 10,
    checkpoint: str | None = None,
    html_file: str | None = None,
) -> SearchResult:
    tags = read_tags(tags_dir, columns=COLUMNS)
    if tags is None:
        raise SearchError(f"--tags {tags_dir}: no tag part files there")
    model = ModelSource(cfg.model, checkpoint).load()
    result = search(model, tags, text, top)
    if not result.searched:
        raise SearchError(
            f"--tags {tags_dir}: no current row has an embedding by this model "
            f"({model_fingerprint(model)}); tag with tag.emit_embedding=true and this checkpoint"
        )
    if html_file is not None:
        write_text_atomic(html_file, html_page(cfg, result, tags_dir))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(
        "ovml search",
        "Text-to-video search over the video embeddings a tagging run stored: the text is "
        "encoded by the model's label encoder and scored like a label; nothing is decoded "
        "except the hits' thumbnails for --html.",
        "video.max_decode_s=10",
    )
    parser.add_argument("text", help="what to find, e.g. 'dress' (encoded like a label)")
    parser.add_argument("--tags", required=True, help="output directory of the tagging job")
    parser.add_argument("--top", type=int, default=10, help="hits to show (default 10)")
    parser.add_argument("--html", help="write a self-contained HTML page of the hits here")
    parser.add_argument(
        "--checkpoint",
        help="the checkpoint that tagged --tags, local, s3:// or gs:// (default: untrained)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = Config.from_yaml(args.config, args.overrides)
        result = run_search(
            cfg,
            args.text,
            args.tags,
            top=args.top,
            checkpoint=args.checkpoint,
            html_file=args.html,
        )
        print(format_result(result, args.tags))
        if args.html:
            print(f"html: {args.html}")
        return EXIT_OK

    return run_job(body, usage_errors=(SearchError,))


if __name__ == "__main__":
    sys.exit(main())
