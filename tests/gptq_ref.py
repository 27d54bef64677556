"""The GPTQ layout in plain Python integers, written from the format's description (docs/design.md §9 and
the readers' documentation), not from lrgptq's packer:

- a column of n values of b bits is one little-endian bit stream: value i occupies stream bits
  [i·b, (i+1)·b); int32 word w holds stream bits [32w, 32w + 32), least-significant bit first;
- for 3 bits, 32 values take 3 words, and values 10 and 21 straddle a word boundary;
- qweight packs each output's codes along the inputs: qweight[w][n] is word w of output n;
- qzeros packs each group's zero points along the outputs: qzeros[g][w] is word w of group g;
- v1 (checkpoint_format "gptq") stores z − 1, gptq_v2 stores z;
- w[n][i] = scales[g_idx[i]][n] · (q[i][n] − z[g_idx[i]][n]).
"""

from typing import List, Sequence


def words_for(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def unpack_stream(words: Sequence[int], bits: int, n: int) -> List[int]:
    """Values of one stream, from its int32 words (signed as stored)."""
    stream = 0
    for j, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * j)
    return [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]


def pack_stream(values: Sequence[int], bits: int) -> List[int]:
    """int32 words (signed, as torch stores them) of one stream."""
    stream = 0
    for i, v in enumerate(values):
        assert 0 <= v < (1 << bits)
        stream |= v << (i * bits)
    out = []
    for j in range(words_for(len(values), bits)):
        w = (stream >> (32 * j)) & 0xFFFFFFFF
        out.append(w - (1 << 32) if w >= 1 << 31 else w)
    return out


def unpack_3bit_block(w0: int, w1: int, w2: int) -> List[int]:
    """The 32 values of a 3-bit block, spelled out word by word as AutoGPTQ documents them."""
    w0, w1, w2 = w0 & 0xFFFFFFFF, w1 & 0xFFFFFFFF, w2 & 0xFFFFFFFF
    v = [(w0 >> (3 * i)) & 7 for i in range(10)]
    v.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))  # value 10: bits 30-31 of word 0, bit 0 of word 1
    v += [(w1 >> (1 + 3 * i)) & 7 for i in range(10)]
    v.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))  # value 21: bit 31 of word 1, bits 0-1 of word 2
    v += [(w2 >> (2 + 3 * i)) & 7 for i in range(10)]
    return v


def qweight_codes(qweight: List[List[int]], bits: int, d: int) -> List[List[int]]:
    """codes[n][i] from qweight (words, d_out) as nested lists."""
    d_out = len(qweight[0])
    return [unpack_stream([row[n] for row in qweight], bits, d) for n in range(d_out)]


def qzeros_values(qzeros: List[List[int]], bits: int, d_out: int) -> List[List[int]]:
    """stored zero points [g][n] from qzeros (G, words) as nested lists."""
    return [unpack_stream(row, bits, d_out) for row in qzeros]


def dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> List[List[float]]:
    """W[n][i] as Python floats (float64), from nested lists."""
    d, d_out = len(g_idx), len(scales[0])
    q = qweight_codes(qweight, bits, d)
    z = qzeros_values(qzeros, bits, d_out)
    off = 1 if v1 else 0
    return [[scales[g_idx[i]][n] * (q[n][i] - (z[g_idx[i]][n] + off)) for i in range(d)] for n in range(d_out)]
