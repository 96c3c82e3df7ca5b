"""``python -m bnlab``: the same as the ``bnlab`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # a worker process (--jobs, --nproc) re-imports this module as __mp_main__
    sys.exit(main())
