"""``python -m strlowrank.sweep``: the command line of ``strlowrank.analysis.sweep``.

The sweep and its help live in the analysis layer (strlowrank/analysis/sweep.py); this entry
module keeps the command short and imports nothing else (tests/test_layering.py).
"""

import sys

from strlowrank.analysis.sweep import main

if __name__ == "__main__":
    sys.exit(main())
