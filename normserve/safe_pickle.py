"""A pickle loader for data files (the canonical CIFAR-10 python batches) that runs no code.

torch-free on purpose: training (models.data) and the ONNX Runtime evaluator (evaluation) both
read CIFAR batches with it, and the evaluator must not import torch.
"""

from __future__ import annotations

import builtins
import io
import pickle
from typing import Any

_SAFE_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "complex", "bool"}
)
# What numpy's ndarray.__reduce__ emits (numpy 1.x and 2.x module names).
_SAFE_NUMPY = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1");
        # encoding a string has no side effects (torch's weights_only unpickler allows it too).
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only builtins containers/scalars and numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) in _SAFE_NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def restricted_load(data: bytes) -> Any:
    """Unpickle `data` with `RestrictedUnpickler`; python-2 pickles (CIFAR's) come back with bytes keys."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
