"""bamray's performance suite: bamray side by side with the plain alternative of each part.

``python -m bench`` (``make bench``) runs five sections -- loss kernels, data pipeline, training step,
start-up, sweep -- writes every raw repeat to ``bench/results/<date>-<machine>.json`` and prints a
markdown table. See ``bench/README.md`` for how each figure is measured.
"""

from bench.common import BenchContext, Figure, SectionResult, markdown_table, measure

__all__ = ["BenchContext", "Figure", "SectionResult", "markdown_table", "measure", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench`` (imported lazily: sections pull in Ray and torch)."""
    from bench.runner import main as _main

    return _main(argv)
