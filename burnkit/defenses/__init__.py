"""Built-in defenses. Importing this package registers them (explicit imports, no magic)."""
from . import burn, ft  # noqa: F401
