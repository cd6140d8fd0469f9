"""Evaluate a tagging run: `python jobs/evaluate.py --config C --tags DIR --manifest M --out DIR
[--labels VOCAB]` writes metrics.json and a self-contained report.html (`pipeline.evaluation`).
"""

import sys

from pipeline.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
