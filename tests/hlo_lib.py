"""Reading lowered HLO text in tests: which element types each dot / convolution really multiplies."""

from __future__ import annotations

import re


def dot_types(hlo: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, out) element types of each dot / convolution, looking through float32 converts, reshapes,
    transposes, bitcasts and copies back to the stored operand type (XLA:CPU may upcast fp8 before a dot)."""
    inst = {}
    for line in hlo.splitlines():
        m = re.match(r'\s*(?:ROOT\s+)?([\w.\-]+)\s*=\s*([a-z0-9]+)\[[^=]*?\s([a-z\-]+)\(([^)]*)\)', line)
        if m:
            inst[m.group(1)] = (m.group(2), m.group(3), [a.strip() for a in m.group(4).split(',')])

    def source(name):
        while name in inst and inst[name][1] in ('convert', 'reshape', 'transpose', 'bitcast', 'copy') and (
                inst[name][0] == 'f32'):
            name = inst[name][2][0]
        return inst.get(name, ('?',))[0]

    return [(source(a[0]), source(a[1]), t) for t, op, a in inst.values() if op in ('dot', 'convolution')]
