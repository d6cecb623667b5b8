"""``python -m ltc`` runs the ``ltc`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
