"""The approximation study's pieces: targets, budget matching, run_study, outputs."""

import json
import math

import pytest
import torch

from surm import structured
from surm.analysis import approximation as ap

SHAPES = [(16, 16), (12, 18), (64, 64), (384, 1536)]


# -- targets ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ap.target_names())
@pytest.mark.parametrize("shape", [(16, 16), (12, 20)])
def test_target_shape_dtype_and_seed(name, shape):
    M = ap.make_target(name, *shape, seed=3)
    assert M.shape == shape and M.dtype == torch.float64
    assert torch.isfinite(M).all() and M.norm() > 0
    assert torch.equal(M, ap.make_target(name, *shape, seed=3))
    assert not torch.equal(M, ap.make_target(name, *shape, seed=4))


def test_psd_is_symmetric_positive_semidefinite():
    M = ap.make_target("psd", 32, 32, seed=0)
    torch.testing.assert_close(M, M.T)
    assert torch.linalg.eigvalsh(M).min() > -1e-10


def test_lowrank_noise_has_rank_k_plus_relative_noise():
    m, n, noise = 64, 48, 0.1
    k = ap.lowrank_rank(m, n)
    assert k == 3
    M = ap.make_target("lowrank_noise", m, n, seed=1, noise=noise)
    s = torch.linalg.svdvals(M)
    # the top k singular values hold the low-rank part; the tail is the noise (about 10%)
    tail = s[k:].norm() / s.norm()
    assert 0.05 < tail < noise
    assert s[k - 1] > 5 * s[k]
    clean = ap.make_target("lowrank_noise", m, n, seed=1, noise=0.0)
    assert torch.linalg.matrix_rank(clean) == k


@pytest.mark.parametrize("name", ["near_toeplitz", "near_circulant", "near_kronecker"])
def test_near_structured_targets_are_close_to_their_family(name):
    family = name.removeprefix("near_")
    M = ap.make_target(name, 24, 24, seed=0, noise=0.1)
    P = structured.get(family).project(M).dense()
    # the best fit removes the structure and keeps (most of) the 10% noise
    assert ap.relative_error(M, P) < 0.1 + 1e-9


def test_unknown_target_names_the_known_ones():
    with pytest.raises(ValueError, match="known targets: psd"):
        ap.make_target("nope", 4, 4, seed=0)


def test_trial_seeds_differ_by_trial_and_target():
    seeds = {ap.trial_seed(0, t, name) for t in range(5) for name in ap.target_names()}
    assert len(seeds) == 5 * len(ap.target_names())


# -- budgets -> knobs -------------------------------------------------------------------


@pytest.mark.parametrize("family", structured.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_candidate_params_are_the_families_params(family, shape):
    m, n = shape
    for s in ap.candidates(family, m, n)[:4]:
        assert structured.make(family, m, n, **s.knob_dict).num_params == s.params, s


@pytest.mark.parametrize("family", structured.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_match_budget_is_the_largest_setting_within_budget(family, shape):
    m, n = shape
    N = max(m, n)
    options = ap.candidates(family, m, n)
    for budget in [N // 2, N, 2 * N - 1, 2 * N, 3 * N, 4 * N, 16 * N]:
        s = ap.match_budget(family, m, n, budget)
        fitting = [c.params for c in options if c.params <= budget]
        if not fitting:
            assert s is None
        else:
            assert s.params <= budget
            assert s.params == max(fitting)


def test_match_budget_picks_the_expected_knobs():
    n = 64
    assert ap.match_budget("circulant", n, n, n).knob_dict == {"block_size": None}
    assert ap.match_budget("circulant", n, n, 4 * n).knob_dict == {"block_size": 16}
    assert ap.match_budget("circulant", n, n, 5 * n).knob_dict == {"block_size": 16}
    assert ap.match_budget("ldr", n, n, 8 * n).knob_dict == {"rank": 4}
    assert ap.match_budget("ldr", n, n, 2 * n - 1) is None
    assert ap.match_budget("low_rank", n, n, 8 * n).knob_dict == {"rank": 4}
    assert ap.match_budget("toeplitz", n, n, 2 * n).params == 2 * n - 1
    assert ap.match_budget("toeplitz", n, n, n) is None
    # kronecker (8x8) (x) (8x8): 128 params a term
    assert ap.match_budget("kronecker", n, n, 4 * n).knob_dict == {"terms": 2}
    # rectangular: a block size must divide both sides
    s = ap.match_budget("circulant", 384, 1536, 4 * 1536)
    assert s.knob_dict == {"block_size": 96} and s.params == 6144


def test_plan_has_one_point_per_distinct_setting():
    n = 64
    budgets = ap.budgets_from_multiples(ap.DEFAULT_BUDGETS, n, n)
    assert budgets == [64, 128, 256, 512, 1024]
    points = ap.plan(structured.names(), n, n, budgets)
    settings = [s for s, _ in points]
    assert len(settings) == len(set(settings))
    by_family = {}
    for s, budget in points:
        assert s.params <= budget
        by_family.setdefault(s.family, []).append(s.params)
    assert by_family["toeplitz"] == [127]
    assert by_family["skew_circulant"] == [64]
    assert by_family["symmetric_toeplitz"] == [64]
    assert by_family["circulant"] == [64, 128, 256, 512, 1024]
    assert by_family["ldr"] == [128, 256, 512, 1024]
    assert by_family["low_rank"] == [128, 256, 512, 1024]


# -- the study ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study():
    n = 16
    budgets = ap.budgets_from_multiples([1, 2, 4], n, n)
    return ap.run_study(
        n, n, targets=ap.target_names(), families=structured.names(), budgets=budgets,
        trials=2, seed=0, ldr_steps=5, progress=False,
    )


def test_run_study_covers_every_family_and_target(tiny_study):
    pairs = {(r.target, r.family) for r in tiny_study}
    assert pairs == {(t, f) for t in ap.target_names() for f in structured.names()}
    for r in tiny_study:
        assert len(r.errors) == 2 and len(r.seconds) == 2
        assert all(0.0 <= e <= 1.0 + 1e-9 for e in r.errors), r
        assert r.params <= r.budget
        assert math.isclose(r.mean, sum(r.errors) / 2)


def test_run_study_is_reproducible_and_keeps_global_rng():
    kwargs = dict(targets=["gaussian"], families=["ldr"], budgets=[96], trials=1, ldr_steps=3, progress=False)
    torch.manual_seed(123)
    a = ap.run_study(16, 16, **kwargs)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = ap.run_study(16, 16, **kwargs)
    assert a[0].knobs == {"rank": 3}
    assert a[0].errors == b[0].errors
    assert torch.equal(after, torch.rand(1))


def test_full_rank_low_rank_and_dense_circulant_blocks_are_exact():
    n = 8
    records = ap.run_study(
        n, n, targets=["gaussian", "psd"], families=["low_rank", "circulant", "kronecker"],
        budgets=[n * n * 2], trials=1, progress=False,
    )
    for r in records:
        assert r.mean < 1e-10, r


def test_rectangular_study_runs():
    records = ap.run_study(
        8, 12, targets=["psd", "near_toeplitz"], families=structured.names(), budgets=[24, 48],
        trials=1, ldr_steps=3, progress=False,
    )
    assert {r.family for r in records} == set(structured.names())
    assert all(0 <= e <= 1 + 1e-9 for r in records for e in r.errors)


def test_toeplitz_wins_on_near_toeplitz(tiny_study):
    best = {}
    for r in tiny_study:
        if r.target == "near_toeplitz" and r.family != "ldr":
            best[r.family] = min(best.get(r.family, 2.0), r.mean)
    assert min(best, key=best.get) == "toeplitz"


def test_check_study_rejects_bad_input():
    with pytest.raises(ValueError, match="known families"):
        ap.check_study(4, 4, ["psd"], ["banded"], 1)
    with pytest.raises(ValueError, match="trials"):
        ap.check_study(4, 4, ["psd"], ["toeplitz"], 0)


# -- outputs ------------------------------------------------------------------------------


def test_table_json_and_plot(tiny_study, tmp_path):
    table = ap.format_table(tiny_study)
    lines = table.splitlines()
    assert len(lines) == len(tiny_study) + 2
    assert "rel. error (mean ± std)" in lines[0] and "near_toeplitz" in table
    path = ap.save_json(tiny_study, tmp_path / "a" / "approx.json", {"trials": 2})
    data = json.loads(path.read_text())
    assert data["config"] == {"trials": 2}
    assert len(data["records"]) == len(tiny_study)
    rec = data["records"][0]
    assert set(rec) >= {"target", "family", "knobs", "params", "errors", "mean", "std"}
    png = ap.plot_records(tiny_study, tmp_path / "approx.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
