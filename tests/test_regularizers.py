import pytest
import torch
from torch import nn

from ovml_core.regularizers import (
    distillation_loss,
    draw_alpha,
    interpolate_weights,
    interpolated_loss,
    l2sp_penalty,
    reference_state,
)


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
