"""Block sizes of the weight-only kernel and the rule that picks them.

Decode matmuls (M <= 64) read every weight byte once and are bound by
memory bandwidth, so the choice is about keeping enough bytes in flight: a
grid of at least ~2 programs per SM (split-K when N alone is too small) and
K tiles of 64-256 values per loop step. Prefill shapes (M > 64) are compute
bound and go to XLA's matmul (``choose`` returns None).

Numbers here are starting points; ``benchmarks/gpu_bench.py`` sweeps a few
configs per shape on a GPU and prints the best, which belong in ``TUNED``.

Example:
  >>> from qarray.ops.kernels.config import choose
  >>> from qarray.ops.kernels.layout import WeightLayout
  >>> cfg = choose(16, WeightLayout('int4', 'nk', 8192, 28672, 128))
  >>> cfg.block_m, cfg.block_k, cfg.split_k
  (16, 128, 1)
"""

from __future__ import annotations

import dataclasses

from qarray.ops.kernels.layout import WeightLayout

__all__ = ['KernelConfig', 'choose', 'MAX_M', 'TUNED']

MAX_M = 64          # above this the matmul is compute bound: XLA's GEMM wins
TARGET_PROGRAMS = 264  # ~2 programs per SM on an H100 (132 SMs)

# (fmt, orient, tile or 0) -> overrides measured on a GPU (empty until measured; see gpu_bench.py).
TUNED: dict[tuple[str, str, int], dict[str, object]] = {}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static tiling of one kernel launch.

    Attributes:
      block_m: rows of x per program (>= 16: Triton's dot needs M >= 16; rows
        past M are masked, never read).
      block_n: output columns per program.
      block_k: K values per loop step (== the scale tile when scales are tiled).
      split_k: programs along K; partial sums (f32) are added by XLA.
      num_warps, num_stages: Triton launch parameters.
      unpack: 4-bit only. ``'join'`` interleaves the two nibbles of each byte
        back into K order (one dot); ``'split'`` splits x into even/odd K
        columns instead (two dots, weights untouched). 'kn' weights use 'split'.
      int4_offset: int4 only. Dequantize ``u = code + 8`` (no sign extension)
        and subtract ``8 * sum(x)`` per tile after the dot.

    Example:
      >>> from qarray.ops.kernels import KernelConfig
      >>> cfg = KernelConfig(block_n=32, block_k=64)
      >>> cfg.block_m, cfg.split_k, cfg.unpack
      (16, 1, 'join')
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    unpack: str = 'join'
    int4_offset: bool = False

    def __post_init__(self):
        for name in ('block_m', 'block_n', 'block_k', 'split_k'):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a positive power of two; got {v!r}.")
        if self.block_m < 16:
            raise ValueError(f"KernelConfig.block_m must be >= 16 (Triton dot); got {self.block_m}.")
        if self.unpack not in ('join', 'split'):
            raise ValueError(f"KernelConfig.unpack must be 'join' or 'split'; got {self.unpack!r}.")


def _pow2_at_least(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def fits(cfg: KernelConfig, m: int, layout: WeightLayout) -> str | None:
    """Why ``cfg`` cannot run this shape, or None when it can.

    Example:
      >>> from qarray.ops.kernels.config import KernelConfig, fits
      >>> from qarray.ops.kernels.layout import WeightLayout
      >>> fits(KernelConfig(block_n=64), 16, WeightLayout('int8', 'kn', 256, 96, None))
      'block_n=64 does not divide N=96'
    """
    if layout.n % cfg.block_n:
        return f'block_n={cfg.block_n} does not divide N={layout.n}'
    if layout.tile is not None and cfg.block_k != layout.tile:
        return f'block_k={cfg.block_k} must equal the scale tile {layout.tile}'
    if layout.k % (cfg.block_k * cfg.split_k):
        return f'block_k*split_k={cfg.block_k * cfg.split_k} does not divide K={layout.k}'
    if layout.fmt in ('int4', 'nf4') and cfg.block_k < 32:
        return f'block_k={cfg.block_k} < 32 for a 4-bit weight'
    if cfg.block_k < 16:
        return f'block_k={cfg.block_k} < 16'
    return None


def choose(m: int, layout: WeightLayout) -> KernelConfig | None:
    """A config for ``x[m, K] @ W``, or None when XLA should run it (prefill, odd shapes).

    Example:
      >>> from qarray.ops.kernels.config import choose
      >>> from qarray.ops.kernels.layout import WeightLayout
      >>> choose(512, WeightLayout('int8', 'kn', 4096, 4096, None)) is None
      True
    """
    if m > MAX_M or m < 1:
        return None
    block_m = min(64, max(16, _pow2_at_least(m)))
    block_k = layout.tile or next((b for b in (128, 64, 32, 16) if layout.k % b == 0), 0)
    if not block_k:
        return None
    block_n = next((b for b in (64, 128, 32, 16) if layout.n % b == 0), 0)
    if not block_n:
        return None
    unpack = 'join' if layout.orient == 'nk' else 'split'
    base = dict(block_m=block_m, block_n=block_n, block_k=block_k, unpack=unpack)
    base.update(TUNED.get((layout.fmt, layout.orient, layout.tile or 0), {}))
    programs = (layout.n // base['block_n']) * -(-m // base['block_m'])
    split = 1
    # Split K until the grid fills the GPU, keeping >= 4 loop steps per program.
    while (programs * split < TARGET_PROGRAMS
           and layout.k % (base['block_k'] * split * 2) == 0
           and layout.k // (split * 2) >= 4 * base['block_k']):
        split *= 2
    base.setdefault('split_k', split)
    cfg = KernelConfig(**base)
    return None if fits(cfg, m, layout) else cfg
