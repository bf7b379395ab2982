"""quantize(model, scheme) -> a Keras QAT model that trains with model.fit.

Steps: apply the rewrites of ``REWRITES`` in order (plain model -> model functions of
``mobileqat.transforms``: flatten nested models, MobileNetV3's hard-swish/-sigmoid patterns to one layer
each, TF ops to layers, split activations and n-input merges, depthwise-grouped and separable convolutions, ReLU
layers into the conv before them, preprocessing and standalone BatchNorm to foldable pairs); ``audit``
the result against the refusal list below (``MODEL_RULES``, ``LAYER_RULES``) and refuse, in one
ValueError, every layer mobileqat cannot quantize, with its class and the fix, before any layer
reaches tfmot (or keep named layers float: ``keep_float``); fold BatchNorm into the convolutions
(``transforms.fold_batchnorm``); give every layer a ``QuantizeConfig`` from the scheme; let tfmot wrap
the layers (``quantize_annotate_layer`` + ``quantize_apply``).
"""
from typing import NamedTuple

from mobileqat import transforms
from mobileqat._tf import keras, tf, tfmot
from mobileqat.layers import (FoldedConvBN, HardSigmoid, HardSigmoidQuantizeConfig, HardSwish, LayerNormCore,
                              LayerNormQuantizeConfig, QuantizeConfig)
from mobileqat.quantizers import FixedRangeQuantizer
from mobileqat import schemes as _schemes

_qk = tfmot.quantization.keras
L = keras.layers

# Layers that move integers without rescaling: output keeps the input's scale, nothing to quantize.
# AveragePooling2D too: the int8 AVERAGE_POOL_2D keeps its input's scale (pooling.cc), and an output
# range of its own only makes the converter add a QUANTIZE (a second rounding) after it.
# UpSampling2D/Resizing too: RESIZE_* keeps its input's scale (given an output range of its own, the converter
# writes an extra QUANTIZE to that scale before the resize).
_PASS_THROUGH = transforms.PASS_THROUGH
# Layers whose output gets its own (moving-average) range.
_REQUANTIZE = (L.Add, L.Subtract, L.Multiply, L.Concatenate, L.Maximum, L.Minimum,
               L.GlobalAveragePooling2D, HardSwish)
_WEIGHTED = (L.Dense, L.Conv2D, L.Conv2DTranspose)  # exact types: their kernel is fake-quantized in place
_FOLDED_ONLY = (L.DepthwiseConv2D, L.BatchNormalization)  # quantized only as a FoldedConvBN
_ACTIVATION_LAYERS = (L.Activation, L.ReLU, L.Softmax)
_FUSABLE = ("linear", "relu", "relu6")
# TFLite fixes these int8 output ranges: softmax/sigmoid scale 1/256, zero point -128; tanh 1/128, 0
_FIXED_OUTPUT = {"softmax": (0.0, 255.0 / 256.0), "sigmoid": (0.0, 255.0 / 256.0), "tanh": (-1.0, 127.0 / 128.0)}
_FIXED_OUTPUT_16 = (-1.0, 32767.0 / 32768.0)  # 16-bit, zero point 0, scale 1/32768 (TFLite's int16 outputs)
_OWN_RANGE = _FUSABLE + ("swish", "gelu")  # activation layers whose output gets its own (moving-average) range
_ACTIVATIONS = set(_OWN_RANGE) | set(_FIXED_OUTPUT)  # what an Activation/ReLU/Softmax layer may apply
SUPPORTED = ("Conv2D; Conv2DTranspose; Conv2D or DepthwiseConv2D + BatchNormalization [+ ReLU/ReLU6] "
             "(folded into one layer); Conv1D and 1D pools (as their 2D layers); Dense; "
             "Activation/ReLU/Softmax (" + ", ".join(sorted(_ACTIVATIONS)) + "); "
             + ", ".join(c.__name__ for c in _REQUANTIZE + _PASS_THROUGH))


def quantize_config_for(layer, scheme):
    """The QuantizeConfig of ``layer`` (a layer of the folded model) under ``scheme``, or None when mobileqat
    has none for it. ``audit`` says, before folding, why a layer gets none and what to do instead."""
    wq = scheme.weight_quantizer
    aq = lambda: scheme.activation_quantizer(layer)  # noqa: E731  (PACT needs to know the output is >= 0)
    if isinstance(layer, FoldedConvBN):
        return QuantizeConfig(output_quantizer=aq())
    if type(layer) is L.Dense:
        # The converter cannot write per-channel FULLY_CONNECTED weights from a QAT graph
        # ("'tfl.transpose' op has mismatched quantized axes"): Dense weights are per-tensor.
        inputs = int(layer.kernel.shape[0]) if layer.built else 1  # unbuilt: unknown, never packed
        return QuantizeConfig(["kernel"], scheme.fully_connected_weight_quantizer(inputs), aq())
    if type(layer) is L.Conv2D:
        return QuantizeConfig(["kernel"], wq(), aq())
    if type(layer) is L.Conv2DTranspose:
        # Per-tensor, as Dense: a per-channel FakeQuant on the kernel's output axis (kh, kw, out, in; measured
        # with transposes around fake_quant_with_min_max_vars_per_channel) stops the converter with
        # "'tfl.transpose' op has mismatched quantized axes of input and output".
        return QuantizeConfig(["kernel"], scheme.dense_weight_quantizer(), aq())
    if isinstance(layer, _ACTIVATION_LAYERS):
        name = transforms.activation_name(layer)
        if name in _FIXED_OUTPUT:
            if scheme.activation_bits == 16:  # int16x8 softmax/logistic/tanh: scale 1/32768, zero point 0
                return QuantizeConfig(output_quantizer=FixedRangeQuantizer(*_FIXED_OUTPUT_16, num_bits=16))
            return QuantizeConfig(output_quantizer=FixedRangeQuantizer(*_FIXED_OUTPUT[name]))
        return QuantizeConfig(output_quantizer=aq()) if name in _OWN_RANGE else None
    if isinstance(layer, HardSigmoid):  # output in [0, 1]; relu6(x + 3) on [0, 6] inside
        return HardSigmoidQuantizeConfig(output_quantizer=FixedRangeQuantizer(0.0, 1.0))
    if isinstance(layer, LayerNormCore):  # every intermediate tensor on its own range, inside the layer
        return LayerNormQuantizeConfig(output_quantizer=aq())
    if isinstance(layer, _REQUANTIZE):
        return QuantizeConfig(output_quantizer=aq())
    if isinstance(layer, _PASS_THROUGH):
        return QuantizeConfig()
    return None


def _has_integer_mapping(layer):
    """The layer types quantize_config_for maps, those quantized folded, and model inputs."""
    return (type(layer) in _WEIGHTED or isinstance(layer, (L.InputLayer, FoldedConvBN, HardSigmoid, LayerNormCore) + _FOLDED_ONLY
                                                   + _ACTIVATION_LAYERS + _REQUANTIZE + _PASS_THROUGH))


# --- The refusal list --------------------------------------------------------------------------------
#
# ``audit`` runs every rule below on the float model and ``quantize`` raises one ValueError listing every
# problem as "layer 'name' (Class): why; fix: what to do" ("model ..." for the model-level rules).
# A rule is a function returning why it refuses (a string), or (why, fix) when the fix depends on the
# layer, or None; it is registered with its fix. Layer rules see each layer (model inputs first, then the
# layers in graph order) and a ``_Graph``; after a "final" rule fires the layer's other rules are skipped.
# ``audit`` returns the problems instead of raising, so that an option to keep refused layers in float
# can later use the same list.

class Problem(NamedTuple):
    """One reason quantize() refuses a model: where ("layer" or "model"), the name and class, why, the fix."""
    where: str
    name: str
    cls: str
    why: str
    fix: str

    def __str__(self):
        return f"{self.where} '{self.name}' ({self.cls}): {self.why}; fix: {self.fix}"


MODEL_RULES = []  # (check(model) -> why, fix, final)
LAYER_RULES = []  # (check(layer, graph) -> why, fix, final)


def _rule(table, fix=None, final=False):
    def register(check):
        table.append((check, fix, final))
        return check
    return register


@_rule(MODEL_RULES, "build it as a functional or Sequential model (keras.Input and layer calls)", final=True)
def subclassed_model(model):
    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        return "it is a subclassed model: its call() is Python code, not a graph of layers mobileqat can rewrite"


@_rule(MODEL_RULES, "start it with keras.Input(shape), or call model.build((None, H, W, C)) first", final=True)
def unbuilt_sequential(model):
    if isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        return "it is a Sequential model with no layer graph yet (it does not know its input shape)"


@_rule(MODEL_RULES, "add the layers to quantize", final=True)
def no_layers(model):
    if all(isinstance(layer, L.InputLayer) for layer in model.layers):
        return "it has no layers besides its input"


def _several(tensors, what):
    if len(tensors) != 1:
        names = ", ".join(f"'{t._keras_history.layer.name}'" for t in tensors)
        return f"it has {len(tensors)} {what} ({names})"


@_rule(MODEL_RULES, "quantize a model with one image input (N, H, W, C); mobileqat's export, harness and "
                    "integer path run models with one input and one output")
def several_inputs(model):
    return _several(model.inputs, "inputs")


@_rule(MODEL_RULES, "quantize a model with one output, e.g. keras.Model(model.input, model.outputs[0]); "
                    "mobileqat's export, harness and integer path run models with one input and one output")
def several_outputs(model):
    return _several(model.outputs, "outputs")


@_rule(LAYER_RULES, "use a separate layer for each call", final=True)
def shared_layer(layer, graph):
    calls = len(graph.nodes.get(layer.name, ()))
    if calls > 1:
        return f"it is called {calls} times in this model (a shared layer); mobileqat quantizes each layer once"


@_rule(LAYER_RULES, "flatten it: call the nested model's layers directly, in one functional model", final=True)
def nested_model(layer, graph):
    if isinstance(layer, keras.Model):
        return "it is a nested model; mobileqat quantizes one flat graph of layers"


_NO_MAPPING_FIX = {  # class name -> fix, where a plainer one than "replace it" exists
    "Lambda": "write it with Keras layers (Add, Multiply, ReLU, Reshape, ...)",
    "TFOpLambda": "use the Keras layer instead of the TensorFlow op (x + y: layers.Add, x * y: layers.Multiply, "
                  "tf.nn.relu: layers.ReLU, tf.reshape: layers.Reshape)",
    "SeparableConv2D": "split it into DepthwiseConv2D -> BatchNormalization -> 1x1 Conv2D -> BatchNormalization",
    "LeakyReLU": "use ReLU or ReLU6", "PReLU": "use ReLU or ReLU6", "ELU": "use ReLU or ReLU6",
    "ThresholdedReLU": "use ReLU or ReLU6",
    "Average": "use Add: the converter leaves Average's division by the input count in float (no int8 op)",
    "Rescaling": "scale the images in the input pipeline, before the model",
    "Normalization": "normalize the images in the input pipeline, before the model",
    "SyncBatchNormalization": "use layers.BatchNormalization",
    "LayerNormalization": "normalize over the last axis (axis=-1, the channels): quantize writes that as int8 "
                          "ops; or keep it float: quantize(model, keep_float=[its name]), then "
                          "export_tflite(..., allow_float_ops=True) (mobileqat.lower then names it)",
    "LayerScale": "put it directly after a Conv2D/Dense/DepthwiseConv2D with no activation that nothing else "
                  "uses: quantize then folds its per-channel scale into that layer's weights",
    "QuantizeWrapperV2": "the model is already quantized: pass the float model to quantize()",
    "QuantizeWrapper": "the model is already quantized: pass the float model to quantize()",
    "QuantizeLayer": "the model is already quantized: pass the float model to quantize()",
    "QuantizeAnnotate": "pass the float model, not an annotated one: quantize() does the annotation",
}


@_rule(LAYER_RULES, final=True)
def no_integer_mapping(layer, graph):
    if not _has_integer_mapping(layer):
        cls = type(layer).__name__
        what = {"TFOpLambda": f"a TensorFlow op (tf.{getattr(layer, 'symbol', None)}) called on a Keras tensor",
                "Lambda": "a Lambda layer (Python code)",
                "LayerNormalization": f"LayerNormalization over axis {list(getattr(layer, 'axis', None) or [])} of a "
                                      "rank-{} input (mobileqat writes LayerNormalization over the last axis of a "
                                      "rank 2-4 input with known sizes as int8 ops)".format(
                                          len(layer.input_shape) if isinstance(layer.input_shape, tuple) else "?")
                }.get(cls, cls)
        return (f"mobileqat has no integer mapping for {what}",
                _NO_MAPPING_FIX.get(cls, "replace it with supported layers (listed below)"))


@_rule(LAYER_RULES, "use keras.Input(..., dtype='float32') and convert the images to float32 before the model")
def non_float32_input(layer, graph):
    if isinstance(layer, L.InputLayer) and layer.dtype != "float32":
        return f"the model input has dtype {layer.dtype}; the fake-quant input and the int8 export take float32"


@_rule(LAYER_RULES, "build the model under the float32 policy: keras.mixed_precision.set_global_policy('float32')")
def not_float32_compute(layer, graph):
    if not isinstance(layer, L.InputLayer) and layer.compute_dtype != "float32":
        return (f"it computes in {layer.compute_dtype} (dtype policy '{layer.dtype_policy.name}'); "
                "quantization-aware training runs in float32")


@_rule(LAYER_RULES, "use dilation_rate=1", final=True)
def dilated_conv(layer, graph):
    if type(layer) in transforms.FOLDABLE_CONVS and tuple(layer.dilation_rate) != (1, 1):
        return (f"dilation_rate={tuple(layer.dilation_rate)}; mobileqat folds and lowers undilated "
                "convolutions only")


@_rule(LAYER_RULES, "use dilation_rate=1 and output_padding=None")
def dilated_or_padded_transpose_conv(layer, graph):
    if type(layer) is L.Conv2DTranspose and (tuple(layer.dilation_rate) != (1, 1) or layer.output_padding is not None):
        return (f"Conv2DTranspose with dilation_rate={tuple(layer.dilation_rate)}, "
                f"output_padding={layer.output_padding}; mobileqat lowers the plain TRANSPOSE_CONV only")


@_rule(LAYER_RULES, "set use_bias=True (a zero bias costs nothing) or move the activation into its own layer")
def transpose_conv_activation_without_bias(layer, graph):
    if type(layer) is L.Conv2DTranspose and not layer.use_bias:
        name = transforms.function_name(layer.activation)
        if name in ("relu", "relu6"):
            return (f"Conv2DTranspose with use_bias=False and activation '{name}': the converter leaves that "
                    "TRANSPOSE_CONV and its activation in float")


@_rule(LAYER_RULES, "use interpolation='nearest' or 'bilinear' (and crop_to_aspect_ratio=False)")
def unsupported_resize(layer, graph):
    if isinstance(layer, (L.UpSampling2D, L.Resizing)):
        crop = getattr(layer, "crop_to_aspect_ratio", False)
        if layer.interpolation not in ("nearest", "bilinear") or crop:
            return (f"interpolation='{layer.interpolation}'" + (", crop_to_aspect_ratio=True" if crop else "")
                    + "; the int8 resize ops are RESIZE_NEAREST_NEIGHBOR and RESIZE_BILINEAR")


@_rule(LAYER_RULES, "use data_format='channels_last' (the default) and (N, H, W, C) inputs")
def channels_first(layer, graph):
    if getattr(layer, "data_format", None) == "channels_first":
        return "data_format='channels_first'; folding, the int8 export and the CPU kernels are channels_last (NHWC)"


@_rule(LAYER_RULES, "set activation=None and move the activation into its own Activation layer after it")
def unfusable_activation(layer, graph):
    if type(layer) in _WEIGHTED + transforms.FOLDABLE_CONVS:
        name = transforms.function_name(layer.activation)
        if name not in _FUSABLE + transforms.SPLIT_ACTIVATIONS:
            return (f"its activation '{name}' cannot be fused into the integer op (fusable: {', '.join(_FUSABLE)}; "
                    f"{', '.join(transforms.SPLIT_ACTIVATIONS)} are split into their own layer)")


@_rule(LAYER_RULES, "put Flatten or GlobalAveragePooling2D before it")
def dense_on_rank_over_2(layer, graph):
    if type(layer) is L.Dense:
        shape = tuple(graph.node(layer).input_shapes)
        if len(shape) != 2:
            return f"Dense on a rank-{len(shape)} input {shape}; the int8 FULLY_CONNECTED takes (batch, features)"


@_rule(LAYER_RULES, "use ReLU or ReLU6 (" + ", ".join(sorted(_ACTIVATIONS)) + " are supported)")
def unsupported_activation(layer, graph):
    if isinstance(layer, _ACTIVATION_LAYERS):
        name = transforms.activation_name(layer)
        if name not in _ACTIVATIONS:
            if isinstance(layer, L.ReLU):
                return (f"ReLU(max_value={layer.max_value}, negative_slope={float(layer.negative_slope)}, "
                        f"threshold={float(layer.threshold)}) has no int8 kernel in mobileqat")
            return f"activation '{name}' has no int8 kernel in mobileqat"


@_rule(LAYER_RULES, "make the softmax run over the last axis (Reshape or Permute before it, Softmax(axis=-1))")
def softmax_not_on_last_axis(layer, graph):
    if isinstance(layer, L.Softmax):
        rank = len(tuple(graph.node(layer).input_shapes))
        axes = [a % rank for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])]
        if axes != [rank - 1]:
            return (f"Softmax over axis {layer.axis} of a rank-{rank} input; the int8 SOFTMAX (and mobileqat's "
                    "integer path) normalize the last axis")


@_rule(LAYER_RULES, "put a BatchNormalization directly after it (and its activation after that)")
def depthwise_without_batchnorm(layer, graph):
    if type(layer) is L.DepthwiseConv2D and not any(isinstance(u, L.BatchNormalization) for u in graph.after(layer)):
        return "a DepthwiseConv2D is quantized only folded with the BatchNormalization after it, and none follows it"


_CONVOLUTIONS = (L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D,
                 L.SeparableConv2D)  # and their Transpose subclasses


@_rule(LAYER_RULES)
def unfoldable_batchnorm(layer, graph):
    if isinstance(layer, L.BatchNormalization):
        conv = graph.before(layer)[0]
        if isinstance(conv, _CONVOLUTIONS) and conv.name in graph.refused:
            return None  # the convolution's own problem keeps it from folding: its line says why
        return transforms.fold_blocker(conv, layer, graph.after(conv))  # (why, fix) or None


@_rule(LAYER_RULES, "register its custom objects (initializers, regularizers, constraints, activations) with "
                    "keras.utils.register_keras_serializable, or remove them")
def config_does_not_rebuild(layer, graph):  # quantize rebuilds every layer from its config
    if isinstance(layer, L.InputLayer) or layer.name in graph.refused:
        return None
    try:
        type(layer).from_config(layer.get_config())
    except Exception as e:  # noqa: BLE001 - any failure here is the refusal
        text = str(e).split("Exception encountered:")[-1].strip().splitlines()
        return f"it does not rebuild from its config ({type(e).__name__}: {(text or [''])[0][:200]})"


class _Graph:
    """What layer rules may ask about the model: each layer's calls (nodes), the layers before and after it,
    and which layers already have a problem (layers are audited in graph order)."""

    def __init__(self, model):
        self.nodes = transforms.layer_nodes(model)
        self.users = {}
        for layer in model.layers:
            for node in self.nodes[layer.name]:
                for parent in tf.nest.flatten(node.inbound_layers):
                    self.users.setdefault(parent.name, []).append(layer)
        self.refused = set()

    def node(self, layer):
        return self.nodes[layer.name][0]

    def before(self, layer):
        return tf.nest.flatten(self.node(layer).inbound_layers)

    def after(self, layer):
        return self.users.get(layer.name, [])


def _run(check, fix, *args):
    result = check(*args)
    if not result:
        return None
    return result if isinstance(result, tuple) else (result, fix)


# The rewrites quantize applies, in this order, before the layer rules and the BatchNorm folding: each is
# a plain function model -> model with the same float function (``mobileqat.transforms``).
REWRITES = (
    transforms.unshare_layers,         # a layer called n times -> n copies with the same weights
    transforms.flatten_nested,         # backbone nested in a head -> one flat graph
    transforms.inline_custom_layers,   # a weightless layer of the user's class -> the TF ops its call runs
    transforms.hard_activations,       # MobileNetV3's TFOpLambda hard-swish/-sigmoid -> HardSwish/HardSigmoid
    transforms.tf_ops_to_layers,       # x + y, x * y, tf.nn.relu on Keras tensors -> Add, Multiply, ReLU
    transforms.scalar_ops_to_affine,   # x * c, x + c on rank-4 tensors -> a fixed 1x1 depthwise scale, offset
    transforms.drop_linear_activations,  # Activation('linear') -> nothing (its users take its input)
    transforms.merge_duplicate_activations,  # identical activations of one tensor -> one (the converter merges them)
    transforms.layers_1d_to_2d,        # Conv1D, 1D pools -> Reshape, the 2D layer over (N, 1, L, C), Reshape
    transforms.pool_reshape_to_keepdims,  # global pool + Reshape to (1, 1, C) -> the pool with keepdims=True
    transforms.drop_identity_pools,    # a global pool with keepdims over 1 x 1 -> nothing (the identity)
    transforms.split_activations,      # Conv/Dense(activation=softmax|sigmoid|swish) -> layer + Activation
    transforms.split_merges,           # Add/Multiply/Maximum/Minimum of n > 2 inputs -> a chain of pairs
    transforms.grouped_to_depthwise,   # Conv2D(groups == channels) -> DepthwiseConv2D
    transforms.dense_to_conv,          # Dense on (N, H, W, C) -> 1x1 Conv2D
    transforms.fold_layer_scale,       # Conv2D/Dense -> LayerScale (x * gamma): gamma folded into the weights
    transforms.fuse_relu,              # Conv2D/Dense -> ReLU(6) layer: the activation fused, as in the file
    transforms.split_separable,        # SeparableConv2D -> DepthwiseConv2D + 1x1 Conv2D
    transforms.preprocessing_to_conv,  # Rescaling, Normalization -> fixed 1x1 depthwise scale and offset
    transforms.layer_norm_to_core,     # LayerNormalization(axis=-1) -> LayerNormCore; gamma, beta into the next
                                       # Dense/Conv2D, else a 1x1 depthwise
    transforms.standalone_batchnorm,   # BN after Add/Concat/pool, depthwise without BN -> foldable pairs
    transforms.requantize_shared_pass_through,  # a pool output two Concatenates read -> 1x1 scale for one
    transforms.constant_shape_reshapes,  # Reshape -> the same Reshape with a constant shape (-1 batch)
)


def rewrite(model, keep_float=()):
    """``model`` after every rewrite of ``REWRITES`` (the model itself when none applies). LayerNormalization
    layers named in ``keep_float`` are not rewritten (they stay float, as ``quantize(keep_float=...)`` asks)."""
    skip = () if keep_float in (True, None) else keep_float
    for step in REWRITES:
        model = step(model, skip=skip) if step is transforms.layer_norm_to_core else step(model)
    return model


def audit(model):
    """Every reason ``quantize`` refuses ``model`` (a tf_keras Model), as a list of ``Problem``; empty when it
    can quantize it. The layer rules see the model after ``REWRITES`` (layers keep their names; a layer a
    rewrite adds is named after the one it came from). The model is not changed and none of its layers is
    called (rules build throwaway copies of layers from their configs)."""
    return _audit(model)[0]


def _audit(model, keep_float=()):
    """(problems, the rewritten model or None when the model-level rules stop before the rewrites)."""
    problems = []
    for check, fix, final in MODEL_RULES:
        found = _run(check, fix, model)
        if found:
            problems.append(Problem("model", model.name, type(model).__name__, *found))
            if final:
                return problems, None
    try:
        model = rewrite(model, keep_float)
    except ValueError:  # e.g. a shared layer: the layer rules on the model as given say which
        pass
    return problems + _audit_layers(model), model


def _audit_layers(model):
    problems = []
    graph = _Graph(model)
    inputs = [t._keras_history.layer for t in model.inputs]  # Sequential.layers leaves its InputLayer out
    for layer in inputs + [la for la in model.layers if not isinstance(la, L.InputLayer)]:
        for check, fix, final in LAYER_RULES:
            found = _run(check, fix, layer, graph)
            if found:
                problems.append(Problem("layer", layer.name, transforms.rewritten_from(layer), *found))
                graph.refused.add(layer.name)
                if final:
                    break
    return problems


def _refusal(model, problems):
    lines = "\n".join(f"  - {p}" for p in problems)
    return ValueError(f"mobileqat cannot quantize model '{model.name}' ({len(problems)} problem"
                      f"{'s' if len(problems) != 1 else ''}; nothing was changed):\n{lines}\n"
                      f"Layers mobileqat quantizes: {SUPPORTED}.")


def _kept_float(rewritten, problems, keep_float):
    """Split the audit's problems into (still refused, kept float) by ``keep_float`` (True, or layer names).
    Model-level problems and layers that cannot be rebuilt are never kept."""
    if not keep_float:
        return problems, []
    names = None if keep_float is True else set([keep_float] if isinstance(keep_float, str) else keep_float)
    if names is not None:
        known = {layer.name for layer in rewritten.layers}
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(f"keep_float names no layer of model '{rewritten.name}': {unknown}; pass names from "
                             "model.layers (or keep_float=True for every layer the audit refuses).")
    never = ("rebuild from its config", "a shared layer")  # float or not, these stop the rebuild
    keep = [p for p in problems if p.where == "layer" and (names is None or p.name in names)
            and not any(n in p.why for n in never) and p.cls != "InputLayer"]
    return [p for p in problems if p not in keep], keep


def quantize(model, scheme="w8a8", keep_float=()):
    """Return a QAT copy of ``model`` (float Keras model, functional or Sequential).

    Conv/DepthwiseConv + BN (+ReLU/ReLU6) become ``FoldedConvBN``; weights are fake-quantized
    per channel, activations per tensor, as ``scheme`` says: a preset name ("w8a8", "w4a8"), a
    ``QuantScheme``, or mixed-precision rules (a list of rules, a {"default", "rules"} dict, a
    ``SchemeRules`` or the path of a JSON rules file; ``mobileqat.schemes``). Rules that cannot apply
    raise ValueError naming them; ``scheme_plan(model, scheme)`` shows which layer gets which scheme. The original model is untouched.
    Raises ValueError naming every layer that cannot be quantized, its class and the fix (``audit``).

    keep_float: layer names (or True: every layer the audit refuses) to keep in float instead of
    refusing them, with a warning. Their weights and computation are not fake-quantized; their output
    is (so the layers after them stay int8). The converter writes them as float ops between
    DEQUANTIZE/QUANTIZE (``export_tflite(..., allow_float_ops=True)``) or as int8 ops where it has them;
    ``mobileqat.lower`` names them (no integer twin for such a model yet).
    """
    scheme = _schemes.as_scheme_or_rules(scheme)
    if not isinstance(model, keras.Model):
        raise TypeError(f"quantize() takes a tf_keras Model, got {type(model).__name__}. If it is a Keras 3 "
                        "model, build it with tf_keras (import mobileqat before tensorflow).")
    problems, rewritten = _audit(model, keep_float)
    if rewritten is None:
        raise _refusal(model, problems)
    problems, kept = _kept_float(rewritten, problems, keep_float)
    if problems:
        raise _refusal(model, problems)
    if kept:
        import warnings
        lines = "\n".join(f"  - {p}" for p in kept)
        warnings.warn(f"quantize: keeping {len({p.name for p in kept})} layer(s) of '{model.name}' float, as "
                      f"keep_float asks; their weights and computation are not fake-quantized:\n{lines}",
                      stacklevel=2)
    kept_names = {p.name for p in kept}
    plan = _scheme_plan(model, rewritten, scheme)
    _activation_bits(plan)
    scheme_of = lambda name: plan[name][0] if name in plan else plan[None][0]  # noqa: E731
    folded = transforms.fold_batchnorm(rewritten, weight_quantizer={
        layer.name: scheme_of(layer.name).weight_quantizer() for layer in rewritten.layers
        if type(layer) in transforms.FOLDABLE_CONVS})
    configs = {}
    for layer in folded.layers:
        if isinstance(layer, L.InputLayer):
            continue
        if layer.name in kept_names:  # float inside, fake-quantized output
            configs[layer.name] = QuantizeConfig(output_quantizer=scheme_of(layer.name).activation_quantizer(layer))
            continue
        configs[layer.name] = quantize_config_for(layer, scheme_of(layer.name))
        if configs[layer.name] is None:  # the audit let it through: a gap in the refusal list
            raise _refusal(model, [Problem("layer", layer.name, type(layer).__name__,
                                           "the audit accepted it but mobileqat has no QuantizeConfig for it",
                                           "report this as a mobileqat bug")])

    def annotate(layer):
        if layer.name in configs:
            return _qk.quantize_annotate_layer(layer, configs[layer.name])
        return layer

    annotated = keras.models.clone_model(folded, clone_function=annotate)
    annotated.set_weights(folded.get_weights())
    with quantize_scope():
        qat = _qk.quantize_apply(annotated)
    if plan[None][0].activation_bits == 16:
        _int16_input(qat)
    for layer in qat.layers:  # learned weight steps (LSQ) start from the weights, as the paper's initialisation
        for weight, quantizer, qvars in getattr(layer, "_weight_vars", ()):
            if hasattr(quantizer, "initialize"):
                quantizer.initialize(weight, qvars)
    return qat


def _activation_bits(plan):
    """The activation bit width every scheme of ``plan`` shares (int16x8 is a whole-model mode)."""
    bits = {p[0].activation_bits for p in plan.values()}
    if len(bits) > 1:
        names = sorted(f"'{n}' ({p[0].name}: {p[0].activation_bits})" for n, p in plan.items() if n is not None)
        raise ValueError(f"scheme rules mix activation_bits {sorted(bits)} ({', '.join(names[:6])}); TFLite runs a "
                         "model with int8 or with int16 activations, not both: give every rule the same "
                         "activation_bits (e.g. 'w8a16' for all layers, or 8-bit activations everywhere).")
    return bits.pop()


def _int16_input(qat):
    """tfmot's input QuantizeLayer fake-quantizes at 8 bits, asymmetric; an int16x8 model's input is int16 with
    zero point 0: the same min/max variables under a 16-bit symmetric narrow AllValuesQuantizer."""
    for layer in qat.layers:
        if type(layer).__name__ == "QuantizeLayer" and layer.quantizer is not None:
            layer.quantizer = _qk.quantizers.AllValuesQuantizer(num_bits=16, per_axis=False, symmetric=True,
                                                                narrow_range=True)


_SCHEME_WEIGHTED = _WEIGHTED + (L.DepthwiseConv2D,)  # layers of the rewritten model a scheme's weight bits reach


def _scheme_plan(model, rewritten, scheme):
    """{layer name: (QuantScheme, rule index or None, user class, added by a rewrite)} for the user's layers with weights in
    ``rewritten`` (``schemes.user_weighted_layers``), and None: (the scheme of every other layer, ...).
    Layers a rewrite added with weights (a BatchNormalization's or Rescaling's fixed 1x1 depthwise: one
    weight per channel) keep 8-bit weights under the default scheme."""
    import dataclasses
    rules = scheme if isinstance(scheme, _schemes.SchemeRules) else _schemes.SchemeRules((), scheme, scheme.name)
    layers = _schemes.user_weighted_layers(model, rewritten, _SCHEME_WEIGHTED)
    names = {n for n, _ in layers}
    others = [(la.name, transforms.rewritten_from(la)) for la in rewritten.layers if la.name not in names]
    assigned = _schemes.assign(rules, layers, others)
    classes = dict(layers)
    plan = {n: (s, i, classes[n], False) for n, (s, i) in assigned.items()}
    helper = dataclasses.replace(rules.default, weight_bits=8)
    for la in rewritten.layers:
        if type(la) in _SCHEME_WEIGHTED and la.name not in plan:
            plan[la.name] = (helper, None, transforms.rewritten_from(la), True)
    plan[None] = (rules.default, None, None, False)
    return plan


def scheme_plan(model, scheme="w8a8"):
    """Which scheme ``quantize(model, scheme)`` gives each layer with weights, as plain data:
    {layer name: {"class": the class the user wrote, "scheme": QuantScheme fields, "rule": index of
    the rule that chose it or None (the default)}}, in graph order; a layer with weights that a rewrite
    added (a fixed 1x1 depthwise) also has "added_by_rewrite": True (8-bit weights). Raises ValueError as ``quantize`` does
    for rules that cannot apply."""
    scheme = _schemes.as_scheme_or_rules(scheme)
    problems, rewritten = _audit(model)
    if rewritten is None:
        raise _refusal(model, problems)
    plan = _scheme_plan(model, rewritten, scheme)
    order = [la.name for la in rewritten.layers if la.name in plan]
    return {n: {"class": plan[n][2], "scheme": plan[n][0].to_dict(), "rule": plan[n][1],
                **({"added_by_rewrite": True} if plan[n][3] else {})} for n in order}


def load_qat_model(path):
    """Load a QAT model saved as .h5 or SavedModel (tfmot's QuantizeLayer does not reload from .keras).

    mobileqat's and tfmot's objects are known; no custom_objects needed."""
    import os
    with quantize_scope():
        return keras.models.load_model(os.fspath(path))


def quantize_scope():
    """tfmot's quantize_scope with mobileqat's objects (they are also registered with Keras)."""
    from mobileqat import layers, quantizers
    objs = {c.__name__: c for c in (layers.FoldedConvBN, layers.QuantizeConfig, layers.HardSwish, layers.HardSigmoid,
                                    layers.HardSigmoidQuantizeConfig, layers.LayerNormCore,
                                    layers.LayerNormQuantizeConfig, layers.ConstantShapeReshape) + quantizers.ALL}
    return _qk.quantize_scope(objs)
