"""The capacity model behind `ovml plan`: analytic encoder FLOPs against torch's FLOP counter,
decode-cost interpolation, node arithmetic, the CLI's labels; and the tagging run's per-stage
report arithmetic."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ovml_core.capacity import (
    DecodeCost,
    Figure,
    Node,
    bf16_peak_tflops,
    main,
    plan_capacity,
    projected_clips_per_gpu_s,
    video_encoder_flops,
)
from ovml_core.clip import create_clip, register_model_configs
from ovml_core.vision import VideoEncoder
from pipeline.stage_meter import StageReport


@pytest.mark.parametrize("temporal", ["none", "divided", "neighbor"])
def test_analytic_flops_equal_torchs_flop_counter(temporal):
    register_model_configs()
    cfg = open_clip.get_model_config("ovml-tiny")
    frames = 4
    encoder = VideoEncoder(create_clip("ovml-tiny").visual, temporal, num_frames=frames)
    size = cfg["vision_cfg"]["image_size"]
    counter = FlopCounterMode(display=False)
    # Autograd on: nn.MultiheadAttention's no-grad fast path is not counted; and attention in
    # plain matmuls, which the counter sees on any device.
    with counter, sdpa_kernel(SDPBackend.MATH):
        encoder(torch.zeros(1, frames, 3, size, size))
    expected = video_encoder_flops(cfg["vision_cfg"], cfg["embed_dim"], frames, temporal)
    assert counter.get_total_flops() == expected


def test_vit_b16_frame_is_the_known_17_6_gmacs():
    cfg = open_clip.get_model_config("ViT-B-16")
    flops = video_encoder_flops(cfg["vision_cfg"], cfg["embed_dim"], num_frames=1)
    assert 17.4e9 < flops / 2 < 17.8e9
    divided = video_encoder_flops(cfg["vision_cfg"], cfg["embed_dim"], 8, "divided")
    # The divided branch adds a third to the block's linear layers.
    assert 1.3 < divided / (8 * flops) < 1.4


def test_bf16_peaks_match_the_specific_name_first():
    assert bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("Tesla T4") is None
    assert projected_clips_per_gpu_s(1e12, 1000.0, 0.5) == pytest.approx(500.0)


def test_decode_cost_interpolates_and_extends_the_last_segment():
    cost = DecodeCost(((10.0, 1.0), (300.0, 5.0)), "measured")
    assert cost.seconds(10.0) == pytest.approx(1.0)
    assert cost.seconds(155.0) == pytest.approx(3.0)
    assert cost.seconds(590.0) == pytest.approx(9.0)
    assert cost.seconds(5.0) == pytest.approx(1.0 - 4.0 / 290 * 5)
    three = DecodeCost(((10.0, 1.0), (60.0, 2.0), (300.0, 2.0)), "measured")
    assert three.seconds(35.0) == pytest.approx(1.5) and three.seconds(1000.0) == 2.0
    assert DecodeCost(((10.0, 2.0),), "m").seconds(30.0) == pytest.approx(6.0)


GPU_NODE = Node(gpus=1, cpus=3, price_per_hour=10.0)


def _plan(decode_s: float, busy: float = 1.0, gpu_node: Node = GPU_NODE):
    return plan_capacity(
        videos=7200,
        hours=1.0,
        length_s=60.0,
        decode=DecodeCost(((60.0, decode_s),), "measured: test"),
        clips_per_gpu_s=Figure(1.0, "projection: test"),
        gpu_node=gpu_node,
        cpu_node=Node(gpus=0, cpus=4, price_per_hour=1.0),
        busy=busy,
    )


def test_plan_sizes_decode_cores_and_gpus_for_the_window():
    # 7200 videos in 3600 s: 2 videos/s. 2 core-s each -> 4 cores; 1 clip/s per GPU -> 2 GPUs.
    balanced = _plan(2.0)
    assert balanced.cores_needed == pytest.approx(4.0)
    assert balanced.gpus_needed == pytest.approx(2.0)
    # A GPU node decodes on 3 - 1 cores (one feeds its GPU): 2 nodes cover both.
    assert (balanced.gpu_only_nodes, balanced.split_gpu_nodes, balanced.split_cpu_nodes) == (
        2,
        2,
        0,
    )
    heavy = _plan(5.0)  # 10 cores: decode is the bottleneck of a GPU node
    assert heavy.bottleneck == "decode (CPU)"
    assert heavy.gpu_only_nodes == 5
    assert (heavy.split_gpu_nodes, heavy.split_cpu_nodes) == (2, 2)  # (10 - 2*2) / 4 cores
    assert heavy.cost(5, 0) == pytest.approx(50.0)
    assert heavy.cost(2, 2) == pytest.approx(22.0)
    assert _plan(0.5).bottleneck == "encode (GPU)"
    assert heavy.cores_per_gpu == pytest.approx(5.0)  # 1 clip/s per GPU x 5 core-s per video


def test_headroom_scales_the_need_and_impossible_nodes_fail():
    assert _plan(2.0, busy=0.5).cores_needed == pytest.approx(2 * _plan(2.0).cores_needed)
    assert _plan(2.0, busy=0.5).gpus_needed == pytest.approx(4.0)
    with pytest.raises(ValueError, match="spare core"):
        _plan(2.0, gpu_node=Node(1, 1))  # its one core feeds the GPU, none left to decode
    with pytest.raises(ValueError):
        _plan(2.0, busy=0.0)


def test_plan_command_labels_projections_and_uses_measurements(tmp_path, capsys):
    assert main(["--videos", "1000000", "--hours", "8", "--minutes-per-video", "5"]) == 0
    printed = capsys.readouterr().out
    assert "1,000,000 videos of 5 min in 8 h" in printed
    assert "PROJECTION: ViT-B/16" in printed and "H200" in printed
    assert "measured: dev CPU" in printed
    assert "--gpu-node-price" in printed

    results = {
        "environment": {"device": "NVIDIA H200"},
        "decode": [
            {"length_s": 10.0, "mode": "exact", "seconds_per_video": 0.1},
            {"length_s": 300.0, "mode": "exact", "seconds_per_video": 0.4},
        ],
        "encoder": {
            "rows": [
                {"variant": "eager", "batch": 32, "clips_per_s": 800.0},
                {"variant": "compile", "batch": 64, "clips_per_s": 1200.0},
            ]
        },
    }
    (tmp_path / "r.json").write_text(json.dumps(results))
    argv = ["--videos", "100", "--mode", "exact", "--measurements", str(tmp_path / "r.json")]
    assert main([*argv, "--gpu-node-price", "5", "--cpu-node-price", "1"]) == 0
    printed = capsys.readouterr().out
    assert "PROJECTION" not in printed
    assert "1,200 clips/s per GPU  [measured: NVIDIA H200, compile, batch 64" in printed
    assert "0.400 core-s per video  [measured: NVIDIA H200" in printed
    assert "$40 a night" in printed  # 1 GPU node for 8 h at $5

    assert main(["--videos", "10", "--gpu", "T4"]) == 2
    assert "no bf16 peak known" in capsys.readouterr().err


def test_stage_report_names_the_slower_stage():
    report = StageReport(
        wall_s=10.0,
        videos=100,
        decode_busy_s=50.0,  # 0.5 s per video on 10 slots: 20 videos/s
        decode_slots=10,
        encode_busy_s=2.0,  # 20 ms per clip on one actor: 50 clips/s
        encode_actors=1,
        encode_device="cuda",
    )
    assert report.videos_per_s == pytest.approx(10.0)
    assert report.decode_capacity == pytest.approx(20.0)
    assert report.encode_capacity == pytest.approx(50.0)
    assert report.bottleneck == "decode (CPU)"
    text = "\n".join(report.format_lines())
    assert "capacity 20.00 videos/s on 10 slots" in text and "bottleneck decode (CPU)" in text
    report.decode_slots = 40
    assert report.bottleneck == "encode"


def test_plan_per_decode_mode_keyframe_needs_fewer_cores_for_long_videos():
    from ovml_core.capacity import default_figures

    cores = {}
    for mode in ("exact", "keyframe"):
        decode, encode = default_figures(mode, "H200", 0.4)
        plan = plan_capacity(10**6, 8, 300, decode, encode, Node(1, 16), Node(0, 16))
        cores[mode] = plan.cores_needed
        assert ("bench_decode" in plan.decode_core_s.source) == (mode == "keyframe")
    assert cores["keyframe"] < cores["exact"] / 4
