"""The label bank job: a vocabulary in, a Parquet label bank (DESIGN.md §3) out.

    vocabulary file (driver)       validate; keep rows of the existing bank built by this model
      -> LabelBankActor (Ray Data actor pool, label_bank.actors; the model loads once per
                         actor, on a GPU by label_bank.device; backend hf or vllm)
      -> one atomic Parquet file: label, embedding, attributes, model_fingerprint

Incremental: a label already in the bank under the same model fingerprint is reused as it is;
only new labels reach the actors, so adding 10 labels to a bank of 10,000 costs 10. A changed
checkpoint (or config) changes the fingerprint and every label is recomputed. Labels no longer
in the vocabulary are dropped: the bank holds exactly the vocabulary's valid labels.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from ovml_core.checkpoint import CheckpointError, model_fingerprint
from ovml_core.config import Config, ConfigError, LabelBankConfig
from ovml_core.label_embedder import LabelEmbedder, load_vocabulary
from pipeline.cli import EXIT_OK, job_parser, run_job
from pipeline.manifest import Filesystems, resolve
from pipeline.parquet_io import label_bank_schema, write_parquet_atomic
from pipeline.progress import watch_plan
from pipeline.resources import actor_device, gpus_per_actor, task_blocks
from pipeline.tagging import ModelSource

logger = logging.getLogger(__name__)


class LabelBankActor:
    """`map_batches` callable: one model per actor; a batch of labels -> label bank rows."""

    def __init__(
        self, source: ModelSource, settings: LabelBankConfig, fingerprint: str, num_gpus: float
    ):
        # Ray sets OMP_NUM_THREADS per actor; torch's own pool is sized here explicitly.
        torch.set_num_threads(settings.torch_threads)
        model = source.load(actor_device(num_gpus))
        if model_fingerprint(model) != fingerprint:
            raise CheckpointError(
                f"the model loaded by this actor is not the one the job started with "
                f"(fingerprint {model_fingerprint(model)} != {fingerprint}); was the checkpoint "
                "replaced while the job ran?"
            )
        self.fingerprint = fingerprint
        self.embedder = LabelEmbedder(model, settings.backend, settings.vllm_gpu_memory_utilization)

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels = batch["label"].to_pylist()
        embeddings, attributes = self.embedder.embed(labels)
        return bank_table(labels, embeddings, attributes, self.fingerprint)


def bank_table(labels: list[str], embeddings, attributes: list[str], fingerprint: str) -> pa.Table:
    dim = embeddings.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim)
    return pa.Table.from_arrays(
        [
            pa.array(labels, pa.string()),
            column,
            pa.array(attributes, pa.string()),
            pa.array([fingerprint] * len(labels), pa.string()),
        ],
        schema=label_bank_schema(dim),
    )


@dataclass
class LabelBankSummary:
    out: str
    model_fingerprint: str
    labels: int = 0  # rows in the bank now
    computed: int = 0  # rows the actors produced in this run
    reused: int = 0  # rows carried over from the existing bank
    dropped: int = 0  # rows of the old bank not written again (removed labels, other model)
    seconds: float = 0.0  # time spent computing

    @property
    def labels_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return "\n".join(
            [
                f"label bank: {self.out} (model {self.model_fingerprint})",
                f"  labels    {self.labels}",
                f"  computed  {self.computed} ({self.labels_per_s:.1f} labels/s)",
                f"  reused    {self.reused}",
                f"  dropped   {self.dropped}",
            ]
        )


def read_bank(fs: pafs.FileSystem, path: str, out: str) -> pa.Table | None:
    """The existing bank at `out`, None when there is none yet."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"--out {out}: not a readable label bank ({err})") from err
    missing = {"label", "embedding", "model_fingerprint"} - set(table.column_names)
    if missing:
        raise ConfigError(f"--out {out}: not a label bank (no {', '.join(sorted(missing))})")
    return table


def reusable_rows(bank: pa.Table | None, fingerprint: str, labels: list[str]) -> pa.Table | None:
    """Rows of the existing bank built by this model for labels still in the vocabulary."""
    if bank is None:
        return None
    wanted = set(labels)
    seen: set[str] = set()
    keep = []
    rows = zip(bank["label"].to_pylist(), bank["model_fingerprint"].to_pylist(), strict=True)
    for i, (label, row_fingerprint) in enumerate(rows):
        if row_fingerprint == fingerprint and label in wanted and label not in seen:
            seen.add(label)
            keep.append(i)
    return bank.take(pa.array(keep, pa.int64()))


def compute_rows(
    labels: list[str], cfg: Config, source: ModelSource, fingerprint: str
) -> pa.Table | None:
    """Label bank rows for `labels` from a Ray Data actor pool."""
    settings = cfg.label_bank
    size = settings.batch_size
    # One block per batch, so the pool's actors share the work.
    blocks = task_blocks(pa.table({"label": pa.array(labels, pa.string())}), size)
    num_gpus = gpus_per_actor(settings.device, settings.num_gpus, "label_bank")
    rows = blocks.map_batches(
        LabelBankActor,
        fn_constructor_kwargs={
            "source": source,
            "settings": settings,
            "fingerprint": fingerprint,
            "num_gpus": num_gpus,
        },
        batch_size=size,
        batch_format="pyarrow",
        # No more actors than batches: each actor loads a whole model.
        compute=ray.data.ActorPoolStrategy(size=min(settings.actors, blocks.num_blocks())),
        num_cpus=settings.num_cpus,
        num_gpus=num_gpus,
    )
    field, what = "label_bank.no_progress_timeout_s", "the label bank's actors to embed labels"
    watch_plan(rows, field, settings.no_progress_timeout_s, what)
    tables = [t for t in ray.get(rows.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def in_vocabulary_order(tables: list[pa.Table | None], labels: list[str]) -> pa.Table:
    table = pa.concat_tables([t for t in tables if t is not None and t.num_rows])
    position = {label: i for i, label in enumerate(table["label"].to_pylist())}
    return table.take(pa.array([position[label] for label in labels], pa.int64()))


def build_label_bank(
    cfg: Config,
    labels_path: str,
    out: str,
    *,
    checkpoint: str | None = None,
    filesystems: Filesystems | None = None,
) -> LabelBankSummary:
    """Bring the label bank at `out` up to date with the vocabulary at `labels_path`."""
    source = ModelSource(cfg.model, checkpoint)
    model = source.load()
    fingerprint = model_fingerprint(model)
    vocabulary = load_vocabulary(labels_path, model)
    del model  # the actors build their own

    fs, path = resolve(out, filesystems)
    old = read_bank(fs, path, out)
    reused = reusable_rows(old, fingerprint, vocabulary.labels)
    done = set(reused["label"].to_pylist()) if reused is not None else set()
    todo = [label for label in vocabulary.labels if label not in done]
    summary = LabelBankSummary(out, fingerprint, reused=len(done))
    summary.dropped = (old.num_rows if old is not None else 0) - summary.reused
    logger.info(
        "%d labels in %s: %d to compute, %d reused from %s (model %s)",
        len(vocabulary.labels),
        labels_path,
        len(todo),
        summary.reused,
        out,
        fingerprint,
    )
    computed = None
    if todo:
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (`ray job submit`) or a local instance
        started = time.perf_counter()
        computed = compute_rows(todo, cfg, source, fingerprint)
        summary.seconds = time.perf_counter() - started
        summary.computed = computed.num_rows if computed is not None else 0
        if summary.computed != len(todo):
            raise RuntimeError(
                f"{len(todo)} labels to compute, but {summary.computed} rows came back"
            )
    summary.labels = len(vocabulary.labels)
    if todo or summary.dropped:
        fs.create_dir(posixpath.dirname(path), recursive=True)
        write_parquet_atomic(in_vocabulary_order([reused, computed], vocabulary.labels), fs, path)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(
        "ovml labels",
        "Build or update a label bank: vocabulary in, Parquet label embeddings out "
        "(incremental: labels already in the bank for the same model are not recomputed).",
        "label_bank.backend=vllm",
    )
    parser.add_argument(
        "--labels",
        required=True,
        help="vocabulary: .txt (one label per line), .csv/.tsv (label[,type,description]) "
        "or .yaml (list, or {type: [labels]})",
    )
    parser.add_argument(
        "--out", required=True, help="label bank Parquet file (local, s3://, gs://)"
    )
    parser.add_argument("--checkpoint", help="trained checkpoint directory (default: untrained)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        cfg = Config.from_yaml(args.config, args.overrides)
        summary = build_label_bank(cfg, args.labels, args.out, checkpoint=args.checkpoint)
        print(summary.format())
        return EXIT_OK

    return run_job(body)
