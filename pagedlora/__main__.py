"""``python -m pagedlora``: the ``pagedlora`` command (see :mod:`pagedlora.cli`)."""

import sys

from pagedlora.cli import main

sys.exit(main())
