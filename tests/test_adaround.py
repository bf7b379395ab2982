"""AdaRound (``mobileqat.adaround``, ``mobileqat.ptq(adaround=True)``): on a tiny conv model, the learned integer
weights are within one step of nearest rounding of the float (folded) weights computed in numpy, each layer's
reconstruction error measured in numpy is no worse than nearest rounding's, the exported file's weight codes are
the learned integers, the file lowers at 0 LSB on the reference kernels and XNNPACK, and the rounded model saves
and reloads."""
import numpy as np
import pytest

import mobileqat as mq
from conftest import labelled_noise as data
from mobileqat import calibration, export, lowering
from mobileqat._tf import keras
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def float_net():
    """16x16x3 -> 5: stem conv+BN+ReLU6 (stride 2), depthwise+BN+ReLU6, 1x1 projection+BN, Add, 1x1 Conv2D with
    bias and ReLU, GAP, Dense (8 inputs: packed INT4 under w4a8), softmax; trained for a few steps."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(6.0)(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, name="proj")(y))
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(8, 1, activation="relu", name="plain")(x)
    x = L.Dense(5, name="logits")(L.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inp, L.Activation("softmax", name="probs")(x), name="adaround_net")
    x, y = data(128, 7)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model


LAYERS = ("stem", "dw", "proj", "plain", "logits")


@pytest.fixture(scope="module")
def model():
    return float_net()


@pytest.fixture(scope="module")
def rounded(model):
    """{scheme: (qat after minmax calibration + AdaRound, its report, the calibration images)}."""
    calib = data(64, 8)[0]
    out = {}
    for scheme in ("w4a8", "w8a8"):
        qat = quantize(model, scheme)
        calibration.calibrate(qat, calib, "minmax")
        out[scheme] = (qat, mq.adaround(qat, calib, iters=300, batch_size=16), calib)
    return out


def _stored_codes(qat, layer, step):
    """Integer weights (output channels last) that the quantized model carries: fake-quantized weights / step."""
    wrapper = qat.get_layer(f"quant_{layer}")
    inner = wrapper.layer
    if hasattr(inner, "folded_kernel"):
        w = inner.weight_quantizer(inner.folded_float_kernel(), False, inner._wq_vars).numpy()
    else:
        var, q, qvars = wrapper._weight_vars[0]
        w = q(var, False, qvars).numpy()
    return np.round(w.astype(np.float64) / step)


def _float_weights(model, layer):
    """The float weight the file carries (numpy, float64, output channels last) and the float bias: a conv
    followed by BatchNormalization folded as kernel * gamma / sqrt(var + eps), bias beta - mean * that."""
    lay = model.get_layer(layer)
    if isinstance(lay, L.DepthwiseConv2D):
        w = lay.depthwise_kernel.numpy().astype(np.float64)
        w = w.reshape(w.shape[:2] + (1, -1))
    else:
        w = lay.kernel.numpy().astype(np.float64)
    bn = lay.outbound_nodes[0].outbound_layer
    if isinstance(bn, L.BatchNormalization):
        g = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        return w * g, bn.beta.numpy() - bn.moving_mean.numpy() * g
    return w, lay.bias.numpy().astype(np.float64)


def _step(w, bits):
    """The step of a calibrated (min-max) per-channel weight grid: max|w| / (2^(b-1) - 1) per output channel
    (the schemes quantize Dense weights per tensor: max over the whole tensor there)."""
    return np.abs(w).reshape(-1, w.shape[-1]).max(0) / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("scheme", ["w4a8", "w8a8"])
def test_learned_integers_are_within_one_step_of_nearest_rounding(model, rounded, scheme):
    qat, report, _ = rounded[scheme]
    bits = int(scheme[1])
    assert sorted(report["adaround"]) == sorted(f"quant_{n}" for n in LAYERS) and not report["not_rounded"]
    changed = 0
    for layer in LAYERS:
        w, _ = _float_weights(model, layer)
        wq = qat.get_layer(f"quant_{layer}")
        quantizer = getattr(wq.layer, "weight_quantizer", None) or wq._weight_vars[0][1]
        step = _step(w, bits) if quantizer.per_channel else np.abs(w).max() / (2 ** (bits - 1) - 1)
        q = _stored_codes(qat, layer, step)
        near = np.clip(np.floor(w / step + 0.5), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert np.abs(q - near).max() <= 1, layer
        assert np.abs(q).max() <= 2 ** (bits - 1) - 1, layer
        changed += int(np.sum(q != near))
        assert report["adaround"][f"quant_{layer}"]["changed"] == pytest.approx(np.mean(q != near), abs=0.02)
    assert changed > 0  # it learned something other than nearest rounding


def _conv_same(x, w, stride=1):
    """numpy 'same' convolution (TensorFlow's padding): x (N, H, W, C), w (kh, kw, C, O)."""
    kh, kw = w.shape[:2]
    n, h, wd, _ = x.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - wd, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((n, oh, ow, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride], w[i, j])
    return out


@pytest.mark.parametrize("scheme", ["w4a8", "w8a8"])
def test_reconstruction_error_is_no_worse_than_nearest_rounding(model, rounded, scheme):
    """The objective's data term in numpy: mean over images and positions of sum over channels of
    (f(W_q x_q + b) - f(W x + b))^2, x_q the layer's input in the rounded quantized model, x in the float model."""
    qat, report, calib = rounded[scheme]
    bits = int(scheme[1])
    layers = {"stem": (lambda x, w: _conv_same(x, w, 2), lambda y: np.clip(y, 0, 6)),
              "plain": (lambda x, w: _conv_same(x, w), lambda y: np.maximum(y, 0)),
              "logits": (lambda x, w: x @ w, lambda y: y)}
    for layer, (op, act) in layers.items():
        w, b = _float_weights(model, layer)
        step = _step(w, bits) if layer != "logits" else np.abs(w).max() / (2 ** (bits - 1) - 1)  # Dense: per tensor
        x_float = keras.Model(model.input, model.get_layer(layer).input).predict(calib, verbose=0)
        x_q = keras.Model(qat.input, qat.get_layer(f"quant_{layer}").input).predict(calib, verbose=0)
        x_float, x_q = x_float.astype(np.float64), x_q.astype(np.float64)
        if layer == "logits":
            w = w.reshape(w.shape[-2:])
        target = act(op(x_float, w) + b)
        top = 2 ** (bits - 1) - 1
        near = np.clip(np.floor(w / step + 0.5), -top, top) * step
        learned = _stored_codes(qat, layer, step).reshape(w.shape) * step
        mse = {k: np.mean(np.sum((act(op(x_q, v) + b) - target) ** 2, axis=-1))
               for k, v in (("nearest", near), ("adaround", learned))}
        assert mse["adaround"] <= mse["nearest"], (layer, mse)
        entry = report["adaround"][f"quant_{layer}"]
        assert entry["mse_adaround"] == pytest.approx(mse["adaround"], rel=1e-3), layer
        assert entry["mse_nearest"] == pytest.approx(mse["nearest"], rel=1e-3), layer


def _file_weight_codes(path):
    """{tensor name: integer codes} of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED filter in the file
    (INT4 unpacked: two signed codes a byte, low nibble first), and their scales."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    root = flatbuffer_utils.read_model_from_bytearray(bytearray(open(path, "rb").read()))
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    sub, out = root.subgraphs[0], {}
    for op in sub.operators:
        code = root.operatorCodes[op.opcodeIndex]
        if ops[max(code.builtinCode, code.deprecatedBuiltinCode)] not in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                          "FULLY_CONNECTED"):
            continue
        t = sub.tensors[op.inputs[1]]
        raw = np.frombuffer(bytes(root.buffers[t.buffer].data), np.uint8)
        if t.type == schema.TensorType.INT4:
            nib = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(-1)[:int(np.prod(t.shape))].astype(np.int16)
            codes = (nib ^ 8) - 8
        else:
            assert t.type == schema.TensorType.INT8
            codes = raw.view(np.int8).astype(np.int16)
        out[t.name.decode()] = (codes.reshape(t.shape), np.asarray(t.quantization.scale))
    return out


@pytest.fixture(scope="module")
def exported(rounded, tmp_path_factory):
    qat = rounded["w4a8"][0]
    path = str(tmp_path_factory.mktemp("adaround") / "w4a8_adaround.tflite")
    export.export_tflite(qat, path)
    return qat, path


def test_the_files_weights_are_the_learned_integers(model, exported):
    qat, path = exported
    weights = _file_weight_codes(path)
    for layer in LAYERS:
        (name,) = [k for k in weights if f"quant_{layer}/" in k]
        codes, scales = weights[name]
        learned = _stored_codes(qat, layer, scales.astype(np.float64))
        # TFLite layouts: conv (O, kh, kw, I), depthwise (1, kh, kw, C), fully connected (O, I)
        if layer == "logits":
            expected = learned.T
        else:
            expected = learned.transpose((2, 0, 1, 3) if layer == "dw" else (3, 0, 1, 2))
        np.testing.assert_array_equal(codes, expected, err_msg=layer)
        w, _ = _float_weights(model, layer)
        np.testing.assert_allclose(scales, np.atleast_1d(_step(w, 4) if layer != "logits"
                                                         else np.abs(w).max() / 7), rtol=1e-5, err_msg=layer)
        assert np.abs(codes).max() <= 7
    assert "int4 packed" in export.weight_summary(path)["grids"]  # the Dense's packed INT4 path is covered


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_the_adarounded_file_matches_the_integer_twin_at_0_lsb(exported, runtime):
    qat, path = exported
    f = TFLiteModel(path, runtime)
    codes = f.quantize_input(data(32, 9)[0])
    out = np.concatenate([f.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), out)
    assert export.tensor_types(path)["float_ops"] == []


def test_ptq_with_adaround_and_bias_correction_saves_and_reloads(model, tmp_path):
    calib = data(48, 10)[0]
    qat = mq.ptq(model, calib, "w8a8", adaround=True, adaround_iters=50, bias_correction=True)
    plain = qat.get_layer("quant_plain")
    # the bias moved by E[(W - W_q) x_q]: the mean output error of the layer (before ReLU) vanishes
    w, b = _float_weights(model, "plain")
    x_q = keras.Model(qat.input, plain.input).predict(calib, verbose=0).astype(np.float64)
    var, q, qvars = plain._weight_vars[0]
    w_q = q(var, False, qvars).numpy().astype(np.float64)
    err = (_conv_same(x_q, w) + b) - (_conv_same(x_q, w_q) + plain.layer.bias.numpy())
    assert np.abs(err.mean(axis=(0, 1, 2))).max() < 1e-5
    qat.save(tmp_path / "adaround.h5")
    loaded = load_qat_model(tmp_path / "adaround.h5")
    codes = lowering.lower(qat).quantize_input(calib[:8])
    for runtime in ("reference", "xnnpack"):
        np.testing.assert_array_equal(lowering.lower(loaded).run(codes, runtime), lowering.lower(qat).run(codes, runtime))


def test_adaround_errors_name_the_thing_and_the_fix(model):
    x = data(8, 11)[0]
    with pytest.raises(ValueError, match=r"layer 'quant_stem' \(FoldedConvBN\): its weight range is not fixed.*"
                                         r"calibrate first"):
        mq.adaround(quantize(model, "w8a8"), x, iters=5)
    with pytest.raises(ValueError, match=r"quantizes its weights with LSQWeightQuantizer.*min-max scheme"):
        mq.adaround(quantize(model, "w4a8_lsq"), x, iters=5)
    qat = quantize(model, "w8a8")
    with pytest.raises(ValueError, match="iters=0"):
        mq.adaround(qat, x, iters=0)
    with pytest.raises(ValueError, match="has no quantizers"):
        mq.adaround(model, x)
    with pytest.raises(ValueError, match="adaround_options=5"):
        mq.ptq(model, x, adaround=True, adaround_options=5)


def test_layers_adaround_does_not_cover_keep_nearest_rounding_and_are_named():
    keras.utils.set_random_seed(6)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inp)
    x = L.Conv2DTranspose(4, 2, strides=2, name="up")(x)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    calib = np.random.default_rng(12).uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32)
    qat = mq.ptq(model, calib, "w8a8")
    var = qat.get_layer("quant_up")._weight_vars[0][0]
    before = var.numpy()
    report = mq.adaround(qat, calib, iters=20)
    assert sorted(report["adaround"]) == ["quant_conv", "quant_head"]
    assert list(report["not_rounded"]) == ["quant_up"] and "Conv2DTranspose" in report["not_rounded"]["quant_up"]
    np.testing.assert_array_equal(var.numpy(), before)
