"""Built-in attacks. Importing this package registers them (explicit imports)."""
from . import badnet, blended  # noqa: F401
from . import lc, lf, ssba, trojannn  # noqa: F401
