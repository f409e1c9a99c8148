"""Shared test settings: small, deadline-free hypothesis runs (JAX compiles per new shape)."""

import hypothesis

hypothesis.settings.register_profile('qarray', max_examples=20, deadline=None, derandomize=True,
                                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile('qarray')
