"""Build or update a label bank: `python jobs/build_label_bank.py --config C --labels FILE
--out P [--checkpoint DIR] [--set section.key=value ...]`.

Runs on a local Ray instance, or on a cluster under `ray job submit -- python
jobs/build_label_bank.py ...` (RAY_ADDRESS). The job itself is `pipeline.label_bank`
(also `ovml labels`); `--help` lists the options.
"""

import sys

from pipeline.label_bank import main

if __name__ == "__main__":
    sys.exit(main())
