"""`python -m glmrt.bench ARGS` is `glmrt bench ARGS`; `python -m glmrt.bench --worker TASK RESULT`
runs one task of a bench run (glmrt.bench.workers starts these)."""

import sys

from .command import main
from .workers import worker_main

if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(sys.argv[2], sys.argv[3]))
sys.exit(main(sys.argv[1:]))
