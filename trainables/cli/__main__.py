"""``python -m defectforge.trainables.cli``: how a Ray Job runs the command line."""

from defectforge.trainables.cli import entry

entry()
