"""Build or update a label bank: `python jobs/build_label_bank.py --config C --labels FILE --out P
[--checkpoint DIR] [--set section.key=value]`. Same code as `ovml labels`."""

import sys

from pipeline.label_bank import main

if __name__ == "__main__":
    sys.exit(main())
