"""Soft-attribute training step: the LLM path before and after the shared-head rewrite of
`ovml_core.llm`, side by side on the same batch.

"Old" is `FrozenLLM` as of REFERENCE_COMMIT (read from git): every row runs its full
`prefix + chat prompt + label + attribute ids` sequence, left-padded, and ids come from HF
`generate()`. "New" is the working tree: the shared head once, then each distinct row's tail
on its key/value cache. Both wrap the same frozen weights. Per path, alternating old/new so
machine load hits both alike:

- `generate`: greedy attribute ids for the step's labels (what a refresh costs), asserted equal;
- `step`: objective forward + backward + AdamW step with the same ids (lr 0, so every repeat
  sees the same weights), the loss and the prefix gradient asserted equal to tolerance.

Medians of wall and process CPU time are printed with `os.getloadavg()`: the 2 cores are
shared. Run from the repository
root (the first SmolLM2 load converts its GGUF, ~20 s):

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.bench_soft_step --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ovml_core.moving_fashion as mf
from ovml_core.config import Config
from ovml_core.finetune import Objective, StudentForward, build_optimizer, set_trainable
from ovml_core.llm import FrozenLLM
from ovml_core.losses import sample_labels
from ovml_core.model import create_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "moving_fashion" / "soft_attributes.yaml"
REFERENCE_COMMIT = "32840a6bbfb530f3936da87f90ce3a1866153d4c"  # llm.py before the rewrite
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-5


def reference_llm_class() -> type:
    """`FrozenLLM` as it was at REFERENCE_COMMIT."""
    source = subprocess.run(
        ["git", "show", f"{REFERENCE_COMMIT}:ovml_core/llm.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("ovml_reference_llm", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(REPO / "ovml_core" / "llm.py")  # it finds model_configs/ from there
    exec(compile(source, f"{REFERENCE_COMMIT[:8]}:ovml_core/llm.py", "exec"), module.__dict__)
    return module.FrozenLLM


def timed(fn: Callable[[], object]) -> tuple[tuple[float, float], object]:
    """(wall s, this process's CPU s), result. CPU time is what load from others inflates least."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path")
    # A Ray Train worker runs with OMP_NUM_THREADS = train.worker_num_cpus (1 by default).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = Config.from_yaml(CONFIG, args.set)
    model = create_model(cfg.model)
    set_trainable(model, cfg.train)
    base = mf.base_labels()
    objective = Objective(model, cfg.train, base)
    optimizer, _ = build_optimizer(model, cfg.train, total_steps=100)
    for group in optimizer.param_groups:
        group["lr"] = 0.0  # same work per step, same weights for every repeat
    student = StudentForward(model)
    model.train()

    generator = torch.Generator().manual_seed(0)
    size, batch = model.image_size, cfg.train.batch_size
    frames = torch.randint(
        0, 256, (batch, model.num_frames, size, size, 3), dtype=torch.uint8, generator=generator
    )
    targets = (torch.rand(batch, len(base), generator=generator) < 0.2).long()
    positives = [[base[j] for j in row.nonzero().flatten().tolist()] for row in targets]
    labels, _ = sample_labels(positives, base, cfg.train.negatives_per_batch, generator)

    soft = model.labels.soft
    new: FrozenLLM = soft.llm
    old = reference_llm_class()(new.model, new.tokenizer, new.identifier)
    paths = {"old": old, "new": new}
    prompts, m = soft.prompts(labels), soft.num_attributes

    def generate(llm) -> list[list[int]]:
        return llm.generate_attribute_ids(soft.generation_prefix, prompts, m)

    def step(llm) -> tuple[float, torch.Tensor]:
        soft.llm = llm
        optimizer.zero_grad()
        losses = objective(student, model, frames, targets, torch.Generator().manual_seed(1))
        losses["total"].backward()
        grad = soft.prefix.grad.detach().clone()
        optimizer.step()
        return losses["total"].item(), grad

    ids = generate(old)
    soft.refresh()
    soft.set_attribute_ids(labels, ids)
    times: dict[str, dict[str, list[tuple[float, float]]]] = {
        p: {"generate": [], "step": []} for p in paths
    }
    print(
        f"{len(labels)} labels, batch {batch} x {model.num_frames} frames, "
        f"{torch.get_num_threads()} threads, loadavg before {os.getloadavg()}",
        flush=True,
    )
    for repeat in range(args.repeats + 1):  # the first round warms up, untimed
        results = {}
        for name, llm in paths.items():
            gen_s, got = timed(lambda llm=llm: generate(llm))
            assert got == ids, f"{name}: ids differ from the reference ids"
            step_s, results[name] = timed(lambda llm=llm: step(llm))
            if repeat:
                times[name]["generate"].append(gen_s)
                times[name]["step"].append(step_s)
        (old_loss, old_grad), (new_loss, new_grad) = results["old"], results["new"]
        assert abs(new_loss - old_loss) <= LOSS_RTOL * abs(old_loss), (old_loss, new_loss)
        torch.testing.assert_close(new_grad, old_grad, atol=GRAD_ATOL, rtol=1e-3)
        print(
            f"round {repeat}: loss old {old_loss:.7f} new {new_loss:.7f}, "
            f"max |grad diff| {float((new_grad - old_grad).abs().max()):.2e}, "
            f"loadavg {os.getloadavg()}",
            flush=True,
        )

    print(
        f"ids equal ({len(ids)} x {m}); loss within rtol {LOSS_RTOL}; prefix grad atol {GRAD_ATOL}"
    )
    for part in ("step", "generate"):
        for k, clock in enumerate(("wall", "cpu")):
            runs = {name: [t[k] for t in times[name][part]] for name in paths}
            med = {name: statistics.median(runs[name]) for name in paths}
            print(
                f"{part:>8} {clock:>4}: old {med['old']:.2f} s  new {med['new']:.2f} s  "
                f"old/new {med['old'] / med['new']:.1f}x  "
                f"(old {[round(t, 2) for t in runs['old']]}, new {[round(t, 2) for t in runs['new']]})"
            )
    print(
        f"loadavg after {os.getloadavg()}; python {sys.version.split()[0]}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
