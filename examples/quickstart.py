#!/usr/bin/env python
"""LaViT end to end on a CPU (`make demo`): every stage of `quickstart_lavit`, from the synthetic task to the report.

    python examples/quickstart.py --output-dir quickstart_output     # the default run (make demo), about 16 minutes
    python examples/quickstart.py --output-dir quickstart_output --ablations   # adds Table 3's rows, ~6 minutes more
    python examples/quickstart.py --output-dir quickstart-smoke --smoke   # every stage at toy size, under a minute

`python examples/quickstart.py --help` lists the settings; a finished stage is not run again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from quickstart_lavit import main, parse_args


if __name__ == "__main__":
    report = main(sys.argv[1:])
    root = Path(parse_args(sys.argv[1:]).output_dir)
    print(report)
    print(f"Report: {root / 'report.md'}; numbers: {root / 'results.json'}; log: {root / 'run.log'}")
