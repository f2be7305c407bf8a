"""``python -m coldbrew.agent`` is the ``coldbrew`` command."""

import sys

from .cli import main

sys.exit(main())
