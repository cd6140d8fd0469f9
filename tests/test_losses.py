import pytest
import torch

from ovml_core.losses import asymmetric_loss, bce_loss, sample_labels


def _logits_and_targets(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 9, generator=g) * 4
    targets = (torch.rand(6, 9, generator=g) < 0.3).float()
    return logits, targets


def test_bce_matches_definition():
    logits, targets = _logits_and_targets()
    p = torch.sigmoid(logits)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    torch.testing.assert_close(bce_loss(logits, targets), expected)


def test_asl_with_zero_gammas_and_clip_equals_bce_in_value_and_gradient():
    logits, targets = _logits_and_targets(1)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    asl = asymmetric_loss(a, targets, gamma_neg=0, gamma_pos=0, clip=0)
    bce = bce_loss(b, targets)
    asl.backward()
    bce.backward()
    torch.testing.assert_close(asl, bce)
    torch.testing.assert_close(a.grad, b.grad)


def test_asl_matches_reference_formula():
    logits, targets = _logits_and_targets(2)
    gamma_neg, gamma_pos, clip = 3.0, 1.0, 0.1
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0)
    pos = (1 - p) ** gamma_pos * p.log()
    neg = p_m**gamma_neg * (1 - p_m).log()
    expected = -(targets * pos + (1 - targets) * neg).mean()
    got = asymmetric_loss(logits, targets, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    torch.testing.assert_close(got, expected)


def test_asl_discards_easy_negatives_and_downweights_hard_ones():
    targets = torch.zeros(1, 2)
    easy = torch.tensor([[-5.0, -5.0]])  # p ~ 0.007 < clip
    assert asymmetric_loss(easy, targets).item() == 0.0
    hard = torch.tensor([[2.0, 2.0]])
    assert 0 < asymmetric_loss(hard, targets) < bce_loss(hard, targets)


def test_asl_finite_for_extreme_logits():
    logits = torch.tensor([[80.0, -80.0]], requires_grad=True)
    targets = torch.tensor([[0.0, 1.0]])
    loss = asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(80.0, rel=1e-3)


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match="differ"):
        bce_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="clip"):
        asymmetric_loss(torch.zeros(1, 1), torch.zeros(1, 1), clip=1.0)
    with pytest.raises(ValueError, match="gamma"):
        asymmetric_loss(torch.zeros(1, 1), torch.zeros(1, 1), gamma_neg=-1)


BASE = [f"base{i}" for i in range(20)]


def test_sample_labels_positives_then_negatives_from_base_only():
    batch = [["base3", "novel_cat"], ["base1"], ["novel_dog", "base3"], []]
    labels, targets = sample_labels(batch, BASE, 5, torch.Generator().manual_seed(0))
    assert labels[:2] == ["base1", "base3"]  # every batch positive, in vocabulary order
    assert len(labels) == 7 and len(set(labels)) == 7
    assert set(labels) <= set(BASE)  # novel labels never appear
    assert targets.shape == (4, 7)
    expected = torch.zeros(4, 7)
    expected[0, 1] = expected[1, 0] = expected[2, 1] = 1
    torch.testing.assert_close(targets, expected)


def test_sample_labels_never_yields_novel_labels_over_many_draws():
    novel = {f"novel{i}" for i in range(10)}
    g = torch.Generator().manual_seed(1)
    seen = set()
    for step in range(50):
        batch = [[BASE[step % 20], f"novel{step % 10}"], [f"novel{(step + 3) % 10}"]]
        labels, targets = sample_labels(batch, BASE, 8, g)
        seen.update(labels)
        assert not novel & set(labels)
        assert targets[1].sum() == 0  # a video with only novel labels has no positive
    assert seen == set(BASE)  # negatives do cover the whole base vocabulary


def test_sample_labels_is_reproducible_and_caps_negatives():
    batch = [["base0"]]
    first = sample_labels(batch, BASE, 4, torch.Generator().manual_seed(7))[0]
    again = sample_labels(batch, BASE, 4, torch.Generator().manual_seed(7))[0]
    assert first == again
    labels, targets = sample_labels(batch, BASE, 100, torch.Generator().manual_seed(7))
    assert sorted(labels) == sorted(BASE) and targets.sum() == 1


def test_sample_labels_rejects_bad_input():
    with pytest.raises(ValueError, match="string"):
        sample_labels(["base0"], BASE, 1)
    with pytest.raises(ValueError, match="duplicate"):
        sample_labels([["a"]], ["a", "a"], 1)
    with pytest.raises(ValueError, match="num_negatives"):
        sample_labels([["base0"]], BASE, -1)
    with pytest.raises(ValueError, match="no base-vocabulary positive"):
        sample_labels([["novel"]], BASE, 0)


def test_bce_gradient_pushes_scores_towards_targets():
    logits, targets = _logits_and_targets(3)
    logits.requires_grad_()
    bce_loss(logits, targets).backward()
    expected = (torch.sigmoid(logits) - targets) / targets.numel()
    torch.testing.assert_close(logits.grad, expected.detach())
