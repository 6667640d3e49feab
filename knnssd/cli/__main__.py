"""`python -m knnssd.cli`: the same as the `knnssd` console script."""

import sys

from knnssd.cli.commands import main

sys.exit(main())
