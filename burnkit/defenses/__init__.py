"""Built-in defenses. Importing this package registers them (explicit imports, no magic)."""
from . import ft  # noqa: F401
from . import ibau  # noqa: F401
from . import ft_sam  # noqa: F401
from . import sau  # noqa: F401
