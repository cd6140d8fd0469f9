"""Capacity model of the nightly tagging job: nodes, node-hours and cost for N videos a night.

Every video costs decode time on CPU cores (PyAV, `ovml_core.video.sample_frames`: one core per
decode task) and one T-frame clip through the video encoder on a GPU. The two stages run at the
same time on a Ray cluster, so the job needs enough cores AND enough GPUs for the window:

    cores = videos * decode_core_s(length, mode) / (window_s * busy)
    gpus  = videos / (clips_per_gpu_s * window_s * busy)

Which figures are measured and which projected is carried with each figure (`Figure.source`)
and printed by `ovml plan`. The defaults: decode costs measured on the development CPU
(BENCHMARKS.md, "GPU readiness / scaling"); encode clips/s per GPU a PROJECTION from the
analytic FLOPs of the video encoder, a datasheet bf16 peak and an assumed utilisation, until
`bench/gpu_check.sh` has measured it (`--measurements results.json` then replaces both).

    ovml plan --videos 2000000 --hours 8 --minutes-per-video 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA datasheets, TFLOP/s. Longer names
# first: "H100 PCIe" must not match "H100".
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
# Share of peak a ViT-B/16 bf16 inference forward is assumed to reach (not measured).
ASSUMED_UTILISATION = 0.4
DEFAULT_GPU = "H200"


def bf16_peak_tflops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of a CUDA device name, None when unknown."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def video_encoder_flops(
    vision_cfg: dict, embed_dim: int, num_frames: int, temporal: str = "none"
) -> int:
    """Forward FLOPs of one T-frame clip through the video encoder (ovml_core.vision), counted
    as torch.utils.flop_counter counts them: 2 per multiply-add of matmuls, convolutions and
    attention; norms, softmax and activations are left out (a few percent).

    `vision_cfg` is open_clip's (image_size, patch_size, width, layers, mlp_ratio);
    every block carries the temporal branch.
    """
    size, patch = vision_cfg["image_size"], vision_cfg["patch_size"]
    width, layers = vision_cfg["width"], vision_cfg["layers"]
    mlp = round(width * vision_cfg.get("mlp_ratio", 4.0))
    patches = (size // patch) ** 2
    n = patches + 1  # with the class token
    t = num_frames
    patch_embed = 2 * patches * (3 * patch * patch) * width
    # q, k, v and output projections; scores and weighted sum; the MLP.
    block = 2 * n * width * 4 * width + 4 * n * n * width + 2 * 2 * n * width * mlp
    per_frame = patch_embed + layers * block + 2 * width * embed_dim
    branch = 0
    if temporal == "divided":  # attention over the T frames at each of the n positions
        branch = 2 * n * t * width * 4 * width + 4 * n * t * t * width
    elif temporal == "neighbor":  # a second attention, over the keys of frames t-1, t, t+1
        branch = t * 4 * n * (3 * n) * width
    return t * per_frame + layers * branch


def projected_clips_per_gpu_s(
    flops_per_clip: float, peak_tflops: float, utilisation: float = ASSUMED_UTILISATION
) -> float:
    return peak_tflops * 1e12 * utilisation / flops_per_clip


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # "measured: ..." or "projection: ..."


# CPU seconds of one single-threaded sample_frames call per video (T=8 at 224, 1280x720 h264
# 30 fps GOP 250, ~1.7 Mbit/s moving texture), measured on the development machine's CPU while
# other jobs shared its 2 cores (bench/gpu_bench.py, BENCHMARKS.md). (length_s, seconds) per
# mode; sequential was measured up to 60 s only, and grows with length beyond.
MEASURED_DECODE_S = {
    "sequential": ((10.0, 0.656), (60.0, 3.737)),
    "seek": ((10.0, 2.203), (60.0, 1.840), (300.0, 1.753)),
    "exact": ((10.0, 0.664), (60.0, 1.745), (300.0, 1.663)),
    # bench/bench_decode.py, 1280x720 h264 25 fps GOP 250 (T / frames per CPU-s). Up to about
    # 80 s the keyframes (10 s apart) are too sparse for 8 segments and it samples exactly.
    "keyframe": ((10.0, 0.257), (60.0, 0.948), (300.0, 0.251)),
    # On those clips auto makes keyframe's choices (exact at 10 s: short; at 60 s: keyframes
    # too sparse; at 5 min keyframes at most 5 s from centres 37.5 s apart, within a quarter
    # segment, predicted 4.4x cheaper), so it does the same work. With keyframes ~1 s apart it
    # stays exact (predicted 1.4x, under its 2x margin): plan such video with exact.
    "auto": ((10.0, 0.257), (60.0, 0.948), (300.0, 0.251)),
}


def measured_decode_source(mode: str) -> str:
    bench = "bench/bench_decode.py" if mode in ("keyframe", "auto") else "bench/gpu_bench.py"
    return f"measured: dev CPU (2 shared cores), 720p h264, {bench}, see BENCHMARKS.md"


@dataclass(frozen=True)
class DecodeCost:
    """Core-seconds per video as a function of its length: piecewise linear through measured
    points, extended along the last segment."""

    points: tuple[tuple[float, float], ...]  # (length_s, seconds), sorted by length
    source: str

    def seconds(self, length_s: float) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1] * length_s / pts[0][0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            if length_s <= x1 or (x1, y1) == pts[-1]:
                return max(0.0, y0 + (y1 - y0) * (length_s - x0) / (x1 - x0))
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Node:
    gpus: int
    cpus: int
    price_per_hour: float | None = None


@dataclass(frozen=True)
class Plan:
    videos: int
    hours: float
    length_s: float
    decode_core_s: Figure  # per video
    clips_per_gpu_s: Figure
    cores_needed: float
    gpus_needed: float
    gpu_only_nodes: int  # GPU nodes alone, decoding on their own cores
    split_gpu_nodes: int  # GPU nodes for encoding ...
    split_cpu_nodes: int  # ... plus CPU-only nodes for the decode their cores cannot do
    gpu_node: Node
    cpu_node: Node

    @property
    def bottleneck(self) -> str:
        """Per GPU node: the stage its own cores or GPUs cannot keep up with."""
        decode_cores = decode_cores_per_node(self.gpu_node)
        decode_rate = decode_cores / self.decode_core_s.value
        encode_rate = self.gpu_node.gpus * self.clips_per_gpu_s.value
        return "decode (CPU)" if decode_rate < encode_rate else "encode (GPU)"

    @property
    def cores_per_gpu(self) -> float:
        """Decode cores it takes to feed one GPU: the CPU:GPU ratio of a balanced cluster."""
        return self.clips_per_gpu_s.value * self.decode_core_s.value

    def cost(self, gpu_nodes: int, cpu_nodes: int) -> float | None:
        prices = (self.gpu_node.price_per_hour, self.cpu_node.price_per_hour)
        if prices[0] is None or (cpu_nodes and prices[1] is None):
            return None
        return self.hours * (gpu_nodes * prices[0] + cpu_nodes * (prices[1] or 0.0))


ENCODE_CPUS_PER_GPU = 1  # tag.encode_num_cpus: the encode actor's host thread


def decode_cores_per_node(node: Node) -> int:
    return node.cpus - node.gpus * ENCODE_CPUS_PER_GPU


def plan_capacity(
    videos: int,
    hours: float,
    length_s: float,
    decode: DecodeCost,
    clips_per_gpu_s: Figure,
    gpu_node: Node,
    cpu_node: Node,
    busy: float = 0.8,
) -> Plan:
    """Nodes for `videos` of `length_s` each within `hours`, every resource busy at most
    `busy` of the time (headroom for stragglers, retries and scale-up)."""
    if videos < 0 or hours <= 0 or length_s <= 0 or not 0 < busy <= 1:
        raise ValueError("need videos >= 0, hours > 0, length > 0 and 0 < busy <= 1")
    if decode_cores_per_node(gpu_node) < 1 or gpu_node.gpus < 1 or cpu_node.cpus < 1:
        raise ValueError("a GPU node needs >= 1 GPU and a spare core; a CPU node >= 1 core")
    window_s = hours * 3600 * busy
    core_s = decode.seconds(length_s)
    cores = videos * core_s / window_s
    gpus = videos / (clips_per_gpu_s.value * window_s)
    per_node_cores = decode_cores_per_node(gpu_node)
    split_gpu = math.ceil(gpus / gpu_node.gpus)
    spare_cores = split_gpu * per_node_cores
    return Plan(
        videos=videos,
        hours=hours,
        length_s=length_s,
        decode_core_s=Figure(core_s, decode.source),
        clips_per_gpu_s=clips_per_gpu_s,
        cores_needed=cores,
        gpus_needed=gpus,
        gpu_only_nodes=max(split_gpu, math.ceil(cores / per_node_cores)),
        split_gpu_nodes=split_gpu,
        split_cpu_nodes=math.ceil(max(0.0, cores - spare_cores) / cpu_node.cpus),
        gpu_node=gpu_node,
        cpu_node=cpu_node,
    )


def format_plan(plan: Plan) -> str:
    g, c = plan.gpu_node, plan.cpu_node

    def money(gpu_nodes: int, cpu_nodes: int) -> str:
        cost = plan.cost(gpu_nodes, cpu_nodes)
        return f", ${cost:,.0f} a night" if cost is not None else ""

    lines = [
        f"{plan.videos:,} videos of {plan.length_s / 60:g} min in {plan.hours:g} h",
        f"  decode   {plan.decode_core_s.value:.3f} core-s per video  [{plan.decode_core_s.source}]",
        f"  encode   {plan.clips_per_gpu_s.value:,.0f} clips/s per GPU  "
        f"[{plan.clips_per_gpu_s.source}]",
        f"  needs    {plan.cores_needed:,.1f} decode cores and {plan.gpus_needed:,.2f} GPUs busy "
        "all night",
        f"  balance  one GPU keeps {plan.cores_per_gpu:,.0f} decode cores busy",
        f"  bottleneck of a {g.gpus}-GPU/{g.cpus}-core node: {plan.bottleneck}",
        f"  plan A   {plan.gpu_only_nodes} GPU nodes ({g.gpus} GPU, {g.cpus} cores each)"
        f"{money(plan.gpu_only_nodes, 0)}",
        f"  plan B   {plan.split_gpu_nodes} GPU nodes + {plan.split_cpu_nodes} CPU nodes "
        f"({c.cpus} cores each){money(plan.split_gpu_nodes, plan.split_cpu_nodes)}",
    ]
    if g.price_per_hour is None:
        lines.append("  (give --gpu-node-price and --cpu-node-price, $/h, for the cost)")
    return "\n".join(lines)


def measured_figures(path: str | Path, mode: str) -> tuple[DecodeCost | None, Figure | None]:
    """Decode cost and best encoder clips/s from a `bench/gpu_bench.py` JSON, where present."""
    results = json.loads(Path(path).read_text())
    device = results["environment"]["device"]
    decode = None
    rows = sorted(
        (r["length_s"], r["seconds_per_video"])
        for r in results.get("decode", [])
        if r["mode"] == mode
    )
    if rows:
        decode = DecodeCost(tuple(rows), f"measured: {device}, {path}")
    encode = None
    encoder = results.get("encoder")
    if encoder and encoder["rows"]:
        best = max(encoder["rows"], key=lambda r: r["clips_per_s"])
        encode = Figure(
            best["clips_per_s"],
            f"measured: {device}, {best['variant']}, batch {best['batch']}, {path}",
        )
    return decode, encode


def default_figures(mode: str, gpu: str, utilisation: float) -> tuple[DecodeCost, Figure]:
    """Measured decode costs of this project's dev CPU; projected ViT-B/16 encode rate."""
    vit_b16 = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12}
    flops = video_encoder_flops(vit_b16, 512, num_frames=8, temporal="divided")
    peak = bf16_peak_tflops(gpu)
    if peak is None:
        raise ValueError(f"no bf16 peak known for GPU {gpu!r}; known: {known_gpus()}")
    clips = projected_clips_per_gpu_s(flops, peak, utilisation)
    source = (
        f"PROJECTION: ViT-B/16 T=8 divided, {flops / 1e9:.0f} GFLOP/clip, {gpu} bf16 peak "
        f"{peak:g} TFLOP/s x assumed {utilisation:.0%} utilisation"
    )
    decode = DecodeCost(MEASURED_DECODE_S[mode], measured_decode_source(mode))
    return decode, Figure(clips, source)


def known_gpus() -> str:
    return ", ".join(name for name, _ in BF16_PEAK_TFLOPS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ovml plan",
        description="Nodes and cost for tagging N videos a night (capacity model; see "
        "docs/scaling.md). Figures are labelled measured or PROJECTION.",
    )
    parser.add_argument("--videos", type=int, required=True, help="videos per night")
    parser.add_argument("--hours", type=float, default=8.0, help="nightly window")
    parser.add_argument("--minutes-per-video", type=float, default=5.0, help="mean length")
    parser.add_argument("--mode", choices=sorted(MEASURED_DECODE_S), default="auto")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"for the projection ({known_gpus()})")
    parser.add_argument("--utilisation", type=float, default=ASSUMED_UTILISATION)
    parser.add_argument("--measurements", help="bench/gpu_bench.py JSON with measured figures")
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--cpus-per-node", type=int, default=16, help="of a GPU node")
    parser.add_argument("--cpu-node-cpus", type=int, default=16, help="of a CPU-only node")
    parser.add_argument("--gpu-node-price", type=float, help="$ per hour of a GPU node")
    parser.add_argument("--cpu-node-price", type=float, help="$ per hour of a CPU-only node")
    parser.add_argument("--busy", type=float, default=0.8, help="target busy share of a node")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        decode, encode = default_figures(args.mode, args.gpu, args.utilisation)
        if args.measurements:
            measured_decode, measured_encode = measured_figures(args.measurements, args.mode)
            decode, encode = measured_decode or decode, measured_encode or encode
        plan = plan_capacity(
            args.videos,
            args.hours,
            args.minutes_per_video * 60,
            decode,
            encode,
            Node(args.gpus_per_node, args.cpus_per_node, args.gpu_node_price),
            Node(0, args.cpu_node_cpus, args.cpu_node_price),
            busy=args.busy,
        )
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0
