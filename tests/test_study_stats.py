"""Seeds and intervals of the study: aggregation over seeds (hand-computed), the paired effect across
seeds (one seed = `bootstrap.compare`), the reading's rule and the regime line."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.bootstrap import compare
from pcb_analysis.errors import ApiMisuseError
from pcb_analysis.eval_cases import make_case
from pcb_analysis.lvis_gt import GroundTruth, load_ground_truth
from pcb_analysis.regime_line import regime_text, sci
from pcb_analysis.study_stats import (
    NO_EFFECT,
    Effect,
    SeedSample,
    aggregate_seeds,
    effect_verdict,
    format_effect,
    mean_cell,
    mean_std,
    paired_effect,
)
from pcb_train.study_bootstrap import paired_effects, resample_metrics


def row(seed: int, stat: str, ap: float, source: str = "val", **extra: float) -> dict:
    return {"model": "softmax", "source": "-" if stat == "none" else source, "stat": stat, "seed": seed,
            "AP": ap, "APr": -1.0, "APc": None, "APf": ap / 2, "APb": ap, "AP_cap": ap, "cap": 3,
            "AP_fixed": ap, **extra}


def test_mean_std_by_hand() -> None:
    # 0.20, 0.24, 0.25: mean 0.23; deviations -0.03, 0.01, 0.02 -> sum of squares 14e-4 / (3 - 1) = 7e-4
    mean, std = mean_std([0.20, 0.24, 0.25])
    assert mean == pytest.approx(0.23) and std == pytest.approx(math.sqrt(7e-4))
    assert mean_std([0.3]) == (pytest.approx(0.3), None) and mean_std([]) == (None, None)


def test_aggregate_seeds_by_hand() -> None:
    rows = [row(0, "cm", 0.20, cond2=100.0, diag_r=0.1), row(1, "cm", 0.24, cond2=10_000.0, diag_r=0.3),
            row(2, "cm", 0.25, cond2=1000.0, diag_r=0.2), row(0, "none", 0.3), row(1, "none", 0.4)]
    agg = aggregate_seeds(rows)
    cm, none = agg
    assert (cm["stat"], cm["seeds"], none["seeds"]) == ("cm", [0, 1, 2], [0, 1])
    assert cm["AP"] == pytest.approx(0.23) and cm["AP_std"] == pytest.approx(math.sqrt(7e-4))
    assert cm["AP_n"] == 3 and cm["APf"] == pytest.approx(0.115)
    # undefined metrics (-1, None) are left out: no value, no spread
    assert cm["APr"] is None and cm["APr_n"] == 0 and cm["APc"] is None
    # cond2 averaged geometrically: (1e2 * 1e4 * 1e3)^(1/3) = 1e3; diagonals arithmetically
    assert cm["cond2"] == pytest.approx(1000.0) and cm["diag_r"] == pytest.approx(0.2)
    assert none["AP"] == pytest.approx(0.35) and none["AP_std"] == pytest.approx(math.sqrt(0.005))
    assert "seed" not in cm and "cond2" not in none
    assert mean_cell(cm, "AP") == "23.0 ± 2.6" and mean_cell(cm, "APr") == "-"
    # one seed: the value alone, as the one-seed report always printed it
    assert mean_cell(aggregate_seeds([row(0, "cm", 0.2)])[0], "AP") == "20.0"
    with pytest.raises(ApiMisuseError, match="twice"):
        aggregate_seeds([row(0, "cm", 0.2), row(0, "cm", 0.3)])


def test_aggregate_keeps_protocols_apart() -> None:
    rows = [row(0, "cm", 0.2), {**row(0, "cm", 0.4), "protocol": "cross-fitted"}]
    assert [r.get("protocol") for r in aggregate_seeds(rows)] == [None, "cross-fitted"]


def effect(delta: float, low: float, high: float, seeds: tuple[float, ...] | None = None) -> Effect:
    return Effect(delta, low, high, seeds if seeds is not None else (delta,))


def test_effect_rule() -> None:
    # an interval including 0: no detectable effect, whatever the sign of the point difference
    assert effect_verdict(effect(0.05, -0.01, 0.1), 9.4) == NO_EFFECT
    assert effect_verdict(effect(-0.05, -0.1, 0.0), 9.4) == NO_EFFECT  # 0 on the edge counts as included
    # excluding 0 with the paper's sign / against it
    assert effect_verdict(effect(0.05, 0.01, 0.1), 9.4) == "same direction as the paper"
    assert effect_verdict(effect(-0.05, -0.1, -0.01), -2.9) == "same direction as the paper"
    assert effect_verdict(effect(-0.05, -0.1, -0.01), 8.0) == "the opposite of the paper"
    # seeds disagreeing in sign: no detectable effect even with an interval off 0
    assert effect_verdict(effect(0.02, 0.01, 0.03, (0.05, -0.01)), 9.4).startswith(NO_EFFECT)
    assert effect_verdict(effect(0.02, 0.01, 0.03, (0.05, 0.0)), 9.4).startswith(NO_EFFECT)
    assert effect_verdict(effect(0.02, 0.01, 0.03, (0.03, 0.01)), 9.4) == "same direction as the paper"
    assert effect_verdict(None, 1.0) == "not measurable here"
    assert effect_verdict(effect(math.nan, 0.0, 0.1), 1.0) == "not measurable here"
    assert effect_verdict(effect(0.1, math.nan, math.nan), 1.0).startswith("not tested")
    assert effect_verdict(effect(0.1, 0.05, 0.2), None).startswith("an effect")
    assert format_effect(effect(0.012, -0.003, 0.025)) == "+1.2 [-0.3, +2.5]"
    assert format_effect(effect(0.012, 0.003, 0.025)) == "+1.2 [+0.3, +2.5] *"
    assert format_effect(effect(0.012, math.nan, math.nan)) == "+1.2" and format_effect(None) == "-"


def test_paired_effect_across_seeds_by_hand() -> None:
    # two seeds, three resamples; resample 2 is undefined for seed 1's b and is left out
    s0 = SeedSample(0.10, 0.15, np.array([0.1, 0.2, 0.3]), np.array([0.2, 0.2, 0.4]))
    s1 = SeedSample(0.20, 0.21, np.array([0.1, 0.1, 0.1]), np.array([0.3, np.nan, 0.1]))
    e = paired_effect([s0, s1])
    assert e.delta == pytest.approx(0.03) and e.seed_deltas == pytest.approx((0.05, 0.01))
    # per-resample seed means of b - a: resample 0: (0.1 + 0.2) / 2 = 0.15; resample 2: (0.1 + 0) / 2 = 0.05
    # two values: the 2.5% / 97.5% points at 0.025 and 0.975 of the way from 0.05 to 0.15
    assert (e.low, e.high) == (pytest.approx(0.0525), pytest.approx(0.1475))
    assert e.excludes_zero and e.seeds_agree
    with pytest.raises(ApiMisuseError):
        paired_effect([s0, SeedSample(0.1, 0.1, np.zeros(2), np.zeros(2))])


def two_results(tmp_path: Path, seed: int, num_images: int) -> tuple[GroundTruth, Path, Path]:
    """A small LVIS case: its ground-truth index, results a.json and b.json (a's scores perturbed)."""
    case = make_case(seed=seed, num_images=num_images, num_cats=6, dets_per_image=12, crowded_images=0,
                     size=64)
    other = copy.deepcopy(case.results)
    rng = np.random.default_rng(seed - 2)
    for d in other:
        d["score"] = float(np.clip(d["score"] * rng.uniform(0.5, 1.5), 1e-4, 1.0))
    gt = tmp_path / "gt.json"
    write_json_atomic(gt, case.gt)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json_atomic(a, case.results)
    write_json_atomic(b, other)
    return load_ground_truth(gt), a, b


def test_one_seed_equals_bootstrap_compare(tmp_path: Path) -> None:
    index, a, b = two_results(tmp_path, seed=3, num_images=24)
    boot = {0: {str(a): resample_metrics(index, a, 40), str(b): resample_metrics(index, b, 40)}}
    rows = [{**row(0, "none", 0.1), "results": str(a)}, {**row(0, "cm", 0.1), "results": str(b)}]
    key_a, key_b = (None, "softmax", "-", "none"), (None, "softmax", "val", "cm")
    got = paired_effects(rows, boot, [(key_b, key_a, "cm - none")])[(key_b, key_a)]
    for name, iou, metric in (("AP", "segm", "AP"), ("APf", "segm", "APf"), ("APb", "bbox", "AP")):
        want = compare(index, str(a), str(b), iou, n=40, seed=0)[metric]
        assert (got[name].delta, got[name].low, got[name].high) == pytest.approx(want, nan_ok=True), name


def test_capped_effects_equal_bootstrap_compare_at_that_cap(tmp_path: Path) -> None:
    index, a, b = two_results(tmp_path, seed=4, num_images=20)
    boot = {0: {str(p): resample_metrics(index, p, 30, cap=3) for p in (a, b)}}
    assert set(boot[0][str(a)]["full"]) == {"AP", "APr", "APc", "APf", "APb", "AP_cap", "APr_cap", "APc_cap",
                                             "APf_cap"}
    rows = [{**row(0, "none", 0.1), "results": str(a)}, {**row(0, "cm", 0.1), "results": str(b)}]
    key_a, key_b = (None, "softmax", "-", "none"), (None, "softmax", "val", "cm")
    got = paired_effects(rows, boot, [(key_b, key_a, "cm - none")])[(key_b, key_a)]
    for name, metric in (("AP_cap", "AP"), ("APf_cap", "APf")):
        want = compare(index, str(a), str(b), "segm", n=30, seed=0, max_dets=3)[metric]
        assert (got[name].delta, got[name].low, got[name].high) == pytest.approx(want, nan_ok=True), name
    # 3 detections per image bind (12 per image in the files): the capped value differs from the uncapped
    assert got["AP_cap"].delta != pytest.approx(got["AP"].delta)
    # without a cap no capped metric is bootstrapped, and effects carry only what every file has
    plain = {0: {str(p): resample_metrics(index, p, 5) for p in (a, b)}}
    assert "AP_cap" not in paired_effects(rows, plain, [(key_b, key_a, "cm - none")])[(key_b, key_a)]


def test_regime_line() -> None:
    fields = {"cond2": 1234.5, "sigma_min": 0.000567, "diag_r": 0.21, "diag_c": 0.449, "diag_f": 0.8,
              "clipped": 0.031}
    assert regime_text(fields) == "cond 1.2e3 · σmin 5.7e-4 · diag r/c/f 0.21/0.45/0.80 · clip 3%"
    assert regime_text(fields, sigma=False) == "cond 1.2e3 · diag r/c/f 0.21/0.45/0.80 · clip 3%"
    assert regime_text({"cond2": math.inf, "diag_r": None, "diag_f": 0.5}) == "cond inf · diag r/c/f -/-/0.50"
    assert regime_text({}) == ""
    assert (sci(12.34), sci(0.5), sci(2e5), sci(None)) == ("12.3", "0.5", "2.0e5", "-")
