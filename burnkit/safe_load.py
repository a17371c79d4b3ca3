"""Loading pickled records without running code hidden in them.

BackdoorBench records (``attack_result.pt``) are plain dicts of builtins, tensors and NumPy arrays.
They are read with ``torch.load(weights_only=True)`` plus an explicit allowlist of the NumPy
globals such a file needs (spec §9.1), under both the NumPy 1 (``numpy.core``) and NumPy 2
(``numpy._core``) module names. Anything else in the pickle - ``os.system``, ``builtins.eval``, a
class from some package - makes the load fail before it can be called.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import BurnError

try:  # NumPy 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray


def _numpy_allowlist() -> list:
    reconstruct, scalar = _multiarray._reconstruct, _multiarray.scalar
    allow: list = [np.ndarray, np.dtype, reconstruct, scalar]
    for qualified in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow.append((reconstruct, f"{qualified}._reconstruct"))
        allow.append((scalar, f"{qualified}.scalar"))
    # The restricted unpickler must BUILD dtype instances, so it needs the dtype classes too.
    dtype_classes = getattr(np, "dtypes", None)
    if dtype_classes is not None:
        for name in ("Int64DType", "Int32DType", "Int16DType", "Int8DType", "UInt8DType",
                     "UInt16DType", "UInt32DType", "UInt64DType", "Float64DType", "Float32DType",
                     "Float16DType", "BoolDType"):
            if hasattr(dtype_classes, name):
                allow.append(getattr(dtype_classes, name))
    return allow


NUMPY_SAFE_GLOBALS = _numpy_allowlist()


def safe_torch_load(path: str | Path, what: str = "file", fix: str | None = None):
    """``torch.load`` a record with weights-only unpickling and the NumPy allowlist.

    Every ``.pt`` file the package reads goes through here - records, defense results and our own
    checkpoints alike, since a record folder is shared as a whole and can carry any file.
    Raises :class:`BurnError` for a missing, truncated or non-torch file and for a file that
    needs any global outside the allowlist (the offending names are listed, never imported).
    ``fix`` replaces the default advice at the end of the message.
    """
    path = Path(path)
    if not path.is_file():
        raise BurnError(f"{what} not found: {path}")
    advice = fix or "re-create it or check that the copy is complete"
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise BurnError(
                f"{what} {path} refers to code outside the safe allowlist ({', '.join(unsafe)}); "
                f"it was not loaded (nothing in it ran). Only use files from sources you trust; {fix or 're-create this one with the script that makes it if it should be plain data'}"
            ) from None
        raise BurnError(f"{what} {path} could not be unpickled ({_first_line(err)}); {advice}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise BurnError(f"{what} {path} is corrupt or not a torch file ({_first_line(err)}); {advice}") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a file too broken to list is reported as corrupt by the caller
        return []
    allowed = {f"{obj.__module__}.{obj.__qualname__}" if not isinstance(obj, tuple) else obj[1]
               for obj in NUMPY_SAFE_GLOBALS}
    return [n for n in names if n not in allowed]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
