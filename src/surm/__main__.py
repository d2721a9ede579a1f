"""``python -m surm ...``: the same as the ``surm`` command."""

import sys

from surm.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
