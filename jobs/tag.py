"""Tag videos with any vocabulary: `python jobs/tag.py --config C --manifest M --out DIR
[--labels FILE | --label-bank P] [--checkpoint DIR] [--full] [--set section.key=value ...]`.

Runs on a local Ray instance, or on a cluster under `ray job submit -- python jobs/tag.py ...`
(RAY_ADDRESS). The job itself is `pipeline.tagging`; `--help` lists the options.
"""

import sys

from pipeline.tagging import main

if __name__ == "__main__":
    sys.exit(main())
