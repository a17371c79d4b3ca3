"""Built-in poison detectors, one module per method (BackdoorBench's ``detection_pretrain/<m>.py``):
the algorithm as functions other code can call, its config and its :class:`~burnkit.detector.Detector`.
Importing this package registers them (explicit imports, no magic)."""
from . import abl, ac, beatrix, burn, scan, spectral, spectre, strip  # noqa: F401
