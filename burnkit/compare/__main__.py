"""``python -m burnkit.compare EXPERIMENT.yaml``."""
import sys

from . import main

sys.exit(main())
