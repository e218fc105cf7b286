"""Pseudo-gradient codecs (heloco.codecs): exact bytes and values by hand on tiny tensors, round-trip
properties (hypothesis), the error-feedback invariant, and every refusal of a malformed message."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heloco.codecs import (
    CODEC_NAMES,
    HEADER_BYTES,
    EncodedMessage,
    ErrorFeedback,
    Int8Codec,
    MalformedMessage,
    TopKCodec,
    make_codec,
    pack_bits,
    read_header,
    unpack_bits,
)

CODECS = {
    "fp32": make_codec("fp32"),
    "bf16": make_codec("bf16"),
    "int8": make_codec("int8", block=4),
    "topk": make_codec("topk", fraction=0.25, bits=3, chunk=8),
    "topk-global": make_codec("topk", fraction=0.25, bits=3, chunk=8, scope="global"),
}
ALL = (*CODEC_NAMES, "topk-global")  # every codec and top-k's two scopes


def decoded(codec, message, like):
    out = [torch.full_like(t, 7.0) for t in like]
    codec.decode(message, out)
    return out


def body(message):
    return message.payload[HEADER_BYTES:]


# ------------------------------------------------------------------------------------- by hand


def test_int8_scale_and_values_by_hand():
    # block 4: tensor 0 = blocks [127, -2, 0.5, 3.4] (scale 1) and [-100.6] (scale 100.6/127);
    # tensor 1 = one block [254, 3, -1, 0] (scale 2); round half to even: 0.5 → 0, 1.5 → 2
    codec = Int8Codec(block=4)
    x = [torch.tensor([127.0, -2.0, 0.5, 3.4, -100.6]), torch.tensor([[254.0, 3.0], [-1.0, 0.0]])]
    message = codec.encode(x)
    assert message.nbytes == 32 + 9 + 4 * 3
    scales = body(message)[:12].view(torch.float32)
    assert scales.tolist() == [1.0, torch.tensor(100.6 / 127, dtype=torch.float32).item(), 2.0]
    assert body(message)[12:].view(torch.int8).tolist() == [127, -2, 0, 3, -127, 127, 2, 0, 0]
    a, b = decoded(codec, message, x)
    assert a[:4].tolist() == [127.0, -2.0, 0.0, 3.0]
    assert a[4].item() == pytest.approx(-100.6, rel=1e-6)
    assert b.tolist() == [[254.0, 4.0], [0.0, 0.0]]


def test_topk_indices_levels_and_bits_by_hand():
    # chunk 8, k = ⌈0.25·8⌉ = 2, 2 bits (L = 2): keeps -4 (index 1) and 3 (index 3);
    # lo = 3, hi = 4, step = (4 − 3)/2 = 0.5: 3 → level 0 → 3.25; -4 → level 1 → -(3 + 1.5·0.5)
    codec = TopKCodec(fraction=0.25, bits=2, chunk=8)
    x = [torch.tensor([0.1, -4.0, 0.0, 3.0, 0.2, 1.0, -0.5, 2.0])]
    message = codec.encode(x)
    assert message.nbytes == 32 + 8 + 2  # one chunk: (lo, step) + ⌈2 entries × (3 + 2) bits / 8⌉
    assert body(message)[:8].view(torch.float32).tolist() == [3.0, 0.5]
    # fields (index << 2 | sign << 1 | level): 1<<2|1<<1|1 = 7, 3<<2 = 12; 5 bits each, LSB first
    assert body(message)[8:].tolist() == [135, 1]
    assert decoded(codec, message, x)[0].tolist() == [0, -3.75, 0, 3.25, 0, 0, 0, 0]


def test_topk_keeps_min_k_and_chunk_real_elements_per_chunk():
    # chunk 8, k = 3: a 10-element tensor is chunks of 8 and 2 real elements (keeps 3 + 2), a
    # 1-element tensor keeps its only entry; chunks never straddle tensors
    codec = TopKCodec(fraction=3 / 8, bits=8, chunk=8)
    x = [torch.arange(1.0, 11.0), torch.tensor([-5.0])]
    out = decoded(codec, codec.encode(x), x)
    assert out[0].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    assert out[1].item() == pytest.approx(-5.0)
    assert codec.max_nbytes([(10,), (1,)]) == 32 + 8 * 3 + math.ceil(6 * (3 + 8) / 8)


def test_pack_bits_by_hand():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [1 + 8 + 16 + 32]
    assert pack_bits(torch.tensor([511]), 9).tolist() == [255, 1]
    assert unpack_bits(torch.tensor([57], dtype=torch.uint8), 3, 2).tolist() == [1, 2, 3]


@given(st.integers(1, 31), st.lists(st.integers(0, 2**31 - 1), max_size=50))
@settings(max_examples=50, deadline=None)
def test_pack_bits_round_trip(width, values):
    values = torch.tensor(values, dtype=torch.int64) % (1 << width)
    packed = pack_bits(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(values.numel() * width / 8)
    assert torch.equal(unpack_bits(packed, values.numel(), width).long(), values)


def test_bytes_formula_of_each_codec():
    shapes = [(3, 5), (7,)]  # n = 22
    assert make_codec("fp32").max_nbytes(shapes) == 32 + 4 * 22
    assert make_codec("bf16").max_nbytes(shapes) == 32 + 2 * 22
    # blocks of 4: ⌈15/4⌉ + ⌈7/4⌉ = 6 fp32 scales
    assert make_codec("int8", block=4).max_nbytes(shapes) == 32 + 22 + 4 * 6
    # chunks of 8: 15 → 8 + 7, 7 → 7: 3 chunks of 2 entries, (3 index + 3 value) bits each
    assert CODECS["topk"].max_nbytes(shapes) == 32 + 8 * 3 + math.ceil(6 * 6 / 8)
    x = [torch.randn(s) for s in shapes]
    for codec in CODECS.values():
        assert codec.encode(x).nbytes == codec.max_nbytes(shapes)


def test_documented_ratios():
    shapes = [(4096 * 100,)]
    fp32 = make_codec("fp32").max_nbytes(shapes)
    topk = make_codec("topk", fraction=0.01, bits=2, chunk=4096)
    assert topk.k == 41 and topk.width == 14
    assert topk.max_nbytes(shapes) == 32 + 100 * 8 + math.ceil(4100 * 14 / 8)
    assert fp32 / topk.max_nbytes(shapes) > 200  # ≈ 205× per whole chunk (79.75 vs 16384 bytes)
    assert fp32 / make_codec("int8").max_nbytes(shapes) == pytest.approx(4 / (1 + 4 / 256), rel=1e-3)
    assert fp32 / make_codec("bf16").max_nbytes(shapes) == pytest.approx(2, rel=1e-3)


def test_header_records_codec_and_layout():
    message = CODECS["topk"].encode([torch.randn(3, 5), torch.randn(7)])
    header = read_header(message.payload)
    assert (header.codec_id, header.bits, header.block, header.k) == (4, 3, 8, 2)
    assert (header.num_tensors, header.numel) == (2, 22)


# ---------------------------------------------------------------------------------- properties


@st.composite
def tensor_lists(draw, max_numel=40):
    shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1, max_size=3))
    shapes = [tuple(s) for s in shapes if math.prod(s) <= max_numel] or [(3,)]
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=gen) for s in shapes]


def padded_chunks(t, size):
    flat = t.reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % size)).view(-1, size), flat.numel()


@given(tensor_lists())
@settings(max_examples=40, deadline=None)
def test_fp32_round_trip_is_exact(x):
    out = decoded(CODECS["fp32"], CODECS["fp32"].encode(x), x)
    assert all(torch.equal(a, b) for a, b in zip(x, out, strict=True))


@given(tensor_lists())
@settings(max_examples=40, deadline=None)
def test_bf16_round_trip_within_bf16_rounding(x):
    out = decoded(CODECS["bf16"], CODECS["bf16"].encode(x), x)
    for a, b in zip(x, out, strict=True):
        assert torch.equal(b, a.bfloat16().float())
        assert bool(((a - b).abs() <= 2**-8 * a.abs()).all())


@given(tensor_lists(), st.sampled_from([1, 3, 4, 16]))
@settings(max_examples=40, deadline=None)
def test_int8_error_at_most_half_a_scale(x, block):
    codec = make_codec("int8", block=block)
    out = decoded(codec, codec.encode(x), x)
    for a, b in zip(x, out, strict=True):
        blocks, _ = padded_chunks(a, block)
        scale = blocks.abs().amax(1, keepdim=True) / 127
        err = padded_chunks(a - b, block)[0].abs()
        assert bool((err <= scale / 2 * (1 + 1e-5)).all())


@given(tensor_lists(), st.sampled_from([(0.25, 2, 8), (0.1, 3, 16), (0.5, 8, 4), (1.0, 2, 4)]))
@settings(max_examples=40, deadline=None)
def test_topk_keeps_exactly_k_largest_per_chunk_with_bounded_error(x, setting):
    fraction, bits, chunk = setting
    codec = make_codec("topk", fraction=fraction, bits=bits, chunk=chunk)
    out = decoded(codec, codec.encode(x), x)
    for a, b in zip(x, out, strict=True):
        values, n = padded_chunks(a, chunk)
        got = padded_chunks(b, chunk)[0]
        for j in range(values.shape[0]):
            real = min(chunk, n - j * chunk)
            v, d = values[j, :real], got[j, :real]
            kept = d != 0
            assert int(kept.sum()) == min(codec.k, real)
            if bool((~kept).any()):
                assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())
            lo, hi = float(v[kept].abs().min()), float(v[kept].abs().max())
            step = (hi - lo) / 2 ** (bits - 1)
            assert bool(((v - d)[kept].abs() <= step / 2 + 1e-6 * hi).all())
            assert bool((torch.sign(d[kept]) == torch.sign(v[kept])).all())


@given(tensor_lists(), st.sampled_from(ALL), st.sampled_from([1.0, 0.5]))
@settings(max_examples=40, deadline=None)
def test_error_feedback_invariant_over_rounds(x, name, decay):
    codec = CODECS[name]
    ef = ErrorFeedback(codec, decay=decay)
    gen = torch.Generator().manual_seed(0)
    total_sent = [torch.zeros_like(t) for t in x]
    total_delta = [torch.zeros_like(t) for t in x]
    residual = [torch.zeros_like(t) for t in x]
    for round_ in range(4):
        delta = [t * (1 + round_) + torch.randn(t.shape, generator=gen) for t in x]
        torch._foreach_add_(total_delta, delta)
        message = ef.encode(delta)
        sent = decoded(codec, message, x)
        for d, s, e_old, e_new in zip(delta, sent, residual, ef.residuals, strict=True):
            # decode(sent) + e_new == Δ + β·e_old
            torch.testing.assert_close(s + e_new, d + decay * e_old, rtol=1e-5, atol=1e-5)
        torch._foreach_add_(total_sent, sent)
        residual = [e.clone() for e in ef.residuals]
    if decay == 1.0:  # nothing is lost: everything the server decoded plus what is left is every Δ
        for sent, left, total in zip(total_sent, ef.residuals, total_delta, strict=True):
            torch.testing.assert_close(sent + left, total, rtol=1e-4, atol=1e-4)
    if name == "fp32":
        assert all(bool((e == 0).all()) for e in ef.residuals)


# ------------------------------------------------------------------------------------- refusals


def message_and_out(name, shapes=((3, 5), (7,))):
    x = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    return CODECS[name].encode(x), [torch.zeros(s) for s in shapes]


def tampered(message, offset, value):
    payload = message.payload.clone()
    payload[offset] = value
    return EncodedMessage(payload)


@pytest.mark.parametrize("name", ALL)
def test_refuses_malformed_headers_and_lengths(name):
    codec = CODECS[name]
    message, out = message_and_out(name)
    cases = {
        "magic": tampered(message, 0, ord("X")),
        "format version": tampered(message, 4, 9),
        "codec 'unknown'": tampered(message, 5, 77),
        "truncated message": EncodedMessage(message.payload[:-1]),
        "shorter than the 32-byte header": EncodedMessage(message.payload[:20]),
        "oversized message": EncodedMessage(torch.cat([message.payload, torch.zeros(1, dtype=torch.uint8)])),
    }
    for match, bad in cases.items():
        with pytest.raises(MalformedMessage, match=match):
            codec.decode(bad, out)
    assert all(bool((o == 0).all()) for o in out)  # a refused message writes nothing


@pytest.mark.parametrize("name", ALL)
def test_refuses_a_layout_other_than_out(name):
    codec = CODECS[name]
    message, _ = message_and_out(name)
    layouts = {
        "holds 2 tensors, out has 3": [(3, 5), (7,), (1,)],
        "holds 22 elements, out has 23": [(3, 5), (8,)],
        "shapes differ": [(5, 3), (7,)],
    }
    for match, shapes in layouts.items():
        with pytest.raises(MalformedMessage, match=match):
            codec.decode(message, [torch.zeros(s) for s in shapes])


def test_refuses_another_codec_or_other_settings():
    message, out = message_and_out("int8")
    with pytest.raises(MalformedMessage, match=r"encoded by codec 'int8'.*decoder is 'topk'"):
        CODECS["topk"].decode(message, out)
    with pytest.raises(MalformedMessage, match=r"\(bits, block, k\) = \(8, 4, 0\).*expects \(8, 256, 0\)"):
        make_codec("int8").decode(message, out)
    message, out = message_and_out("topk")
    with pytest.raises(MalformedMessage, match="expects"):
        make_codec("topk", fraction=0.25, bits=2, chunk=8).decode(message, out)


def test_refuses_non_finite_or_negative_scales_and_values():
    nan, inf = float("nan"), float("inf")
    message, out = message_and_out("fp32")
    for v in (nan, inf):
        bad = message.payload.clone()
        bad[HEADER_BYTES:].view(torch.float32)[3] = v
        with pytest.raises(MalformedMessage, match="NaN or Inf values"):
            CODECS["fp32"].decode(bad, out)
    message, out = message_and_out("bf16")
    bad = message.payload.clone()
    bad[HEADER_BYTES:].view(torch.bfloat16)[0] = inf
    with pytest.raises(MalformedMessage, match="NaN or Inf values"):
        CODECS["bf16"].decode(bad, out)
    for name in ("int8", "topk", "topk-global"):
        message, out = message_and_out(name)
        for v, match in [(nan, "NaN or Inf scale"), (inf, "NaN or Inf scale"), (-1.0, "negative scale")]:
            bad = message.payload.clone()
            bad[HEADER_BYTES : HEADER_BYTES + 8].view(torch.float32)[1] = v
            with pytest.raises(MalformedMessage, match=match):
                CODECS[name].decode(bad, out)
        bad = message.payload.clone()
        bad[HEADER_BYTES : HEADER_BYTES + 8].view(torch.float32)[1] = (
            3e38  # 127 × 3e38 (or lo + 4·step) overflows fp32
        )
        with pytest.raises(MalformedMessage, match="overflow"):
            CODECS[name].decode(bad, out)
        assert all(bool((o == 0).all()) for o in out)


def test_int8_refuses_the_value_minus_128():
    message, out = message_and_out("int8")
    bad = message.payload.clone()
    bad[-1] = 128  # int8 -128
    with pytest.raises(MalformedMessage, match="-128"):
        CODECS["int8"].decode(bad, out)


def rewritten_topk_fields(message, codec, chunks, entries, edit):
    """The message with its packed entry fields edited (``edit`` takes and returns the int64 fields)."""
    payload = message.payload.clone()
    start = HEADER_BYTES + 8 * chunks
    fields = edit(unpack_bits(payload[start:], entries, codec.width))
    payload[start:] = pack_bits(fields, codec.width)
    return payload


def test_topk_refuses_out_of_range_and_repeated_indices():
    codec = CODECS["topk"]  # chunk 8, k 2, 3 bits: chunks of (8, 7) and (7,) real elements
    message, out = message_and_out("topk")

    def out_of_range(fields):
        fields[3] = (7 << codec.bits) | (fields[3] & 7)  # chunk 1 has 7 real elements: index 7 is padding
        return fields

    def repeated(fields):
        fields[1] = fields[0]
        return fields

    with pytest.raises(MalformedMessage, match="index 7, out of range for its chunk of 7 elements"):
        codec.decode(rewritten_topk_fields(message, codec, 3, 6, out_of_range), out)
    with pytest.raises(MalformedMessage, match="strictly increasing"):
        codec.decode(rewritten_topk_fields(message, codec, 3, 6, repeated), out)
    # a chunk size that is not a power of two: index fields can name positions past the chunk
    codec = make_codec("topk", fraction=0.5, bits=2, chunk=6)
    message = codec.encode([torch.randn(6)])

    def past_chunk(fields):
        fields[2] = (7 << codec.bits) | (fields[2] & 3)
        return fields

    with pytest.raises(MalformedMessage, match="index 7, out of range"):
        codec.decode(rewritten_topk_fields(message, codec, 1, 3, past_chunk), [torch.zeros(6)])


def test_refuses_payloads_that_are_not_byte_vectors():
    _, out = message_and_out("fp32")
    with pytest.raises(MalformedMessage, match=r"1-D torch\.uint8"):
        CODECS["fp32"].decode(torch.zeros(120), out)


@pytest.mark.parametrize("name", ALL)
def test_encoding_a_non_finite_delta_raises(name):
    for v in (float("nan"), float("inf"), -float("inf")):
        x = [torch.ones(3), torch.tensor([1.0, v])]
        with pytest.raises(
            ValueError, match=r"tensors\[1\] with " + CODECS[name].name + ": it contains NaN or Inf"
        ):
            CODECS[name].encode(x)


def test_bf16_refuses_a_finite_value_that_overflows_bf16():
    with pytest.raises(ValueError, match="overflows"):
        CODECS["bf16"].encode([torch.tensor([3.4e38])])


@pytest.mark.parametrize("name", ALL)
def test_never_encodes_a_message_its_decoder_would_refuse(name):
    """Values near fp32's largest are finite, but 127 × (max/127) rounds to Inf: int8 refuses to
    encode them; whatever any codec does encode, its decoder accepts."""
    largest = torch.finfo(torch.float32).max
    if name == "int8":
        with pytest.raises(ValueError, match="overflows"):
            CODECS[name].encode([torch.tensor([largest, 1.0, 2.0, 3.0])])
    for x in (
        [largest, -largest, 0.0, 1.0],
        [0.999 * largest, 0.0, 0.0, 1.0],
        [largest, 0.5 * largest, 1.0, 2.0],
    ):
        try:
            message = CODECS[name].encode([torch.tensor(x)])
        except ValueError as err:
            assert "overflows" in str(err)
            continue
        assert bool(torch.isfinite(decoded(CODECS[name], message, [torch.zeros(4)])[0]).all())


def test_error_feedback_keeps_its_residual_when_the_delta_is_refused():
    ef = ErrorFeedback(CODECS["topk"])
    ef.encode([torch.randn(3, 5)])
    before = ef.residuals[0].clone()
    with pytest.raises(ValueError, match="NaN"):
        ef.encode([torch.full((3, 5), float("nan"))])
    assert torch.equal(ef.residuals[0], before)
    with pytest.raises(ValueError, match="reset"):
        ef.encode([torch.randn(15)])


# --------------------------------------------------------------------------------- the rest


def test_decode_accepts_a_received_buffer_even_unaligned():
    message, out = message_and_out("int8")
    received = torch.zeros(message.nbytes + 3, dtype=torch.uint8)
    received[3:] = message.payload
    CODECS["int8"].decode(received[3:], out)
    expected = [torch.zeros_like(o) for o in out]
    CODECS["int8"].decode(message, expected)
    assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))


@pytest.mark.parametrize("name", ALL)
def test_one_instance_decodes_message_after_message_like_a_fresh_one(name):
    """Scratch buffers are reused between calls (topk clears only the entries it wrote last time)."""
    shapes = [(3, 5), (7,)]
    messages = [CODECS[name].encode([torch.randn(s) for s in shapes]) for _ in range(3)]
    for message in messages:
        fresh = make_codec(**CODECS[name].config())
        expected = [torch.zeros(s) for s in shapes]
        fresh.decode(message, expected)
        got = [torch.full(s, 7.0) for s in shapes]
        CODECS[name].decode(message, got)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("name", ALL)
def test_subtract_decoded_is_exactly_decode_then_subtract(name):
    """What error feedback keeps; top-k subtracts its kept entries in place, or falls back to a dense
    decode for tensors that are not contiguous."""
    codec = CODECS[name]
    x = [torch.randn(3, 5), torch.randn(7), torch.randn(4, 5).t()]
    message = codec.encode(x)
    expected = [a - b for a, b in zip(x, decoded(codec, message, x), strict=True)]
    for tensors in ([t.contiguous() for t in x], [t.clone() for t in x]):
        codec.subtract_decoded(message, tensors)
        assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))


def test_encode_into_a_preallocated_buffer():
    codec = CODECS["topk"]
    x = [torch.randn(3, 5), torch.randn(7)]
    buffer = torch.zeros(codec.max_nbytes([(3, 5), (7,)]) + 16, dtype=torch.uint8)
    message = codec.encode(x, out=buffer)
    assert message.payload.data_ptr() == buffer.data_ptr()
    assert torch.equal(message.payload, codec.encode(x).payload)
    with pytest.raises(ValueError, match="at least 61 bytes"):
        codec.encode(x, out=torch.zeros(60, dtype=torch.uint8))


def test_error_feedback_state_dict_and_reset():
    x = [torch.randn(3, 5), torch.randn(7)]
    ef = ErrorFeedback(CODECS["topk"])
    assert ef.state_dict() == {"residuals": None}
    ef.encode(x)
    ef.encode(x)
    resumed = ErrorFeedback(CODECS["topk"])
    resumed.load_state_dict(ef.state_dict())
    assert torch.equal(resumed.encode(x).payload, ef.encode(x).payload)
    with pytest.raises(ValueError, match=r"residuals\[0\] contains NaN"):
        resumed.load_state_dict({"residuals": [torch.full((3, 5), float("nan")), torch.zeros(7)]})
    ef.reset()
    assert ef.residuals is None
    assert torch.equal(ef.encode(x).payload, CODECS["topk"].encode(x).payload)


def test_make_codec_names_the_bad_field():
    assert make_codec(**make_codec("topk", bits=4).config()).config() == {
        "name": "topk",
        "fraction": 0.01,
        "bits": 4,
        "chunk": 4096,
        "scope": "chunk",
    }
    cases = [
        (dict(name="zstd"), "codec must be one of fp32, bf16, int8, topk; got 'zstd'"),
        (dict(name="int8", bits=4), "codec int8 takes block; got unknown option"),
        (dict(name="fp32", block=4), "codec fp32 takes no options"),
        (dict(name="topk", bits=1), r"topk bits must be an int in \[2, 8\], got 1"),
        (dict(name="topk", bits=9), r"topk bits must be an int in \[2, 8\]"),
        (dict(name="topk", bits=2.0), r"topk bits must be an int"),
        (dict(name="topk", fraction=0.0), r"topk fraction must be a number in \(0, 1\], got 0.0"),
        (dict(name="topk", fraction=1.5), r"topk fraction must be a number in \(0, 1\]"),
        (dict(name="topk", fraction=float("nan")), r"topk fraction"),
        (dict(name="topk", chunk=1), r"topk chunk must be an int in \[2, 65536\], got 1"),
        (dict(name="topk", chunk=2**16 + 1), r"topk chunk must be an int in \[2, 65536\]"),
        (dict(name="topk", scope="layer"), r"topk scope must be one of chunk, global; got 'layer'"),
        (dict(name="int8", block=0), r"int8 block must be an int in \[1, "),
        (dict(name="int8", block=True), r"int8 block must be an int"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            make_codec(**kwargs)
    with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\]"):
        ErrorFeedback(CODECS["fp32"], decay=0.0)


# ------------------------------------------------------------------------ speed paths and scopes


def test_global_topk_indices_counts_levels_and_bits_by_hand():
    # chunk 8, n = 13, K = ⌈0.25·13⌉ = 4: the 4 largest magnitudes anywhere are -4 (chunk 0, index 1)
    # and 5, -0.5, 3 (chunk 2 = tensor 1); chunk 1 (tensor 0's last 2 elements) keeps nothing.
    # chunk 0: lo = hi = 4, step 0; chunk 1: (0, 0); chunk 2: lo 0.5, hi 5, step 4.5/2 = 2.25:
    # 5 → level min(2, 1) = 1 → 0.5 + 1.5·2.25 = 3.875; -0.5 → level 0 → -1.625; 3 → level 1 → 3.875
    codec = TopKCodec(fraction=0.25, bits=2, chunk=8, scope="global")
    x = [torch.tensor([0.1, -4.0, 0, 0, 0, 0, 0, 0.2, 0.3, 0.05]), torch.tensor([5.0, -0.5, 3.0])]
    message = codec.encode(x)
    header = read_header(message)
    assert (header.codec_id, header.k) == (5, 4)
    # 3 chunks of (lo, step), 3 counts of ⌊log2 8⌋ + 1 = 4 bits, 4 fields of 3 + 2 bits
    assert message.nbytes == 32 + 8 * 3 + 2 + 3 == codec.max_nbytes([(10,), (3,)])
    assert body(message)[:24].view(torch.float32).tolist() == [4.0, 0.0, 0.0, 0.0, 0.5, 2.25]
    assert body(message)[24:26].tolist() == [1 | 0 << 4, 3]  # counts 1, 0, 3
    # fields 1<<2|1<<1 = 6, 0<<2|1 = 1, 1<<2|1<<1 = 6, 2<<2|1 = 9; 5 bits each, LSB first
    assert int.from_bytes(bytes(body(message)[26:].tolist()), "little") == 6 | 1 << 5 | 6 << 10 | 9 << 15
    a, b = decoded(codec, message, x)
    assert a.tolist() == [0, -4.0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert b.tolist() == [3.875, -1.625, 3.875]


def test_global_topk_bytes_formula():
    # chunks of 8: 15 → 8 + 7, 7 → 7 (N_c = 3); n = 22, K = ⌈0.25·22⌉ = 6 fields of 3 + 3 bits
    assert CODECS["topk-global"].max_nbytes([(3, 5), (7,)]) == 32 + 8 * 3 + math.ceil(3 * 4 / 8) + math.ceil(
        6 * 6 / 8
    )
    # the documented ratio: 1% of 4096·100 elements in 2 bits, chunk 4096: ≈202× fewer than fp32
    topk = make_codec("topk", fraction=0.01, bits=2, chunk=4096, scope="global")
    shapes = [(4096 * 100,)]
    assert topk.max_nbytes(shapes) == 32 + 800 + math.ceil(100 * 13 / 8) + math.ceil(4096 * 14 / 8)
    assert make_codec("fp32").max_nbytes(shapes) / topk.max_nbytes(shapes) > 200


@given(tensor_lists(), st.sampled_from([(0.25, 2, 8), (0.1, 3, 16), (0.05, 2, 64), (1.0, 2, 4)]))
@settings(max_examples=40, deadline=None)
def test_global_topk_keeps_exactly_the_k_largest_with_bounded_error(x, setting):
    fraction, bits, chunk = setting
    codec = make_codec("topk", fraction=fraction, bits=bits, chunk=chunk, scope="global")
    out = decoded(codec, codec.encode(x), x)
    values = torch.cat([t.reshape(-1) for t in x])
    got = torch.cat([t.reshape(-1) for t in out])
    kept = got != 0
    assert int(kept.sum()) == min(values.numel(), math.ceil(round(fraction * values.numel(), 9)))
    if bool((~kept).any()):
        assert float(values[kept].abs().min()) >= float(values[~kept].abs().max())
    assert bool((torch.sign(got[kept]) == torch.sign(values[kept])).all())
    for a, b in zip(x, out, strict=True):  # per chunk: within half a step of that chunk's kept range
        chunks, d = padded_chunks(a, chunk)[0], padded_chunks(b, chunk)[0]
        for v, w in zip(chunks, d, strict=True):
            if bool((w != 0).any()):
                lo, hi = float(v[w != 0].abs().min()), float(v[w != 0].abs().max())
                step = (hi - lo) / 2 ** (bits - 1)
                assert bool(((v - w)[w != 0].abs() <= step / 2 + 1e-6 * hi).all())


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_grouped_selection_keeps_what_a_full_sort_keeps(scope):
    """Large enough chunks select through group maxima (group_size > 1); the kept entries are
    exactly those of a plain ranking (random normals: no ties), short chunks included."""
    from heloco.codecs.selection import group_size

    codec = make_codec("topk", fraction=0.02, bits=8, chunk=512, scope=scope)
    gen = torch.Generator().manual_seed(3)
    x = [
        torch.randn(3000, generator=gen),
        torch.randn(50, 40, generator=gen),
        torch.randn(700, generator=gen),
    ]
    assert (
        group_size(512, codec.k, 512) > 1 and group_size(512, 114, 12 * 512) > 1
    )  # K = ⌈0.02·5700⌉ over 6 + 4 + 2 chunks
    out = decoded(codec, codec.encode(x), x)
    if scope == "global":
        flat = torch.cat([t.reshape(-1) for t in x])
        expected = torch.zeros(flat.numel(), dtype=torch.bool)
        expected[flat.abs().topk(math.ceil(0.02 * flat.numel())).indices] = True
        assert torch.equal(torch.cat([t.reshape(-1) for t in out]) != 0, expected)
        return
    for a, b in zip(x, out, strict=True):
        chunks, n = padded_chunks(a, 512)
        for j, (v, w) in enumerate(zip(chunks, padded_chunks(b, 512)[0], strict=True)):
            real = min(512, n - 512 * j)
            expected = torch.zeros(real, dtype=torch.bool)
            expected[v[:real].abs().topk(min(codec.k, real)).indices] = True
            assert torch.equal(w[:real] != 0, expected)


@pytest.mark.parametrize("sparse", [False, True])
def test_global_selection_through_a_sampled_floor_keeps_what_a_full_sort_keeps(sparse, monkeypatch):
    """Global top-k over many groups guesses a floor from a sample of the group maxima and ranks only
    the elements reaching it; the kept entries are exactly a full ranking's, and a Δ that is mostly
    zeros (the floor would not be positive) falls back to ranking every group."""
    from heloco.codecs import selection

    found, floor_below_top = [], selection.floor_below_top

    def recording(values, kept):
        result = floor_below_top(values, kept)
        found.append(result is not None)
        return result

    monkeypatch.setattr(selection, "SAMPLE", 2**12)
    monkeypatch.setattr(selection, "floor_below_top", recording)
    codec = make_codec("topk", fraction=0.02, bits=8, chunk=512, scope="global")
    gen = torch.Generator().manual_seed(4)
    x = [torch.randn(150_000, generator=gen), torch.randn(300, 170, generator=gen)]
    if sparse:
        for t in x:
            t[torch.rand(t.shape, generator=gen) < 0.995] = 0.0
    out = decoded(codec, codec.encode(x), x)
    flat = torch.cat([t.reshape(-1) for t in x])
    kept = math.ceil(0.02 * flat.numel())
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[flat.abs().topk(kept).indices] = True
    got = torch.cat([t.reshape(-1) for t in out]) != 0
    if sparse:  # fewer non-zeros than K: every one of them is kept (and some zeros)
        assert bool(got[flat != 0].all()) and int(got.sum()) == kept
    else:
        assert torch.equal(got, expected)
    assert found == [not sparse]


def test_floor_below_top_has_at_least_kept_values_above_it():
    from heloco.codecs.selection import floor_below_top

    values = torch.rand(500_000, generator=torch.Generator().manual_seed(6))
    for kept in (1, 1000, 40_000, 400_000):
        found = floor_below_top(values, kept)
        assert found is not None
        floor, above = found
        assert torch.equal(above, (values >= floor).nonzero().squeeze(1))
        assert kept <= above.numel() <= kept * 1.1 + 1000
    assert floor_below_top(values[:1000], 10) is None  # too small to sample
    assert floor_below_top(torch.zeros(500_000), 10) is None  # no positive floor


@pytest.mark.parametrize("name", ALL)
def test_error_feedback_residual_is_exactly_what_decode_left(name):
    """e_new = (Δ + e_old) − decode(m) bit for bit: the encoder computes e from the decoder's values."""
    codec = CODECS[name]
    ef = ErrorFeedback(codec)
    gen = torch.Generator().manual_seed(5)
    previous = [torch.zeros(3, 5), torch.zeros(7)]
    for _ in range(3):
        delta = [torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen)]
        message = ef.encode(delta)
        sent = decoded(make_codec(**codec.config()), message, delta)
        for d, e_old, s, e_new in zip(delta, previous, sent, ef.residuals, strict=True):
            assert torch.equal(e_new, (d + e_old) - s)
        previous = [e.clone() for e in ef.residuals]


def test_global_topk_refuses_bad_counts_and_the_other_scope():
    codec = CODECS["topk-global"]  # chunk 8, 3 chunks of (8, 7, 7) real elements, K = 6
    message, out = message_and_out("topk-global")
    counts_at = HEADER_BYTES + 8 * 3

    def with_counts(counts):
        payload = message.payload.clone()
        payload[counts_at : counts_at + 2] = pack_bits(torch.tensor(counts), codec.count_bits)
        return payload

    with pytest.raises(MalformedMessage, match="add up to 5 entries, not K = 6"):
        codec.decode(with_counts([2, 2, 1]), out)
    with pytest.raises(MalformedMessage, match="chunk 1 claims 8 entries, more than its 7 elements"):
        codec.decode(with_counts([0, 8, 0]), out)
    with pytest.raises(
        MalformedMessage, match=r"encoded by codec 'topk \(global scope\)'.*decoder is 'topk'"
    ):
        CODECS["topk"].decode(message, out)
    with pytest.raises(MalformedMessage, match="expects"):
        make_codec("topk", fraction=0.5, bits=3, chunk=8, scope="global").decode(message, out)
    assert all(bool((o == 0).all()) for o in out)


def test_int8_subnormal_scales_stay_within_the_encoded_range():
    """A subnormal scale (max |x| < 127·2⁻¹²⁶) is inexact, so |x|/scale can pass 127.5: clamped."""
    codec = Int8Codec(block=4)
    for values in ([1e-40, -3e-41, 7e-42, 2e-45], [-1.1e-38, 5e-39, 1e-38, 0.0], [3e-44, -3e-44, 1e-45, 0.0]):
        message = codec.encode([torch.tensor(values)])
        q = body(message)[4:].view(torch.int8)
        assert int(q.min()) >= -127 and int(q.max()) <= 127
        decoded(codec, message, [torch.zeros(4)])  # accepted


@pytest.mark.parametrize("name", ALL)
def test_tiles_change_no_byte(name, monkeypatch):
    """Encoders work a tile at a time (error feedback's Δ + β·e filled in just before): with tiny
    tiles (many per tensor, tensors sharing one) every message and residual is the same, byte for
    byte, as with one tile for everything."""
    from heloco.codecs import tiling

    gen = torch.Generator().manual_seed(11)
    rounds = [
        [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen), torch.randn(20, generator=gen)]
        for _ in range(3)
    ]

    def run_rounds():
        ef = ErrorFeedback(make_codec(**CODECS[name].config()), decay=0.5)
        plain = make_codec(**CODECS[name].config())
        out = [(ef.encode(d).payload.clone(), plain.encode(d).payload.clone()) for d in rounds]
        return out, [e.clone() for e in ef.residuals]

    whole = run_rounds()
    monkeypatch.setattr(tiling, "TILE", 8)
    tiled = run_rounds()
    for (a, b), (c, d) in zip(whole[0], tiled[0], strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert all(torch.equal(e, f) for e, f in zip(whole[1], tiled[1], strict=True))
