"""Loading pickled records without running code hidden in them.

BackdoorBench records (``attack_result.pt``) are plain dicts of builtins, tensors and NumPy arrays.
They are read with ``torch.load(weights_only=True)`` plus an explicit allowlist of the NumPy
globals such a file needs (spec §9.1), under both the NumPy 1 (``numpy.core``) and NumPy 2
(``numpy._core``) module names. Anything else in the pickle - ``os.system``, ``builtins.eval``, a
class from some package - makes the load fail before it can be called.

A file whose tensors hold NaN or Inf is refused here too: weights that diverged still load and
run, and every accuracy, ASR or distance computed from them is an artefact (an all-NaN model
predicts class 0 everywhere, i.e. "100 % ASR" for target 0), so such a file must never reach an
algorithm.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import BurnError

try:  # NumPy 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray


def _empty_bytes(*args) -> bytes:
    """``builtins.bytes`` as a pickle calls it for ``b""``: an empty NumPy array pickles its (empty)
    data that way (protocol 2). Only the empty call is allowed - ``bytes(n)`` would allocate n bytes."""
    if args:
        raise pickle.UnpicklingError("builtins.bytes called with arguments")
    return b""


def _numpy_allowlist() -> list:
    reconstruct, scalar = _multiarray._reconstruct, _multiarray.scalar
    allow: list = [np.ndarray, np.dtype, reconstruct, scalar, (_empty_bytes, "builtins.bytes")]
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
    Raises :class:`BurnError` for a missing, truncated or non-torch file, for a file that needs any
    global outside the allowlist (the offending names are listed, never imported) and for a file
    whose tensors or arrays hold NaN/Inf (:func:`first_nonfinite`). ``fix`` replaces the default
    advice at the end of the message.
    """
    path = Path(path)
    if not path.is_file():
        raise BurnError(f"{what} not found: {path}")
    advice = fix or "re-create it or check that the copy is complete"
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _weights_only_detail(err)
        named = re.search(r"GLOBAL ([\w.]+)", detail)  # a legacy (non-zip) pickle names it only here
        unsafe = _unsafe_globals(path) or ([named.group(1)] if named else [])
        if unsafe:
            raise BurnError(
                f"{what} {path} refers to code outside the safe allowlist ({', '.join(unsafe)}); "
                f"it was not loaded (nothing in it ran). Only use files from sources you trust; {fix or 're-create this one with the script that makes it if it should be plain data'}"
            ) from None
        if "but got" in detail:  # a type outside the allowlist, e.g. a NumPy string array
            raise BurnError(f"{what} {path} holds data outside the safe allowlist ({detail.split('but got')[-1].strip()}); "
                            f"it was not loaded; {advice}") from None
        raise BurnError(f"{what} {path} is corrupt or not a torch file ({detail}); {advice}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise BurnError(f"{what} {path} is corrupt or not a torch file ({_first_line(err)}); {advice}") from None
    bad = first_nonfinite(loaded)
    if bad is not None:
        raise BurnError(f"{what} {path} holds {bad}: the model it stores diverged, and every score computed from it "
                        f"would be meaningless; {fix or 're-create it (if its training diverged, with a lower --lr)'}")
    return loaded


def first_nonfinite(obj, name: str = "") -> str | None:
    """``"NaN in model['conv1.weight'] (288 of 288 values)"`` for the first floating-point tensor or
    NumPy array inside ``obj`` (nested dicts, lists and tuples) that holds NaN or Inf; None when all
    are finite. Every file read and every model written is checked with this one walk, so a
    diverged model can neither enter nor leave a run."""
    stack = [(name, obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            items = list(value.items())
            stack.extend((f"{where}[{k!r}]" if where else str(k), v) for k, v in reversed(items))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()):
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                return _describe(where, value.isnan().any().item(), int((~finite).sum()), value.numel())
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fc":
            finite = np.isfinite(value)
            if not finite.all():
                return _describe(where, bool(np.isnan(value).any()), int((~finite).sum()), value.size)
    return None


def _describe(where: str, has_nan: bool, bad: int, total: int) -> str:
    return f"{'NaN' if has_nan else 'Inf'} in {where or 'its data'} ({bad} of {total} values)"


def _unsafe_globals(path: Path) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a file too broken to list is reported as corrupt by the caller
        return []
    allowed = {f"{obj.__module__}.{obj.__qualname__}" if not isinstance(obj, tuple) else obj[1]
               for obj in NUMPY_SAFE_GLOBALS}
    return [n for n in names if n not in allowed]


def _weights_only_detail(err: BaseException) -> str:
    """The useful part of torch's weights-only error (its first lines only advise weights_only=False,
    which is exactly what must not be done with a file from elsewhere)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    for paragraph in text.split("\n\n"):
        paragraph = " ".join(paragraph.split())
        if paragraph and not paragraph.startswith(boilerplate):
            return paragraph[:200]
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
