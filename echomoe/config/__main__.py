"""``python -m echomoe.config <experiment.yaml|sweep.yaml> [key=value ...]``."""

from echomoe.config import main

raise SystemExit(main())
