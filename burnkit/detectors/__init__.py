"""Built-in poison detectors (BackdoorBench's ``detection_pretrain/<m>.py``). Importing this package
registers them (explicit imports, no magic)."""
from . import abl, ac, beatrix, burn, scan, spectral, spectre, strip  # noqa: F401
