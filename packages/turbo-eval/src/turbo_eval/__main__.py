"""``python -m turbo_eval`` (also under ``torchrun``)."""

from .cli import main

raise SystemExit(main())
