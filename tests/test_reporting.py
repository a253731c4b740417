import numpy as np
import pytest

from tailjax import evaluation, reporting


def test_formatting_and_side_of_zero():
  assert reporting.mean_std([0.1, 0.2, 0.3]) == "20.00 ± 10.00"
  assert reporting.mean_std([0.5]) == "50.00"
  ci = {"mean": 0.189, "lo": 0.137, "hi": 0.243}
  assert reporting.interval(ci, signed=True) == "+0.189 [+0.137, +0.243]"
  assert reporting.interval({"mean": 0.5, "lo": np.nan, "hi": np.nan}) == "0.500"
  assert reporting.side_of_zero(ci) == 1
  assert reporting.side_of_zero({"mean": -1, "lo": -2, "hi": -0.5}) == -1
  assert reporting.side_of_zero({"mean": 0, "lo": -2, "hi": 0.5}) == 0
  assert reporting.side_of_zero({"mean": 0.7, "lo": 0.6, "hi": 0.8}, null=0.5) == 1
  assert reporting.difference_verdict(ci, "better", "worse").startswith("better (95 % CI above 0)")
  assert reporting.num(float("nan")) == reporting.DASH and reporting.pvalue(1.23456e-5) == "1.23e-05"


def test_table_checks_row_width(tmp_path):
  lines = reporting.table(["a", "b"], [[1, 2], ["x", "y"]])
  assert lines == ["| a | b |", "|---|---|", "| 1 | 2 |", "| x | y |"]
  with pytest.raises(ValueError, match="2 cells"):
    reporting.table(["a"], [[1, 2]])
  text = reporting.write_markdown(tmp_path / "r.md", lines)
  assert (tmp_path / "r.md").read_text() == text and text.endswith("|\n")


def test_chunked_scorer_pads_to_one_shape_and_drops_padding():
  shapes = []

  def fn(params, x):
    shapes.append(x.shape)
    return x.sum(axis=(1, 2, 3)) * params

  x = np.arange(7 * 2 * 2 * 1, dtype=np.float32).reshape(7, 2, 2, 1)
  out = evaluation.chunked(fn, 2.0, x, chunk=3)
  np.testing.assert_allclose(out, 2.0 * x.sum(axis=(1, 2, 3)))
  assert set(shapes) == {(3, 2, 2, 1)}                 # the last chunk (1 image) padded to 3
  assert evaluation.chunked(fn, 1.0, x[:2], chunk=3).shape == (2,)
