"""Regularizers that keep fine-tuned CLIP close to the pretrained one, so novel labels survive.

- `distill` (FROSTER): cosine distillation of features towards the frozen pretrained model's.
- `l2sp`: squared L2 distance of the trainable weights to their pretrained values.
- `patch` (weight patching, Ilharco et al. 2022; Open-VCLIP): export alpha * pretrained +
  (1 - alpha) * fine-tuned for the weights both models share, while parameters new to
  fine-tuning keep their fine-tuned values; optionally also train on the loss at randomly
  interpolated weights.

Everything works on generic modules and state dicts, so the trainer applies it to whichever
parts it fine-tunes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

State = Mapping[str, torch.Tensor]


def distillation_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over rows; the teacher is frozen (no gradient)."""
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(
            f"student {tuple(student_feats.shape)} and teacher {tuple(teacher_feats.shape)} "
            "features differ in shape"
        )
    return (1 - F.cosine_similarity(student_feats, teacher_feats.detach(), dim=-1)).mean()


def reference_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's trainable parameters: the point to stay close to."""
    return {
        name: param.detach().clone()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def _referenced_params(module: nn.Module, reference: State) -> dict[str, torch.Tensor]:
    """Trainable parameters that have a reference value, checked for shape agreement.

    Parameters new to fine-tuning (e.g. a temporal branch) have no pretrained value and are
    left out; a reference that matches no parameter at all is a wiring mistake.
    """
    params = {
        name: param
        for name, param in module.named_parameters()
        if param.requires_grad and name in reference
    }
    if not params:
        raise ValueError("reference state names none of the module's trainable parameters")
    for name, param in params.items():
        if reference[name].shape != param.shape:
            raise ValueError(
                f"reference {name}: shape {tuple(reference[name].shape)} "
                f"!= parameter shape {tuple(param.shape)}"
            )
    return params


def l2sp_penalty(module: nn.Module, reference_state: State) -> torch.Tensor:
    """Sum over trainable parameters of ||param - reference||^2 (L2-SP, Li et al. 2018)."""
    params = _referenced_params(module, reference_state)
    return sum(
        (param - reference_state[name].to(param)).pow(2).sum() for name, param in params.items()
    )


def interpolate_weights(
    pretrained_state: State, finetuned_state: State, alpha: float
) -> dict[str, torch.Tensor]:
    """alpha * pretrained + (1 - alpha) * fine-tuned, for every floating-point tensor.

    alpha=1 returns the pretrained values bit for bit, alpha=0 the fine-tuned ones. Entries only
    in the fine-tuned state (parameters new to fine-tuning) and non-float buffers are kept as
    fine-tuned.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    unknown = sorted(set(pretrained_state) - set(finetuned_state))
    if unknown:
        raise ValueError(f"pretrained state has entries the fine-tuned one lacks: {unknown[:5]}")
    merged = {}
    for name, tuned in finetuned_state.items():
        pre = pretrained_state.get(name)
        if pre is None or not tuned.is_floating_point():
            merged[name] = tuned.detach().clone()
            continue
        if pre.shape != tuned.shape:
            raise ValueError(
                f"{name}: pretrained {tuple(pre.shape)} != fine-tuned {tuple(tuned.shape)}"
            )
        # lerp is exact at both ends: weight 0 gives start, weight 1 gives end.
        merged[name] = torch.lerp(tuned.detach(), pre.to(tuned), alpha)
    return merged


@contextmanager
def patched(module: nn.Module, pretrained_state: State, alpha: float) -> Iterator[nn.Module]:
    """Temporarily give `module`'s parameters named in `pretrained_state` alpha * pretrained +
    (1 - alpha) * current values; the others (new to fine-tuning) stay as they are."""
    params = _referenced_params(module, pretrained_state)
    tuned = {name: param.detach().clone() for name, param in params.items()}
    merged = interpolate_weights(pretrained_state, tuned, alpha)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(merged[name])
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tuned[name])


def draw_alpha(max_alpha: float = 1.0, generator: torch.Generator | None = None) -> float:
    """A random interpolation weight, uniform in [0, max_alpha]."""
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"max_alpha: must be in [0, 1], got {max_alpha}")
    return max_alpha * torch.rand((), generator=generator).item()


class _Closure(nn.Module):
    """Lets `functional_call` swap a module's parameters around an arbitrary computation."""

    def __init__(self, module: nn.Module, compute: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.compute = compute

    def forward(self) -> torch.Tensor:
        return self.compute()


def interpolated_loss(
    module: nn.Module,
    pretrained_state: State,
    alpha: float,
    compute_loss: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """`compute_loss()` evaluated while `module`'s trainable parameters are
    alpha * pretrained + (1 - alpha) * current.

    Gradients flow to the current parameters (scaled by 1 - alpha); the module's own parameters
    are restored afterwards. `compute_loss` may use `module` through any method, not only
    forward. Used for the `patch` interpolated-weight loss with `alpha = draw_alpha(...)`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    params = _referenced_params(module, pretrained_state)
    weights = {
        f"module.{name}": torch.lerp(param, pretrained_state[name].to(param), alpha)
        for name, param in params.items()
    }
    return functional_call(_Closure(module, compute_loss), weights, ())
