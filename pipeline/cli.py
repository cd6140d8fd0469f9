"""`ovml <command> ...`: one CLI in front of the jobs (the same code `jobs/*.py` run)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

# Exit codes of every job: 0 done; 1 the work failed (every video errored, training failed);
# 2 what the user gave is wrong (config, checkpoint, vocabulary, paths); 3 no progress for
# <section>.no_progress_timeout_s (pipeline.progress). Scripts and schedulers branch on them.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_PROGRESS = 0, 1, 2, 3

# command -> (module with `main(argv)`, one-line help). Modules import Ray lazily, on use.
COMMANDS = {
    "tag": ("pipeline.tagging", "tag videos with any vocabulary (jobs/tag.py)"),
    "labels": ("pipeline.label_bank", "build or update a label bank (jobs/build_label_bank.py)"),
    "train": ("pipeline.training", "fine-tune with Ray Train, resumable (jobs/train.py)"),
    "compact": ("pipeline.compaction", "fold a tags folder into one snapshot, atomically"),
    "eval": ("pipeline.evaluation", "mAP, ECE and an HTML report of a run (jobs/evaluate.py)"),
    "plan": ("ovml_core.capacity", "nodes and cost for N videos a night (docs/scaling.md)"),
    "search": (
        "pipeline.search",
        "text-to-video search over the stored embeddings of a tags folder",
    ),
}


def job_parser(prog: str, description: str, override_example: str) -> argparse.ArgumentParser:
    """The arguments every job shares: a YAML config and `--set section.key=value` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny.yaml)")
    add_overrides(parser, f"override a config field, e.g. --set {override_example} (repeatable)")
    return parser


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set section.key=value`, repeatable, collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help,
    )


def run_job(body: Callable[[], int], usage_errors: tuple[type[Exception], ...] = ()) -> int:
    """Every job's main(): console logging, then `body()` (which prints its summary and
    returns the exit code). What the user gave being wrong (a config, checkpoint or
    vocabulary error, or one of the job's `usage_errors`) prints `error: ...` and exits 2; a
    stalled job (`NoProgressError`) exits 3."""
    from ovml_core.checkpoint import CheckpointError
    from ovml_core.config import ConfigError
    from ovml_core.vocabulary import VocabularyError
    from pipeline.progress import NoProgressError

    log_to_console()
    try:
        return body()
    except (ConfigError, CheckpointError, VocabularyError, *usage_errors) as err:
        return print_error(err, EXIT_USAGE)
    except NoProgressError as err:
        return print_error(err, EXIT_NO_PROGRESS)


def print_error(err: BaseException | str, code: int) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


def log_to_console() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="ovml",
        description="Open-vocabulary multi-label video tagging on Ray.",
        epilog="Run `ovml <command> --help` for a command's options.",
    )
    parser.add_argument(
        "command",
        choices=sorted(COMMANDS),
        metavar="command",
        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(COMMANDS.items())),
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(COMMANDS[ns.command][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
