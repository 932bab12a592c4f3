"""Identifiability diagnostics: which partial derivatives can the training data support?

A network's partials ``dy/dx_j`` are exact functions of its weights, but the weights only encode what the
training data showed them. If the training inputs vary along a few directions only (in the extreme, they all
lie on one line), the data fix the derivative along those directions and nothing else: every other part of
the gradient is whatever the initial weights and the optimiser left there. This module measures that.

* **Global**: singular values of the (centred) training inputs in the model's own normalised coordinates,
  the effective rank, and the directions along which the data carry no information, in input units.
* **Local**, at each query point: the distance to the nearest training point, the rank of the neighbourhood
  of its ``neighbors`` nearest training points (local PCA), the directions supported there, and a flag per
  partial: ``dy/dx_j`` is *identified* at a point only when the point lies inside the data and the unit vector
  ``e_j`` lies (numerically) in the span of the locally supported directions.
* **Ensemble** (optional): the spread of partials across networks trained with different seeds, an
  empirical uncertainty that is large exactly where the data do not pin the partials down.
* **Second order** (with a Hessian, from a bundle exported with ``order=2`` or given by the caller, or on
  request): ``d2y/dx_j dx_k`` is identified where *both* ``e_j`` and ``e_k`` lie in the supported span (locally
  per query point, globally likewise), so on a line no axis-aligned second partial is identified, only the
  second derivative along the line. What the data do identify are the second derivatives along the supported
  directions, ``d_a' H d_b`` (:meth:`Diagnosis.second_directional_derivatives`). A piecewise-linear network
  (relu, leaky_relu, ...) has second derivatives that are zero almost everywhere whatever its data (the bundle's
  ``second_order.zero_almost_everywhere``): the diagnostics then say so instead of reporting zeros as information.

Coordinates and units
---------------------
The model sees ``z = (x - mean) / std`` (a Keras ``Normalization`` layer, taken from the bundle's manifest,
or the training data's own standardisation when there is none), so "how much the data vary along a direction"
is measured in ``z``. A direction ``v`` in ``z`` corresponds to the input-space direction ``std * v``
(element-wise); every direction this module returns is converted back to input units and scaled to unit
length, with its largest component positive. Because the normalisation is diagonal, the coordinate axes are
the same in both systems, so the test "is ``e_j`` in the supported span" does not depend on the choice.
Null directions are the complement of the supported ones in ``z`` (what the model never saw vary), mapped to
input units.

Thresholds (all named parameters of :func:`diagnose`, defaults below)
-------------------------------------------------------------------
``rank_rtol``
    relative singular-value tolerance: a principal direction counts as supported when its singular value is
    at least ``rank_rtol`` times the largest one. The effective rank is the number of such directions.
``local_rtol``
    the same tolerance for the local PCA of each query point's neighbourhood.
``span_tol``
    ``dy/dx_j`` is identified where ``|e_j - P e_j| <= span_tol``, with ``P`` the orthogonal projector onto the
    supported directions in ``z`` (the sine of the angle between ``e_j`` and the supported subspace). Since
    ``dy/dx_j = (1/std_j) dg/dz_j`` and ``dg/dz_j = cos(angle) * (supported part) + sin(angle) * (unconstrained
    part)``, the tolerance bounds the share of the partial that the data leave to the initial weights, measured in
    the model's own units: with very different feature scales a data line can be nearly parallel to an axis in
    ``z`` although it is not in ``x``, and that partial then counts as identified.
``far_factor``
    a query point is *outside* the data when its nearest training point is farther than ``far_factor`` times
    the typical neighbourhood radius (median distance from a distinct training point to its ``neighbors``-th
    nearest other one). Nothing is identified outside the data: the local rank there is 0 (the neighbourhood's
    PCA is still in ``LocalDiagnosis.singular_values`` and ``directions``, for inspection only).
``outlier_z``
    a training row is an *outlier* when some feature lies more than ``outlier_z`` robust standard deviations
    from that feature's median (robust std: 1.4826 x the median absolute deviation; where half the rows or more
    share one value of the feature, so that this is zero, 1.2533 x the mean absolute deviation from the median,
    which flags the rows of a feature that fewer than about 1 / (1.25 * outlier_z) of the rows move away from
    its common value; deviations within the rounding floor below never count). Outliers are set aside, listed
    (``GlobalDiagnosis.outliers``, row indices of ``train_x``), and everything else, including the data's own
    standardisation, is computed from the remaining rows: one row 1e4 away from data of unit spread would otherwise
    carry the largest singular value and push every real direction below ``rank_rtol`` of it. ``None`` (or
    ``inf``) switches the detection off.

Rounding floor (fixed, not a parameter)
---------------------------------------
Spread that the model cannot see is not information. The model reads float32 inputs (``Partials`` converts every
input to float32), so a value ``x_j`` is only known to ``INPUT_EPS * max(|x_j|, |mean_j|)`` (the larger of the raw
value and the normalisation's mean, which the model subtracts in float32). A feature whose spread (in the
training data, or in a query point's neighbourhood) is at most ``RANK_NOISE_FACTOR`` times that resolution
counts as constant, and a principal direction ``v`` is supported only where its singular value also exceeds
``RANK_NOISE_FACTOR`` times the resolution along ``v`` (in normalised units). Identical training points
therefore have rank 0 and identify nothing, and a constant feature divided by a tiny stored std (a Keras
Normalization layer adapted on a constant column stores about 1e-7) does not become information. The floor is
about float resolution, not about small data: spread of 1e-4 of the values' magnitude is far above it.
Duplicate training rows add nothing to a neighbourhood, so the local analysis uses each distinct row once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from nnpartials.errors import InputError, InputTypeError

from nnpartials.validate import as_batch

#: Relative singular-value tolerance of the global rank (singular values below rank_rtol * s_max are "no information").
DEFAULT_RANK_RTOL = 0.05
#: Relative singular-value tolerance of each query point's local PCA.
DEFAULT_LOCAL_RTOL = 0.05
#: Largest sine of the angle between e_j and the supported subspace for which dy/dx_j counts as identified.
DEFAULT_SPAN_TOL = 0.1
#: A query point is outside the data beyond this many typical neighbourhood radii from its nearest training point.
DEFAULT_FAR_FACTOR = 2.0
#: Default neighbourhood size of the local PCA (raised to 3 * n_in + 1 for wide inputs, capped at the number of
#: distinct training rows).
DEFAULT_NEIGHBORS = 16
#: A training row is an outlier beyond this many robust standard deviations from a feature's median.
DEFAULT_OUTLIER_Z = 25.0
#: At most this many training points are used to estimate the typical neighbourhood radius.
RADIUS_PROBES = 2000
#: Relative resolution of the inputs the model reads (float32: bundles compute in float32).
INPUT_EPS = float(np.finfo(np.float32).eps)
#: Spread up to this many times the float resolution of the inputs is rounding noise, not information.
RANK_NOISE_FACTOR = 10.0
#: At most this many outlier row indices are printed (summary, tables); to_dict() and the attribute list all.
OUTLIERS_SHOWN = 20

#: Second partials are listed one per line (summary) and one column each (tables) up to this many pairs j <= k.
PAIRS_SHOWN = 10
#: At most this many second-partial names are listed in one line of the summary.
PAIRS_LISTED = 20
#: How a second partial's identification is decided (printed with it).
SECOND_ORDER_RULE = "identified only where both e_j and e_k lie in the span the data support"

_STD_FLOOR = 1e-12  # a feature whose std is below this is treated as constant (std 1, so it normalises to 0)


# ----------------------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Normalization:
    """The affine map ``z = (x - mean) / std`` the diagnostics measure in."""

    mean: np.ndarray
    std: np.ndarray
    source: str

    def to_z(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def direction_to_input(self, v: np.ndarray) -> np.ndarray:
        """Map directions (rows of ``v``, z units) to unit-length input-unit directions, largest component > 0."""
        d = np.atleast_2d(v) * self.std
        return _canonical_rows(d)


def _canonical_rows(d: np.ndarray) -> np.ndarray:
    d = np.array(d, dtype=np.float64, copy=True)
    if d.size == 0:
        return d
    norms = np.linalg.norm(d, axis=-1, keepdims=True)
    d = np.divide(d, norms, out=np.zeros_like(d), where=norms > 0)
    idx = np.argmax(np.abs(d), axis=-1)
    signs = np.sign(np.take_along_axis(d, idx[..., None], axis=-1))
    signs[signs == 0] = 1.0
    return d * signs


def _read_manifest(bundle) -> Optional[dict]:
    """The manifest of a loaded Bundle, or of a bundle folder read and verified by the one loader."""
    if bundle is None:
        return None
    manifest = getattr(bundle, "manifest", None)
    if isinstance(manifest, dict):
        return manifest
    if isinstance(bundle, (str, os.PathLike)):
        from nnpartials.bundle import load_bundle

        return load_bundle(bundle).manifest
    raise InputTypeError(f"bundle: expected a Bundle or a bundle folder path, got {type(bundle).__name__}")


def _manifest_n_in(manifest: dict) -> Optional[int]:
    try:
        n = sum(int(i["shape"][-1]) for i in manifest["inputs"])  # several inputs are concatenated in order
        return n if n > 0 else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _resolve_normalization(normalization, manifest, x: np.ndarray) -> Normalization:
    n_in = x.shape[1]

    def from_data(source):
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        return Normalization(mean, np.where(std > _STD_FLOOR, std, 1.0), source)

    if normalization is None or (isinstance(normalization, str) and normalization == "auto"):
        if manifest is not None and manifest.get("input_normalization"):
            normalization = manifest["input_normalization"]
            src = "the model's Normalization layer (bundle manifest)"
        else:
            return from_data("standardised with the training data's mean and std"
                             + (" (the model has no Normalization layer)" if manifest is not None else ""))
    elif isinstance(normalization, str) and not os.path.exists(normalization):
        if normalization == "data":
            return from_data("standardised with the training data's mean and std")
        if normalization in ("none", "identity"):
            return Normalization(np.zeros(n_in), np.ones(n_in), "raw input units (no normalisation)")
        raise InputError(f"normalization: expected None, 'auto', 'data', 'none', a dict with 'mean' and 'std', "
                         f"or a bundle; got {normalization!r}")
    else:
        src = "given mean and std"
        if not isinstance(normalization, dict):
            m = _read_manifest(normalization)
            normalization = m.get("input_normalization")
            if not normalization:
                return from_data("standardised with the training data's mean and std "
                                 "(the model has no Normalization layer)")
            src = "the model's Normalization layer (bundle manifest)"
    try:
        mean = np.asarray(normalization["mean"], dtype=np.float64).reshape(-1)
        if "std" in normalization:
            std = np.asarray(normalization["std"], dtype=np.float64).reshape(-1)
        else:
            std = np.sqrt(np.asarray(normalization["variance"], dtype=np.float64).reshape(-1))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"normalization: expected 'mean' and 'std' (or 'variance') per input feature: {exc}") from None
    if mean.size == 1 and n_in > 1:
        mean = np.full(n_in, mean[0])
    if std.size == 1 and n_in > 1:
        std = np.full(n_in, std[0])
    if mean.shape != (n_in,) or std.shape != (n_in,):
        raise InputError(f"normalization: expected {n_in} means and stds (one per input feature), "
                         f"got {mean.size} and {std.size}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        raise InputError("normalization: mean and std must be finite and std non-negative")
    return Normalization(mean, np.where(std > _STD_FLOOR, std, 1.0), src)


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GlobalDiagnosis:
    """Global picture of the training inputs (in the model's normalised coordinates)."""

    singular_values: np.ndarray  # [n_in] std of the normalised data along each principal direction, descending
    relative: np.ndarray  # [n_in] singular_values / singular_values[0]
    rank_rtol: float
    effective_rank: int
    directions_z: np.ndarray  # [n_in, n_in] principal directions (rows) in normalised coordinates
    supported_directions: np.ndarray  # [rank, n_in] unit rows, input units
    null_directions: np.ndarray  # [n_in - rank, n_in] unit rows, input units
    span_residual: np.ndarray  # [n_in] |e_j - P e_j| against the globally supported span
    identified: np.ndarray  # [n_in] bool
    outliers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # row indices set aside
    outlier_z: Optional[float] = DEFAULT_OUTLIER_Z  # None: detection switched off

    @property
    def full_rank(self) -> bool:
        return self.effective_rank == self.singular_values.shape[0]

    @property
    def identified_second(self) -> np.ndarray:
        """``[n_in, n_in]`` bool: ``d2y/dx_j dx_k`` is identified where both ``e_j`` and ``e_k`` are."""
        return self.identified[:, None] & self.identified[None, :]


@dataclass
class LocalDiagnosis:
    """Per query point (arrays over the query batch Q)."""

    nn_distance: np.ndarray  # [Q] distance to the nearest training point, normalised units
    typical_radius: float  # median distance of a training point to its neighbors-th neighbour, normalised units
    outside: np.ndarray  # [Q] bool, nn_distance > far_factor * typical_radius
    singular_values: np.ndarray  # [Q, n_in] local PCA singular values (std along each direction, normalised)
    relative: np.ndarray  # [Q, n_in]
    local_rank: np.ndarray  # [Q] int; 0 outside the data
    directions_z: np.ndarray  # [Q, n_in, n_in] local principal directions (rows), normalised coordinates
    directions: np.ndarray  # [Q, n_in, n_in] the same in input units (unit rows); the first local_rank are supported
    span_residual: np.ndarray  # [Q, n_in] against the supported span (1 outside the data, where it is empty)
    identified: np.ndarray  # [Q, n_in] bool

    def supported(self, i: int) -> np.ndarray:
        """The directions (unit rows, input units) supported at query point ``i``; empty outside the data."""
        if self.outside[i]:
            return self.directions[i, :0]
        return self.directions[i, : int(self.local_rank[i])]

    @property
    def identified_second(self) -> np.ndarray:
        """``[Q, n_in, n_in]`` bool: ``d2y/dx_j dx_k`` is identified at a point where both ``e_j`` and ``e_k`` lie in
        the span supported there (never outside the data)."""
        return self.identified[:, :, None] & self.identified[:, None, :]


@dataclass
class Diagnosis:
    """What :func:`diagnose` found. ``global_`` always; ``local`` when query points were given; ``partials``
    (``[Q, n_out, n_in]``) when a model (bundle) or a Jacobian was given; ``ensemble_std`` with an ensemble;
    ``second_order`` (identification of the second partials) with a Hessian or on request, ``hessian``
    (``[Q, n_out, n_in, n_in]``) when one was given or computed from an ``order=2`` bundle, and
    ``second_derivatives_vanish`` (True, False, or None when unknown) from the bundle's manifest."""

    n_train: int
    n_in: int
    input_names: list
    normalization: Normalization
    global_: GlobalDiagnosis
    neighbors: int
    local_rtol: float
    span_tol: float
    far_factor: float
    query: Optional[np.ndarray] = None
    local: Optional[LocalDiagnosis] = None
    partials: Optional[np.ndarray] = None
    ensemble_mean: Optional[np.ndarray] = None
    ensemble_std: Optional[np.ndarray] = None
    ensemble_size: int = 0
    output_names: list = field(default_factory=list)
    second_order: bool = False
    hessian: Optional[np.ndarray] = None
    hessian_source: Optional[str] = None
    second_derivatives_vanish: Optional[bool] = None
    second_order_note: Optional[str] = None

    # ---- derived views ---------------------------------------------------------------------------------------
    @property
    def identified(self) -> np.ndarray:
        """``[Q, n_in]`` per query point and input (local), or ``[n_in]`` (global) without query points."""
        return self.local.identified if self.local is not None else self.global_.identified

    def masked_partials(self, partials: Optional[np.ndarray] = None) -> np.ndarray:
        """Partials ``[Q, n_out, n_in]`` with NaN wherever ``dy/dx_j`` is not identified at the point."""
        J = self._need_partials(partials)
        mask = self.identified if self.local is not None else np.broadcast_to(self.global_.identified,
                                                                             (J.shape[0], self.n_in))
        return np.where(mask[:, None, :], J, np.nan)

    def directional_derivatives(self, partials: Optional[np.ndarray] = None):
        """Derivatives along the supported directions: ``(D [Q, n_out, n_in], dirs [Q, n_in, n_in])`` where
        ``D[q, :, k] = J[q] @ dirs[q, k]`` for the ``k < local_rank`` supported unit directions (input units) and
        NaN beyond (and everywhere at points outside the data). These are what the data identify."""
        J = self._need_partials(partials)
        if self.local is None:
            raise InputError("directional_derivatives needs query points (diagnose(..., query=...))")
        dirs = self.local.directions
        D = np.einsum("qoj,qkj->qok", J, dirs)
        k = np.arange(self.n_in)[None, :]
        ok = (k < self.local.local_rank[:, None]) & ~self.local.outside[:, None]
        return np.where(ok[:, None, :], D, np.nan), dirs

    @property
    def identified_second(self) -> np.ndarray:
        """``[Q, n_in, n_in]`` per query point (local), or ``[n_in, n_in]`` (global) without query points:
        ``d2y/dx_j dx_k`` is identified where both ``e_j`` and ``e_k`` lie in the supported span."""
        return self.local.identified_second if self.local is not None else self.global_.identified_second

    def masked_hessian(self, hessian: Optional[np.ndarray] = None) -> np.ndarray:
        """Hessians ``[Q, n_out, n_in, n_in]`` with NaN wherever ``d2y/dx_j dx_k`` is not identified at the point."""
        H = self._need_hessian(hessian)
        mask = (self.identified_second if self.local is not None
                else np.broadcast_to(self.global_.identified_second, (H.shape[0], self.n_in, self.n_in)))
        return np.where(mask[:, None, :, :], H, np.nan)

    def second_directional_derivatives(self, hessian: Optional[np.ndarray] = None):
        """Second derivatives along the supported directions: ``(S [Q, n_out, n_in, n_in], dirs [Q, n_in, n_in])``
        with ``S[q, :, a, b] = dirs[q, a] @ H[q] @ dirs[q, b]`` for the ``a, b < local_rank`` supported unit
        directions (input units) and NaN beyond (and everywhere at points outside the data). With ``a = b`` this
        is the second derivative of ``y`` along ``dirs[q, a]`` per unit length; these are what the data identify."""
        H = self._need_hessian(hessian)
        if self.local is None:
            raise InputError("second_directional_derivatives needs query points (diagnose(..., query=...))")
        dirs = self.local.directions
        S = np.einsum("qaj,qojk,qbk->qoab", dirs, H, dirs)
        k = np.arange(self.n_in)
        ok = (k[None, :] < self.local.local_rank[:, None]) & ~self.local.outside[:, None]  # [Q, n_in]
        return np.where((ok[:, :, None] & ok[:, None, :])[:, None], S, np.nan), dirs

    def _need_hessian(self, hessian):
        H = self.hessian if hessian is None else np.asarray(hessian, dtype=np.float64)
        if H is None:
            why = (" (the bundle's second derivatives are zero almost everywhere, so none was computed)"
                   if self.second_derivatives_vanish else "")
            raise InputError("no Hessian: pass a bundle exported with order=2 or hessian= to diagnose(), or hessian= "
                             "here" + why)
        if self.query is not None and (H.ndim != 4 or H.shape[0] != self.query.shape[0]
                                       or H.shape[2:] != (self.n_in, self.n_in)):
            raise InputError(f"hessian: expected shape [{self.query.shape[0]}, n_out, {self.n_in}, {self.n_in}], "
                             f"got {tuple(H.shape)}")
        return H

    def _need_partials(self, partials):
        J = self.partials if partials is None else np.asarray(partials, dtype=np.float64)
        if J is None:
            raise InputError("no partials: pass a bundle or jacobian= to diagnose(), or partials= here")
        if self.query is not None and (J.ndim != 3 or J.shape[0] != self.query.shape[0] or J.shape[2] != self.n_in):
            raise InputError(f"partials: expected shape [{self.query.shape[0]}, n_out, {self.n_in}], "
                             f"got {tuple(J.shape)}")
        return J

    # ---- reporting ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        g = self.global_
        out: dict[str, Any] = {
            "n_train": self.n_train,
            "inputs": self.input_names,
            "normalization": {"mean": self.normalization.mean.tolist(), "std": self.normalization.std.tolist(),
                              "source": self.normalization.source},
            "global": {
                "singular_values": g.singular_values.tolist(),
                "relative_singular_values": g.relative.tolist(),
                "rank_rtol": g.rank_rtol,
                "effective_rank": g.effective_rank,
                "supported_directions": g.supported_directions.tolist(),
                "null_directions": g.null_directions.tolist(),
                "partial_identified": g.identified.tolist(),
                "outlier_z": g.outlier_z,
                "outliers": [int(i) for i in g.outliers],
            },
            "thresholds": {"local_rtol": self.local_rtol, "span_tol": self.span_tol, "far_factor": self.far_factor,
                           "neighbors": self.neighbors},
        }
        if self.local is not None:
            loc = self.local
            out["local"] = {
                "n_points": int(loc.nn_distance.shape[0]),
                "typical_radius": loc.typical_radius,
                "nn_distance": loc.nn_distance.tolist(),
                "outside": loc.outside.tolist(),
                "local_rank": loc.local_rank.tolist(),
                "identified": loc.identified.tolist(),
                "supported_directions": [loc.supported(i).tolist() for i in range(loc.nn_distance.shape[0])],
            }
        if self.partials is not None:
            out["partials"] = self.partials.tolist()
        if self.ensemble_std is not None:
            out["ensemble"] = {"size": self.ensemble_size, "mean": self.ensemble_mean.tolist(),
                               "std": self.ensemble_std.tolist()}
        if self.second_order:
            out["second_order"] = self._second_order_dict()
        return out

    def _second_order_dict(self) -> dict:
        so: dict[str, Any] = {
            "rule": SECOND_ORDER_RULE,
            "global_identified": self.global_.identified_second.tolist(),
            "zero_almost_everywhere": self.second_derivatives_vanish,
            "note": self.second_order_note,
        }
        if self.local is not None:
            so["identified"] = self.local.identified_second.tolist()
        if self.hessian is not None and self.second_derivatives_vanish:
            so["values_omitted"] = ("the network's second derivatives are zero almost everywhere, whatever the data: "
                                    "its Hessian values carry no information about the data")
        elif self.hessian is not None:
            so["hessian_source"] = self.hessian_source
            so["hessian"] = self.hessian.tolist()
            if self.local is not None:
                S, _ = self.second_directional_derivatives()
                # S[q, o, a, b] for the supported directions a, b (supported_directions in "local"); null elsewhere
                so["along_supported"] = [[[[None if math.isnan(v) else float(v) for v in row[:r]] for row in o[:r]]
                                          for o in S[i]] for i, r in enumerate(self._local_ranks())]
        return so

    def _local_ranks(self) -> list:
        loc = self.local
        return [0 if loc.outside[i] else int(loc.local_rank[i]) for i in range(loc.nn_distance.shape[0])]

    def _pairs(self):
        """(j, k, name) of the second partials d2y/dx_j dx_k, j <= k."""
        return [(j, k, _pair_name(self.input_names, j, k)) for j in range(self.n_in) for k in range(j, self.n_in)]

    def counts(self) -> dict:
        """Per input j: how many query points identify dy/dx_j; plus points outside the data and rank histogram."""
        if self.local is None:
            return {}
        loc = self.local
        ranks, freq = np.unique(loc.local_rank[~loc.outside], return_counts=True)
        return {
            "points": int(loc.nn_distance.shape[0]),
            "outside": int(loc.outside.sum()),
            "identified": {name: int(loc.identified[:, j].sum()) for j, name in enumerate(self.input_names)},
            "local_rank": {int(r): int(c) for r, c in zip(ranks, freq)},
            **({"identified_second": {name: int(loc.identified_second[:, j, k].sum()) for j, k, name in self._pairs()}}
               if self.second_order else {}),
        }

    def summary(self) -> str:
        """A plain-text summary (what ``nnpartials diagnose`` prints, without colours)."""
        g = self.global_
        names = self.input_names
        lines = [
            f"training inputs: {self.n_train} points, {self.n_in} features ({', '.join(names)})",
            f"normalisation: {self.normalization.source}",
            _outlier_text(g),
            "singular values (std along principal directions, normalised units): "
            + ", ".join(f"{s:.4g}" for s in g.singular_values),
            "relative: " + ", ".join(f"{r:.3g}" for r in g.relative)
            + f"; effective rank {g.effective_rank} of {self.n_in} (rank_rtol={g.rank_rtol:g})",
        ]
        for d in g.supported_directions:
            lines.append("  supported direction (input units): " + _fmt_dir(d, names))
        for d in g.null_directions:
            lines.append("  no information along (input units): " + _fmt_dir(d, names))
        ident = [n for n, ok in zip(names, g.identified) if ok]
        unid = [n for n, ok in zip(names, g.identified) if not ok]
        if g.effective_rank == 0:
            lines.append("the training inputs do not vary (beyond float rounding): no direction is supported and "
                         "no partial dy/dx_j is identified")
        elif not unid:
            lines.append("globally, every partial dy/dx_j is identified by the data")
        else:
            lines.append("globally NOT identified: " + ", ".join(f"dy/d{n}" for n in unid)
                         + (f"; identified: {', '.join('dy/d' + n for n in ident)}" if ident else "")
                         + " (only derivatives along the supported directions are)")
        if self.local is not None:
            c = self.counts()
            lines.append(f"query points: {c['points']} ({c['outside']} outside the training data, where nothing is "
                         f"supported: local rank 0); local rank inside the data "
                         + (", ".join(f"{r}: {n} points" for r, n in c["local_rank"].items()) or "-"))
            for name in names:
                lines.append(f"  dy/d{name} identified at {c['identified'][name]} of {c['points']} points")
        if self.ensemble_std is not None:
            med = np.median(self.ensemble_std, axis=0)  # [n_out, n_in]
            lines.append(f"ensemble of {self.ensemble_size}: median std of partials across members: "
                         + ", ".join(f"dy/d{n} {med[:, j].max():.3g}" for j, n in enumerate(names)))
        if self.second_order:
            lines += self._second_order_lines()
        return "\n".join(lines)

    def _second_order_lines(self) -> list:
        g = self.global_
        pairs = self._pairs()
        gi = g.identified_second
        lines = [f"second partials d2y/dx_j dx_k: {SECOND_ORDER_RULE}"]
        ok = [name for j, k, name in pairs if gi[j, k]]
        bad = [name for j, k, name in pairs if not gi[j, k]]
        along = (" (only second derivatives along the supported directions, d_a' H d_b, are)"
                 if g.effective_rank else "")
        if not bad:
            lines.append(f"  globally, every second partial ({len(pairs)}) is identified by the data")
        elif not ok:
            lines.append(f"  globally NOT identified: {_names_list(bad)}{along}")
        else:
            lines.append(f"  globally NOT identified: {_names_list(bad)}; identified: {_names_list(ok)}{along}")
        if self.local is not None:
            c = self.counts()["identified_second"]
            q = self.local.nn_distance.shape[0]
            if len(pairs) <= PAIRS_SHOWN:
                for _, _, name in pairs:
                    lines.append(f"  {name} identified at {c[name]} of {q} points")
            else:
                per_point = self.local.identified_second.sum(axis=(1, 2))
                everywhere = sum(1 for v in c.values() if v == q)
                lines.append(f"  {everywhere} of {len(pairs)} second partials identified at all {q} points; entries "
                             f"(j, k) identified per point: min {per_point.min()}, max {per_point.max()} of "
                             f"{self.n_in * self.n_in}")
        if self.second_derivatives_vanish:
            lines.append("  the network's second derivatives are zero almost everywhere: they are 0 wherever they exist, "
                         "whatever the data, so no second-derivative values are reported (zeros that carry no "
                         "information about the data); a smooth activation (tanh, gelu, ...) is needed for curvature")
            if self.second_order_note:
                lines.append(f"  why (bundle manifest, second_order.note): {_vanish_reason(self.second_order_note)}")
        elif self.hessian is not None:
            lines.append(f"  Hessian evaluated at {self.hessian.shape[0]} query points ({self.hessian_source})")
        else:
            lines.append("  no Hessian evaluated: identification from the training inputs only")
        return lines

    def rich_tables(self, max_points: int = 10):
        """rich Tables: the global picture, and (with query points) the first ``max_points`` points."""
        from rich.table import Table

        g = self.global_
        names = self.input_names
        t1 = Table(title=f"Training inputs: effective rank {g.effective_rank} of {self.n_in} "
                         f"(rank_rtol {g.rank_rtol:g})")
        t1.add_column("#", justify="right")
        t1.add_column("singular value", justify="right")
        t1.add_column("relative", justify="right")
        t1.add_column("direction (input units)")
        t1.add_column("data")
        for k in range(self.n_in):
            d = self.normalization.direction_to_input(g.directions_z[k])[0]
            sup = k < g.effective_rank
            t1.add_row(str(k + 1), f"{g.singular_values[k]:.4g}", f"{g.relative[k]:.3g}", _fmt_dir(d, names),
                       "[green]informative[/]" if sup else "[red]no information[/]")
        t1.caption = _outlier_text(g)
        tables = [t1]
        t2 = Table(title="Partials dy/dx_j identified by the training data (global)")
        t2.add_column("partial")
        t2.add_column("distance of e_j from supported span", justify="right")
        t2.add_column("identified")
        for j, n in enumerate(names):
            t2.add_row(f"dy/d{n}", f"{g.span_residual[j]:.3g}",
                       "[green]yes[/]" if g.identified[j] else "[red]no[/]")
        tables.append(t2)
        if self.local is not None:
            loc = self.local
            q = loc.nn_distance.shape[0]
            t3 = Table(title=f"Query points ({min(q, max_points)} of {q} shown; typical neighbourhood radius "
                             f"{loc.typical_radius:.3g} normalised units)")
            t3.add_column("point")
            t3.add_column("dist. to data", justify="right")
            t3.add_column("local rank", justify="right")
            t3.add_column("supported directions")
            for n in names:
                t3.add_column(f"dy/d{n}", justify="right")
            if self.partials is not None:
                t3.add_column("along supported directions", justify="right")
                D, _ = self.directional_derivatives()
            t3.caption = "✓ identified, ✗ not identified by the data (value shown, but not meaningful)"
            for i in range(min(q, max_points)):
                sup = loc.supported(i)
                cells = []
                for j in range(self.n_in):
                    val = "" if self.partials is None else ", ".join(f"{v:.4g}" for v in self.partials[i, :, j])
                    if loc.identified[i, j]:
                        cells.append(f"[green]{val} ✓[/]")
                    else:
                        cells.append(f"[red]{val} ✗[/]")
                if self.partials is not None:
                    r = len(sup)
                    cells.append("; ".join(", ".join(f"{v:.4g}" for v in D[i, :, k]) for k in range(r)) or "—")
                t3.add_row("(" + ", ".join(f"{v:.4g}" for v in self.query[i]) + ")",
                           f"{loc.nn_distance[i]:.3g}" + (" [red]outside[/]" if loc.outside[i] else ""),
                           str(int(loc.local_rank[i])),
                           "; ".join(_fmt_dir(d, names) for d in sup) if len(sup) else "[red]none[/]",
                           *cells)
            tables.append(t3)
        if self.second_order:
            tables += self._second_order_tables(max_points)
        return tables

    def _second_order_tables(self, max_points):
        from rich.table import Table

        g = self.global_
        names = self.input_names
        tables = []
        if self.n_in <= PAIRS_SHOWN:
            t = Table(title="Second partials d2y/dx_j dx_k identified (global)",
                      caption="yes: both e_j and e_k lie in the supported span")
            t.add_column("")
            for n in names:
                t.add_column(f"d/d{n}", justify="center")
            for j, n in enumerate(names):
                t.add_row(f"d/d{n}", *("[green]yes[/]" if g.identified_second[j, k] else "[red]no[/]"
                                       for k in range(self.n_in)))
            tables.append(t)
        if self.local is None:
            return tables
        loc = self.local
        q = loc.nn_distance.shape[0]
        values = self.hessian is not None and not self.second_derivatives_vanish
        t = Table(title=f"Second partials at the query points ({min(q, max_points)} of {q} shown; d_a: the a-th "
                        "supported direction of the point)")
        t.add_column("point")
        t.add_column("local rank", justify="right")
        pairs = self._pairs()
        per_pair = len(pairs) <= PAIRS_SHOWN
        if per_pair:
            for _, _, name in pairs:
                t.add_column(name, justify="right")
        else:
            t.add_column("second partials identified", justify="right")
        if values:
            t.add_column("along supported directions d_a'Hd_b", justify="right")
            S, _ = self.second_directional_derivatives()
        if self.second_derivatives_vanish:
            t.caption = ("✓ identified, ✗ not identified by the data; no values: the network's second derivatives "
                         "are zero almost everywhere")
        else:
            t.caption = "✓ identified, ✗ not identified by the data (value shown, but not meaningful)"
        ident = loc.identified_second
        for i in range(min(q, max_points)):
            cells = []
            if per_pair:
                for j, k, _ in pairs:
                    val = ", ".join(f"{v:.4g}" for v in self.hessian[i, :, j, k]) if values else ""
                    cells.append(f"[green]{val} ✓[/]" if ident[i, j, k] else f"[red]{val} ✗[/]")
            else:
                iu = np.triu_indices(self.n_in)
                cells.append(f"{int(ident[i][iu].sum())} of {len(pairs)}")
            if values:
                r = 0 if loc.outside[i] else int(loc.local_rank[i])
                cells.append("; ".join(f"{a + 1},{b + 1}: " + ", ".join(f"{v:.4g}" for v in S[i, :, a, b])
                                       for a in range(r) for b in range(a, r)) or "—")
            t.add_row("(" + ", ".join(f"{v:.4g}" for v in self.query[i]) + ")", str(int(loc.local_rank[i])), *cells)
        tables.append(t)
        return tables


def _vanish_reason(note: str) -> str:
    """The manifest's ``second_order.note`` without its leading statement (the summary states it already)."""
    head = "second derivatives are zero almost everywhere: "
    return note[len(head):] if note.startswith(head) else note


def _pair_name(names, j, k) -> str:
    return f"d2y/d{names[j]}^2" if j == k else f"d2y/d{names[j]}d{names[k]}"


def _names_list(names: list) -> str:
    shown = ", ".join(names[:PAIRS_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > PAIRS_LISTED else "")


def _outlier_text(g: GlobalDiagnosis) -> str:
    if g.outlier_z is None:
        return "outlier detection off: every training row is used"
    n = int(g.outliers.size)
    if n == 0:
        return f"outliers: none (no row beyond {g.outlier_z:g} robust std of a feature's median)"
    shown = ", ".join(str(int(i)) for i in g.outliers[:OUTLIERS_SHOWN]) + (", ..." if n > OUTLIERS_SHOWN else "")
    return (f"{n} outlier{'s' if n != 1 else ''} set aside (beyond {g.outlier_z:g} robust std of a feature's median; "
            f"everything else is computed without {'them' if n != 1 else 'it'}): row{'s' if n != 1 else ''} {shown}")


def _fmt_dir(d, names) -> str:
    d = np.asarray(d, dtype=np.float64)
    nz = np.abs(d) > 1e-12
    if nz.sum() >= 1:
        ref = d[np.argmax(nz)]  # first non-zero component
        ratios = d / ref
        rat = "(" + ", ".join(f"{r:.4g}" for r in ratios) + ")"
    else:
        rat = "(0)"
    return "(" + ", ".join(f"{v:+.4f}" for v in d) + ") ∝ " + rat


# ----------------------------------------------------------------------------------------------------------------
# computation
# ----------------------------------------------------------------------------------------------------------------
def _pca(points: np.ndarray):
    """Batched PCA: points [..., k, n] -> (std along principal directions [..., n], directions [..., n, n] rows)."""
    centred = points - points.mean(axis=-2, keepdims=True)
    k, n = points.shape[-2], points.shape[-1]
    # all n right singular vectors are needed (null directions included), never the k x k left ones: with k >= n the
    # reduced SVD already has them (full_matrices=True would build a k x k matrix: 3.2 GB for 20000 rows)
    _, s, vt = np.linalg.svd(centred, full_matrices=k < n)
    if s.shape[-1] < n:  # fewer points than dimensions: pad the missing singular values with zeros
        pad = np.zeros(s.shape[:-1] + (n - s.shape[-1],))
        s = np.concatenate([s, pad], axis=-1)
    return s / math.sqrt(max(k - 1, 1)), vt


def _rank(s: np.ndarray, rtol: float, vt: np.ndarray, noise: np.ndarray):
    """Relative singular values and the rank: the leading directions with ``s_k >= rtol * s_max`` whose ``s_k``
    also exceeds the rounding floor along them (``noise``: float resolution per feature, normalised units)."""
    top = s[..., :1]
    rel = np.divide(s, top, out=np.zeros_like(s), where=top > 0)
    floor = RANK_NOISE_FACTOR * np.sqrt(np.einsum("...kj,j->...k", vt ** 2, noise ** 2))
    ok = (rel >= rtol) & (s > floor)
    return rel, np.cumprod(ok, axis=-1).sum(axis=-1)


def _noise_level(x: np.ndarray, norm: Normalization) -> np.ndarray:
    """Float resolution of each feature as the model reads it, in normalised units: the model gets float32
    values of about max(|x_j|, |mean_j|) (it subtracts the mean in float32) and divides by std_j."""
    mag = np.maximum(np.abs(x).max(axis=0), np.abs(norm.mean))
    return INPUT_EPS * mag / norm.std


def _drop_rounding_noise(points: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Batched ``points [..., k, n]`` with every feature whose spread is within the rounding floor set to 0
    (constant): such spread is rounding, and dividing it by a tiny std must not turn it into information."""
    k = points.shape[-2]
    centred = points - points.mean(axis=-2, keepdims=True)
    spread = np.sqrt((centred ** 2).sum(axis=-2) / max(k - 1, 1))  # [..., n], as the singular values in _pca
    flat = spread <= RANK_NOISE_FACTOR * noise
    if not flat.any():
        return points
    return np.where(flat[..., None, :], 0.0, points)


def _outlier_rows(x: np.ndarray, outlier_z: Optional[float]) -> np.ndarray:
    """Rows of ``x`` with some feature beyond ``outlier_z`` robust std from the feature's median (sorted)."""
    if outlier_z is None:
        return np.zeros(0, dtype=np.int64)
    med = np.median(x, axis=0)
    dev = np.abs(x - med)
    floor = RANK_NOISE_FACTOR * INPUT_EPS * np.median(np.abs(x), axis=0)  # rounding: never an outlier
    scale = 1.4826 * np.median(dev, axis=0)  # normal-consistent MAD
    # half the rows or more share one value: the MAD is zero (or rounding); the mean absolute deviation is not
    scale = np.where(scale <= floor, 1.2533 * dev.mean(axis=0), scale)
    far = (dev > floor) & (dev > outlier_z * scale) & (scale > 0)
    rows = np.flatnonzero(far.any(axis=1))
    if x.shape[0] - rows.size < 2:  # no bulk left to speak of: nothing is an outlier
        return np.zeros(0, dtype=np.int64)
    return rows.astype(np.int64)


def _span_residual(vt: np.ndarray, rank) -> np.ndarray:
    """|e_j - P e_j| for each j, P the projector onto the first `rank` rows of vt (batched)."""
    n = vt.shape[-1]
    mask = (np.arange(n) < np.asarray(rank)[..., None]).astype(np.float64)  # [..., n] over rows of vt
    # ||P e_j||^2 = sum_k<rank vt[k, j]^2
    proj_sq = np.einsum("...k,...kj->...j", mask, vt ** 2)
    return np.sqrt(np.clip(1.0 - proj_sq, 0.0, 1.0))


def _knn(ref: np.ndarray, pts: np.ndarray, k: int, chunk_bytes: int = 64 << 20):
    """Indices [len(pts), k] of the k nearest rows of ref for each row of pts (sorted), and their distances."""
    n_ref = ref.shape[0]
    k = min(k, n_ref)
    rows = max(1, chunk_bytes // (8 * max(n_ref, 1)))
    ref_sq = np.einsum("ij,ij->i", ref, ref)
    idx_out = np.empty((pts.shape[0], k), dtype=np.int64)
    dist_out = np.empty((pts.shape[0], k))
    for a in range(0, pts.shape[0], rows):
        p = pts[a:a + rows]
        d2 = ref_sq[None, :] - 2.0 * p @ ref.T + np.einsum("ij,ij->i", p, p)[:, None]
        if k < n_ref:
            part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n_ref), (p.shape[0], n_ref)).copy()
        exact = np.linalg.norm(ref[part] - p[:, None, :], axis=-1)  # exact distances of the candidates
        order = np.argsort(exact, axis=1, kind="stable")
        idx_out[a:a + rows] = np.take_along_axis(part, order, axis=1)
        dist_out[a:a + rows] = np.take_along_axis(exact, order, axis=1)
    return idx_out, dist_out


def _check_outlier_z(value) -> Optional[float]:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputTypeError(f"outlier_z: expected a number or None, got {value!r}") from None
    if not v > 0:  # also NaN
        raise InputError(f"outlier_z: expected a positive number (inf or None: no outlier detection), got {value!r}")
    return None if math.isinf(v) else v


def _check_tol(name, value, lo=0.0, hi=1.0):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputTypeError(f"{name}: expected a number, got {value!r}") from None
    if not (lo < v <= hi) or not math.isfinite(v):
        raise InputError(f"{name}: expected a number in ({lo:g}, {hi:g}], got {value!r}")
    return v


def _jacobian_from(model, query: np.ndarray) -> np.ndarray:
    """Partials [Q, n_out, n_in] of a Partials-like object, a Bundle, or a bundle folder at query points."""
    if hasattr(model, "jacobian"):
        obj = model
    else:
        from nnpartials.runtime.serve import Partials

        obj = Partials(model)
    out = obj.jacobian(query)
    J = out[1] if isinstance(out, tuple) else out
    return np.asarray(J, dtype=np.float64)


def _hessian_from(model, query: np.ndarray) -> np.ndarray:
    """Hessians [Q, n_out, n_in, n_in] of a Partials-like object, a Bundle, or a bundle folder at query points."""
    if hasattr(model, "hessian"):
        obj = model
    else:
        from nnpartials.runtime.serve import Partials

        obj = Partials(model)
    out = obj.hessian(query)
    H = out[2] if isinstance(out, tuple) else out
    return np.asarray(H, dtype=np.float64)


def diagnose(train_x, query=None, *, bundle=None, normalization=None, jacobian=None, ensemble: Optional[Sequence] = None,
             rank_rtol: float = DEFAULT_RANK_RTOL, local_rtol: float = DEFAULT_LOCAL_RTOL,
             span_tol: float = DEFAULT_SPAN_TOL, far_factor: float = DEFAULT_FAR_FACTOR,
             neighbors: Optional[int] = None, input_names: Optional[Sequence[str]] = None,
             outlier_z: Optional[float] = DEFAULT_OUTLIER_Z, hessian=None,
             second_order: Optional[bool] = None) -> Diagnosis:
    """Diagnose which partial derivatives ``dy/dx_j`` the training inputs ``train_x`` can identify.

    Parameters
    ----------
    train_x
        the training inputs, ``[N, n_in]`` (numpy, nested lists, or a DataFrame in the model's column order).
    query
        optional points ``[Q, n_in]`` at which to run the local diagnostics (and evaluate the partials).
    bundle
        optional exported bundle (``Bundle`` or folder): supplies the model's normalisation (its Normalization
        layer), the input names, and, with ``query``, the partials to flag (computed with onnxruntime).
    normalization
        overrides the bundle's: ``None``/``"auto"`` (the bundle's, else the data's standardisation), ``"data"``,
        ``"none"`` (raw units), a dict ``{"mean": [...], "std": [...]}``, or a bundle.
    jacobian
        partials ``[Q, n_out, n_in]`` at ``query`` computed elsewhere (instead of the bundle's).
    ensemble
        optional sequence of members, each a Jacobian array ``[Q, n_out, n_in]``, a ``Partials``-like object, a
        ``Bundle`` or a bundle folder, trained on the same data with different seeds; their spread (std across
        members) is an empirical uncertainty of the partials at ``query``.
    rank_rtol, local_rtol, span_tol, far_factor, neighbors
        thresholds; see the module documentation. Defaults: ``DEFAULT_RANK_RTOL`` (0.05),
        ``DEFAULT_LOCAL_RTOL`` (0.05), ``DEFAULT_SPAN_TOL`` (0.1), ``DEFAULT_FAR_FACTOR`` (2),
        ``DEFAULT_NEIGHBORS`` (16, at least ``3 * n_in + 1``).
    outlier_z
        training rows with a feature beyond this many robust standard deviations from its median are set aside
        and listed in ``global_.outliers`` (default ``DEFAULT_OUTLIER_Z``, 25; ``None`` or ``inf``: keep every row).
    hessian
        second derivatives ``[Q, n_out, n_in, n_in]`` at ``query`` computed elsewhere (instead of the bundle's).
    second_order
        report which second partials ``d2y/dx_j dx_k`` the data identify (``identified_second``; with a Hessian
        also ``masked_hessian()`` and ``second_directional_derivatives()``). ``None`` (default): when ``hessian`` is
        given or ``bundle`` was exported with ``order=2``, whose Hessian is then computed at ``query``
        (``Partials.hessian``), unless the bundle's second derivatives are zero almost everywhere (a
        piecewise-linear network), which the diagnosis then states instead. ``True``: always (an ``order=1``
        ``bundle`` without ``hessian`` raises :class:`~nnpartials.errors.OrderNotAvailableError`); ``False``: never.
    """
    rank_rtol = _check_tol("rank_rtol", rank_rtol)
    local_rtol = _check_tol("local_rtol", local_rtol)
    span_tol = _check_tol("span_tol", span_tol)
    far_factor = _check_tol("far_factor", far_factor, 0.0, math.inf)
    outlier_z = _check_outlier_z(outlier_z)

    manifest = _read_manifest(bundle)
    n_in = _manifest_n_in(manifest) if manifest is not None else None
    if n_in is None:
        arr = train_x.to_numpy() if hasattr(train_x, "to_numpy") and hasattr(train_x, "columns") else train_x
        arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
        if arr.ndim != 2:
            raise InputError(f"train_x: expected a 2-D array [n_points, n_features], got shape {tuple(arr.shape)}")
        n_in = arr.shape[1]
        if n_in < 1:
            raise InputError("train_x: expected at least one feature column")
    x = as_batch(train_x, n_in, name="train_x", dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"train_x: expected at least 2 training points, got {x.shape[0]}")

    if input_names is None:
        input_names = _input_names(manifest, n_in)
    input_names = [str(n) for n in input_names]
    if len(input_names) != n_in:
        raise InputError(f"input_names: expected {n_in} names, got {len(input_names)}")
    out_names = _output_names(manifest)

    # outliers are set aside before anything else (the data's own standardisation included)
    outliers = _outlier_rows(x, outlier_z)
    x_in = np.delete(x, outliers, axis=0) if outliers.size else x
    norm = _resolve_normalization(normalization, manifest, x_in)
    z = norm.to_z(x_in)
    noise = _noise_level(x_in, norm)

    # ---- global ------------------------------------------------------------------------------------------------
    s, vt = _pca(_drop_rounding_noise(z, noise))
    rel, rank = _rank(s, rank_rtol, vt, noise)
    rank = int(rank)
    resid = _span_residual(vt, rank)
    g = GlobalDiagnosis(
        singular_values=s, relative=rel, rank_rtol=rank_rtol, effective_rank=rank, directions_z=vt,
        supported_directions=norm.direction_to_input(vt[:rank]) if rank else np.zeros((0, n_in)),
        null_directions=norm.direction_to_input(vt[rank:]) if rank < n_in else np.zeros((0, n_in)),
        span_residual=resid, identified=resid <= span_tol, outliers=outliers, outlier_z=outlier_z,
    )

    # the local analysis looks at distinct rows: copies of a point add nothing to a neighbourhood
    _, first = np.unique(x_in, axis=0, return_index=True)
    ref = z if first.size == z.shape[0] else z[np.sort(first)]

    k = DEFAULT_NEIGHBORS if neighbors is None else neighbors
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise InputError(f"neighbors: expected an integer >= 2, got {neighbors!r}")
    if neighbors is None:
        k = max(k, 3 * n_in + 1)
    k = int(min(k, ref.shape[0]))

    diag = Diagnosis(n_train=x.shape[0], n_in=n_in, input_names=input_names, normalization=norm, global_=g,
                     neighbors=k, local_rtol=local_rtol, span_tol=span_tol, far_factor=far_factor,
                     output_names=out_names)

    so_manifest = manifest.get("second_order") if manifest is not None else None
    if second_order is None:
        second_order = hessian is not None or so_manifest is not None
    elif not isinstance(second_order, (bool, np.bool_)):
        raise InputTypeError(f"second_order: expected None, True or False, got {second_order!r}")
    elif not second_order and hessian is not None:
        raise InputError("hessian= was given with second_order=False")
    elif second_order and hessian is None and manifest is not None and so_manifest is None:
        from nnpartials.errors import OrderNotAvailableError

        raise OrderNotAvailableError("second_order=True: the bundle was exported without second derivatives; export "
                                     "it again with `nnpartials export MODEL -o BUNDLE --order 2` (Python: "
                                     "export(..., order=2)), or pass hessian=")
    diag.second_order = bool(second_order)
    if second_order and so_manifest is not None:
        diag.second_derivatives_vanish = bool(so_manifest.get("zero_almost_everywhere", False))
        diag.second_order_note = so_manifest.get("note")

    if query is None:
        if jacobian is not None or ensemble is not None or hessian is not None:
            raise InputError("jacobian=, hessian= and ensemble= need query points (the points the derivatives "
                             "belong to)")
        return diag

    q = as_batch(query, n_in, name="query", dtype=np.float64)
    diag.query = q
    qz = norm.to_z(q)

    # typical neighbourhood radius of the training data itself
    if ref.shape[0] > RADIUS_PROBES:
        probes = np.random.RandomState(0).choice(ref.shape[0], RADIUS_PROBES, replace=False)
    else:
        probes = np.arange(ref.shape[0])
    kk = min(k + 1, ref.shape[0])  # +1: a probe's nearest neighbour is itself
    _, pd = _knn(ref, ref[probes], kk)
    radius = float(np.median(pd[:, -1]))

    idx, dist = _knn(ref, qz, k)
    nn = dist[:, 0]
    outside = nn > far_factor * radius if radius > 0 else nn > 0
    ls, lvt = _pca(_drop_rounding_noise(ref[idx], noise))  # [Q, k, n] -> [Q, n], [Q, n, n]
    lrel, lrank = _rank(ls, local_rtol, lvt, noise)
    lrank = np.where(outside, 0, lrank)  # nothing is supported outside the data
    lres = _span_residual(lvt, lrank)
    ident = (lres <= span_tol) & ~outside[:, None]
    diag.local = LocalDiagnosis(
        nn_distance=nn, typical_radius=radius, outside=outside, singular_values=ls, relative=lrel,
        local_rank=lrank.astype(np.int64), directions_z=lvt,
        directions=_canonical_rows(lvt * norm.std[None, None, :]), span_residual=lres, identified=ident,
    )

    if jacobian is not None:
        diag.partials = _check_jac(jacobian, q.shape[0], n_in, "jacobian")
    elif bundle is not None:
        diag.partials = _check_jac(_jacobian_from(bundle, q), q.shape[0], n_in, "bundle partials")

    if hessian is not None:
        diag.hessian = _check_hessian(hessian, q.shape[0], n_in, "hessian")
        diag.hessian_source = "given with hessian="
    elif second_order and bundle is not None and so_manifest is not None and not diag.second_derivatives_vanish:
        diag.hessian = _check_hessian(_hessian_from(bundle, q), q.shape[0], n_in, "bundle Hessian")
        diag.hessian_source = "the bundle's Hessian graph"
    if diag.hessian is not None and diag.partials is not None and diag.hessian.shape[1] != diag.partials.shape[1]:
        raise InputError(f"hessian: {diag.hessian.shape[1]} outputs, but the partials have {diag.partials.shape[1]}")

    if ensemble is not None:
        members = list(ensemble)
        if len(members) < 2:
            raise InputError(f"ensemble: expected at least 2 members, got {len(members)}")
        Js = []
        for i, m in enumerate(members):
            J = m if isinstance(m, np.ndarray) or isinstance(m, list) else _jacobian_from(m, q)
            Js.append(_check_jac(J, q.shape[0], n_in, f"ensemble[{i}]"))
        shapes = {J.shape for J in Js}
        if len(shapes) != 1:
            raise InputError(f"ensemble: members disagree in shape: {sorted(shapes)}")
        stack = np.stack(Js)
        diag.ensemble_mean = stack.mean(axis=0)
        diag.ensemble_std = stack.std(axis=0, ddof=1)
        diag.ensemble_size = len(Js)
    return diag


def _check_jac(J, n_q, n_in, name) -> np.ndarray:
    try:
        J = np.asarray(J, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"{name}: expected a numeric array [Q, n_out, n_in]: {exc}") from None
    if J.ndim == 2 and J.shape == (n_q, n_in):
        J = J[:, None, :]
    if J.ndim != 3 or J.shape[0] != n_q or J.shape[2] != n_in:
        raise InputError(f"{name}: expected partials of shape [{n_q}, n_out, {n_in}], got {tuple(J.shape)}")
    if not np.isfinite(J).all():
        raise InputError(f"{name}: partials contain NaN or Inf")
    return J


def _check_hessian(H, n_q, n_in, name) -> np.ndarray:
    try:
        H = np.asarray(H, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"{name}: expected a numeric array [Q, n_out, n_in, n_in]: {exc}") from None
    if H.ndim == 3 and H.shape == (n_q, n_in, n_in):
        H = H[:, None]
    if H.ndim != 4 or H.shape[0] != n_q or H.shape[2:] != (n_in, n_in):
        raise InputError(f"{name}: expected second derivatives of shape [{n_q}, n_out, {n_in}, {n_in}], "
                         f"got {tuple(H.shape)}")
    if not np.isfinite(H).all():
        raise InputError(f"{name}: second derivatives contain NaN or Inf")
    return H


def _input_names(manifest, n_in) -> list:
    if manifest:
        try:
            cols = [c for i in manifest["inputs"] for c in (i.get("columns") or [])]
            if cols and len(cols) == n_in:
                return [str(c) for c in cols]
        except (KeyError, IndexError, AttributeError, TypeError):
            pass
    return [f"x{j + 1}" for j in range(n_in)]


def _output_names(manifest) -> list:
    if manifest:
        try:
            cols = (manifest.get("y") or {}).get("columns") or manifest["outputs"][0].get("columns")
            if cols:
                return [str(c) for c in cols]
        except (KeyError, IndexError, AttributeError, TypeError):
            pass
    return []
