"""Every ``>>>`` example in ``qarray`` and ``flax_integration`` runs, each as if pasted alone.

Each docstring's examples run with empty globals (not the module's, as
``--doctest-modules`` would lend them), so an example that forgets an import
fails here instead of in a user's session. The examples of one docstring share
a namespace, in order, as a reader would type them.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

PACKAGES = ('qarray', 'flax_integration')
# Modules that need optional extras or a GPU to import at all; their examples are checked where those exist.
OPTIONAL = {'qarray.ops.kernels.weight_only': 'jax.experimental.pallas'}
# Modules whose examples run optional packages (the [litert] extra): skipped, with the reason, without them.
EXAMPLES_NEED = {'flax_integration.litert': ('litert_converter', 'ai_edge_litert')}


def _modules() -> list[str]:
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + '.'):
            if info.name.endswith('__main__'):
                continue
            names.append(info.name)
    return sorted(names)


def _doctests() -> list:
    finder = doctest.DocTestFinder(exclude_empty=True)
    cases = []
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # pragma: no cover - optional dependency missing
            if name in OPTIONAL:
                continue
            raise AssertionError(f"module {name} does not import: {e}") from e
        missing = [m for m in EXAMPLES_NEED.get(name, ()) if importlib.util.find_spec(m) is None]
        marks = [pytest.mark.skip(reason=f"needs {', '.join(missing)} (pip install -e '.[litert]')")] if missing else []
        for test in finder.find(module, name, globs={}):
            if test.examples:
                cases.append(pytest.param(test, id=test.name, marks=marks))
    return cases


@pytest.mark.parametrize('test', _doctests())
def test_docstring_example(test: doctest.DocTest) -> None:
    test.globs = {}  # run as if pasted alone: no module globals
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda s: failures.append(s))
    assert not failures, ''.join(failures)


failures: list[str] = []


@pytest.fixture(autouse=True)
def _clear_failures():
    failures.clear()
    yield
    failures.clear()
