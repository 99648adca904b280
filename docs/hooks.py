"""MkDocs hook: the two reference pages that are generated, never written by hand, from the
command line's parsers (``defectforge.cli.reference``) and the spec's section classes
(``defectforge.studies.spec_reference``)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from defectforge.cli.reference import command_reference  # noqa: E402
from defectforge.studies.spec_reference import spec_reference  # noqa: E402

GENERATED = {"reference/commands.md": command_reference, "reference/spec.md": spec_reference}


def on_page_markdown(markdown, page, config, files):
    """A generated page's stub in docs/ (which says what it is, for readers of the source
    tree) is replaced by the generated text; every other page is left as it is."""
    make = GENERATED.get(page.file.src_uri)
    return make() if make else markdown
