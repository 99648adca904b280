"""``python -m defectforge.trainables.cli``: how a Ray Job runs the command line."""

import sys

from defectforge.trainables.cli import main

sys.exit(main())
