"""Built-in defenses. Importing this package registers them (explicit imports, no magic)."""
from . import burn, ft  # noqa: F401
from . import fp  # noqa: F401
from . import nad  # noqa: F401
from . import anp  # noqa: F401
