"""``python -m trio_relay`` is the ``trio-relay`` command."""

import sys

from ._settings.cli import main

sys.exit(main())
