"""Identifiability diagnostics on synthetic inputs with known geometry (numpy only, fast).

References are the geometry the data were built with (a line of slope 1.5, a circle's tangents, a constant
feature), never numbers produced by the code under test.
"""

import json
import os
import math

import numpy as np
import pytest

from nnpartials.errors import InputError, InputTypeError
from nnpartials.runtime.diagnostics import DEFAULT_RANK_RTOL, diagnose
from nnpartials.tolerances import DIAG_DIRECTION_ATOL


def _line(n=500, slope=1.5, x1_max=6 * math.pi):
    x1 = np.linspace(0.0, x1_max, n)
    return np.stack([x1, slope * x1], axis=1)


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _same_direction(a, b):
    """|sin| of the angle between two vectors (0 when parallel or antiparallel)."""
    a, b = _unit(a), _unit(b)
    return abs(a[0] * b[1] - a[1] * b[0]) if a.size == 2 else np.linalg.norm(np.cross(a, b))


@pytest.mark.parametrize("normalization", [None, "data", "none", {"mean": [3.0, -1.0], "std": [0.5, 0.9]}])
def test_line_is_rank_one_along_1_15_in_input_units(normalization):
    d = diagnose(_line(), normalization=normalization)
    g = d.global_
    assert g.effective_rank == 1
    assert not g.full_rank
    assert g.supported_directions.shape == (1, 2)
    # the data line's direction in input units, whatever coordinates the SVD ran in
    assert _same_direction(g.supported_directions[0], [1.0, 1.5]) < DIAG_DIRECTION_ATOL
    assert g.null_directions.shape == (1, 2)
    assert not g.identified.any()  # neither e_1 nor e_2 lies on the line
    assert g.relative[1] < DEFAULT_RANK_RTOL


def test_identification_is_judged_where_the_model_measures():
    """With std (0.5, 40) the line (1, 1.5) is almost the z1 axis in the model's coordinates (angle
    atan(0.0375 / 2) = 0.019 rad): dy/dx1 is then fixed by the data up to sin(angle) = 1.9 % of the unconstrained
    z-gradient, so it counts as identified; dy/dx2 (the z-null direction) is not."""
    d = diagnose(_line(), normalization={"mean": [0.0, 0.0], "std": [0.5, 40.0]})
    expected = math.sin(math.atan2(1.5 / 40.0, 1.0 / 0.5))
    assert d.global_.span_residual[0] == pytest.approx(expected, rel=1e-6)
    assert d.global_.identified.tolist() == [True, False]
    assert _same_direction(d.global_.supported_directions[0], [1.0, 1.5]) < DIAG_DIRECTION_ATOL


def test_null_direction_is_the_complement_in_normalised_coordinates():
    std = np.array([2.0, 3.0])
    d = diagnose(_line(), normalization={"mean": [0.0, 0.0], "std": std.tolist()})
    s, n = d.global_.supported_directions[0], d.global_.null_directions[0]
    assert abs(np.dot(s / std, n / std)) < 1e-9  # orthogonal where the model measures (z = x / std)
    # in z the line is (1/2, 1.5/3) = (0.5, 0.5) -> null (1, -1) in z -> (2, -3) in input units
    assert _same_direction(n, [2.0, -3.0]) < DIAG_DIRECTION_ATOL


def test_independent_inputs_are_full_rank_and_identified():
    rng = np.random.RandomState(0)
    x = np.stack([rng.uniform(0, 6 * math.pi, 800), rng.uniform(0, 9 * math.pi, 800)], axis=1)
    q = np.stack([rng.uniform(1, 17, 50), rng.uniform(1, 27, 50)], axis=1)
    d = diagnose(x, q)
    assert d.global_.effective_rank == 2 and d.global_.full_rank
    assert d.global_.identified.all()
    assert d.global_.null_directions.shape == (0, 2)
    assert not d.local.outside.any()
    assert (d.local.local_rank == 2).all()
    assert d.local.identified.all()


def test_constant_feature_identifies_only_the_other_partial():
    rng = np.random.RandomState(1)
    x = np.stack([rng.uniform(-1, 1, 300), rng.uniform(-1, 1, 300), np.full(300, 2.5)], axis=1)
    d = diagnose(x, x[:5])
    assert d.global_.effective_rank == 2
    assert d.global_.identified.tolist() == [True, True, False]
    assert _same_direction(d.global_.null_directions[0], [0, 0, 1]) < DIAG_DIRECTION_ATOL
    assert d.local.identified[:, :2].all() and not d.local.identified[:, 2].any()


def test_circle_local_rank_one_with_tangent_directions():
    """A circle is globally rank 2 but locally a curve: the tangent decides which partial is identified."""
    th = np.linspace(0, 2 * math.pi, 2000, endpoint=False)
    x = np.stack([np.cos(th), np.sin(th)], axis=1)
    q = np.array([[1.0, 0.0], [0.0, 1.0], [math.cos(0.7), math.sin(0.7)]])
    d = diagnose(x, q, normalization="none")
    assert d.global_.effective_rank == 2
    assert d.local.local_rank.tolist() == [1, 1, 1]
    tangents = [[0.0, 1.0], [1.0, 0.0], [-math.sin(0.7), math.cos(0.7)]]
    for i, tan in enumerate(tangents):
        assert _same_direction(d.local.supported(i)[0], tan) < 1e-2
    # at (1, 0) the data run along x2: dy/dx2 identified, dy/dx1 not; at (0, 1) the other way round
    assert d.local.identified[0].tolist() == [False, True]
    assert d.local.identified[1].tolist() == [True, False]
    assert d.local.identified[2].tolist() == [False, False]


def test_points_far_from_the_data_identify_nothing():
    x = _line(400)
    q = np.array([[3.0, 4.5], [3.0, 1.0], [100.0, 150.0]])  # on the line, off it, beyond its end
    d = diagnose(x, q)
    assert d.local.outside.tolist() == [False, True, True]
    assert not d.local.identified.any()
    assert len(d.local.supported(0)) == 1 and len(d.local.supported(1)) == 0
    # nearest-neighbour distance against a brute-force reference (normalised units)
    z = (x - x.mean(0)) / x.std(0)
    zq = (q - x.mean(0)) / x.std(0)
    ref = np.sqrt(((zq[:, None, :] - z[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(d.local.nn_distance, ref, rtol=1e-9, atol=1e-12)


def test_directional_derivatives_and_masking_with_analytic_partials():
    """J of sin(x1) + cos(x2) on the line: the supported derivative is (J . (1, 1.5)) / |(1, 1.5)|."""
    x = _line(600)
    t = np.linspace(0.5, 18.0, 40)
    q = np.stack([t, 1.5 * t], axis=1)
    J = np.stack([np.cos(t), -np.sin(1.5 * t)], axis=1)[:, None, :]
    d = diagnose(x, q, jacobian=J)
    D, dirs = d.directional_derivatives()
    expected = (np.cos(t) - 1.5 * np.sin(1.5 * t)) / math.hypot(1.0, 1.5)
    np.testing.assert_allclose(D[:, 0, 0], expected, rtol=1e-6, atol=1e-9)
    assert np.isnan(D[:, 0, 1]).all()  # no second supported direction
    assert np.isnan(d.masked_partials()).all()  # neither partial is identified on a line


def test_ensemble_spread_and_shapes():
    rng = np.random.RandomState(2)
    x = rng.normal(size=(200, 2))
    q = x[:7]
    members = [rng.normal(size=(7, 1, 2)) for _ in range(4)]
    d = diagnose(x, q, ensemble=members)
    assert d.ensemble_size == 4
    np.testing.assert_allclose(d.ensemble_std, np.std(np.stack(members), axis=0, ddof=1))
    with pytest.raises(InputError, match="at least 2"):
        diagnose(x, q, ensemble=members[:1])
    with pytest.raises(InputError, match="shape"):
        diagnose(x, q, ensemble=[members[0], rng.normal(size=(6, 1, 2))])


def test_knn_chunks_agree_with_one_chunk():
    from nnpartials.runtime.diagnostics import _knn

    rng = np.random.RandomState(3)
    ref, pts = rng.normal(size=(300, 3)), rng.normal(size=(50, 3))
    i1, d1 = _knn(ref, pts, 5)
    i2, d2 = _knn(ref, pts, 5, chunk_bytes=8 * 300 * 3)  # three rows per chunk
    np.testing.assert_array_equal(i1, i2)
    brute = np.sort(np.sqrt(((pts[:, None] - ref[None]) ** 2).sum(-1)), axis=1)[:, :5]
    np.testing.assert_allclose(d1, brute, rtol=1e-12)


def test_normalization_read_from_a_bundle_manifest(tmp_path, seed_bundle):
    """A bundle folder is read by the one loader (hashes verified): its Normalization statistics and column names."""
    from nnpartials.errors import BundleError

    with open(os.path.join(seed_bundle, "manifest.json")) as fh:
        manifest = json.load(fh)
    d = diagnose(_line(100), normalization=seed_bundle)
    np.testing.assert_allclose(d.normalization.std, manifest["input_normalization"]["std"])
    np.testing.assert_allclose(d.normalization.mean, manifest["input_normalization"]["mean"])
    assert "Normalization layer" in d.normalization.source
    d = diagnose(_line(100), bundle=seed_bundle)
    assert d.input_names == manifest["inputs"][0]["columns"]
    assert f"dy/d{d.input_names[0]}" in d.summary()
    # a folder with only a hand-written manifest is not a bundle: the loader refuses it
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs": manifest["inputs"], "y": {"columns": ["y"]}}))
    with pytest.raises(BundleError):
        diagnose(_line(100), normalization=str(tmp_path))


@pytest.mark.parametrize("train,query,kw,err,match", [
    (np.full((10, 2), np.nan), None, {}, InputError, "finite"),
    (np.ones((1, 2)), None, {}, InputError, "at least 2"),
    (np.ones((5, 2, 2)), None, {}, InputError, "2-D"),
    (np.array([["a", "b"], ["c", "d"]]), None, {}, InputTypeError, "dtype"),
    (np.ones((10, 2)), np.ones((3, 3)), {}, InputError, "2 features"),
    (np.ones((10, 2)), [[1.0, np.inf]], {}, InputError, "finite"),
    (np.ones((10, 2)), None, {"rank_rtol": 0.0}, InputError, "rank_rtol"),
    (np.ones((10, 2)), None, {"span_tol": 2.0}, InputError, "span_tol"),
    (np.ones((10, 2)), None, {"neighbors": 1}, InputError, "neighbors"),
    (np.ones((10, 2)), None, {"outlier_z": 0.0}, InputError, "outlier_z"),
    (np.ones((10, 2)), None, {"outlier_z": "many"}, InputTypeError, "outlier_z"),
    (np.ones((10, 2)), None, {"normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}}, InputError, "2 means"),
    (np.ones((10, 2)), None, {"normalization": "bogus"}, InputError, "normalization"),
    (np.ones((10, 2)), None, {"jacobian": np.zeros((10, 1, 2))}, InputError, "query"),
    (np.ones((10, 2)), np.ones((3, 2)), {"jacobian": np.zeros((4, 1, 2))}, InputError, "shape"),
])
def test_bad_inputs_raise_clear_errors(train, query, kw, err, match):
    with pytest.raises(err, match=match):
        diagnose(train, query, **kw)


def test_summary_and_json_are_complete():
    d = diagnose(_line(300), _line(300)[::50], jacobian=np.zeros((6, 1, 2)))
    text = d.summary()
    assert "effective rank 1 of 2" in text and "∝ (1, 1.5)" in text
    out = json.loads(json.dumps(d.to_dict()))
    assert out["global"]["effective_rank"] == 1
    assert out["local"]["identified"] == [[False, False]] * 6


# ---- silent wrong answers: degenerate data, outliers, far points --------------------------------------------------
@pytest.mark.parametrize("normalization", [None, "data", "none", {"mean": [0.0, 0.0, 0.0], "std": [1e-7, 1e-7, 1e-7]}])
def test_identical_points_identify_nothing(normalization):
    """100 copies of one point span no direction at all: rank 0 globally and locally, no partial identified.
    (A Keras Normalization layer adapted on constant data stores std ~ epsilon = 1e-7: dividing rounding noise
    by it must not manufacture information.)"""
    x = np.tile([[0.1, 3.7, -250.3]], (100, 1))
    q = np.array([[0.1, 3.7, -250.3], [0.1 + 1e-3, 3.7, -250.3]])
    d = diagnose(x, q, normalization=normalization)
    g = d.global_
    assert g.effective_rank == 0 and not g.full_rank
    assert g.supported_directions.shape == (0, 3) and g.null_directions.shape == (3, 3)
    assert not g.identified.any()
    assert (d.local.local_rank == 0).all()
    assert not d.local.identified.any()
    assert all(len(d.local.supported(i)) == 0 for i in range(len(q)))
    assert "effective rank 0 of 3" in d.summary()
    assert json.loads(json.dumps(d.to_dict()))["global"]["effective_rank"] == 0


def test_points_identical_up_to_float32_rounding_identify_nothing():
    """A point that differs between rows only in its last float32 bits (values that went through float32
    arithmetic) is still one point: the model, which reads float32, cannot tell the rows apart."""
    base = np.array([0.1, 3.7, -250.3], dtype=np.float32)
    rng = np.random.RandomState(5)
    steps = rng.randint(-2, 3, size=(100, 3))  # up to 2 ulps either way
    x = np.nextafter(base, np.where(steps > 0, np.inf, -np.inf).astype(np.float32)).astype(np.float64)
    x = np.where(steps == 0, base.astype(np.float64), x)
    assert len(np.unique(x, axis=0)) > 1  # really not bitwise identical
    for normalization in (None, "none", {"mean": base.tolist(), "std": [1e-7, 1e-7, 1e-7]}):
        d = diagnose(x, x[:3], normalization=normalization)
        assert d.global_.effective_rank == 0, normalization
        assert not d.global_.identified.any() and not d.local.identified.any()
        assert (d.local.local_rank == 0).all()


def test_constant_feature_with_a_tiny_stored_std_stays_unidentified():
    """A feature that is constant in float32 terms, normalised by a Keras-style std of 1e-7, is not information."""
    rng = np.random.RandomState(6)
    const = np.float32(2.5)
    x3 = np.where(rng.rand(400) < 0.5, const, np.nextafter(const, np.float32(3))).astype(np.float64)  # 1 ulp apart
    x = np.stack([rng.uniform(-1, 1, 400), rng.uniform(-1, 1, 400), x3], axis=1)
    norm = {"mean": [0.0, 0.0, 2.5], "std": [0.58, 0.58, 1e-7]}
    d = diagnose(x, x[:5], normalization=norm)
    assert d.global_.effective_rank == 2
    assert d.global_.identified.tolist() == [True, True, False]
    assert _same_direction(d.global_.null_directions[0], [0, 0, 1]) < DIAG_DIRECTION_ATOL
    assert d.local.identified[:, :2].all() and not d.local.identified[:, 2].any()


@pytest.mark.parametrize("normalization", [None, "none"])
def test_small_but_real_spread_is_not_rounding_noise(normalization):
    """The floor is about float resolution, not about small data: rank-2 data whose spread is 1e-3 of their
    magnitude (and a line with the same relative spread) keep their geometric rank."""
    rng = np.random.RandomState(7)
    x = 1000.0 + rng.uniform(-1.0, 1.0, size=(500, 2))
    d = diagnose(x, x[:10], normalization=normalization)
    assert d.global_.effective_rank == 2 and d.global_.identified.all()
    assert (d.local.local_rank == 2).all() and d.local.identified.all()
    assert d.global_.outliers.size == 0
    t = rng.uniform(-1.0, 1.0, 500)
    line = np.stack([1000.0 + t, -3000.0 + 1.5 * t], axis=1)
    d = diagnose(line, line[:10], normalization=normalization)
    assert d.global_.effective_rank == 1
    assert _same_direction(d.global_.supported_directions[0], [1.0, 1.5]) < DIAG_DIRECTION_ATOL


def _rank3_in_4d(n=2000, seed=8):
    """Points of the hyperplane x . normal = 1 in R^4 (rank 3), spread over a unit-sized patch."""
    rng = np.random.RandomState(seed)
    basis = np.array([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.5]])
    normal = np.array([-2.0, 1.0, -0.5, 1.0])
    assert np.allclose(basis @ normal, 0.0)
    x = rng.uniform(-1.0, 1.0, size=(n, 3)) @ basis + normal / normal.dot(normal)
    return x, normal


@pytest.mark.parametrize("normalization", [None, "none"])
def test_one_gross_outlier_does_not_collapse_the_rank(normalization):
    x, normal = _rank3_in_4d()
    x[1234] += 1e4 * np.array([0.6, -0.3, 0.7, 0.25])
    q = np.array([[0.1, 0.2, -0.1, 0.0]])
    q = q - (q @ normal - 1.0)[:, None] * normal / normal.dot(normal)  # on the hyperplane
    d = diagnose(x, q, normalization=normalization)
    g = d.global_
    assert g.outliers.tolist() == [1234]
    assert g.effective_rank == 3
    assert g.null_directions.shape == (1, 4)
    if normalization == "none":  # the plane's normal, in input units
        assert abs(_unit(g.null_directions[0]) @ _unit(normal)) > 1 - 1e-8
    assert d.local.local_rank.tolist() == [3]
    # reported everywhere a reader looks
    assert "1 outlier" in d.summary() and "1234" in d.summary()
    out = json.loads(json.dumps(d.to_dict()))
    assert out["global"]["outliers"] == [1234] and out["global"]["effective_rank"] == 3
    from rich.console import Console

    console = Console(record=True, width=200)
    for t in d.rich_tables():
        console.print(t)
    assert "1234" in console.export_text()


def test_outlier_along_a_constant_feature_does_not_raise_the_rank():
    """Rank-2 data whose third feature is constant, plus one row 1e4 away along that feature: one row cannot
    identify dy/dx3 for the whole data set."""
    rng = np.random.RandomState(9)
    x = np.stack([rng.uniform(-1, 1, 2000), rng.uniform(-1, 1, 2000), np.full(2000, 4.0)], axis=1)
    x[17, 2] += 1e4
    d = diagnose(x, x[100:103])
    assert d.global_.outliers.tolist() == [17]
    assert d.global_.effective_rank == 2
    assert d.global_.identified.tolist() == [True, True, False]
    assert _same_direction(d.global_.null_directions[0], [0, 0, 1]) < DIAG_DIRECTION_ATOL
    assert not d.local.identified[:, 2].any()


def test_outlier_detection_can_be_switched_off():
    x, _ = _rank3_in_4d()
    x[5] += 1e4
    d = diagnose(x, outlier_z=None)
    assert d.global_.outliers.size == 0
    assert d.global_.effective_rank == 1  # what the raw SVD says: the outlier dominates


@pytest.mark.parametrize("case", ["normal", "exponential", "binary", "circle"])
def test_ordinary_data_have_no_outliers(case):
    """Heavy-ish tails, a rare binary feature and a curve are data, not outliers."""
    rng = np.random.RandomState(10)
    if case == "normal":
        x = rng.normal(size=(20000, 3))
    elif case == "exponential":
        x = rng.exponential(size=(20000, 2))
    elif case == "binary":
        x = np.stack([rng.uniform(0, 1, 2000), (rng.rand(2000) < 0.1).astype(float)], axis=1)
    else:
        th = rng.uniform(0, 2 * math.pi, 2000)
        x = np.stack([np.cos(th), np.sin(th)], axis=1)
    d = diagnose(x)
    assert d.global_.outliers.size == 0
    assert d.global_.effective_rank == x.shape[1]


def test_far_query_has_no_local_rank():
    """Outside the data nothing is supported, so the local rank there is 0 in every view (not the rank of some
    distant neighbourhood beside 'supported: none')."""
    x = _line(400)
    q = np.array([[3.0, 4.5], [100.0, 150.0], [3.0, 40.0]])  # on the line; beyond its end; far off it
    d = diagnose(x, q, jacobian=np.ones((3, 1, 2)))
    loc = d.local
    assert loc.outside.tolist() == [False, True, True]
    assert loc.local_rank.tolist() == [1, 0, 0]
    assert not loc.identified.any()
    assert len(loc.supported(1)) == 0 and len(loc.supported(2)) == 0
    np.testing.assert_array_equal(loc.span_residual[1:], 1.0)  # e_j is nowhere near an empty span
    assert np.isnan(d.directional_derivatives()[0][1:]).all()
    out = json.loads(json.dumps(d.to_dict()))
    assert out["local"]["local_rank"] == [1, 0, 0]
    assert out["local"]["supported_directions"][1:] == [[], []]
    assert d.counts()["local_rank"] == {1: 1}
    from rich.console import Console

    console = Console(record=True, width=250)
    for t in d.rich_tables():
        console.print(t)
    rows = [r for r in console.export_text().splitlines() if "outside" in r]
    assert len(rows) == 2
    for r in rows:
        cells = [c.strip() for c in r.split("│")]
        assert cells[3] == "0" and cells[4] == "none", cells


def test_replicated_design_points_are_one_point_each_locally():
    """A design of 60 distinct points run 20 times each: a neighbourhood of 16 copies of one point spans
    nothing, so the local PCA must look at distinct points (it sees the 2-D design)."""
    rng = np.random.RandomState(11)
    design = rng.uniform(-1, 1, size=(60, 2))
    x = np.repeat(design, 20, axis=0)
    d = diagnose(x, design[:10])
    assert d.global_.effective_rank == 2 and d.global_.outliers.size == 0
    assert not d.local.outside.any()
    assert (d.local.local_rank == 2).all()
    assert d.local.identified.all()


def test_diagnose_cli_has_the_outlier_flag():
    import argparse

    from nnpartials.commands import diagnose as cmd
    from nnpartials.runtime.diagnostics import DEFAULT_OUTLIER_Z

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    assert p.parse_args(["b", "--data", "t.csv"]).outlier_z == DEFAULT_OUTLIER_Z
    assert math.isinf(p.parse_args(["b", "--data", "t.csv", "--outlier-z", "inf"]).outlier_z)


# ---- second order: d2y/dx_j dx_k is identified only where both e_j and e_k lie in the supported span --------------
def _quadratic_hessian():
    """The Hessian of y = x1^2 + 3 x1 x2 - 2 x2^2 (+ any linear part): constant, [[2, 3], [3, -4]]."""
    return np.array([[2.0, 3.0], [3.0, -4.0]])


def test_second_partials_on_a_line_are_not_identified_only_the_one_along_it():
    """Data on the line (1, 1.5): none of the axis-aligned second partials is identified (neither e_1 nor e_2 lies on
    the line), locally or globally; the second derivative along the line is u' A u, u the unit line direction."""
    x = _line(600)
    t = np.linspace(0.5, 18.0, 30)
    q = np.stack([t, 1.5 * t], axis=1)
    A = _quadratic_hessian()
    d = diagnose(x, q, hessian=np.broadcast_to(A, (30, 1, 2, 2)))
    assert d.second_order
    assert d.identified_second.shape == (30, 2, 2) and not d.identified_second.any()
    assert d.global_.identified_second.shape == (2, 2) and not d.global_.identified_second.any()
    assert np.isnan(d.masked_hessian()).all()
    S, dirs = d.second_directional_derivatives()
    u = _unit([1.0, 1.5])
    np.testing.assert_allclose(S[:, 0, 0, 0], u @ A @ u, rtol=1e-6)  # (2 + 9 - 9) / 3.25
    assert np.isnan(S[:, 0, 0, 1]).all() and np.isnan(S[:, 0, 1, 0]).all() and np.isnan(S[:, 0, 1, 1]).all()
    out = json.loads(json.dumps(d.to_dict()))
    so = out["second_order"]
    assert so["global_identified"] == [[False, False], [False, False]]
    assert so["identified"][0] == [[False, False], [False, False]]
    assert so["along_supported"][0] == [[[pytest.approx(u @ A @ u)]]]  # one output, one supported direction
    text = d.summary()
    assert "globally NOT identified: d2y/dx1^2, d2y/dx1dx2, d2y/dx2^2" in text
    assert "d2y/dx1dx2 identified at 0 of 30 points" in text


def test_full_rank_data_identify_every_second_partial():
    rng = np.random.RandomState(0)
    x = np.stack([rng.uniform(0, 6 * math.pi, 800), rng.uniform(0, 9 * math.pi, 800)], axis=1)
    q = np.stack([rng.uniform(1, 17, 20), rng.uniform(1, 27, 20)], axis=1)
    A = _quadratic_hessian()
    H = np.broadcast_to(A, (20, 1, 2, 2))
    d = diagnose(x, q, hessian=H)
    assert d.identified_second.all() and d.global_.identified_second.all()
    np.testing.assert_array_equal(d.masked_hessian(), H)
    assert "globally, every second partial (3) is identified" in d.summary()


def test_circle_tangent_gives_the_second_derivative_along_it():
    """A circle is locally a curve: at (1, 0) the data run along x2, so d2y/dx2^2 (= A[1, 1]) is identified and is
    the second derivative along the tangent; at (0, 1) the same for x1 (A[0, 0]); the mixed one nowhere."""
    th = np.linspace(0, 2 * math.pi, 2000, endpoint=False)
    x = np.stack([np.cos(th), np.sin(th)], axis=1)
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    A = _quadratic_hessian()
    d = diagnose(x, q, normalization="none", hessian=np.broadcast_to(A, (2, 1, 2, 2)))
    assert d.identified_second[0].tolist() == [[False, False], [False, True]]
    assert d.identified_second[1].tolist() == [[True, False], [False, False]]
    M = d.masked_hessian()
    assert M[0, 0, 1, 1] == A[1, 1] and np.isnan(M[0, 0, [0, 0, 1], [0, 1, 0]]).all()
    assert M[1, 0, 0, 0] == A[0, 0] and np.isnan(M[1, 0, [0, 1, 1], [1, 0, 1]]).all()
    S, _ = d.second_directional_derivatives()
    # the local PCA's tangent is within sin(angle) 1e-2 of the true one (as the first-order test holds it), and
    # d' A d moves by at most 2 |A|_2 sin(angle) when d turns by that angle
    bound = 2 * np.linalg.norm(A, 2) * 1e-2
    assert abs(S[0, 0, 0, 0] - A[1, 1]) <= bound and abs(S[1, 0, 0, 0] - A[0, 0]) <= bound


def test_masked_hessian_masks_exactly_the_pairs_with_the_constant_feature():
    """x3 constant: d2y/dx_j dx_k identified exactly for j, k in {1, 2}; rank-2 support gives a 2 x 2 block of second
    directional derivatives, whose trace over an orthonormal pair of directions (normalization none) is the
    trace of the upper-left block of H."""
    rng = np.random.RandomState(1)
    x = np.stack([rng.uniform(-1, 1, 600), rng.uniform(-1, 1, 600), np.full(600, 2.5)], axis=1)
    q = x[:4]
    B = np.array([[1.0, 2.0, 5.0], [2.0, -3.0, 7.0], [5.0, 7.0, 11.0]])
    H = np.broadcast_to(B, (4, 2, 3, 3)) * np.array([1.0, -2.0])[None, :, None, None]  # two outputs
    d = diagnose(x, q, hessian=H, normalization="none")
    expected = np.zeros((3, 3), bool)
    expected[:2, :2] = True
    assert (d.identified_second == expected).all()
    assert (d.global_.identified_second == expected).all()
    M = d.masked_hessian()
    assert M.shape == (4, 2, 3, 3)
    np.testing.assert_array_equal(np.isnan(M), np.broadcast_to(~expected, M.shape))
    np.testing.assert_array_equal(M[:, :, :2, :2], H[:, :, :2, :2])
    S, dirs = d.second_directional_derivatives()
    assert np.isfinite(S[:, :, :2, :2]).all() and np.isnan(S[:, :, 2, :]).all() and np.isnan(S[:, :, :, 2]).all()
    # orthonormal supported directions spanning the x1-x2 plane: the trace of the block is basis-independent
    np.testing.assert_allclose(np.einsum("qoaa->qo", S[:, :, :2, :2]), np.broadcast_to([-2.0, 4.0], (4, 2)),
                               rtol=1e-6, atol=1e-6)
    out = json.loads(json.dumps(d.to_dict()))
    assert out["second_order"]["identified"][0] == expected.tolist()
    assert d.counts()["identified_second"] == {"d2y/dx1^2": 4, "d2y/dx1dx2": 4, "d2y/dx1dx3": 0, "d2y/dx2^2": 4,
                                               "d2y/dx2dx3": 0, "d2y/dx3^2": 0}


def test_second_order_identification_without_a_hessian_and_points_outside():
    """second_order=True without a Hessian: identification from the data only; outside the data nothing."""
    x = _line(400)
    q = np.array([[3.0, 4.5], [3.0, 40.0]])
    d = diagnose(x, q, second_order=True)
    assert not d.identified_second.any()
    assert "no Hessian evaluated" in d.summary()
    with pytest.raises(InputError, match="no Hessian"):
        d.masked_hessian()
    S, _ = d.second_directional_derivatives(np.ones((2, 1, 2, 2)))
    assert S[0, 0, 0, 0] == pytest.approx(_unit([1, 1.5]).sum() ** 2) and np.isnan(S[1]).all()  # outside: nothing
    assert "second_order" not in diagnose(x, q).to_dict()  # off unless asked or a Hessian is there


@pytest.mark.parametrize("kw,err,match", [
    ({"hessian": np.zeros((3, 1, 2, 2))}, InputError, "query"),
    ({"query": np.ones((3, 2)), "hessian": np.zeros((4, 1, 2, 2))}, InputError, "shape"),
    ({"query": np.ones((3, 2)), "hessian": np.full((3, 1, 2, 2), np.nan)}, InputError, "NaN"),
    ({"query": np.ones((3, 2)), "hessian": np.zeros((3, 1, 2, 2)), "second_order": False}, InputError, "second_order"),
    ({"second_order": "yes"}, InputTypeError, "second_order"),
])
def test_second_order_bad_inputs(kw, err, match):
    kw = dict(kw)
    q = kw.pop("query", None)
    with pytest.raises(err, match=match):
        diagnose(np.random.RandomState(0).normal(size=(10, 2)), q, **kw)


def _onnx_mlp(act: str, W1, b1, w2):
    """y = act(x W1 + b1) @ w2: a hand-built ONNX model (no training framework)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for a, n in ((W1, "W1"), (b1, "b1"), (w2, "w2"))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["z0"]), helper.make_node("Add", ["z0", "b1"], ["z"]),
             helper.make_node(act, ["z"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_W1 = np.array([[0.7, -0.4, 0.3], [0.2, 0.9, -0.5]])
_B1 = np.array([0.1, -0.2, 0.05])
_W2 = np.array([[1.2], [-0.8], [0.6]])


def _tanh_mlp_hessian(x):
    """Analytic Hessian of y = tanh(x W1 + b1) @ w2: sum_k w2_k tanh''(z_k) W1[:, k] W1[:, k]',
    with tanh'' = -2 h (1 - h^2)."""
    h = np.tanh(x @ _W1 + _B1)
    c = -2.0 * h * (1.0 - h ** 2) * _W2[:, 0]  # [N, 3]
    return np.einsum("nk,jk,lk->njl", c, _W1, _W1)[:, None]


@pytest.fixture(scope="module")
def order2_bundles(tmp_path_factory):
    import nnpartials

    out = tmp_path_factory.mktemp("order2")
    box = np.random.RandomState(0).uniform(-2, 2, size=(200, 2)).astype(np.float32)
    tanh = nnpartials.export(_onnx_mlp("Tanh", _W1, _B1, _W2), out / "tanh", data=box, order=2, n_validation=50)
    relu = nnpartials.export(_onnx_mlp("Relu", _W1, _B1, _W2), out / "relu", data=box, order=2, n_validation=50)
    return tanh.path, relu.path


def test_hessian_from_an_order2_bundle_on_a_line(order2_bundles, tmp_path):
    """A smooth (tanh) bundle: its Hessian at the query points against the analytic one; on line data only
    d_1' H d_1 along the line is identified, and the entries are masked."""
    tanh, _ = order2_bundles
    x = np.stack([np.linspace(-1, 1, 300), 1.5 * np.linspace(-1, 1, 300)], axis=1)
    q = x[10:290:40]
    d = diagnose(x, q, bundle=tanh)
    assert d.second_order and d.second_derivatives_vanish is False
    H_ref = _tanh_mlp_hessian(q)
    np.testing.assert_allclose(d.hessian, H_ref, rtol=1e-4, atol=1e-5)
    assert np.isnan(d.masked_hessian()).all()
    S, _ = d.second_directional_derivatives()
    u = _unit([1.0, 1.5])
    np.testing.assert_allclose(S[:, 0, 0, 0], np.einsum("j,njk,k->n", u, H_ref[:, 0], u), rtol=1e-4, atol=1e-5)
    assert "Hessian evaluated at 7 query points" in d.summary()
    assert d.to_dict()["second_order"]["hessian_source"] == "the bundle's Hessian graph"
    # the order can be switched off, and an order-1 request never reads the Hessian graph
    assert not diagnose(x, q, bundle=tanh, second_order=False).second_order


def test_piecewise_linear_bundle_says_its_second_derivatives_vanish(order2_bundles, tmp_path, capsys):
    """A relu bundle: the diagnosis states that the second derivatives are zero almost everywhere instead of
    reporting zero Hessians as values (summary, JSON, CLI)."""
    from nnpartials.cli import main

    _, relu = order2_bundles
    rng = np.random.RandomState(2)
    x = rng.uniform(-1, 1, size=(300, 2))
    d = diagnose(x, x[:5], bundle=relu)
    assert d.second_order and d.second_derivatives_vanish is True
    assert d.hessian is None and d.identified_second.all()
    assert "zero almost everywhere" in d.summary() and "Hessian evaluated" not in d.summary()
    so = json.loads(json.dumps(d.to_dict()))["second_order"]
    assert so["zero_almost_everywhere"] is True and "hessian" not in so and "along_supported" not in so
    # the command line: automatic with an order-2 bundle, off with --order 1
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "d.json"
    assert main(["diagnose", relu, "--data", str(tmp_path / "x.npy"), "--points", "0.1,0.2;0.5,-0.5",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zero almost everywhere" in text and "d2y/dx1dx2" in text
    assert json.loads(out.read_text())["second_order"]["identified"] == [[[True, True], [True, True]]] * 2
    assert main(["diagnose", relu, "--data", str(tmp_path / "x.npy"), "--order", "1", "--json", str(out), "-f"]) == 0
    assert "second_order" not in json.loads(out.read_text())


def test_diagnose_cli_order2_refuses_an_order1_bundle(seed_bundle, tmp_path, capsys):
    from nnpartials.cli import main
    from nnpartials.errors import OrderNotAvailableError

    np.save(tmp_path / "x.npy", _line(50))
    assert main(["diagnose", seed_bundle, "--data", str(tmp_path / "x.npy"), "--order", "2"]) == 1
    assert "--order 2" in capsys.readouterr().err
    with pytest.raises(OrderNotAvailableError, match="order 2"):
        diagnose(_line(50), bundle=seed_bundle, second_order=True)
    assert not diagnose(_line(50), bundle=seed_bundle).second_order  # auto: an order-1 bundle has none
