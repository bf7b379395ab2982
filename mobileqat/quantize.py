"""quantize(model, scheme) -> a Keras QAT model that trains with model.fit.

Steps: fold BatchNorm into the convolutions (``transforms.fold_batchnorm``), give every layer a
``QuantizeConfig`` from the scheme, refuse (in one error) the layers the integer runtime cannot
run, then let tfmot wrap the layers (``quantize_annotate_layer`` + ``quantize_apply``).
"""
from mobileqat import transforms
from mobileqat._tf import keras, tfmot
from mobileqat.layers import FoldedConvBN, QuantizeConfig
from mobileqat.quantizers import FixedRangeQuantizer
from mobileqat.schemes import get_scheme

_qk = tfmot.quantization.keras

# Layers that move integers without rescaling: output keeps the input's scale, nothing to quantize.
_PASS_THROUGH = (keras.layers.MaxPooling2D, keras.layers.Reshape, keras.layers.Flatten, keras.layers.Dropout,
                 keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.GlobalMaxPooling2D,
                 keras.layers.SpatialDropout2D, keras.layers.GaussianNoise, keras.layers.Permute)
# Layers whose output gets its own (moving-average) range.
_REQUANTIZE = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Concatenate,
               keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
               keras.layers.GlobalAveragePooling2D, keras.layers.AveragePooling2D, keras.layers.UpSampling2D)
_FUSABLE = ("linear", "relu", "relu6")
_FIXED_OUTPUT = {"softmax", "sigmoid"}  # TFLite int8 output: scale 1/256, zero point -128


def quantize_config_for(layer, scheme):
    """The QuantizeConfig for ``layer`` under ``scheme``, or a string saying why it is unsupported."""
    wq, aq = scheme.weight_quantizer, scheme.activation_quantizer
    if isinstance(layer, FoldedConvBN):
        return QuantizeConfig(output_quantizer=aq())
    if type(layer) in (keras.layers.Dense, keras.layers.Conv2D):
        act = keras.activations.serialize(layer.activation)
        if act not in _FUSABLE:
            return (f"its activation '{act}' cannot be fused into the integer op; "
                    "move it into its own Activation layer")
        if isinstance(layer, keras.layers.Dense) and layer.input_spec and len(layer.input.shape) != 2:
            return "Dense on a rank>2 input; put Flatten or GlobalAveragePooling2D before it"
        if isinstance(layer, keras.layers.Dense):
            # The converter cannot write per-channel FULLY_CONNECTED weights from a QAT graph
            # ("'tfl.transpose' op has mismatched quantized axes"): Dense weights are per-tensor.
            return QuantizeConfig(["kernel"], scheme.dense_weight_quantizer(), aq())
        return QuantizeConfig(["kernel"], wq(), aq())
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU, keras.layers.Softmax)):
        name = transforms.activation_name(layer)
        if name in _FIXED_OUTPUT:
            return QuantizeConfig(output_quantizer=FixedRangeQuantizer(0.0, 255.0 / 256.0))
        if name in ("relu", "relu6", "linear"):
            return QuantizeConfig(output_quantizer=aq())
        return f"activation '{name}' has no int8 kernel mobileqat supports yet; use ReLU6"
    if isinstance(layer, keras.layers.BatchNormalization):
        return ("a BatchNormalization that does not follow a Conv2D/DepthwiseConv2D cannot be folded; "
                "put it right after a convolution without activation")
    if isinstance(layer, _REQUANTIZE):
        return QuantizeConfig(output_quantizer=aq())
    if isinstance(layer, _PASS_THROUGH):
        return QuantizeConfig()
    if isinstance(layer, keras.Model):
        return "nested models are not supported yet; build the model as one flat functional graph"
    return "mobileqat has no integer mapping for this layer type; replace it with a supported layer"


def quantize(model, scheme="w8a8"):
    """Return a QAT copy of ``model`` (float Keras model, functional or Sequential).

    Conv/DepthwiseConv + BN (+ReLU/ReLU6) become ``FoldedConvBN``; weights are fake-quantized
    per channel, activations per tensor, as ``scheme`` says. The original model is untouched.
    Raises ValueError naming every layer that cannot be quantized, its class and the fix.
    """
    scheme = get_scheme(scheme)
    if not isinstance(model, keras.Model):
        raise TypeError(f"quantize() takes a tf_keras Model, got {type(model).__name__}. If it is a Keras 3 "
                        "model, build it with tf_keras (import mobileqat before tensorflow).")
    folded = transforms.fold_batchnorm(model, weight_quantizer=scheme.weight_quantizer())
    configs, problems = {}, []
    for layer in folded.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        config = quantize_config_for(layer, scheme)
        if isinstance(config, str):
            problems.append(f"  - layer '{layer.name}' ({type(layer).__name__}): {config}")
        else:
            configs[layer.name] = config
    if problems:
        raise ValueError(f"model '{model.name}' has layers mobileqat cannot quantize:\n" + "\n".join(problems))

    def annotate(layer):
        if layer.name in configs:
            return _qk.quantize_annotate_layer(layer, configs[layer.name])
        return layer

    annotated = keras.models.clone_model(folded, clone_function=annotate)
    annotated.set_weights(folded.get_weights())
    with quantize_scope():
        qat = _qk.quantize_apply(annotated)
    return qat


def load_qat_model(path):
    """Load a QAT model saved as .h5 (tfmot's QuantizeLayer does not reload from .keras).

    mobileqat's and tfmot's objects are known; no custom_objects needed."""
    import os
    with quantize_scope():
        return keras.models.load_model(os.fspath(path))


def quantize_scope():
    """tfmot's quantize_scope with mobileqat's objects (they are also registered with Keras)."""
    from mobileqat import layers, quantizers
    objs = {c.__name__: c for c in (layers.FoldedConvBN, layers.QuantizeConfig, quantizers.WeightQuantizer,
                                    quantizers.ActivationQuantizer, quantizers.FixedRangeQuantizer)}
    return _qk.quantize_scope(objs)
