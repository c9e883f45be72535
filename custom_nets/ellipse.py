"""
Ellipses in the plane: the fitted shape of a fetal head (the HC18 challenge measures its perimeter), used
by the dataset reader (annotated outlines), the synthetic data, the mask post-processing and the metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Ellipse", "ellipse_perimeter", "fit_ellipse", "fit_ellipse_robust"]


class Ellipse(NamedTuple):
    """An ellipse in the units of the points it was fitted to: centre along array axes 0 and 1, semi-axes, angle (radians)."""

    center_0: float
    center_1: float
    semi_major: float
    semi_minor: float
    angle: float

    @property
    def perimeter(self) -> float:
        return ellipse_perimeter(self.semi_major, self.semi_minor)

    def radial_distance(self, points: np.ndarray) -> np.ndarray:
        """
        Signed distance of ``points`` (``(N, 2)``) from the ellipse along the ray from its centre:
        positive outside, negative inside (a close, cheap stand-in for the geometric distance).
        """
        d0, d1 = points[:, 0] - self.center_0, points[:, 1] - self.center_1
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u, v = d0 * cos + d1 * sin, -d0 * sin + d1 * cos
        r = np.sqrt((u / self.semi_major) ** 2 + (v / self.semi_minor) ** 2)
        return np.hypot(d0, d1) * (1.0 - 1.0 / np.maximum(r, 1e-12))

    def scaled(self, spacing: float | Sequence[float]) -> Ellipse:
        """
        The same ellipse with array axes 0 and 1 stretched by ``spacing`` (e.g. pixels to mm): a stretched
        ellipse is an ellipse, whose semi-axes are the singular values of the stretched axis vectors.
        """
        s0, s1 = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,))
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        # columns: the semi-major and semi-minor axis vectors, stretched
        axes = np.array([[s0 * self.semi_major * cos, -s0 * self.semi_minor * sin], [s1 * self.semi_major * sin, s1 * self.semi_minor * cos]])
        u, singular, _ = np.linalg.svd(axes)
        return Ellipse(
            self.center_0 * s0, self.center_1 * s1, float(singular[0]), float(singular[1]), math.atan2(u[1, 0], u[0, 0])
        )

    def to_mask(self, shape: Sequence[int]) -> np.ndarray:
        """A boolean ``shape`` array, True at the pixels whose centres lie inside the ellipse (pixel units)."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        # only the ellipse's bounding box is evaluated: a head is a fraction of the image
        half_0 = math.hypot(self.semi_major * cos, self.semi_minor * sin)
        half_1 = math.hypot(self.semi_major * sin, self.semi_minor * cos)
        lo_0, hi_0 = max(0, math.floor(self.center_0 - half_0)), min(shape[0], math.ceil(self.center_0 + half_0) + 1)
        lo_1, hi_1 = max(0, math.floor(self.center_1 - half_1)), min(shape[1], math.ceil(self.center_1 + half_1) + 1)
        mask = np.zeros(tuple(shape[:2]), dtype=bool)
        if lo_0 >= hi_0 or lo_1 >= hi_1:
            return mask
        d0 = np.arange(lo_0, hi_0, dtype=np.float64)[:, None] - self.center_0
        d1 = np.arange(lo_1, hi_1, dtype=np.float64)[None, :] - self.center_1
        u, v = d0 * cos + d1 * sin, -d0 * sin + d1 * cos
        mask[lo_0:hi_0, lo_1:hi_1] = (u / self.semi_major) ** 2 + (v / self.semi_minor) ** 2 <= 1.0
        return mask


def ellipse_perimeter(a: float, b: float) -> float:
    """
    Perimeter of an ellipse with semi-axes ``a`` and ``b`` by Ramanujan's second approximation,
    ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))`` with ``h = ((a - b) / (a + b))^2`` (relative error
    below 1e-9 for head-like ellipses; exact for a circle). HC18's reference values use the same formula.

    Example::

        ellipse_perimeter(10.0, 10.0)  # 62.83 = 2 pi 10
    """
    if a < 0 or b < 0:
        raise ValueError(f"semi-axes must be >= 0, got {a}, {b}")
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def fit_ellipse(points: np.ndarray) -> Ellipse | None:
    """
    Least-squares ellipse through ``points`` (``(N, 2)``, N >= 5) with scikit-image's ``EllipseModel``;
    ``None`` when no ellipse fits (too few or collinear points).
    """
    from skimage.measure import EllipseModel

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 5:
        return None
    if hasattr(EllipseModel, "from_estimate"):  # scikit-image >= 0.26
        model = EllipseModel.from_estimate(points)
        if not model:
            return None
        (c0, c1), (a, b), theta = model.center, model.axis_lengths, model.theta
    else:
        model = EllipseModel()
        if not model.estimate(points):
            return None
        c0, c1, a, b, theta = model.params
    if not all(np.isfinite([c0, c1, a, b, theta])) or min(a, b) <= 0:
        return None
    if a < b:
        a, b, theta = b, a, theta + math.pi / 2
    return Ellipse(float(c0), float(c1), float(a), float(b), float(theta))


def fit_ellipse_robust(
    points: np.ndarray, tolerance: float = 1.5, max_rounds: int = 5, min_inliers: float = 0.5
) -> tuple[Ellipse | None, np.ndarray]:
    """
    Least-squares ellipse through ``points`` that is not pulled by outliers: fit, drop the points
    farther from the ellipse than ``max(tolerance, 3 sd)`` (sd estimated robustly, 1.4826 x the median
    absolute deviation of the radial distances), fit the rest again, until nothing changes.

    This is what a segmentation that spills into the amniotic fluid on one side needs: the spill
    is a bump of contour points outside the skull's ellipse, which a plain least-squares fit
    follows half-way.

    Args:
        points: ``(N, 2)`` contour points.
        tolerance: distances up to this (in the points' units) are never outliers: the contour's
            own pixel steps and raggedness.
        max_rounds: most refits.
        min_inliers: stop dropping points before fewer than this share of them is left.

    Returns:
        the ellipse (``None`` when none fits) and the boolean inlier mask of ``points``.
    """
    points = np.asarray(points, dtype=np.float64)
    inliers = np.ones(len(points), dtype=bool)
    ellipse = fit_ellipse(points)
    for _ in range(max_rounds):
        if ellipse is None:
            break
        distance = ellipse.radial_distance(points)
        spread = 1.4826 * float(np.median(np.abs(distance[inliers] - np.median(distance[inliers]))))
        keep = np.abs(distance) <= max(tolerance, 3.0 * spread)
        if np.array_equal(keep, inliers) or keep.sum() < max(5, min_inliers * len(points)):
            break
        refit = fit_ellipse(points[keep])
        if refit is None:
            break
        ellipse, inliers = refit, keep
    return ellipse, inliers
