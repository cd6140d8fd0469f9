"""Stage 0 of Moving Fashion: train a small CLIP on garment stills, save it as .safetensors.

    python jobs/pretrain_clip.py --out models/moving-fashion-tiny/clip.safetensors

The file is an open_clip state dict for --model (a config in ovml_core/model_configs); use it
as `model.clip_pretrained`. See `ovml_core.pretrain`.
"""

import argparse
import json
import logging
import sys
import time

import open_clip
import torch

from ovml_core.clip import create_clip
from ovml_core.moving_fashion import DEFAULT_SOURCE, FashionMNISTMissingError, split_pools
from ovml_core.pretrain import PretrainSettings, pretrain_clip, save_clip_weights


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--model", default="ovml-fashion", help="open_clip model config name")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="Fashion-MNIST IDX folder")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--init", help="continue from these .safetensors weights (default: random)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        pools = split_pools(args.source)
    except FashionMNISTMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = PretrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    torch.manual_seed(args.seed)
    clip = create_clip(args.model, pretrained=args.init)
    started = time.perf_counter()
    metrics = pretrain_clip(
        clip, open_clip.get_tokenizer(args.model), pools["train"], pools["val"], settings
    )
    save_clip_weights(clip, args.out)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{args.out}: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
