"""The Ray work of defectforge, and (in ``cli``) its command line."""

# Set by `defectforge --verbose` (read by ``runtime`` when Ray starts): Ray's own log lines and
# its workers' output on the terminal too.
VERBOSE_ENV = "DEFECTFORGE_VERBOSE"
