from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ovml_core.checkpoint import WEIGHTS_FILE
from ovml_core.config import Config, ConfigError
from ovml_core.finetune import (
    Objective,
    StudentForward,
    check_regularizers,
    export_model,
    set_trainable,
)
from ovml_core.losses import sample_labels
from ovml_core.model import create_model
from ovml_core.regularizers import (
    distillation_loss,
    draw_alpha,
    interpolate_weights,
    interpolated_loss,
    l2sp_penalty,
    patched,
    reference_state,
)
from tests.conftest import TINY_CONFIG


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    net[1].weight.requires_grad_(False)  # a frozen part
    return net


def test_distillation_loss_values_and_frozen_teacher():
    teacher = torch.randn(5, 16, requires_grad=True)
    assert distillation_loss(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    expected = ((1 - 0.0) + (1 - 2**-0.5)) / 2
    assert distillation_loss(a, b).item() == pytest.approx(expected)
    student = torch.randn(5, 16, requires_grad=True)
    distillation_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_reference_state_copies_only_trainable_parameters():
    net = _net(0)
    ref = reference_state(net)
    assert "1.weight" not in ref and set(ref) == {
        "0.weight",
        "0.bias",
        "1.bias",
        "2.weight",
        "2.bias",
    }
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(ref["0.weight"], net[0].weight)  # a copy, not a view


def test_l2sp_is_squared_distance_with_zero_gradient_at_reference():
    net = _net(0)
    ref = reference_state(net)
    penalty = l2sp_penalty(net, ref)
    penalty.backward()
    assert penalty.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters() if p.requires_grad)

    with torch.no_grad():
        net[0].weight.add_(0.5)  # 32 entries moved by 0.5 -> 32 * 0.25
        net[1].weight.add_(10.0)  # frozen: not penalised
    net.zero_grad()
    penalty = l2sp_penalty(net, ref)
    penalty.backward()
    assert penalty.item() == pytest.approx(8.0)
    torch.testing.assert_close(net[0].weight.grad, torch.full((8, 4), 1.0))  # 2 * 0.5


def test_l2sp_skips_new_parameters_and_rejects_mismatches():
    net = _net(0)
    ref = {"0.weight": net[0].weight.detach().clone()}
    with torch.no_grad():
        net[2].weight.add_(1.0)  # no reference value: a parameter new to fine-tuning
    assert l2sp_penalty(net, ref).item() == 0.0
    with pytest.raises(ValueError, match="none of the module"):
        l2sp_penalty(net, {"visual.proj": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"0\.weight: shape"):
        l2sp_penalty(net, {"0.weight": torch.zeros(4, 8)})


def test_interpolate_weights_is_exact_at_both_ends_and_linear_between():
    pre, tuned = _net(0).state_dict(), _net(1).state_dict()
    at_one = interpolate_weights(pre, tuned, 1.0)
    at_zero = interpolate_weights(pre, tuned, 0.0)
    for name in tuned:
        assert torch.equal(at_one[name], pre[name]), name
        assert torch.equal(at_zero[name], tuned[name]), name
    mid = interpolate_weights(pre, tuned, 0.25)
    for name in tuned:
        torch.testing.assert_close(mid[name], 0.25 * pre[name] + 0.75 * tuned[name])


def test_interpolate_weights_keeps_new_entries_and_checks_inputs():
    pre = {"w": torch.zeros(3)}
    tuned = {"w": torch.ones(3), "temporal.proj": torch.ones(2), "steps": torch.tensor(7)}
    merged = interpolate_weights(pre, tuned, 0.5)
    torch.testing.assert_close(merged["w"], torch.full((3,), 0.5))
    assert torch.equal(merged["temporal.proj"], tuned["temporal.proj"])
    assert torch.equal(merged["steps"], tuned["steps"])
    with pytest.raises(ValueError, match="alpha"):
        interpolate_weights(pre, tuned, 1.5)
    with pytest.raises(ValueError, match="lacks"):
        interpolate_weights({"other": torch.zeros(1)}, tuned, 0.5)
    with pytest.raises(ValueError, match="w: pretrained"):
        interpolate_weights({"w": torch.zeros(4)}, tuned, 0.5)


def test_interpolated_loss_at_the_ends_and_loads_back_like_patched_weights():
    net = _net(1)
    pretrained = reference_state(_net(0))
    x = torch.randn(6, 4)

    def loss():
        return net(x).pow(2).mean()

    torch.testing.assert_close(interpolated_loss(net, pretrained, 0.0, loss), loss())
    patched = _net(1)
    patched.load_state_dict(interpolate_weights(pretrained, net.state_dict(), 0.3))
    expected = patched(x).pow(2).mean()
    torch.testing.assert_close(interpolated_loss(net, pretrained, 0.3, loss), expected)


def test_interpolated_loss_gradient_is_scaled_and_module_restored():
    net = nn.Linear(3, 1, bias=False)
    before = net.weight.detach().clone()
    pretrained = {"weight": torch.zeros(1, 3)}
    x = torch.tensor([[1.0, 2.0, 3.0]])
    alpha = 0.25
    # Loss is linear in the weight: d/dW of x @ ((1 - alpha) W)^T = (1 - alpha) x.
    interpolated_loss(net, pretrained, alpha, lambda: net(x).sum()).backward()
    torch.testing.assert_close(net.weight.grad, (1 - alpha) * x)
    assert isinstance(net.weight, nn.Parameter) and torch.equal(net.weight, before)


def test_draw_alpha_range_and_reproducibility():
    g = torch.Generator().manual_seed(3)
    draws = [draw_alpha(0.4, g) for _ in range(200)]
    assert all(0.0 <= a <= 0.4 for a in draws) and max(draws) > 0.3
    assert draw_alpha(0.4, torch.Generator().manual_seed(3)) == draws[0]
    with pytest.raises(ValueError, match="max_alpha"):
        draw_alpha(2.0)


def test_patched_interpolates_named_parameters_and_restores_them():
    net, pretrained = _net(1), {"0.weight": _net(0)[0].weight.detach().clone()}
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    with patched(net, pretrained, 0.25):
        torch.testing.assert_close(
            net[0].weight, 0.25 * pretrained["0.weight"] + 0.75 * before["0.weight"]
        )
        assert torch.equal(net[2].weight, before["2.weight"])  # not named: new, untouched
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())


# ---------------------------------------------------------------- through the trainer

BASE = ["green", "left", "red", "right"]
TARGETS = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]])


def _trainer(**train):
    """A tiny model (CLIP vision trainable), its objective, and 2 random clips."""
    settings = {"lr_clip": 1e-3, **train}
    overrides = [f"train.{k}={v}" for k, v in settings.items() if k != "label_encoder"]
    if "label_encoder" in train:
        overrides.append(f"model.label_encoder={train['label_encoder']}")
    cfg = Config.from_yaml(TINY_CONFIG, overrides)
    model = create_model(cfg.model)
    set_trainable(model, cfg.train)
    objective = Objective(model, cfg.train, BASE)
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, model.num_frames, 32, 32, 3), dtype=torch.uint8)
    return cfg, model, objective, frames


def _fine_tune(model, clip_step: float = 0.05, temporal_step: float = 0.3) -> None:
    """Move pretrained CLIP weights and the zero-initialised temporal branch, as training
    would (deterministic)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.visual.clip_parameters():
            param.add_(clip_step * torch.randn_like(param))
        for param in model.visual.temporal_parameters():
            param.add_(temporal_step * torch.randn_like(param))


def _total(objective, model, frames, **weights) -> torch.Tensor:
    """The objective's total loss with some regularizer weights replaced, on a fixed draw."""
    objective.train = replace(objective.train, **weights)
    generator = torch.Generator().manual_seed(0)
    return objective(StudentForward(model), model, frames, TARGETS, generator)["total"]


def _draws(objective, generator_seed: int = 0) -> tuple[list[str], torch.Tensor, float]:
    """The labels, targets and patch alpha the objective draws from `generator_seed`."""
    generator = torch.Generator().manual_seed(generator_seed)
    positives = [[BASE[j] for j in row.nonzero().flatten().tolist()] for row in TARGETS]
    labels, targets = sample_labels(positives, BASE, objective.train.negatives_per_batch, generator)
    return labels, targets, draw_alpha(generator=generator)


def test_patch_exports_interpolated_shared_weights_and_fine_tuned_new_ones(tmp_path):
    cfg, model, objective, _ = _trainer(regularizers="[patch]", patch_alpha=0.3)
    zero_shot = {n: p.detach().clone() for n, p in model.visual.visual.named_parameters()}
    _fine_tune(model)
    with torch.no_grad():
        model.labels.soft.prefix.add_(0.5)  # label side: new parameters too
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}

    exported = load_file(export_model(model, tmp_path / "model", objective) / WEIGHTS_FILE)

    shared = {f"visual.visual.{name}" for name in zero_shot}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert shared < trainable and any(n.startswith("visual.branches.") for n in trainable)
    alpha = cfg.train.patch_alpha  # the zero-shot weight: Ilharco et al.'s alpha is 1 - this
    for name in shared:
        pre, ft = zero_shot[name.removeprefix("visual.visual.")], tuned[name]
        assert not torch.equal(pre, ft), name
        assert torch.equal(exported[name], torch.lerp(ft, pre, alpha)), name
        torch.testing.assert_close(exported[name], alpha * pre + (1 - alpha) * ft)
    for name in trainable - shared:  # temporal branch, prefix, prompting, scale, bias
        assert torch.equal(exported[name], tuned[name]), name
    # Training continues from the fine-tuned weights, not the exported ones.
    assert all(torch.equal(p, tuned[n]) for n, p in model.named_parameters())


def test_patch_needs_trainable_clip_weights():
    cfg = Config.from_yaml(TINY_CONFIG, ["train.regularizers=[patch]", "train.lr_clip=0"])
    assert cfg.model.temporal == "divided"  # a temporal branch alone has no pretrained value
    with pytest.raises(ConfigError, match="train.regularizers: patch .* train.lr_clip"):
        check_regularizers(cfg.model, cfg.train)


def test_objective_adds_the_patch_loss_at_interpolated_clip_weights_only():
    _, model, objective, frames = _trainer(regularizers="[patch]", patch_loss_weight=0.0)
    _fine_tune(model)
    labels, targets, alpha = _draws(objective)
    assert 0.0 < alpha < 1.0
    with torch.no_grad(), patched(model.visual.visual, objective.pretrained_clip, alpha):
        # The temporal branch keeps its fine-tuned values inside the interpolated loss too.
        logits = model.logits(model.encode_video(frames), model.encode_labels(labels))
        at_alpha = objective.loss_fn(logits.float(), targets).item()
    difference = _total(objective, model, frames, patch_loss_weight=2.5) - _total(
        objective, model, frames, patch_loss_weight=0.5
    )
    assert difference.item() == pytest.approx(2.0 * at_alpha, rel=1e-5)


def test_objective_adds_the_l2sp_term():
    _, model, objective, frames = _trainer(regularizers="[l2sp]")
    _fine_tune(model, clip_step=0.0, temporal_step=0.3)  # new parameters: not penalised
    conv = model.visual.visual.conv1.weight
    with torch.no_grad():
        conv.add_(0.1)
    difference = _total(objective, model, frames, l2sp_weight=3.0) - _total(
        objective, model, frames, l2sp_weight=1.0
    )
    assert difference.item() == pytest.approx(2.0 * 0.1**2 * conv.numel(), rel=1e-4)


@pytest.mark.parametrize("label_encoder", ["soft", "prompt"])
def test_objective_adds_the_distill_term(label_encoder):
    _, model, objective, frames = _trainer(regularizers="[distill]", label_encoder=label_encoder)
    _fine_tune(model, clip_step=0.0)  # only the temporal branch moved: video differs
    labels, _, _ = _draws(objective)
    teacher = objective.teacher
    with torch.no_grad():
        video_term = distillation_loss(
            model.encode_video(frames), teacher.encode_video(frames)
        ).item()
        label_term = distillation_loss(
            model.encode_labels(labels), teacher.encode_labels(labels)
        ).item()
    difference = _total(objective, model, frames, distill_weight=2.0) - _total(
        objective, model, frames, distill_weight=0.5
    )
    assert video_term > 1e-4
    assert difference.item() == pytest.approx(1.5 * (video_term + label_term), rel=1e-4)
    if label_encoder == "prompt":
        # Student and teacher read the same prompt with the same frozen text tower: the label
        # term is zero, so with `prompt` labels `distill` regularizes the video features only.
        assert label_term == pytest.approx(0.0, abs=1e-6)
    else:
        assert label_term > 1e-6  # soft tokens move the labels away from the plain prompt
