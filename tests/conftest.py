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
# Tests that share one expensive module fixture run in ONE process, so the fixture is built once instead of
# once per process (pytest-xdist's ``xdist_group`` mark cannot do it with pytest 9: xdist renames the items
# through ``Item._nodeid``, which pytest 9 no longer reads). A node id starting with one of these prefixes
# belongs to that group; every other test is handed out on its own. Groups are handed out first (largest
# first), then the ``slow`` tests, so the long items overlap with the many short ones instead of ending the
# run on one core while the other waits.
SHARED_SETUP = (
    'tests/test_sharding.py::test_on_8_device_mesh[',     # one 8-device subprocess runs every mesh case
    'tests/flax_integration/test_litert.py::',            # four digits models trained and converted
    'tests/test_checkpoint.py::',                         # the every-format tree (8 s of eager quantizes)
    'tests/examples/test_smollm.py::',                    # the real model and its GGUF-native twin, loaded once
)


def shared_setup_group(nodeid: str) -> str | None:
    """The :data:`SHARED_SETUP` prefix a test belongs to, or None."""
    return next((p for p in SHARED_SETUP if nodeid.startswith(p)), None)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``-n N`` with ``--dist load`` (the default): tests one by one, except the :data:`SHARED_SETUP` groups."""
    if config.getvalue('dist') != 'load':
        return None  # another --dist mode asked for explicitly: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class SharedSetupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_setup_group(nodeid) or nodeid

    return SharedSetupScheduling(config, log)


def _start_rank(item: pytest.Item) -> int:
    if shared_setup_group(item.nodeid) is not None:
        return 0
    return 1 if item.get_closest_marker('slow') is not None else 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_start_rank)  # stable: the same order in every process, as xdist requires
