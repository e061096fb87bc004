"""``python -m kfrob``: the ``kfrob`` command (see :mod:`kfrob.job.cli`)."""

import sys

from kfrob.job.cli import main

if __name__ == "__main__":
    sys.exit(main())
