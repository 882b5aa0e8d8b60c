"""``python -m denuc ...`` and ``torchrun [...] -m denuc ...``: the ``denuc`` command."""

import sys

from denuc.cli import main

if __name__ == "__main__":
    sys.exit(main())
