"""Input checks shared by the statistics modules: one `DataError` naming the array and the fix."""

from __future__ import annotations

from typing import Any

import numpy as np

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


def check_top_k(name: str, k: Any, n_components: int) -> int:
    """Return `k` if 1 <= k <= n_components, else raise `ConfigError` naming `name`."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"{name}: {k!r} must be an integer >= 1")
    if k > n_components:
        raise ConfigError(f"{name}: {k} is larger than the number of components ({n_components}); "
                          f"set it to at most {n_components}")
    return int(k)


def as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A numpy Generator from a seed (or the Generator itself, to share one stream)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"stats.seed: {seed!r} must be a non-negative integer")
    return np.random.default_rng(int(seed))
