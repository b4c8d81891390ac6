"""Checks of the raw arguments the statistics functions take: one function per constraint.

The `stats` config group is validated once, by `StatsConfig`, when the config is composed. These
checks are for what does not come from there: arrays, and the counts, levels and seeds a library
caller passes to `bootstrap`, `fcas_test`, `pairwise_stability`, ... directly, plus the one
constraint the config cannot know, top_k against the number of components in the data. Each
raises one error naming the argument (`stats.<field>` for a config setting) and the fix.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from mechflow.config import is_number
from mechflow.errors import ConfigError, DataError


def finite_array(name: str, x: Any, ndim: int | tuple[int, ...], *, min_rows: int = 1) -> np.ndarray:
    """Return `x` as a float64 array after checking its rank, size and finiteness.

    Args:
        name: what the caller calls this input (appears in the error message).
        x: array-like (numpy, list, or a CPU torch tensor).
        ndim: allowed number(s) of dimensions.
        min_rows: minimum length of axis 0.

    Raises:
        DataError: wrong rank, too few rows, or NaN/inf entries (with the first bad index).
    """
    if hasattr(x, "detach"):  # torch tensor: avoid importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in allowed:
        raise DataError(f"{name}: expected an array with {' or '.join(map(str, allowed))} dimension(s), "
                        f"got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise DataError(f"{name}: needs at least {min_rows} rows along axis 0, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{name}: contains {int(bad.sum())} NaN/inf value(s), first at index {first}; "
                        "drop or impute those entries before computing statistics")
    return arr


def is_count(value: Any) -> bool:
    """A Python or numpy integer that is not a bool (YAML's `true` is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> int:
    """Return `value` if it is an integer >= 1, else raise `ConfigError` naming `name`."""
    if not is_count(value) or value < 1:
        raise ConfigError(f"{name}: {value!r} must be an integer >= 1")
    return int(value)


def check_top_k(name: str, k: Any, n_components: int) -> int:
    """Return `k` if 1 <= k <= n_components, else raise `ConfigError` naming `name`."""
    k = check_positive_int(name, k)
    if k > n_components:
        raise ConfigError(f"{name}: {k} is larger than the number of components ({n_components}); "
                          f"set it to at most {n_components}")
    return k


def check_ci_level(name: str, value: Any) -> float:
    """Return `value` if it is a number strictly inside (0, 1), else raise `ConfigError`."""
    if not is_number(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name}: {value!r} must be a number strictly between 0 and 1 (e.g. 0.95)")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return `value` if it is one of `choices`, else raise `ConfigError` naming `name`."""
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} must be one of {list(choices)}")
    return value


def check_choices(name: str, values: Iterable[str], choices: Sequence[str]) -> tuple[str, ...]:
    """Return `values` as a tuple if it is non-empty and drawn from `choices`, else raise `ConfigError`."""
    values = tuple(values)
    if not values or any(v not in choices for v in values):
        raise ConfigError(f"{name}: {list(values)!r} must be a non-empty list drawn from {list(choices)}")
    return values


def as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A numpy Generator from a seed (or the Generator itself, to share one stream)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if not is_count(seed) or seed < 0:
        raise ConfigError(f"stats.seed: {seed!r} must be a non-negative integer")
    return np.random.default_rng(int(seed))
