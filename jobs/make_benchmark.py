"""Write the Moving Fashion benchmark: `python jobs/make_benchmark.py --out DIR [--size quick]`.

Clips (h264 mp4), `manifest.parquet` (train/val/test), `test.parquet`, `vocabulary.csv` and
`benchmark.json` go to --out. The clips are drawn from the Fashion-MNIST IDX files (--source,
default: the Debian package's folder); see `ovml_core.moving_fashion`.
"""

import argparse
import sys
import time

import torch

from ovml_core.moving_fashion import (
    DEFAULT_SOURCE,
    SIZES,
    FashionMNISTMissingError,
    build_benchmark,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source", default=str(DEFAULT_SOURCE), help="folder with the Fashion-MNIST IDX files"
    )
    args = parser.parse_args(argv)
    # Each clip is a few tiny tensor ops: more threads only add contention.
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        info = build_benchmark(args.out, args.size, args.seed, args.source)
    except FashionMNISTMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"Moving Fashion ({info.size}, seed {info.seed}): {info.counts} clips in {args.out} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
