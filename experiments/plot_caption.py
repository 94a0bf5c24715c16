"""A caption for a study's plot: where its numbers come from, read from the study's own report.

Each report (``results/<stem>.md``) starts with the command and, after a dash, the code version,
the machine and the threads; the plot repeats that line so that it can be read on its own.
"""

from __future__ import annotations

import re
from pathlib import Path


def caption(png_path: Path, limit: int = 140) -> str:
    """The provenance line of ``png_path``'s report (same stem, ``.md``), or ``""`` when absent."""
    report = Path(png_path).with_suffix(".md")
    if not report.is_file():
        return ""
    for line in report.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^`python [^`]*` — (.*)$", line)
        if m:
            parts = [p.strip() for p in m.group(1).split(",")]
            keep = [p for p in parts[:5] if p]
            text = ", ".join(keep).split(". ")[0].rstrip(".")
            return text if len(text) <= limit else text[: limit - 1] + "…"
    return ""
