"""Label bank throughput: labels/s of one actor's `LabelEmbedder`, batched vs one at a time,
for each backend that can run here (hf always; vllm when it is installed).

Each run starts from empty attribute caches, so every label is generated, teacher-forced and
encoded. Model construction and one warm-up batch are not timed (an actor pays them once). Run from the repository root:

    .venv/bin/python -m bench.bench_label_bank --labels 1000
    .venv/bin/python -m bench.bench_label_bank --set model.llm=smollm2 --labels 200
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import time
from pathlib import Path

import torch

from ovml_core.config import Config
from ovml_core.label_embedder import LabelEmbedder
from ovml_core.model import create_model

REPO = Path(__file__).resolve().parents[1]
ADJECTIVES = [
    "red", "small", "old", "wet", "fast", "wooden", "broken", "happy", "night", "winter",
    "street", "indoor", "giant", "tiny", "noisy", "empty", "crowded", "frozen", "burning", "flying",
    "sleeping", "dancing", "baby", "wild", "rusty",
]  # fmt: skip
NOUNS = [
    "dog", "cat", "car", "bicycle", "boat", "horse", "kitchen", "forest", "beach", "guitar",
    "train", "bridge", "garden", "market", "robot", "bird", "river", "tent", "truck", "clock",
    "piano", "mountain", "skateboard", "umbrella", "parade", "volcano", "football", "ladder",
    "candle", "waterfall", "airport", "library", "snowman", "tractor", "kite", "castle", "rabbit",
    "bakery", "subway", "lighthouse",
]  # fmt: skip


def synthetic_labels(count: int) -> list[str]:
    pairs = itertools.product(ADJECTIVES, NOUNS)
    labels = [f"{a} {n}" for a, n in itertools.islice(pairs, count)]
    if len(labels) < count:
        raise SystemExit(f"at most {len(ADJECTIVES) * len(NOUNS)} synthetic labels")
    return labels


def labels_per_s(embedder: LabelEmbedder, labels: list[str], batch_size: int) -> float:
    embedder.model.labels.refresh()  # nothing cached: every label is generated again
    started = time.perf_counter()
    for i in range(0, len(labels), batch_size):
        embedder.embed(labels[i : i + batch_size])
    return len(labels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, help="default: label_bank.batch_size")
    parser.add_argument("--threads", type=int, help="default: label_bank.torch_threads")
    args = parser.parse_args()
    cfg = Config.from_yaml(args.config, args.overrides)
    batch_size = args.batch_size or cfg.label_bank.batch_size
    threads = args.threads or cfg.label_bank.torch_threads
    torch.set_num_threads(threads)
    labels = synthetic_labels(args.labels)
    backends = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(cfg.model, device)
    print(
        f"{len(labels)} labels, model.llm={cfg.model.llm}, mode={cfg.model.label_encoder}, "
        f"M={cfg.model.num_attributes}, device={device}, {threads} threads; "
        f"backends: {', '.join(backends)}"
    )
    results = {}
    for backend in backends:
        embedder = LabelEmbedder(model, backend, cfg.label_bank.vllm_gpu_memory_utilization)
        labels_per_s(embedder, labels[:batch_size], batch_size)  # warm-up: first calls are slow
        batched = labels_per_s(embedder, labels, batch_size)
        single = labels_per_s(embedder, labels, 1)
        results[backend] = batched
        print(
            f"{backend:5s} batch {batch_size:3d}: {batched:8.1f} labels/s | one at a time: "
            f"{single:7.1f} labels/s | batched / one-at-a-time: {batched / single:5.1f}x"
        )
    if "vllm" in results:
        print(f"vllm / hf (batched): {results['vllm'] / results['hf']:.2f}x")


if __name__ == "__main__":
    main()
