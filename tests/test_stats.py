import numpy as np
import pytest
from scipy import stats

from tailjax.stats import mean_ci


def test_mean_ci_matches_scipy():
  v = np.array([0.41, 0.47, 0.44, 0.52])
  got = mean_ci(v)
  lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
  assert got["lo"] == pytest.approx(lo) and got["hi"] == pytest.approx(hi)
  assert got["std"] == pytest.approx(v.std(ddof=1)) and got["n"] == 4
  lo90, _ = stats.t.interval(0.90, 3, loc=v.mean(), scale=stats.sem(v))
  assert mean_ci(v, 0.90)["lo"] == pytest.approx(lo90)


def test_mean_ci_degenerate_cases():
  one = mean_ci([0.3])
  assert one["mean"] == 0.3 and np.isnan(one["lo"]) and np.isnan(one["std"])
  const = mean_ci([0.2, 0.2, 0.2])
  assert const["lo"] == pytest.approx(0.2) and const["hi"] == pytest.approx(0.2)
