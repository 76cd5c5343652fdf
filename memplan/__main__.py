"""``python -m memplan``: the ``memplan`` command."""
import sys

from .cli.main import main

sys.exit(main())
