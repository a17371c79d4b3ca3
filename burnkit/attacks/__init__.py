"""Built-in attacks. Importing this package registers them (explicit imports)."""
from . import badnet, blended, bpp, inputaware, lc, lf, sig, ssba, trojannn, wanet  # noqa: F401
