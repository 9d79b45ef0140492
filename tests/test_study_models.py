"""Model lists of the study: `pcbkit demo --models`, `pcbkit study --model`, comparisons for N models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pcb_analysis.errors import PcbkitError
from pcb_analysis.reading import comparisons, model_pairs, reading
from pcb_train.study_demo import DEMO_MODELS, parse_models
from pcbkit.cli import cli
from pcbkit.cmd_study import parse_model_spec, study_models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcbkit: error: "), err
    return lines[0]


def test_parse_models_maps_names_to_synth_configs_in_order() -> None:
    got = parse_models("softmax, pcb,seesaw,seesaw_pcb", CONFIGS)
    assert [n for n, _ in got] == ["softmax", "pcb", "seesaw", "seesaw_pcb"]
    assert [Path(c).name for _, c in got] == [f"synth_tiny_{n}.yaml" for n in
                                              ("softmax", "pcb", "seesaw", "seesaw_pcb")]
    # the default option value is today's two models, config for config
    assert tuple((n, Path(c).name) for n, c in parse_models("softmax,pcb", CONFIGS)) == tuple(
        (n, Path(c).name) for n, c in DEMO_MODELS)


@pytest.mark.parametrize(("spec", "message"), [
    ("softmax,nope", "unknown model 'nope'"),
    ("softmax,softmax", "listed twice"),
    ("", "expected comma-separated model names"),
    ("softmax,,pcb", "expected comma-separated model names"),
    ("../softmax", "must be letters, digits and '_'"),
])
def test_parse_models_refuses_bad_lists(spec: str, message: str) -> None:
    with pytest.raises(PcbkitError, match=message):
        parse_models(spec, CONFIGS)


def test_parse_models_names_the_missing_config(tmp_path: Path) -> None:
    (tmp_path / "synth_tiny_softmax.yaml").write_text("{}")
    with pytest.raises(PcbkitError, match=r"synth_tiny_pcb\.yaml not found; known: softmax"):
        parse_models("softmax,pcb", tmp_path)


def test_demo_refuses_an_unknown_model_in_one_line(tmp_path: Path, run_pcbkit: Any) -> None:
    code, _, err = run_pcbkit(["demo", "--quick", "--models", "softmax,focal", "--data", str(tmp_path / "d"),
                               "--work", str(tmp_path / "w"), "--report", str(tmp_path / "r")])
    assert code == 2 and "unknown model 'focal'" in _one_line(err)
    assert not (tmp_path / "d").exists()  # refused before any work


def test_parse_model_spec() -> None:
    assert parse_model_spec("seesaw=cfg/a.yaml:run/m.pth") == (
        "seesaw", Path("cfg/a.yaml"), Path("run/m.pth"))
    for bad in ("seesaw", "seesaw=cfg.yaml", "=a.yaml:b.pth", "s=:b.pth", "s=a.yaml:"):
        with pytest.raises(PcbkitError, match="expected NAME=CONFIG:CHECKPOINT"):
            parse_model_spec(bad)
    with pytest.raises(PcbkitError, match="not usable in a file name"):
        parse_model_spec("../x=a.yaml:b.pth")


def test_study_models_one_or_several() -> None:
    assert study_models("c.yaml", "m.pth", "s", ()) == [("s", Path("c.yaml"), Path("m.pth"))]
    two = study_models(None, None, "s", ("a=a.yaml:a.pth", "b=b.yaml:b.pth"))
    assert [m[0] for m in two] == ["a", "b"]
    with pytest.raises(PcbkitError, match="not both"):
        study_models("c.yaml", None, "s", ("a=a.yaml:a.pth",))
    with pytest.raises(PcbkitError, match="must differ"):
        study_models(None, None, "s", ("a=a.yaml:a.pth", "a=b.yaml:b.pth"))
    with pytest.raises(PcbkitError, match="give --config and --checkpoint"):
        study_models("c.yaml", None, "s", ())


def test_study_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path, run_pcbkit: Any) -> None:
    for name in ("train.json", "val.json", "a.yaml", "a.pth", "b.yaml"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "images").mkdir()
    code, _, err = run_pcbkit([
        "study", "--model", f"a={tmp_path / 'a.yaml'}:{tmp_path / 'a.pth'}",
        "--model", f"b={tmp_path / 'b.yaml'}:{tmp_path / 'b.pth'}",
        "--train-gt", str(tmp_path / "train.json"), "--val-gt", str(tmp_path / "val.json"),
        "--images", str(tmp_path / "images"), "--work", str(tmp_path / "w"), "--report", str(tmp_path / "r")])
    assert code == 2 and "b.pth: checkpoint of model 'b' not found" in _one_line(err)
    assert not (tmp_path / "w").exists()


def _none(model: str, ap: float) -> dict[str, Any]:
    return {"model": model, "stat": "none", "source": "-", "AP": ap, "APr": ap / 2, "APc": ap, "APf": ap}


def test_comparisons_and_reading_for_four_models() -> None:
    names = ["softmax", "pcb", "seesaw", "seesaw_pcb"]
    assert model_pairs(names) == [("pcb", "softmax"), ("seesaw", "softmax"), ("seesaw_pcb", "softmax"),
                                  ("seesaw_pcb", "seesaw")]
    assert model_pairs(["softmax"]) == [] and model_pairs([]) == []
    # <base>_pcb against a first-model base is not listed twice
    assert model_pairs(["seesaw", "seesaw_pcb"]) == [("seesaw_pcb", "seesaw")]
    rows = [_none(m, ap) for m, ap in zip(names, (0.20, 0.22, 0.25, 0.26), strict=True)]
    labels = [label for _, _, label in comparisons(rows, names)]
    assert labels == ["pcb - softmax (none)", "seesaw - softmax (none)", "seesaw_pcb - softmax (none)",
                      "seesaw_pcb - seesaw (none)"]
    text = [s for s in reading(rows, names) if " vs **" in s]
    assert len(text) == 4
    # b - a in points, by hand: 26 - 25 = +1.0 AP, 13 - 12.5 = +0.5 APr
    assert text[3].startswith("**seesaw_pcb** vs **seesaw** (no calibration): AP +1.0, APr +0.5,")
    # the paper's Softmax + PCB number is quoted for pcb vs softmax only
    assert "paper, Softmax + PCB vs Softmax" in text[0]
    assert all("paper" not in s for s in text[1:])


@pytest.mark.slow
def test_demo_quick_with_a_loss_family(tmp_path: Path) -> None:
    data, work, report = tmp_path / "data", tmp_path / "work", tmp_path / "report"
    args = ["demo", "--quick", "--models", "softmax,seesaw", "--bootstrap", "20", "--data", str(data),
            "--work", str(work), "--report", str(report)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((report / "results.json").read_text())
    assert {r["model"] for r in rows} == {"softmax", "seesaw"}
    text = (report / "README.md").read_text()
    assert "--models softmax,seesaw" in text and "seesaw - softmax (none)" in text
    assert "**seesaw** vs **softmax** (no calibration)" in text
