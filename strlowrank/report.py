"""``python -m strlowrank.report``: the command line of ``strlowrank.analysis.report``.

The report and its help live in the analysis layer (strlowrank/analysis/report.py); this entry
module keeps the command short and imports nothing else (tests/test_layering.py).
"""

import sys

from strlowrank.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
