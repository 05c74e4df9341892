"""The ``turbo-eval`` commands, one module each, every one with ``main(args, parser) -> int``.

``run``, ``tune`` and ``bench`` evaluate, count and time methods through
:mod:`turbo_eval.runner`; ``report`` turns results folders into tables and a plot;
``analyze`` and ``visualize`` inspect one model on images; ``methods`` lists every
method with its stages and families. :mod:`turbo_eval.cli` parses
the command line and calls the command's ``main``.
"""

#: the commands in the order ``turbo-eval --help`` lists them
COMMANDS = ("run", "bench", "analyze", "visualize", "report", "tune", "methods")

__all__ = ["COMMANDS"]
