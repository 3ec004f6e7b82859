"""``python -m interbert ...``: the same as the ``interbert`` command."""

import sys

from interbert.cli import main

sys.exit(main())
