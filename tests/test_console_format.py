"""Figures on the console: 3–4 significant digits, ints as ints, missing values readable."""

from raydiff.console import epoch_summary, fmt
from raydiff.eval.cli import summary_table


def test_fmt_rounds_to_four_significant_digits():
    assert fmt(0.49970272090286016) == "0.4997"
    assert fmt(0.00032114796340465546) == "0.0003211"
    assert fmt(123456.7) == "1.235e+05"
    assert fmt(3) == "3" and fmt(None) == "n/a" and fmt(float("nan")) == "n/a"
    assert fmt(5.55117510700029, 3) == "5.55"


def test_epoch_summary_line():
    line = epoch_summary(14, 15, {"reward/mean": 0.5429568476974964, "reward/std": 0.011749833713432207,
                                  "train/loss": 0.00032114796340465546, "time/epoch_s": 5.55117510700029})
    assert line == "epoch 15/15  reward 0.543 ± 0.01175  loss 0.0003211  5.55 s"


def test_eval_summary_table_has_ci_and_delta_rows():
    agg = {"mean": 0.5339823, "ci_low": 0.49391234, "ci_high": 0.574112, "n": 3, "unit": "prompt"}
    result = {"policies": {"checkpoint": {"aggregate": {"total": agg}}, "base": {"aggregate": {"total": dict(agg, ci_low=None)}}},
              "comparison": {"a": "checkpoint", "b": "base", "delta": {"total": {"mean": 0.0412, "ci_low": 0.00612, "ci_high": 0.0763}}}}
    lines = summary_table(result).splitlines()
    assert lines[0].split() == ["policy", "reward", "mean", "95%", "CI", "n"]
    assert lines[1].split() == ["checkpoint", "total", "0.534", "[0.4939,", "0.5741]", "3", "prompts"]
    assert "[n/a, 0.5741]" in lines[2]
    assert lines[3].startswith("checkpoint − base") and "0.0412" in lines[3]
