"""Fine-tune with Ray Train: `python jobs/train.py --config C [--set section.key=value ...]`.

Runs on a local Ray instance, or on a cluster under `ray job submit -- python jobs/train.py ...`
(RAY_ADDRESS). Checkpoints go to `train.storage_path/train.name`; rerunning the same command
resumes from the latest one. The job itself is `pipeline.training`; `--help` lists the options.
"""

import sys

from pipeline.training import main

if __name__ == "__main__":
    sys.exit(main())
