"""QAT schedules as Keras callbacks (mobileqat.training): quantization delay, batch-norm freeze, single-conv
BN folding, gradual weight bit width. Each checked against an independent reference: the float model trained
the same way, numpy batch norm, the exported file on the reference kernels and XNNPACK via ``mobileqat.lower``."""
import numpy as np
import pytest

from mobileqat import export, lowering, training
from mobileqat._tf import keras, tf
from mobileqat.layers import FoldedConvBN
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.quantizers import WeightQuantizer
from mobileqat.runtime import TFLiteModel

L = keras.layers


def net(seed=1, classes=4):
    """12x12x3 -> classes: conv+BN+ReLU6 (stride 2), depthwise+BN+ReLU6, GAP, Dense, softmax."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="c1")(inp)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    x = L.Dense(classes, name="fc")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Activation("softmax")(x), name="sched_net")


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 12, 12, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)
    return x, y


def _sgd(model):
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    return model


class _Record(keras.callbacks.Callback):
    """The schedule's state at every training batch."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.states = schedule, []

    def on_train_batch_begin(self, batch, logs=None):
        self.states.append(self.schedule.state)


def test_quantization_delay_trains_the_float_model_then_quantizes():
    x, y = data()
    f, q = _sgd(net()), _sgd(quantize(net()))
    delay = training.QuantizationDelay(6)
    f.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # 4 steps
    rec = _Record(delay)
    q.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[delay, rec])
    assert rec.states == [True] * 4
    # after 4 float steps of both: the QAT model (quantizers bypassed) is the float model, in both modes
    delay._set(True)
    np.testing.assert_allclose(q(x, training=False).numpy(), f(x, training=False).numpy(), atol=2e-6)
    np.testing.assert_allclose(q(x, training=True).numpy(), f(x, training=True).numpy(), atol=2e-6)
    delay._set(False)
    # ranges were recorded during the delay: the activation quantizers saw data
    seen = [w for w in q.weights if w.name.endswith("_seen:0")]
    assert seen and all(float(w.numpy()) == 1.0 for w in seen)
    # after fit the model is quantized (softmax output on its 1/256 grid), and steps 6.. run with fake quant on
    out = q(x).numpy()
    np.testing.assert_array_equal(out * 256, np.round(out * 256))
    rec.states.clear()
    q.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[delay, rec])
    assert rec.states == [True, True, False, False]  # the optimizer's step count carries over: 4, 5 | 6, 7
    assert not any(qz.bypass for qz in training.quantizers_of(q))


def test_quantization_delay_bypasses_layer_norms_inner_quantizers():
    """LayerNormCore fake-quantizes its intermediates (mean, var, rsqrt, ...) with its own quantizer: bypassed
    with the others, the QAT model computes the float LayerNormalization model."""
    def ln_net():
        keras.utils.set_random_seed(3)
        inp = keras.Input((6, 6, 3))
        x = L.LayerNormalization(name="ln")(L.Conv2D(8, 3, name="c")(inp))
        return keras.Model(inp, L.Dense(4, activation="softmax", name="fc")(L.GlobalAveragePooling2D()(x)))
    x, _ = data(16)
    x = x[:, :6, :6]
    f, q = ln_net(), quantize(ln_net())
    q(x, training=True)  # ranges seen once
    inner = [layer._quantizer for layer in q.submodules if type(layer).__name__ == "LayerNormCore"]
    assert inner and all(any(qz is i for qz in training.quantizers_of(q)) for i in inner)
    delay = training.QuantizationDelay(1)
    delay.set_model(q)
    assert np.abs(q(x, training=False).numpy() - f(x, training=False).numpy()).max() > 1e-4  # quantized: differs
    delay._set(True)
    np.testing.assert_allclose(q(x, training=False).numpy(), f(x, training=False).numpy(), atol=2e-6)
    delay._set(False)


def test_quantization_delay_refuses_a_negative_delay():
    with pytest.raises(ValueError, match="steps=-1"):
        training.QuantizationDelay(-1)


def _folded_layer(folding, seed=0):
    """A built 1x1 FoldedConvBN (3 -> 5 channels, 8-bit per-channel weights) with random BN statistics."""
    rng = np.random.default_rng(seed)
    layer = FoldedConvBN(5, kernel_size=1, weight_quantizer=WeightQuantizer(8), folding=folding, momentum=0.9)
    layer.build((None, 6, 6, 3))
    layer.load_conv_bn(rng.normal(size=(1, 1, 3, 5)), rng.uniform(0.5, 2, 5), rng.normal(size=5),
                       rng.normal(size=5) * 0.1, rng.uniform(0.5, 2, 5))
    return layer, rng.normal(size=(4, 6, 6, 3)).astype(np.float32)


def test_single_conv_folding_is_pytorchs_approximate_forward_in_numpy():
    from conftest import numpy_fake_quant
    layer, x = _folded_layer("single_conv")
    k, g, b, mm, mv = (v.numpy().astype(np.float64) for v in (layer.kernel, layer.gamma, layer.beta,
                                                                 layer.moving_mean, layer.moving_variance))
    eps = layer.epsilon
    scale = g / np.sqrt(mv + eps)
    folded = k[0, 0] * scale  # (3, 5)
    amax = np.abs(folded).max(axis=0)
    wq = numpy_fake_quant(folded, -amax, amax, 8, narrow_range=True)
    z = np.einsum("nhwc,co->nhwo", x.astype(np.float64), wq) / scale
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
    expected = (z - mean) * g / np.sqrt(var + eps) + b
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, atol=2e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.9 * mm + 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 * mv + 0.1 * var, atol=1e-5)


def test_both_foldings_infer_alike_and_train_on_batch_statistics():
    two, x = _folded_layer("two_pass")
    one, _ = _folded_layer("single_conv")
    np.testing.assert_array_equal(two(x, training=False).numpy(), one(x, training=False).numpy())
    # training mode: the single conv normalises by the statistics of its own (quantized-weight) output, so per
    # channel the output has mean beta and std gamma (less the epsilon's share); the two-pass form by those of the float conv, so only up to
    # the weights' quantization error
    for layer, tol in ((one, 1e-5), (two, 1e-3)):
        y = layer(x, training=True).numpy()
        np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), layer.beta.numpy(), atol=tol)
        np.testing.assert_allclose(y.std(axis=(0, 1, 2)), np.abs(layer.gamma.numpy()), rtol=3e-3)


def test_folding_option_round_trips_config_and_h5(tmp_path):
    layer, _ = _folded_layer("single_conv")
    assert FoldedConvBN.from_config(layer.get_config()).folding == "single_conv"
    with pytest.raises(ValueError, match="folding='one'"):
        FoldedConvBN(4, folding="one")
    qat = training.set_bn_folding(quantize(net()), "single_conv")
    x, y = data(16)
    qat(x, training=True)
    qat.save(tmp_path / "m.h5")
    loaded = load_qat_model(tmp_path / "m.h5")
    assert [layer.folding for layer in training.folded_layers(loaded)] == ["single_conv"] * 2
    np.testing.assert_array_equal(loaded(x).numpy(), qat(x).numpy())


def test_freeze_batch_norm_fixes_the_statistics_from_its_step():
    x, y = data()
    q = _sgd(quantize(net()))
    freeze = training.FreezeBatchNorm(2)
    folded = training.folded_layers(q)
    assert len(folded) == 2 and all(layer.batch_statistics for layer in folded)

    class Stats(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(folded[0].moving_mean.numpy().copy())
    stats, rec = Stats(), _Record(freeze)
    q.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[freeze, rec, stats])
    assert rec.states == [False, False, True, True]
    assert not np.array_equal(stats.seen[0], stats.seen[1])  # batch statistics update the moving ones
    np.testing.assert_array_equal(stats.seen[1], stats.seen[2])  # frozen from step 2 on
    np.testing.assert_array_equal(stats.seen[2], stats.seen[3])
    assert all(not layer.batch_statistics and not layer.get_config()["batch_statistics"] for layer in folded)
    # one convolution with the moving statistics, in training as at inference
    inner = folded[0]
    z = q.layers[1](x)  # the input quantizer's output feeds the first folded layer
    np.testing.assert_allclose(inner(z, training=True).numpy(), inner(z, training=False).numpy(), atol=1e-6)


def _weight_codes(layer, quantizer, bits):
    """The layer's fake-quantized folded kernel in units of the ``bits``-bit step of its recorded range."""
    w = layer.folded_kernel(training=False).numpy().reshape(-1, quantizer_channels(layer))
    amax = [v for v in layer.weights if v.name.endswith("kernel_max:0")][0].numpy()
    return w / (amax / (2 ** (bits - 1) - 1))


def quantizer_channels(layer):
    return int(layer.folded_kernel().shape[-1]) if not layer.depthwise else int(np.prod(layer.kernel.shape[2:]))


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_bit_schedule_trains_8_6_4_and_the_4_bit_file_lowers_at_0_lsb(bit_scheduled, runtime):
    qat, path, x, codes_by_step = bit_scheduled
    assert [bits for bits, _ in codes_by_step] == [8, 8, 6, 6, 4, 4]
    for bits, codes in codes_by_step:  # the conv weights lie on each step's grid, and use it
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        top = 2 ** (bits - 1) - 1
        assert np.abs(np.round(codes)).max() == top, bits
    assert all(q.train_bits is None for q in training.quantizers_of(qat) if isinstance(q, WeightQuantizer))
    m = TFLiteModel(path, runtime)
    codes = m.quantize_input(x)
    out = np.concatenate([m.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), out)


@pytest.fixture(scope="module")
def bit_scheduled(tmp_path_factory):
    x, y = data()
    qat = _sgd(quantize(net(), "w4a8"))
    schedule = training.BitSchedule("8:0,6:2,4:4")
    conv = training.folded_layers(qat)[0]
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((schedule.state, _weight_codes(conv, conv.weight_quantizer, schedule.state)))
    qat.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[schedule, Probe()])
    qat.fit(x[:32], y[:32], batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[schedule, Probe()])
    path = str(tmp_path_factory.mktemp("bits") / "w4.tflite")
    export.export_tflite(qat, path)
    return qat, path, x[:24], seen


def test_bit_schedule_must_end_at_the_exported_width():
    x, y = data(16)
    qat = _sgd(quantize(net(), "w4a8"))
    with pytest.raises(ValueError, match="ends at 6 bits, but weights are exported on 4 bits"):
        qat.fit(x, y, epochs=1, verbose=0, callbacks=[training.BitSchedule({0: 8, 1: 6})])
    for bad, match in (("8:1", "must start at 0"), ("4:0,8:2", "never grow"), ("8-0", "is not BITS:START")):
        with pytest.raises(ValueError, match=match):
            training.BitSchedule(bad)


SCHEDULED_RUN = ["--train", 128, "--test", 32, "--epochs", 1, "--qat-epochs", 2, "--model", "mobilenet_v1",
                 "--alpha", 0.25, "--batch-size", 32,
                 "--bench-runs", 3, "--golden", 0, "--quiet", "--scheme", "w4a8", "--quant-delay", 2, "--freeze-bn", 7,
                 "--bit-schedule", "8:0,4:1", "--distill", "3,0.5", "--bn-folding", "single_conv"]


def test_mobileqat_run_flags_schedule_distil_and_record_the_recipe(tmp_path):
    import json
    from mobileqat import cli
    out = tmp_path / "run"
    assert cli.main(["demo", "--out", str(out), *map(str, SCHEDULED_RUN)]) == 0  # in this process: no TF start-up
    report = json.loads((out / "report.json").read_text())
    recipe = report["training"]["qat_recipe"]
    assert recipe == {"epochs": 2, "learning_rate": 2e-4, "warmup": 0.1, "quant_delay": 2, "freeze_bn": 7,
                      "bit_schedule": {"0": 8, "1": 4}, "distill": {"temperature": 3.0, "alpha": 0.5},
                      "bn_folding": "single_conv"}
    assert report["config"]["distill"] == [3.0, 0.5] and report["config"]["bit_schedule"] == "8:0,4:1"
    assert "distillation_loss" in report["training"]["qat"]
    fid = report["variants"]["qat_int8"]["fidelity"]
    assert fid["xnnpack_twin_output_max_lsb_diff"] == 0
    qat = load_qat_model(out / "qat_model.h5")
    assert all(not layer.batch_statistics and layer.folding == "single_conv" for layer in training.folded_layers(qat))


def test_bad_schedule_flags_stop_the_run_before_training(tmp_path, capsys):
    from mobileqat import cli
    from mobileqat.data import synthetic_shapes
    from mobileqat.pipeline import run_pipeline
    parser = cli.build_parser()
    for flags, message in ((["--distill", "4"], "expected T,ALPHA"), (["--distill", "4,2"], "ALPHA in [0, 1]")):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo", "--out", "o", *flags])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="must start at 0"):
        cli._config(parser.parse_args(["demo", "--out", "o", "--bit-schedule", "8:1"]))
    cfg = cli._config(parser.parse_args(["demo", "--out", "o", "--scheme", "w4a8", "--bit-schedule", "8:0,6:1",
                                         "--alpha", "0.25"]))
    with pytest.raises(ValueError, match="ends at 6 bits, but the scheme exports 4-bit weights"):
        run_pipeline(synthetic_shapes(n_train=20, n_test=10), tmp_path / "x", cfg)
    assert not (tmp_path / "x").exists()
