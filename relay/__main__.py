"""``python -m relay`` runs the command line."""

import sys

from relay.cli import main

sys.exit(main())
