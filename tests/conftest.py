"""Shared test settings: the suite's time budget and the hypothesis profiles.

Budget: ``python -m pytest tests`` (the README's command, every extra installed) must finish in under 10
minutes on 2 CPU cores, and aims at well under 6 minutes of wall time on an idle 2-core machine so that new
capabilities have room. Keep shapes as small as the property allows (a bound that holds at K=128 holds at
K=4096), share expensive setup in module-scoped fixtures, don't parametrize over cases that run the same code
path, and give property tests their example count through ``budget.examples(n)``.

Profiles, chosen by the ``QARRAY_TEST_PROFILE`` environment variable (tests/budget.py):

* unset or ``default``: hypothesis runs ``budget.DEFAULT_EXAMPLES`` examples per property test (tests that need
  a different count use ``@settings(max_examples=budget.examples(n))``), derandomized: the same examples on
  every run and machine, so a failure reproduces;
* ``long``: ``budget.LONG_FACTOR`` (25) times the examples everywhere, randomized (new examples each run; a
  failure prints its ``@reproduce_failure`` seed), and the larger shapes / step counts that tests offer
  through ``budget.pick(default, long)``. For a nightly or pre-release run::

      QARRAY_TEST_PROFILE=long python -m pytest tests

Every profile is deadline-free (JAX compiles once per new shape, so the first example is slow).
"""

import hypothesis
import pytest

import budget

_COMMON = dict(deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile('qarray-default', max_examples=budget.DEFAULT_EXAMPLES, derandomize=True,
                                     **_COMMON)
hypothesis.settings.register_profile('qarray-long', max_examples=budget.examples(budget.DEFAULT_EXAMPLES),
                                     derandomize=False, **_COMMON)
hypothesis.settings.load_profile(f'qarray-{budget.PROFILE}')


# ------------------------------------------------------------------ how the two processes share the work
# Tests that share one expensive setup (the 8-device mesh subprocess, the trained LiteRT models) carry
# ``@pytest.mark.xdist_group(name)``: with ``--dist loadgroup`` a group runs in one process, so its setup is
# built once instead of once per process. Groups and ``slow`` tests are handed out first, so the long items
# overlap with the many short ones instead of ending the run on one core while the other waits.
def _start_rank(item: pytest.Item) -> int:
    if item.get_closest_marker('xdist_group') is not None:
        return 0
    return 1 if item.get_closest_marker('slow') is not None else 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_start_rank)  # stable: the same order in every process, as xdist requires
