"""Evaluate a tagging run: `python jobs/evaluate.py --config C --tags DIR --manifest M --out DIR
[--labels VOCAB] [--fit-calibration | --calibration VAL_METRICS_JSON]` writes metrics.json and a
self-contained report.html (`pipeline.evaluation`). A vocabulary with a `means` column (other
words for the manifest's labels) is scored against the labels it means.
"""

import sys

from pipeline.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
