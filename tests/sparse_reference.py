"""SparsestMax and sparsemax in float64 NumPy, by enumeration, independent of switchnorm.

The problem: minimise ||p - z||^2 over the probability simplex with ||p - u|| >= r, u = 1/K.
The minimiser lies in the relative interior of some face (its support S). There either the
sphere constraint is slack, so p is the nearest point of the face's affine hull to z, or it
binds, so p is a critical point of the distance to z on the sphere within that affine hull: its
nearest or farthest point (any point when z projects onto the face's centre). Enumerating every
support and each case and keeping the best feasible candidate gives the exact minimiser without
assuming anything about how the library finds it. `dense_minimum` checks this enumeration itself
by sampling.
"""

from __future__ import annotations

import itertools

import numpy as np

FEASIBLE_SLACK = 1e-12


def sparsemax(z) -> np.ndarray:
    """Sort-based sparsemax of one vector (Martins and Astudillo, 2016)."""
    z = np.asarray(z, np.float64)
    s = np.sort(z)[::-1]
    cumulative = np.cumsum(s)
    k = np.arange(1, z.size + 1)
    support = k[1 + k * s > cumulative].max()
    return np.maximum(z - (cumulative[support - 1] - 1) / support, 0)


def top_radius(size: int) -> float:
    """Distance from the simplex centre to a vertex: the largest radius with feasible points."""
    return float(np.sqrt(1 - 1 / size))


def objective(p, z) -> float:
    """||p - z||^2 up to a constant that depends on z only: ||p||^2 - 2 <p, z - max(z)> on the
    simplex. Shifting by the maximum keeps logits near 1e30 from drowning the differences."""
    p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
    return float(np.sum(p**2) - 2 * np.dot(p, z - z.max()))


def _face_candidates(z: np.ndarray, support: tuple[int, ...], radius: float):
    size, k = z.size, len(support)
    zs = z[list(support)]
    offset = zs - zs.mean()  # from the face's centre to the nearest point of its affine hull
    offset -= offset.mean()  # again: tiny offsets must sum to 0 to the last bit, or the sphere tilts
    yield offset + 1 / k
    rho2 = radius**2 - (1 / k - 1 / size)  # sphere radius within the affine hull, squared
    if k == 1 or rho2 < 0:
        return
    centre = np.full(k, 1 / k)
    if np.linalg.norm(offset) > 1e-14:
        directions = [offset, -offset]
    else:  # every point of the sphere is equally near: try towards and away from each vertex
        directions = [sign * (np.eye(k)[i] - centre) for i in range(k) for sign in (1, -1)]
    for d in directions:
        yield centre + np.sqrt(rho2) * d / np.linalg.norm(d)


def sparsestmax(z, radius: float) -> np.ndarray:
    """The exact minimiser for one vector; radii above the top radius act as the top radius."""
    z = np.asarray(z, np.float64)
    size = z.size
    radius = min(float(radius), top_radius(size))
    best, best_value = None, np.inf
    for k in range(1, size + 1):
        for support in itertools.combinations(range(size), k):
            for weights in _face_candidates(z, support, radius):
                p = np.zeros(size)
                p[list(support)] = weights
                if p.min() < -FEASIBLE_SLACK or np.linalg.norm(p - 1 / size) < radius - FEASIBLE_SLACK:
                    continue
                value = objective(p, z)
                if value < best_value:
                    best, best_value = p, value
    return best


def sparsestmax_rows(z, radius) -> np.ndarray:
    """Row-wise reference over a 2-D array; radius a scalar or one per row."""
    z = np.asarray(z, np.float64)
    radius = np.broadcast_to(np.asarray(radius, np.float64), z.shape[:1])
    return np.stack([sparsestmax(row, r) for row, r in zip(z, radius, strict=True)])


def lowest_index_tiebreak(z, radius: float, eps: float = 1e-6) -> np.ndarray:
    """The documented tie rule: sparsestmax(z - eps * arange(K)), exact for gaps >> eps."""
    z = np.asarray(z, np.float64)
    return sparsestmax(z - eps * np.arange(z.size), radius)


def _face_sphere_samples(size: int, radius: float, rng: np.random.Generator, count: int) -> np.ndarray:
    """Random points at distance radius from u on every face of dimension >= 1 (zeros off the face)."""
    samples = []
    for k in range(2, size + 1):
        rho2 = radius**2 - (1 / k - 1 / size)
        if rho2 < 0:
            continue
        for support in itertools.combinations(range(size), k):
            directions = rng.normal(size=(count, k))
            directions -= directions.mean(axis=1, keepdims=True)  # within the face's plane
            directions /= np.linalg.norm(directions, axis=1, keepdims=True)
            points = np.zeros((count, size))
            points[:, list(support)] = 1 / k + np.sqrt(rho2) * directions
            samples.append(points)
    return np.concatenate(samples) if samples else np.zeros((0, size))


def dense_minimum(z, radius: float, rng: np.random.Generator, grid: int, sphere_points: int) -> float:
    """Smallest objective over sampled feasible points: a simplex grid and the sphere on every face."""
    z = np.asarray(z, np.float64)
    size = z.size
    radius = min(float(radius), top_radius(size))
    counts = np.array(
        [c for c in itertools.product(range(grid + 1), repeat=size - 1) if sum(c) <= grid], np.float64
    )
    lattice = np.concatenate([counts, grid - counts.sum(axis=1, keepdims=True)], axis=1) / grid
    points = np.concatenate([lattice, _face_sphere_samples(size, radius, rng, sphere_points)])
    feasible = (points.min(axis=1) >= 0) & (
        np.linalg.norm(points - 1 / size, axis=1) >= radius - FEASIBLE_SLACK
    )
    points = points[feasible]
    return float(np.min(np.sum(points**2, axis=1) - 2 * points @ (z - z.max())))
