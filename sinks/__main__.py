"""`python -m burnguard.sinks`: run the ClickHouse sink (configured from the environment)."""

import sys

from burnguard.sinks.consumer import main

raise SystemExit(main(sys.argv[1:]))
