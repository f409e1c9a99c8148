"""The suite's time budget, one knob: the ``QARRAY_TEST_PROFILE`` environment variable (see conftest.py).

``examples(n)``: a property test's hypothesis example count (n by default, ``LONG_FACTOR * n`` in the long
profile). ``pick(default, long)``: a size (a shape, a step count) for the profile.
"""

from __future__ import annotations

import os

PROFILES = ('default', 'long')
PROFILE = os.environ.get('QARRAY_TEST_PROFILE', '').strip().lower() or 'default'
if PROFILE not in PROFILES:
    raise ValueError(f"QARRAY_TEST_PROFILE must be one of {', '.join(PROFILES)}; got {PROFILE!r}")
LONG = PROFILE == 'long'
LONG_FACTOR = 25
DEFAULT_EXAMPLES = 10   # property tests that do not set their own count


def examples(n: int) -> int:
    """max_examples for a property test that runs ``n`` examples in the default profile."""
    return n * LONG_FACTOR if LONG else n


def pick(default, long):
    """``long`` in the long profile, else ``default`` (larger shapes or more steps for long runs)."""
    return long if LONG else default
