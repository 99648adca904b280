"""``python -m defectforge.cli``: how a Ray Job runs the command line."""

from defectforge.cli import entry

entry()
