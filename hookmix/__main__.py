"""``python -m hookmix``: the ``hookmix`` command (also what ``torchrun -m hookmix`` runs). Part of the app, as
the ``hookmix`` script is: the library itself never imports it."""

import sys

from hookmix.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
