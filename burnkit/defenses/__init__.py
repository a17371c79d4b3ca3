"""Built-in defenses. Importing this package registers them (explicit imports, no magic)."""
from . import abl, ac, anp, burn, clp, dbd, dbr, dst, ep, fp, ft, ft_sam, ibau, nad, sau, spectral  # noqa: F401
