"""`python -m benchmarks [--quick] [--json PATH]`: the whole suite, table and JSON."""

import sys

from benchmarks.suite import main

sys.exit(main())
