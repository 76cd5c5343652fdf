"""``python -m memplan.cli``: the ``memplan`` command."""
import sys

from .main import main

sys.exit(main())
