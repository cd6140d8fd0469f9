"""Training losses over a batch's label set, and the sampler that builds that label set.

Each (video, label) pair is an independent yes/no: the losses take logits and 0/1 targets of
shape [B, L] and average over all pairs. Training only ever sees base-vocabulary labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_pairs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over all (video, label) pairs."""
    _check_pairs(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
) -> torch.Tensor:
    """Asymmetric loss (Ben-Baruch et al., 2021), mean over all (video, label) pairs.

    Positives: -(1 - p)^gamma_pos * log(p). Negatives: -p_m^gamma_neg * log(1 - p_m) with the
    shifted probability p_m = max(p - clip, 0), which discards easy negatives entirely. Sampled
    negatives far outnumber positives, so down-weighting them keeps positives from drowning.
    With both gammas and clip at 0 this is exactly `bce_loss`.
    """
    _check_pairs(logits, targets)
    if gamma_neg < 0 or gamma_pos < 0:
        raise ValueError(f"gammas must be >= 0, got gamma_neg={gamma_neg}, gamma_pos={gamma_pos}")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"clip: must be in [0, 1), got {clip}")
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    log_pos = F.logsigmoid(logits)
    if clip > 0:
        prob_neg = (prob - clip).clamp(min=0)
        log_neg = torch.log1p(-prob_neg)  # 1 - p_m >= clip > 0: finite
    else:
        prob_neg = prob
        log_neg = F.logsigmoid(-logits)  # log(1 - p) without underflow for large logits
    loss_pos = (1 - prob).pow(gamma_pos) * log_pos
    loss_neg = prob_neg.pow(gamma_neg) * log_neg
    return -(targets * loss_pos + (1 - targets) * loss_neg).mean()


def sample_labels(
    batch_label_lists: Sequence[Sequence[str]],
    base_vocabulary: Sequence[str],
    num_negatives: int,
    generator: torch.Generator | None = None,
) -> tuple[list[str], torch.Tensor]:
    """The label set of one training batch and its 0/1 targets [B, L].

    Labels are every base-vocabulary label positive for some video of the batch (in vocabulary
    order), then up to `num_negatives` other base labels drawn uniformly without replacement.
    A video's labels outside the base vocabulary (novel ones) are dropped: training never sees
    them, neither as positives nor as negatives.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives: must be >= 0, got {num_negatives}")
    if isinstance(base_vocabulary, str) or not base_vocabulary:
        raise ValueError("base_vocabulary: expected a non-empty list of labels")
    if len(set(base_vocabulary)) != len(base_vocabulary):
        raise ValueError("base_vocabulary: contains duplicate labels")
    for i, video_labels in enumerate(batch_label_lists):
        if isinstance(video_labels, str):
            raise ValueError(f"batch_label_lists[{i}]: expected a list of labels, got a string")
    present = {label for video_labels in batch_label_lists for label in video_labels}
    positives = [label for label in base_vocabulary if label in present]
    candidates = [label for label in base_vocabulary if label not in present]
    order = torch.randperm(len(candidates), generator=generator)[:num_negatives]
    labels = positives + [candidates[i] for i in order.tolist()]
    if not labels:
        raise ValueError("batch has no base-vocabulary positive and num_negatives is 0")
    column = {label: j for j, label in enumerate(labels)}
    targets = torch.zeros(len(batch_label_lists), len(labels))
    for i, video_labels in enumerate(batch_label_lists):
        for label in video_labels:
            if label in column:
                targets[i, column[label]] = 1.0
    return labels, targets
