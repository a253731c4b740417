"""Test-wide JAX settings: loud broadcasting, float32, CPU."""

import os

# Sharding tests use fake CPU devices; must be set before JAX initialises.
# The suite's time is mostly XLA compiling many small, distinct programs (a shared
# persistent compilation cache saved 2 %): LLVM's backend optimisation level 0 halves
# the compile time and changes no program's meaning (float results agree with the
# optimised build to the tests' tolerances; recorded-number tests still pass). The jobs
# themselves (make demo, study, bench) run XLA's default optimisation.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


# The longest files first: with `--dist loadfile` a file is one unit of work, and a long
# file handed out last leaves the other worker idle at the end (test_distributed.py alone
# is ~2.5 CPU-min).
_FIRST = ("test_distributed.py", "test_multiscale.py", "test_mil_diagnosis.py", "test_engine.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))   # stable otherwise
