"""Turn a user's symmetry name into operators, with a one-line error naming the option."""

from __future__ import annotations

import numpy as np

from ..core.symmetry import UnknownSymmetry, canonical_name, symmetry_operators
from ..errors import DeepAlignError


def operators_for(name: str, option: str = "--sym") -> tuple[np.ndarray, str]:
    try:
        canon = canonical_name(name)
    except UnknownSymmetry as e:
        raise DeepAlignError(f"{option} {name}: {e}")
    return symmetry_operators(canon), canon
