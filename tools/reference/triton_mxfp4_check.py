#!/usr/bin/env python3
"""triton_mxfp4_check: does gptoss quantize bf16 experts to MXFP4 exactly as OpenAI's quantizer does?

gptoss quantizes a bf16 checkpoint's experts at load (csrc/quantize.c, gptoss_mxfp4_quantize in
csrc/mxfp4.c). The oracle is triton_kernels' downcast_to_mxfp, called as gpt-oss calls it
(gpt_oss/triton/moe.py, quantize_mx4; transformers' quantize_to_mxfp4 passes the same arguments):

    downcast_to_mxfp(w.to(torch.bfloat16), torch.uint8, axis=1)    # DEQUANT_SCALE_ROUNDING_MODE=ROUND_UP

on w = gate_up_proj [E][H][2I] or down_proj [E][I][H] (used as x @ w): blocks of 32 along axis 1, the
reduction axis. It returns codes [E][in/2][out] and E8M0 scales [E][in/32][out], transposed views of
[E][out][in/2] and [E][out][in/32] storage; swapping axes 1 and 2 gives the checkpoint layout
[E][out][in/32][16] and [E][out][in/32], two codes a byte, low nibble first, as gptoss stores them
(gpt-oss swizzles only afterwards, in convert_layout; nothing here is swizzled).

Per tensor: (a) scale bytes, (b) codes (bytes, and 4-bit codes), (c) max |upcast_from_mxfp(triton's
bytes) - gptoss's bytes decoded as gptoss decodes them (code * 2^(scale-127))|, both saturated at
+-FLT_MAX as upcast_from_mxfp saturates (gptoss's own f32 decode gives inf there). For information, also
the number of blocks where gptoss differs from downcast_to_mxfp_torch, the torch reference in the same
module (which newer transformers' quantize_to_mxfp4 calls instead).

Run it on a CUDA machine with torch and triton 3.6 (triton_kernels from .triton-kernels, see its SOURCE):

    lua5.4 tools/make_checkpoint.lua --preset tiny --seed 1 --expert-dtype bf16-generic --no-tokenizer --out /tmp/t
    lua5.4 tools/reference/mxfp4_dump.lua /tmp/t /tmp/t.mxfp4.safetensors
    PYTHONPATH=.triton-kernels python3 tools/reference/triton_mxfp4_check.py /tmp/t /tmp/t.mxfp4.safetensors

Hard cases (ties, zeros, signed zeros, bf16 subnormals, maxima of 6 * 2^k, values near the bf16
maximum) go through the same path: this writes a copy of a bf16 checkpoint whose experts hold them
(standard library only, no GPU), to be dumped and checked as above:

    python3 tools/reference/triton_mxfp4_check.py --adversarial /tmp/t /tmp/adv

Exits 1 when any tensor differs from downcast_to_mxfp, 2 on bad usage.
"""
import glob
import json
import os
import random
import re
import shutil
import struct
import sys

DEVICE = "cuda"
EXAMPLES = 3  # differing blocks printed per tensor
FLT_MAX = 3.4028234663852886e38
EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj$")


# {====================================================== safetensors, by hand (stdlib)
def st_entries(path):
    """name -> (path, dtype, shape, begin, end), the offsets absolute in the file"""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: (path, v["dtype"], v["shape"], 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def st_dir(d):
    out = {}
    for p in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(st_entries(p))
    return out


def st_read(entry):
    path, _, _, b, e = entry
    with open(path, "rb") as f:
        f.seek(b)
        return f.read(e - b)
# }======================================================


# {====================================================== hard cases as a bf16 checkpoint
BF16_MAX = 0x7F7F
MIDS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # midpoints between FP4 magnitudes (scale units)
KS = [-133, -130, -128, -127, -126, -125, -124, -100, -20, -9, -6, -2, -1, 0, 1, 3, 7, 20, 100, 122, 123, 124, 125]


def bf16(x):
    """bits of the bf16 nearest x (ties to even), saturating at the largest finite one"""
    if abs(x) >= 3.3895313892515355e38:
        return BF16_MAX | (0x8000 if x < 0 else 0)
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return (u & 0x8000) | BF16_MAX if (u & 0x7FFF) > BF16_MAX else u


def neighbours(bits):  # the bf16 values one step below and above in magnitude (same sign)
    return [bits - 1 if bits & 0x7FFF else bits, bits + 1 if (bits & 0x7FFF) < BF16_MAX else bits]


def _ties(k, r, top):
    v = [bf16(top * 2.0 ** k)] + [bf16(s * m * 2.0 ** k) for m in MIDS for s in (1, -1)]
    v += [n for m in MIDS for n in neighbours(bf16(m * 2.0 ** k))]
    v += [bf16(g * 2.0 ** k) for g in (0.5, -4, 1.5)]
    head, rest = v[:1], v[1:]
    r.shuffle(rest)
    return head + rest


def value(bits):
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def _around(r, top_bits, scale_k):
    """a block of largest magnitude top_bits: values below it, and midpoints at the scale 2^scale_k it
    should get (those not above it)"""
    top = abs(value(top_bits))
    mids = [m * 2.0 ** scale_k for m in MIDS if m * 2.0 ** scale_k <= top]
    rest = [bf16(r.uniform(-top, top)) for _ in range(24)] + [bf16(r.choice((1, -1)) * r.choice(mids)) for _ in range(7)]
    r.shuffle(rest)
    return [top_bits] + rest


PATTERNS = [
    ("zeros", lambda k, r: [0] * 32),
    ("negative zeros", lambda k, r: [0x8000] * 32),
    ("signed zeros and one subnormal", lambda k, r: [0x8000 * (i % 2) for i in range(31)] + [0x0001]),
    ("ties, max 6*2^k", lambda k, r: _ties(k, r, 6)),
    ("ties, max -6*2^k", lambda k, r: _ties(k, r, -6)),
    ("max exactly 6*2^k", lambda k, r: _around(r, bf16(6 * 2.0 ** k), k)),
    ("max exactly 3*2^k", lambda k, r: _around(r, bf16(3 * 2.0 ** k), k - 1)),
    ("max one step below 6*2^k", lambda k, r: _around(r, bf16(6 * 2.0 ** k) - 1, k)),
    ("max one step above 6*2^k", lambda k, r: _around(r, bf16(6 * 2.0 ** k) + 1, k + 1)),
    ("gaussian * 2^k", lambda k, r: [bf16(r.gauss(0, 1) * 2.0 ** k) for _ in range(32)]),
    ("one nonzero", lambda k, r: [bf16(r.uniform(-8, 8) * 2.0 ** k) if i == 7 else 0 for i in range(32)]),
    ("all equal 2^k", lambda k, r: [bf16(2.0 ** k)] * 32),
    ("bf16 subnormals", lambda k, r: [0x007F] + [r.randrange(1, 0x80) | r.choice((0, 0x8000)) for _ in range(31)]),
    ("smallest normals, max 6*2^-126", lambda k, r: [0x01C0] + [r.randrange(0, 0x1C0) | r.choice((0, 0x8000)) for _ in range(31)]),
    ("smallest normals, max below 6*2^-126", lambda k, r: [0x01BF] + [r.randrange(0, 0x1BF) | r.choice((0, 0x8000)) for _ in range(31)]),
    ("near the bf16 maximum", lambda k, r: [0x7F7F, 0xFF7F, 0x7F7E, 0x7F40, 0xFF00] + [r.randrange(0x7E00, 0x7F80) | r.choice((0, 0x8000)) for _ in range(27)]),
    ("max 6*2^125", lambda k, r: _around(r, 0x7F40, 125)),
]


def adversarial_values(name, E, inn, out):
    """bf16 bits of a [E][inn][out] expert matrix, block (e, g, o) = column o's rows 32g..32g+31: pattern
    b % len(PATTERNS) at exponent KS[b // len(PATTERNS) % len(KS)], b = the block's index"""
    import array
    w = array.array("H", bytes(2 * E * inn * out))
    G, P = inn // 32, len(PATTERNS)
    for e in range(E):
        for g in range(G):
            for o in range(out):
                b = (e * G + g) * out + o
                r = random.Random(f"{name}/{b}")
                vals = PATTERNS[b % P][1](KS[b // P % len(KS)], r)
                assert len(vals) == 32, PATTERNS[b % P][0]
                for k, v in enumerate(vals):
                    w[(e * inn + g * 32 + k) * out + o] = v
    if sys.byteorder != "little":
        w.byteswap()
    return w.tobytes()


def make_adversarial(src, dst):
    if os.path.exists(dst):
        sys.exit(f"{dst}: already exists")
    shutil.copytree(src, dst)
    n = 0
    for name, (path, dtype, shape, b, e) in st_dir(dst).items():
        if EXPERTS.match(name):
            assert dtype == "BF16" and len(shape) == 3, f"{name}: {dtype} {shape}: not a bf16 checkpoint's experts"
            data = adversarial_values(name, *shape)
            assert len(data) == e - b
            with open(path, "r+b") as f:
                f.seek(b)
                f.write(data)
            n += 1
    print(f"triton_mxfp4_check: {dst}: {n} expert tensors of hard cases ({len(PATTERNS)} patterns x {len(KS)} exponents)")
# }======================================================


# {====================================================== the check
def main(ckpt, dump):
    import torch
    from triton_kernels.numerics_details import mxfp

    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            sys.exit("triton_mxfp4_check: needs a CUDA device")
        import triton
        print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
              f"triton_kernels from {os.path.dirname(mxfp.__file__)}")

    lut = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64, device=DEVICE)

    def load(entry, dtype):
        t = torch.frombuffer(bytearray(st_read(entry)), dtype=torch.uint8)
        return t.view(dtype).reshape(entry[2]).to(DEVICE)

    def codes(blocks):  # [..., 16] bytes -> [..., 32] codes, element 2j in the low nibble of byte j
        return torch.stack((blocks & 15, blocks >> 4), -1).flatten(-2)

    def decode(blocks, scales):  # as gptoss decodes (csrc/mxfp4.h): code * 2^(scale - 127), scale 0 -> 2^-127
        v = lut[codes(blocks).long()] * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
        return v.float().flatten(-2)

    ck, dm = st_dir(ckpt), st_entries(dump)
    names = sorted((n for n in ck if EXPERTS.match(n)), key=lambda n: (int(EXPERTS.match(n)[1]), n))
    if not names:
        sys.exit(f"triton_mxfp4_check: {ckpt}: no bf16 expert tensors (model.layers.L.mlp.experts.*_proj)")
    results = []
    for name in names:
        w = load(ck[name], torch.bfloat16)  # [E][in][out]
        E, inn, out = w.shape
        G = inn // 32
        g_blocks, g_scales = load(dm[name + "_blocks"], torch.uint8), load(dm[name + "_scales"], torch.uint8)
        assert tuple(g_blocks.shape) == (E, out, G, 16) and tuple(g_scales.shape) == (E, out, G), name

        q, s = mxfp.downcast_to_mxfp(w, torch.uint8, axis=1)  # [E][in/2][out], [E][in/32][out]
        t_blocks = q.transpose(1, 2).contiguous().view(E, out, G, 16)
        t_scales = s.transpose(1, 2).contiguous()
        d_scale = t_scales != g_scales
        d_code = codes(t_blocks) != codes(g_blocks)
        bad = d_scale | d_code.any(-1)  # [E][out][G]

        t_dq = mxfp.upcast_from_mxfp(q, s, torch.float32, axis=1)  # [E][in][out], saturated at +-FLT_MAX
        g_dq = decode(g_blocks, g_scales).transpose(1, 2)
        n_inf = int(torch.isinf(g_dq).sum())  # 4 or 6 * 2^126 and up: past FLT_MAX
        g_dq = g_dq.clamp(-FLT_MAX, FLT_MAX)
        dq = torch.where(t_dq == g_dq, torch.zeros_like(t_dq), (t_dq - g_dq).abs()).max().item()

        rq, rs = mxfp.downcast_to_mxfp_torch(w, torch.uint8, axis=1)
        r_bad = (rs.transpose(1, 2) != g_scales) | (rq.transpose(1, 2).reshape(E, out, G, 16) != g_blocks).any(-1)

        nb, nr = int(bad.sum()), int(r_bad.sum())
        results.append((name, nb, dq))
        print(f"{name} {list(w.shape)}: {bad.numel()} blocks, {nb} differ ({int(d_scale.sum())} scales, "
              f"{int(d_code.sum())} of {d_code.numel()} codes); max|dq diff| {dq:.6g}; "
              f"vs downcast_to_mxfp_torch {nr} blocks differ"
              + (f"; {n_inf} values past FLT_MAX (gptoss's f32 decode: inf)" if n_inf else "")
              + f" -> {'identical' if nb == 0 and dq == 0 else 'DIFFERENT'}")
        for e, o, g in bad.nonzero()[:EXAMPLES].tolist():
            v = w[e, 32 * g:32 * g + 32, o].float()
            hexes = lambda b: "".join("%x" % c for c in codes(b[e, o, g]).tolist())
            print(f"    block [{e}][{o}][{g}]: max|v| {v.abs().max().item():.9g}; scale gptoss {g_scales[e, o, g].item()} "
                  f"triton {t_scales[e, o, g].item()}; codes gptoss {hexes(g_blocks)} triton {hexes(t_blocks)}\n"
                  f"      v = {' '.join('%.9g' % x for x in v.tolist())}")
        del w, q, s, t_dq, g_dq, rq, rs
    same = sum(1 for _, nb, dq in results if nb == 0 and dq == 0)
    worst = max(results, key=lambda r: (r[1], r[2]))
    print(f"triton_mxfp4_check: {len(results)} tensors, {same} identical, worst "
          + (f"{worst[0]} ({worst[1]} blocks differ, max|dq diff| {worst[2]:.6g})" if worst[1] or worst[2] else "none"))
    return 0 if same == len(results) else 1
# }======================================================


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--adversarial":
        make_adversarial(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and not sys.argv[1].startswith("-"):
        sys.exit(main(sys.argv[1], sys.argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
