"""python -m kvserve.bench {serve,compare,offline,roofline,workloads} ... (the same as `kvserve bench ...`)."""

import sys

from kvserve.bench.commands import main

sys.exit(main())
