"""Fail a job that makes no progress, instead of letting it wait forever.

Ray waits without a word for resources that never appear (a GPU or custom resource the cluster
lacks, CPUs held by other work) and for tasks that hang. Each job therefore has a
`<section>.no_progress_timeout_s`: when no unit of its work completes for that long (the
first unit included, so a plan that never starts counts), the job stops what it started and
raises `NoProgressError`, which names the field and what was waited for. Part files and
checkpoints committed before stay valid; a rerun resumes.

Where progress is read (real completions, never wall time alone):
- Ray Data plans (tagging, label bank): the outputs and finished tasks of every operator, read
  by an execution callback at each step of Ray Data's own scheduling loop. Raising there makes
  the executor shut the plan down (its actors and tasks) and the error reaches the caller of
  `write_datasink` / `to_arrow_refs`: no thread, no extra stage, the plan itself unchanged.
- Ray Train (training): optimizer steps the workers count on a `StepCounter` actor; the
  driver plans and runs `fit()` in a thread, watches the counter, and on a stall kills the
  run's controller (its workers go with it) and removes the placement groups it created.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipeline.resources import on_driver_node


class NoProgressError(RuntimeError):
    """Nothing completed for `<section>.no_progress_timeout_s`; the message names the field."""


class Stall:
    """When a counter of completed work last moved; raises once it stood still too long."""

    def __init__(self, field: str, timeout_s: float, waited_for: str):
        self.field, self.timeout_s, self.waited_for = field, timeout_s, waited_for
        self.count: int | None = None
        self.since = time.monotonic()

    def observe(self, count: int, state: Callable[[], str]) -> None:
        """`count`: units completed so far; `state()` describes what is pending, for the error."""
        now = time.monotonic()
        if count != self.count:
            self.count, self.since = count, now
            return
        if self.timeout_s > 0 and now - self.since > self.timeout_s:
            raise NoProgressError(self.message(state()))

    def message(self, state: str) -> str:
        done = "nothing" if not self.count else f"nothing more (after {self.count})"
        return (
            f"{self.field}={self.timeout_s:g}: {done} completed in {self.timeout_s:g} s while "
            f"waiting for {self.waited_for}; stopped. Pending: {state}. Cluster free now: "
            f"{_free_resources()}. Check that the cluster can give every stage what it requests "
            f"(or can add nodes that do), or raise {self.field} (0 waits forever); "
            "what was committed stays, a rerun resumes."
        )


def _free_resources() -> str:
    free = ray.available_resources() if ray.is_initialized() else {}
    shown = {k: v for k, v in sorted(free.items()) if "memory" not in k and "node:" not in k}
    return ", ".join(f"{k} {v:g}" for k, v in shown.items()) or "none"


# ---------------------------------------------------------------- Ray Data plans


class _PlanWatch(ExecutionCallback):
    """Ray Data instantiates callback classes itself, without arguments: `watch_plan` makes a
    subclass per plan whose class attributes carry the settings."""

    field: str = ""
    timeout_s: float = 0.0
    waited_for: str = ""

    def before_execution_starts(self, executor) -> None:
        self.stall = Stall(self.field, self.timeout_s, self.waited_for)

    def on_execution_step(self, executor) -> None:
        operators = list(executor._topology or ())  # Ray Data's own state; pinned Ray version
        done = sum(_completed(op) for op in operators)
        self.stall.observe(done, lambda: "; ".join(_describe(op) for op in operators))


def _completed(op) -> int:
    metrics = op.metrics
    return metrics.num_task_outputs_generated + metrics.num_tasks_finished


def _describe(op) -> str:
    m = op.metrics
    text = f"{op.name}: {m.num_tasks_finished} tasks done, {m.num_tasks_running} running"
    pending = op.get_actor_info().pending
    if pending:
        text += f", {pending} actors not started"
    asks = {
        k: v
        for k, v in getattr(op, "_ray_remote_args", {}).items()
        if k in ("num_cpus", "num_gpus", "resources") and v
    }
    return text + (f" (each asks {asks})" if asks else "")


def watch_plan(
    plan: ray.data.Dataset, field: str, timeout_s: float, waited_for: str
) -> ray.data.Dataset:
    """`plan`, set to raise `NoProgressError` from its execution when none of its operators
    completes a task or an output block for `timeout_s` (0: unchanged). `field` names the
    setting, `waited_for` the work, in the message."""
    if timeout_s <= 0:
        return plan
    settings = {"field": field, "timeout_s": timeout_s, "waited_for": waited_for}
    watch = type("PlanWatch", (_PlanWatch,), settings)
    context = plan.context  # shared by this plan's chain of datasets only, not global
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, watch]
    return plan


# ---------------------------------------------------------------- Ray Train runs

POLL_S = 1.0  # how often the driver reads the step counter
ABORT_WAIT_S = 30.0  # how long fit() gets to return once its controller is killed


@ray.remote(num_cpus=0)
class StepCounter:
    """Optimizer steps the training workers completed. On the driver's node (`step_counter`):
    losing another node never loses the count."""

    def __init__(self):
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def count(self) -> int:
        return self.steps


def step_counter() -> ray.actor.ActorHandle:
    return StepCounter.options(scheduling_strategy=on_driver_node()).remote()


def fit_watched(
    make_trainer: Callable[[], Any], counter: ray.actor.ActorHandle, stall: Stall
) -> Any:
    """`make_trainer().fit()` (a trainer whose workers count steps on `counter`) in a thread
    while this one watches `counter`. Planning counts too: reading the
    manifests runs Ray tasks that wait for CPUs like the workers do. On a stall (or Ctrl-C)
    the run is aborted, its workers and placement group released, and `NoProgressError`
    raised; checkpoints stay, a rerun resumes from the last one."""
    if stall.timeout_s <= 0:
        return make_trainer().fit()
    outcome: dict[str, Any] = {}
    stopped = threading.Event()

    def run() -> None:
        try:
            trainer = make_trainer()
            if not stopped.is_set():  # a planning stall ended after the watch gave up
                outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the watching thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(POLL_S)
            if thread.is_alive():
                stall.observe(ray.get(counter.count.remote()), _train_state)
    except BaseException:
        stopped.set()
        controllers = _stop_train_controllers()
        if controllers:
            thread.join(ABORT_WAIT_S)  # fit() returns once its controller is gone
            _remove_placement_groups_of(controllers)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _train_state() -> str:
    return (
        "planning (manifest reads), workers not placed, waiting for decoded clips, "
        "or inside a step that does not end"
    )


def _stop_train_controllers() -> set[str]:
    """Kill this job's Ray Train controllers; their actor ids (hex). Killing, not
    `TrainController.abort`: on a full cluster the controller may itself wait to be placed
    (then there is no handle to ask), and a controller that is scheduling may not answer.
    Its workers go with it."""
    from ray._private import state  # the GCS actor table; pinned Ray version

    worker = ray._private.worker.global_worker
    stopped = set()
    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    for actor in state.actors(job_id=job).values():
        if actor["ActorClassName"] == "TrainController" and actor["State"] != "DEAD":
            worker.core_worker.kill_actor(ray.ActorID.from_hex(actor["ActorID"]), True)
            stopped.add(actor["ActorID"])
    return stopped


def _remove_placement_groups_of(creators: set[str]) -> None:
    """Remove the placement groups the actors `creators` (hex ids) created. Ray frees a
    placement group only once its creating actor *and* job are gone, so without this a
    driver that lives on (a notebook, a service, the next job of a test session) keeps the
    aborted run's CPUs reserved, and a pending group would take them when they free up."""
    from ray._private import state  # the GCS placement group table; pinned Ray version
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    accessor = state.state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        removed = info.state == gcs_pb2.PlacementGroupTableData.REMOVED
        if info.creator_actor_id.hex() in creators and not removed:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
