"""``python -m coldbrew.agent`` is the ``coldbrew`` command."""

import sys

from .app.cli import main

sys.exit(main())
