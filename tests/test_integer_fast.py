"""The fast integer kernels (BLAS im2col, per-tap depthwise, float64 fixed-point requantization, ADD tables,
per-op plans) against the straightforward implementations they replaced, kept here as the reference: the
same integers on random inputs, parameters and shapes, including the edges where the fast paths hand over
to exact int64 arithmetic. No TensorFlow needed."""
import numpy as np
import pytest

from mobileqat import integer, integer_xnnpack
from mobileqat.integer import multiply_by_quantized_multiplier, quantize_multiplier


# --- the previous implementations (mobileqat.integer / integer_xnnpack before the speed work) -----------

def old_patches(x, kh, kw, stride, padding, pad_value):
    n, h, w, c = x.shape
    if padding == "SAME":
        oh, top = integer._same_padding(h, kh, stride[0])
        ow, left = integer._same_padding(w, kw, stride[1])
    else:
        oh, ow, top, left = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1, 0, 0
    ph = max((oh - 1) * stride[0] + kh - h - top, 0)
    pw = max((ow - 1) * stride[1] + kw - w - left, 0)
    xp = np.pad(x, ((0, 0), (top, ph), (left, pw), (0, 0)), constant_values=pad_value)
    idx_h = (np.arange(oh) * stride[0])[:, None] + np.arange(kh)[None]
    idx_w = (np.arange(ow) * stride[1])[:, None] + np.arange(kw)[None]
    return xp[:, idx_h[:, None, :, None], idx_w[None, :, None, :], :]


def old_requantize(acc, input_scale, filter_scales, output_scale, output_zero_point, act_min, act_max):
    mults = [quantize_multiplier(float(np.float64(input_scale) * np.float64(fs) / np.float64(output_scale)))
             for fs in np.broadcast_to(filter_scales, (acc.shape[-1],))]
    m = np.array([a for a, _ in mults], np.int64)
    s = np.array([b for _, b in mults], np.int64)
    out = multiply_by_quantized_multiplier(acc, m, s) + output_zero_point
    return np.clip(out, act_min, act_max).astype(np.int8)


def old_exact_dot(a, b):
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(np.int64)


def old_conv_accumulators(x, input_zero_point, w, bias, stride=(1, 1), padding="SAME"):
    cout, kh, kw, _ = w.shape
    p = old_patches(np.asarray(x, np.int64), kh, kw, stride, padding, input_zero_point) - input_zero_point
    return old_exact_dot(p.reshape(p.shape[:3] + (-1,)), np.asarray(w).reshape(cout, -1).T) + np.asarray(bias, np.int64)


def old_depthwise_accumulators(x, input_zero_point, w, bias, stride=(1, 1), padding="SAME"):
    _, kh, kw, c = w.shape
    p = old_patches(np.asarray(x, np.int64), kh, kw, stride, padding, input_zero_point) - input_zero_point
    acc = np.einsum("nhwijc,ijc->nhwc", p.astype(np.float64), np.asarray(w[0], np.float64)).astype(np.int64)
    return acc + np.asarray(bias, np.int64)


def old_conv(runtime, depthwise, x, si, zi, w, fs, bias, so, zo, stride, padding, act_range):
    acc = (old_depthwise_accumulators if depthwise else old_conv_accumulators)(x, zi, w, bias, stride, padding)
    if runtime == "reference":
        return old_requantize(acc, si, fs, so, zo, *act_range)
    scales = integer_xnnpack.requantization_scales(si, fs, so, acc.shape[-1])
    return integer_xnnpack.requantize_fp32(acc, scales, zo, *act_range)


def old_add_reference(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
                      act_range=(-128, 127), left_shift=20):
    twice_max = 2.0 * max(np.float64(np.float32(scale1)), np.float64(np.float32(scale2)))
    m1, s1 = quantize_multiplier(np.float64(np.float32(scale1)) / twice_max)
    m2, s2 = quantize_multiplier(np.float64(np.float32(scale2)) / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * np.float64(np.float32(output_scale))))
    a = multiply_by_quantized_multiplier((np.asarray(x1, np.int64) - zero_point1) << left_shift, m1, s1)
    b = multiply_by_quantized_multiplier((np.asarray(x2, np.int64) - zero_point2) << left_shift, m2, s2)
    out = multiply_by_quantized_multiplier(a + b, mo, so) + output_zero_point
    return np.clip(out, *act_range).astype(np.int8)


def old_add_xnnpack(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
                    act_range=(-128, 127)):
    ma, mb, shift, bias = integer_xnnpack.add_params(scale1, zero_point1, scale2, zero_point2, output_scale)
    acc = bias + ma * np.asarray(x1, np.int64) + mb * np.asarray(x2, np.int64)
    acc = acc.astype(np.int32).astype(np.int64) >> shift
    out = np.clip(acc + int(output_zero_point), -128, 127)
    return np.clip(out, *act_range).astype(np.int8)


def old_fully_connected_acc(x, input_zero_point, w, bias):
    w = np.asarray(w, np.int64)
    acc = np.asarray(x, np.int64) @ w.T - input_zero_point * w.sum(axis=1)
    return acc + np.asarray(bias, np.int64)


# --- random cases ----------------------------------------------------------------------------------

def _random_conv_case(rng, depthwise):
    n = int(rng.integers(1, 4))
    h, w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
    cin = int(rng.integers(1, 9))
    kh, kw = (int(rng.choice([1, 2, 3, 5])), int(rng.choice([1, 2, 3, 5])))
    if rng.random() < 0.3:
        kh = kw = 1
    stride = tuple(int(s) for s in rng.choice([1, 2, 3], 2)) if rng.random() < 0.5 else (1, 1)
    padding = str(rng.choice(["SAME", "VALID"]))
    h, w = max(h, kh), max(w, kw)  # VALID needs the window to fit
    cout = cin if depthwise else int(rng.integers(1, 12))
    lo = -128 if rng.random() < 0.2 else -127
    wt = rng.integers(lo, 128, (1, kh, kw, cin) if depthwise else (cout, kh, kw, cin)).astype(np.int8)
    x = rng.integers(-128, 128, (n, h, w, cin)).astype(np.int8)
    zi, zo = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    bias = rng.integers(-(1 << int(rng.integers(4, 31))), 1 << int(rng.integers(4, 31)), cout).astype(np.int32)
    si = np.float32(10.0 ** rng.uniform(-3, 0))
    so = np.float32(10.0 ** rng.uniform(-3, 1))
    fs = (10.0 ** rng.uniform(-5, 0, cout)).astype(np.float32)
    if rng.random() < 0.2:
        fs = fs[:1]  # one scale for every channel
    a, b = sorted(int(v) for v in rng.integers(-128, 128, 2))
    act = (-128, 127) if rng.random() < 0.3 else (a, b)
    return x, si, zi, wt, fs, bias, so, zo, stride, padding, act


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_conv_and_depthwise_equal_the_previous_implementation(runtime, depthwise):
    arith = integer if runtime == "reference" else integer_xnnpack
    fn = arith.depthwise_conv2d if depthwise else arith.conv2d
    rng = np.random.default_rng(11 + depthwise + 2 * (runtime == "xnnpack"))
    for _ in range(150):
        x, si, zi, w, fs, bias, so, zo, stride, padding, act = _random_conv_case(rng, depthwise)
        expected = old_conv(runtime, depthwise, x, si, zi, w, fs, bias, so, zo, stride, padding, act)
        got = fn(x, si, zi, w, fs, bias, so, zo, stride=stride, padding=padding, act_range=act)
        assert got.dtype == np.int8 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"{x.shape} {w.shape} {stride} {padding}")
        acc_fn = integer.depthwise_accumulators if depthwise else integer.conv_accumulators
        old_acc = old_depthwise_accumulators if depthwise else old_conv_accumulators
        np.testing.assert_array_equal(acc_fn(x, zi, w, bias, stride, padding), old_acc(x, zi, w, bias, stride, padding))


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_large_blocks_and_big_accumulators_equal_the_previous_implementation(runtime, monkeypatch):
    """Several blocks per image and across images; 1x1 convs over many channels where float32 sums are no
    longer provably exact (float64) and where the float64 requantization is not (int64 fallback)."""
    arith = integer if runtime == "reference" else integer_xnnpack
    monkeypatch.setattr(integer, "_BLOCK", 1 << 10)
    rng = np.random.default_rng(5)
    cases = []
    for cin, wmax in ((1100, 127), (2000, 3), (64, 127), (300, 127)):
        x = rng.integers(-128, 128, (3, 9, 7, cin)).astype(np.int8)
        x[0] = -128  # every term of a sum at its extreme
        w = rng.integers(-wmax, wmax + 1, (6, 1, 1, cin)).astype(np.int8)
        w[0] = 127
        cases.append((x, w, (1, 1), "SAME"))
    x = rng.integers(-128, 128, (2, 37, 41, 5)).astype(np.int8)
    cases.append((x, rng.integers(-127, 128, (7, 3, 3, 5)).astype(np.int8), (2, 2), "SAME"))
    for x, w, stride, padding in cases:
        cout = w.shape[0]
        bias = rng.integers(-2 ** 20, 2 ** 20, cout).astype(np.int32)
        for si, so in ((0.02, 0.05), (0.5, 1e-4), (1e-4, 3.0)):  # multipliers below 1, above 1, tiny
            fs = (10.0 ** rng.uniform(-3, -1, cout)).astype(np.float32)
            args = (x, np.float32(si), 3, w, fs, bias, np.float32(so), -7)
            expected = old_conv(runtime, False, *args, stride, padding, (-128, 127))
            np.testing.assert_array_equal(arith.conv2d(*args, stride=stride, padding=padding), expected)
    x = rng.integers(-128, 128, (4, 23, 19, 13)).astype(np.int8)
    w = rng.integers(-127, 128, (1, 3, 3, 13)).astype(np.int8)
    bias = rng.integers(-2 ** 12, 2 ** 12, 13).astype(np.int32)
    fs = (10.0 ** rng.uniform(-3, -1, 13)).astype(np.float32)
    for stride in ((1, 1), (2, 2)):
        args = (x, np.float32(0.03), -5, w, fs, bias, np.float32(0.04), 9)
        expected = old_conv(runtime, True, *args, stride, "SAME", (0, 127))
        np.testing.assert_array_equal(arith.depthwise_conv2d(*args, stride=stride, act_range=(0, 127)), expected)


def test_fixed_point_requantization_equals_the_int64_definition_at_every_tie():
    """Multipliers that are powers of two put many accumulators exactly on the ties of both roundings."""
    acc = np.arange(-(1 << 17), 1 << 17, dtype=np.int64).reshape(-1, 4)
    rng = np.random.default_rng(3)
    for m in [2.0 ** -k for k in range(0, 22)] + list(10.0 ** rng.uniform(-7, 1.5, 40)) + [0.0, 1e-12, 3.0, 1000.0]:
        fs = np.array([m, m * 0.75, m * 1.5, m * 0.5], np.float64)
        for zo, lo, hi in ((0, -128, 127), (-128, -128, 127), (127, -128, 127), (5, -3, 100), (5, 5, 100),
                           (-20, -10, 90), (3, 3, 3)):
            expected = old_requantize(acc, 1.0, fs, 1.0, zo, lo, hi)
            np.testing.assert_array_equal(integer._requantize(acc, 1.0, fs, 1.0, zo, lo, hi), expected,
                                          err_msg=f"m={m} zo={zo}")
    big = rng.integers(-2 ** 31, 2 ** 31, (1000, 3))  # int32 accumulators beyond the float64 fast path
    for m in (0.9, 2e-3, 2e-9):
        np.testing.assert_array_equal(integer._requantize(big, 1.0, m, 1.0, 3, -128, 127),
                                      old_requantize(big, 1.0, m, 1.0, 3, -128, 127))


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_add_table_equals_the_previous_implementation_on_every_input_pair(runtime):
    new, old = (integer.add, old_add_reference) if runtime == "reference" else (integer_xnnpack.add, old_add_xnnpack)
    codes = np.arange(256, dtype=np.uint8).view(np.int8)
    x1, x2 = np.repeat(codes, 256).reshape(64, 32, 32), np.tile(codes, 256).reshape(64, 32, 32)
    rng = np.random.default_rng(8)
    for _ in range(12):
        s1, s2 = np.float32(10.0 ** rng.uniform(-2, 0)), np.float32(10.0 ** rng.uniform(-2, 0))
        so = np.float32(max(s1, s2) * 10.0 ** rng.uniform(-0.5, 1))
        z1, z2, zo = (int(v) for v in rng.integers(-128, 128, 3))
        act = tuple(sorted(int(v) for v in rng.integers(-128, 128, 2))) if rng.random() < 0.5 else (-128, 127)
        args = (x1, s1, z1, x2, s2, z2, so, zo, act)
        np.testing.assert_array_equal(new(*args), old(*args))
    # small and non-int8 inputs go to the definition directly
    np.testing.assert_array_equal(new(x1[0, 0].astype(np.int64), 0.1, 1, x2[0, 0], 0.2, -3, 0.3, 4),
                                  old(x1[0, 0], 0.1, 1, x2[0, 0], 0.2, -3, 0.3, 4))


def test_builtin_add_survives_the_table():
    """An ADD XNNPACK refuses (ratio 10,000) goes to the builtin kernel's arithmetic, table or not."""
    rng = np.random.default_rng(1)
    x1, x2 = (rng.integers(-128, 128, (2, 64, 64, 1)).astype(np.int8) for _ in range(2))
    got = integer_xnnpack.add(x1, 1.0, 0, x2, 1.0, 0, 1e-4, 0)  # 8,192 elements: the table, all 16-lane blocks
    np.testing.assert_array_equal(got, integer_xnnpack._builtin_add_vector(x1, x2, 1.0, 0, 1.0, 0, 1e-4, 0, (-128, 127)))
    assert np.any(got != integer.add(x1, 1.0, 0, x2, 1.0, 0, 1e-4, 0))  # not the reference arithmetic


def test_patches_view_equals_the_fancy_index_copy():
    rng = np.random.default_rng(2)
    for _ in range(60):
        x = rng.integers(-128, 128, (2, int(rng.integers(1, 12)), int(rng.integers(1, 12)), 3))
        kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        for padding in ("SAME", "VALID"):
            expected = old_patches(x, kh, kw, stride, padding, -7)
            np.testing.assert_array_equal(integer._patches(x, kh, kw, stride, padding, -7), expected)


def test_fully_connected_accumulators_equal_the_int64_product():
    rng = np.random.default_rng(4)
    for n, k, m in ((5, 1280, 10), (3, 7, 2), (1, 300, 1000)):
        x = rng.integers(-128, 128, (n, k)).astype(np.int8)
        w = rng.integers(-127, 128, (m, k)).astype(np.int8)
        bias = rng.integers(-2 ** 20, 2 ** 20, m).astype(np.int32)
        for kernel in ("reference", "ruy"):
            got = integer.fully_connected(x, 0.02, -3, w, 0.01, bias, 0.1, 2, kernel=kernel)
            acc = integer._wrap32(old_fully_connected_acc(x, -3, w, bias))
            if kernel == "reference":
                out = integer._round_half_away(acc.astype(np.float64) *
                                               (np.float64(np.float32(0.02)) * np.float64(np.float32(0.01))
                                                / np.float64(np.float32(0.1))))
                np.testing.assert_array_equal(got, np.clip(out + 2, -128, 127).astype(np.int8))
    huge = rng.integers(-2 ** 40, 2 ** 40, (2, 3000))  # beyond float64 exactness: the int64 product
    np.testing.assert_array_equal(integer._int_dot(huge, huge.T), huge @ huge.T)


def test_plans_follow_weights_changed_in_place():
    rng = np.random.default_rng(6)
    x = rng.integers(-128, 128, (2, 6, 6, 4)).astype(np.int8)
    w = rng.integers(-127, 128, (3, 3, 3, 4)).astype(np.int8)
    bias = np.zeros(3, np.int32)
    fs = np.full(3, 0.01, np.float32)
    for runtime, arith in (("reference", integer), ("xnnpack", integer_xnnpack)):
        args = (x, np.float32(0.02), 1, w, fs, bias, np.float32(0.05), 0)
        first = arith.conv2d(*args)
        np.testing.assert_array_equal(first, old_conv(runtime, False, *args, (1, 1), "SAME", (-128, 127)))
        w[0] = -w[0]
        bias[1] = 5000
        fs[2] = 0.02
        second = arith.conv2d(*args)
        np.testing.assert_array_equal(second, old_conv(runtime, False, *args, (1, 1), "SAME", (-128, 127)))
        assert not np.array_equal(first, second)
