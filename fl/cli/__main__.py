"""``python -m fl.cli`` is the ``bonsai`` command."""

import sys

from fl.cli import main

sys.exit(main())
