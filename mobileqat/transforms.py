"""Model rewrites applied before quantization: plain functions ``model -> model``.

``fold_batchnorm`` replaces every Conv2D/DepthwiseConv2D -> BatchNormalization [-> ReLU/ReLU6]
chain by one ``FoldedConvBN`` carrying the same weights and statistics, when every row of
``FOLD_CONDITIONS`` holds (``mobileqat.quantize.audit`` reports the BatchNormalizations that fail one).
"""
import json

import numpy as np

from mobileqat._tf import keras, tf
from mobileqat.layers import ConstantShapeReshape, FoldedConvBN, HardSigmoid, HardSwish, LayerNormCore

FOLDABLE_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)  # exact types: not Conv2DTranspose


def layer_nodes(model):
    """{layer name: [its nodes in this model]}: one node per call of the layer (InputLayers included)."""
    return {layer.name: [n for i, n in enumerate(layer._inbound_nodes)
                         if f"{layer.name}_ib-{i}" in model._network_nodes]
            for layer in model.layers}


def _model_nodes(model):
    """{layer name: its one node in this model}; consumers {layer name: [layer, ...]}."""
    nodes, consumers = {}, {}
    all_nodes = layer_nodes(model)
    for layer in model.layers:
        own = all_nodes[layer.name]
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if len(own) != 1:
            raise ValueError(
                f"layer '{layer.name}' ({type(layer).__name__}) is called {len(own)} times in model "
                f"'{model.name}'; mobileqat needs each layer used once. Fix: give each use its own layer.")
        nodes[layer.name] = own[0]
        for parent in tf.nest.flatten(own[0].inbound_layers):
            consumers.setdefault(parent.name, []).append(layer)
    return nodes, consumers


def function_name(fn):
    """The Keras name of an activation function ("relu", "swish", ...), or the Python name of a custom one."""
    try:
        name = keras.activations.serialize(fn)
    except Exception:  # e.g. a lambda whose source cannot be read
        name = None
    return name if isinstance(name, str) else getattr(fn, "__name__", type(fn).__name__)


def activation_name(layer):
    """The activation an Activation/ReLU/Softmax layer applies: "relu", "relu6", "relu_n", "leaky_relu",
    "softmax" or the Keras activation's name."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope or layer.threshold:
            return "leaky_relu"
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else "relu_n"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    return function_name(layer.activation)


def _relu6_like(layer):
    """"relu" or "relu6" if ``layer`` is an activation layer that a conv can absorb, else None."""
    if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
        name = activation_name(layer)
        return name if name in ("relu", "relu6") else None
    return None


# When fold_batchnorm folds ``bn`` into ``conv`` (the layer before it): no row's check gives a reason.
# Each row: (check(conv, bn, users of conv's output) -> why it is not folded, or None; the fix).
def _follows_a_conv(conv, bn, users):
    if type(conv) not in FOLDABLE_CONVS:
        return f"it follows '{conv.name}' ({type(conv).__name__}), not a Conv2D/DepthwiseConv2D it could be folded into"


def _conv_is_plain(conv, bn, users):  # what FoldedConvBN computes (groups included)
    if tuple(conv.dilation_rate) != (1, 1) or conv.data_format != "channels_last":
        return (f"'{conv.name}' is dilated or channels_first (dilation_rate={tuple(conv.dilation_rate)}, "
                f"data_format='{conv.data_format}')")


def _only_consumer(conv, bn, users):
    others = [f"'{u.name}'" for u in users if u is not bn]
    if others:
        return f"the output of '{conv.name}' also goes to {', '.join(others)}"


def _linear_conv(conv, bn, users):
    name = function_name(conv.activation)
    if name != "linear":
        return f"'{conv.name}' applies activation '{name}' before it"


def _no_virtual_batch(conv, bn, users):
    if bn.virtual_batch_size:
        return f"it has virtual_batch_size={bn.virtual_batch_size} (ghost batch normalization)"


def _channel_axis(conv, bn, users):
    if bn.axis not in ([3], [-1], 3, -1):
        axis = list(bn.axis) if isinstance(bn.axis, (list, tuple)) else bn.axis
        return f"it normalizes axis {axis}, not the channel axis (-1)"


FOLD_CONDITIONS = (
    (_follows_a_conv, "put it directly after a Conv2D/DepthwiseConv2D, or remove it (a BatchNormalization "
                      "is only quantized folded into the convolution before it)"),
    (_conv_is_plain, "make the convolution before it undilated and channels_last"),
    (_only_consumer, "make the BatchNormalization the only layer that takes the convolution's output "
                     "(other branches can take the BatchNormalization's output)"),
    (_linear_conv, "give the convolution no activation and put the activation after the BatchNormalization"),
    (_no_virtual_batch, "use virtual_batch_size=None"),
    (_channel_axis, "normalize the channel axis: BatchNormalization(axis=-1) on channels_last data"),
)


def fold_blocker(conv, bn, users):
    """(why, fix) for the first row of ``FOLD_CONDITIONS`` that keeps ``bn`` from folding into ``conv``, or None."""
    for check, fix in FOLD_CONDITIONS:
        why = check(conv, bn, users)
        if why:
            return why, fix
    return None


def _fold_plan(model, consumers, weight_quantizer):
    """{conv name: (FoldedConvBN, weights, [absorbed layer names])}."""
    plan = {}
    for layer in model.layers:
        if type(layer) not in FOLDABLE_CONVS:
            continue
        users = consumers.get(layer.name, [])
        bns = [u for u in users if isinstance(u, keras.layers.BatchNormalization)]
        if len(bns) != 1 or fold_blocker(layer, bns[0], users):
            continue
        bn = bns[0]
        absorbed, activation = [bn.name], None
        after = consumers.get(bn.name, [])
        if len(after) == 1 and _relu6_like(after[0]):
            activation = _relu6_like(after[0])
            absorbed.append(after[0].name)
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        folded = FoldedConvBN(
            filters=None if depthwise else layer.filters, kernel_size=layer.kernel_size,
            strides=layer.strides, padding=layer.padding, depthwise=depthwise,
            depth_multiplier=layer.depth_multiplier if depthwise else 1, activation=activation,
            momentum=bn.momentum, epsilon=bn.epsilon,
            weight_quantizer=(weight_quantizer.get(layer.name) if isinstance(weight_quantizer, dict)
                              else weight_quantizer),
            batch_statistics=bn.trainable, trainable=layer.trainable or bn.trainable, name=layer.name,
            groups=1 if depthwise else layer.groups)
        mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
        gamma = bn.gamma.numpy() if bn.scale else np.ones_like(mean)  # scale=False: gamma 1 (InceptionV3)
        beta = bn.beta.numpy() if bn.center else np.zeros_like(mean)
        kernel = (layer.depthwise_kernel if depthwise else layer.kernel).numpy()
        if layer.use_bias:  # BN(conv + b) == BN'(conv) with mean' = mean - b
            mean = mean - layer.bias.numpy().reshape(mean.shape)
        plan[layer.name] = (folded, lambda new, w=(kernel, gamma, beta, mean, var): new.load_conv_bn(*w), absorbed)
    return plan


def _require_graph(model):
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"model '{model.name}' is a subclassed Keras model; mobileqat needs a functional or Sequential "
            "model. Fix: rebuild it with keras.Input and layer calls.")


def rebuild(model, replace, flatten=False):
    """Rebuild a functional/Sequential model, layer by layer, with fresh layer objects.

    ``replace(layer)`` returns None (clone the layer with its weights), a function ``call(args, kwargs)
    -> output tensor(s)`` that builds the replacement from the node's call arguments (already mapped to
    the new graph), or (new_layer, weights: a list for set_weights or a function of the built layer,
    [names of later layers whose output it takes over][, tensors of ``model`` to call it on instead of
    the layer's own call arguments]). ``new_layer`` may be a tuple of layers, called one after the
    other; ``weights`` go to the first. With ``flatten`` a nested model's layers are
    called in place of the nested model (renamed ``<nested>_<layer>`` where a name is taken).
    """
    _require_graph(model)
    new_inputs = []
    for t in model.inputs:
        new_inputs.append(keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.layer.name))
    names = {t.name.split(":")[0] for t in new_inputs} | {t._keras_history.layer.name for t in model.inputs}
    outputs = _rebuild_graph(model, new_inputs, replace, flatten, names, prefix=None)
    return keras.Model(new_inputs, outputs, name=model.name)


def _unique(layer, names, prefix):
    if layer.name in names:
        base = f"{prefix}_{layer.name}" if prefix else layer.name
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        layer._name = name
    names.add(layer.name)
    return layer


def _rebuild_graph(model, inputs, replace, flatten, names, prefix):
    """Call new layers for ``model``'s graph on the new tensors ``inputs``; returns the new outputs."""
    nodes, _ = _model_nodes(model)
    tensors, taken_over = {}, set()
    for old, new in zip(model.inputs, inputs):
        tensors[id(old)] = new
    for layer in model.layers:
        if layer.name not in nodes or layer.name in taken_over:
            continue
        node = nodes[layer.name]
        args = tf.nest.map_structure(lambda x: tensors.get(id(x), x), (node.call_args, node.call_kwargs))
        if flatten and isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False):
            out = _rebuild_graph(layer, tf.nest.flatten(args[0]), replace, flatten, names, prefix=layer.name)
            out = out[0] if isinstance(out, list) and len(out) == 1 else out
            last = layer
        else:
            choice = replace(layer)
            if callable(choice) and not isinstance(choice, (tuple, keras.layers.Layer)):
                out, last = choice(*args), layer
            else:
                if choice is None:
                    new_layer = type(layer).from_config(layer.get_config())
                    weights, absorbed = layer.get_weights(), []
                else:
                    new_layer, weights, absorbed, *on = choice
                    if on:  # call it on these tensors of ``model`` instead of the layer's own arguments
                        args = (tuple(tensors[id(t)] for t in on[0]), {})
                chain = new_layer if isinstance(new_layer, tuple) else (new_layer,)
                for piece in chain:
                    _unique(piece, names, prefix)
                out = chain[0](*args[0], **args[1])
                for then in chain[1:]:
                    out = then(out)
                if callable(weights):
                    weights(chain[0])
                elif weights is not None:
                    chain[0].set_weights(weights)
                last = layer
                for name in absorbed:
                    taken_over.add(name)
                    last = model.get_layer(name)
        made = getattr(tf.nest.flatten(out)[0], "_keras_history", None)
        if made is not None and made.layer.name == layer.name and rewritten_from(layer) != type(made.layer).__name__:
            made.layer._rewritten_from = rewritten_from(layer)  # errors name the class the user wrote
        old_out = nodes[last.name].outputs
        for o, n in zip(tf.nest.flatten(old_out), tf.nest.flatten(out)):
            tensors[id(o)] = n
    return tf.nest.map_structure(lambda t: tensors[id(t)], model.outputs)


def rewritten_from(layer):
    """The class name of the layer the user wrote, for a layer a rewrite put in its place (same name)."""
    return getattr(layer, "_rewritten_from", type(layer).__name__)


def fold_batchnorm(model, weight_quantizer=None):
    """Conv/DepthwiseConv -> BN [-> ReLU/ReLU6] chains become ``FoldedConvBN`` layers (same function).
    weight_quantizer: one quantizer for every fold, or {conv layer name: quantizer} (mixed precision).

    Chains that fail a row of ``FOLD_CONDITIONS`` are left as they are."""
    _require_graph(model)
    _, consumers = _model_nodes(model)
    plan = _fold_plan(model, consumers, weight_quantizer)
    return rebuild(model, lambda layer: plan.get(layer.name))


# Activations with an int8 kernel of their own but none fused into CONV_2D / FULLY_CONNECTED.
SPLIT_ACTIVATIONS = ("softmax", "sigmoid", "tanh", "swish", "silu", "gelu")
_SPLIT_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense,
                 keras.layers.Conv2DTranspose)  # exact types


def split_activations(model):
    """Conv2D / DepthwiseConv2D / Dense layers whose activation is softmax or sigmoid become the layer
    without activation followed by an ``Activation`` layer named ``<layer>_<activation>`` (same
    function, same weights): the converter writes those activations as their own int8 op, with the
    output range TFLite fixes. E.g. the ``Dense(classes, activation="softmax")`` classifier of
    tf_keras.applications' MobileNetV2, ResNet50 and VGG16."""
    _require_graph(model)

    def split_off(layer):
        name = function_name(getattr(layer, "activation", None)) if type(layer) in _SPLIT_LAYERS else None
        return name if name in SPLIT_ACTIVATIONS else None

    if not any(split_off(layer) for layer in model.layers):
        return model  # nothing to split: no rebuild (fold_batchnorm rebuilds next anyway)

    def replace(layer):
        name = split_off(layer)
        if name is None:
            return None
        config = dict(layer.get_config(), activation="linear")
        linear = type(layer).from_config(config)
        return (linear, keras.layers.Activation(name, name=f"{layer.name}_{name}")), layer.get_weights(), []
    return rebuild(model, replace)


# --- Rewrites that bring common Keras models to the layers mobileqat quantizes ------------------------
# Each is a plain function model -> model with the same function (float), which changes only what it
# recognises and returns the model itself when there is nothing to change. ``quantize.REWRITES`` lists
# the order in which quantize applies them.

L = keras.layers


def _rewrite(model, replace, flatten=False):
    """rebuild(model, replace) when ``replace`` changes some layer (or ``flatten`` finds a nested model),
    else ``model`` unchanged."""
    _require_graph(model)
    if not (any(replace(layer) is not None for layer in model.layers)
            or (flatten and any(isinstance(layer, keras.Model) for layer in model.layers))):
        return model
    return rebuild(model, replace, flatten=flatten)


def unshare_layers(model):
    """A layer called more than once (a shared layer) becomes one copy per call, each starting from the
    shared weights: ``<layer>`` for the first call, ``<layer>_call2``, ... for the others. The float function
    is the same; fine-tuning then trains each copy on its own (the int8 file holds one set of weights per
    op in any case)."""
    _require_graph(model)
    nodes = layer_nodes(model)
    if not any(len(nodes[layer.name]) > 1 for layer in model.layers if not isinstance(layer, L.InputLayer)):
        return model
    names = {layer.name for layer in model.layers}

    def clone(layer, call):
        new = type(layer).from_config(layer.get_config())
        if call > 1:
            k = call
            while f"{layer.name}_call{k}" in names:
                k += 1
            new._name = f"{layer.name}_call{k}"
            names.add(new.name)
        return new
    return _replay_calls(model, clone)


def _replay_calls(model, clone, reroute=None):
    """Rebuild ``model`` call by call (nodes by depth, so a layer called twice is met twice): ``clone(layer,
    call)`` (call 1, 2, ...) gives the new layer, which gets the old one's weights; ``reroute(old tensor, new
    tensor, reader name)`` may give another tensor for a call argument (default: the new tensor)."""
    new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.layer.name)
                  for t in model.inputs]
    tensors = {id(old): new for old, new in zip(model.inputs, new_inputs)}
    calls = {}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.layer
            if isinstance(layer, L.InputLayer):
                continue
            calls[layer.name] = calls.get(layer.name, 0) + 1
            new = clone(layer, calls[layer.name])

            def mapped(t, reader=layer.name):
                got = tensors.get(id(t), t)
                return reroute(t, got, reader) if reroute else got
            args = tf.nest.map_structure(mapped, (node.call_args, node.call_kwargs))
            out = new(*args[0], **args[1])
            new.set_weights(layer.get_weights())
            if rewritten_from(layer) != type(new).__name__:
                new._rewritten_from = rewritten_from(layer)
            for o, n in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
                tensors[id(o)] = n
    outputs = tf.nest.map_structure(lambda t: tensors[id(t)], model.outputs)
    return keras.Model(new_inputs, outputs, name=model.name)


# Layers whose int8 op keeps its input's scale (or writes no op): the converter gives their output the scale
# of the op that reads it where that op forces one (a join), and carries it back up the chain.
PASS_THROUGH = (L.MaxPooling2D, L.AveragePooling2D, L.Reshape, L.Flatten, L.Dropout, L.ZeroPadding2D,
                L.Cropping2D, L.GlobalMaxPooling2D, L.SpatialDropout2D, L.GaussianNoise, L.Permute,
                L.UpSampling2D, L.Resizing)
SAME_SCALE_JOINS = (L.Concatenate, L.Maximum, L.Minimum)  # int8 ops whose inputs take the output's scale


def shared_pass_through(model):
    """Names of the pass-through layers (``PASS_THROUGH``) whose output, directly or through other
    pass-through layers, two or more same-scale joins (Concatenate, Maximum, Minimum) read."""
    nodes, _ = _model_nodes(model)
    producer = {name: [p.name for p in tf.nest.flatten(node.inbound_layers)] for name, node in nodes.items()}
    layers = {layer.name: layer for layer in model.layers}
    reach = {}
    for join in model.layers:
        if not isinstance(join, SAME_SCALE_JOINS):
            continue
        for v in set(producer[join.name]):
            while v in nodes and isinstance(layers[v], PASS_THROUGH) and len(producer[v]) == 1:
                reach.setdefault(v, set()).add(join.name)
                v = producer[v][0]
    return {v for v, joins in reach.items() if len(joins) > 1}


def requantize_shared_pass_through(model):
    """A pass-through layer whose output two same-scale joins reach (``shared_pass_through``, e.g. a
    MaxPooling2D read by two Concatenates) keeps its first reader; the others read it through a fixed
    identity 1x1 depthwise scale (``<layer>_requantize``, ones, no bias), which ``fold_batchnorm`` makes one
    int8 DEPTHWISE_CONV_2D with an output range of its own. Same float function.

    The converter gives a join's inputs the join's scale back up such a chain; given two, TF 2.21's converter
    fails ("'tfl.max_pool_2d' op quantization parameters violate the same scale constraint", measured).
    Neither an output range of the pass-through layer's own nor one copy of it per reader avoids that
    (the converter merges identical copies; measured). Outputs of rank other than 4 are left as they are."""
    _require_graph(model)
    while True:
        shared = shared_pass_through(model)
        _, consumers = _model_nodes(model)
        users = {v: [c.name for c in consumers.get(v, [])] for v in shared}
        last = {v for v in shared if len(model.get_layer(v).output_shape) == 4
                and not any(u in shared for u in users[v])}
        if not last:
            return model
        model = _reroute_readers(model, {v: set(users[v][1:]) for v in last})


def _reroute_readers(model, rerouted):
    """Rebuild ``model``; the readers ``rerouted[v]`` of layer v read ``<v>_requantize`` (an identity 1x1
    depthwise scale after v, one per v) instead of v."""
    outputs_of = {id(o): v for v in rerouted for node in model.get_layer(v)._inbound_nodes
                  for o in tf.nest.flatten(node.outputs)}  # id(old output tensor of v) -> v
    scaled = {}

    def reroute(old, new, reader):
        v = outputs_of.get(id(old))
        if v is None or reader not in rerouted[v]:
            return new
        if v not in scaled:
            channels = int(model.get_layer(v).output_shape[-1])
            scaled[v] = _affine(f"{v}_requantize", np.ones(channels), np.zeros(channels), False)((new,), {})
        return scaled[v]
    return _replay_calls(model, lambda layer, call: type(layer).from_config(layer.get_config()), reroute)


def flatten_nested(model):
    """A model nested in another (a backbone in a Sequential or functional head, a Sequential block)
    becomes its own layers, called in its place, recursively; names that clash get the nested model's
    name as prefix."""
    return _rewrite(model, lambda layer: None, flatten=True)


# TensorFlow ops called on Keras tensors (TFOpLambda) -> the Keras layer that computes the same.
_TF_BINARY = {"__operators__.add": L.Add, "math.add": L.Add, "math.subtract": L.Subtract,
              "math.multiply": L.Multiply, "math.maximum": L.Maximum, "math.minimum": L.Minimum}
_TF_UNARY = {"nn.relu": lambda: L.ReLU(), "nn.relu6": lambda: L.ReLU(6.0),
             "math.sigmoid": lambda: L.Activation("sigmoid"), "nn.sigmoid": lambda: L.Activation("sigmoid"),
             "nn.silu": lambda: L.Activation("swish"), "nn.swish": lambda: L.Activation("swish")}


def _is_keras_tensor(x):
    return hasattr(x, "_keras_history")


def tf_ops_to_layers(model):
    """TF-op lambdas on Keras tensors become Keras layers: ``x + y``, ``x - y``, ``x * y``,
    tf.maximum/minimum of two tensors -> Add/Subtract/Multiply/Maximum/Minimum; tf.nn.relu/relu6/sigmoid/
    silu of one tensor -> ReLU/ReLU6/Activation. Ops with a constant operand (``x + 3.0``) are left to
    the rewrites that know their pattern (``hard_activations``)."""
    nodes = layer_nodes(model)

    def replace(layer):
        if type(layer).__name__ != "TFOpLambda" or len(nodes.get(layer.name, ())) != 1:
            return None
        args, kwargs = nodes[layer.name][0].call_args, nodes[layer.name][0].call_kwargs
        extra = {k: v for k, v in kwargs.items() if k != "name" and v is not None}
        if layer.symbol in _TF_BINARY and len(args) == 2 and all(map(_is_keras_tensor, args)) and not extra:
            if tuple(args[0].shape) == tuple(args[1].shape) or layer.symbol == "math.multiply":
                return lambda a, k, cls=_TF_BINARY[layer.symbol], name=layer.name: cls(name=name)([a[0], a[1]])
        if layer.symbol in _TF_UNARY and len(args) == 1 and _is_keras_tensor(args[0]) and not extra:
            return lambda a, k, make=_TF_UNARY[layer.symbol], name=layer.name: _named(make(), name)(a[0])
        return None
    return _rewrite(model, replace)


# TF ops of a Keras tensor and a scalar constant -> (scale, offset) of the per-channel affine they compute
_TF_SCALAR = {"math.multiply": lambda c: (c, 0.0), "__operators__.add": lambda c: (1.0, c),
              "math.add": lambda c: (1.0, c), "math.subtract": lambda c: (1.0, -c),
              "math.truediv": lambda c: (1.0 / c, 0.0), "math.divide": lambda c: (1.0 / c, 0.0)}


def scalar_ops_to_affine(model):
    """``x * c``, ``x + c``, ``x - c``, ``x / c`` (c a Python or 0-d scalar, x of rank 4 with known channels) become
    the fixed per-channel affine they compute (``_affine``: a 1x1 depthwise scale and offset that folds into one
    int8 DEPTHWISE_CONV_2D). Runs after ``hard_activations``, which knows the constants of its own patterns."""
    nodes = layer_nodes(model)

    def replace(layer):
        if type(layer).__name__ != "TFOpLambda" or layer.symbol not in _TF_SCALAR \
                or len(nodes.get(layer.name, ())) != 1:
            return None
        node = nodes[layer.name][0]
        args = list(node.call_args) + [v for k, v in node.call_kwargs.items() if k in ("y",)]
        extra = {k: v for k, v in node.call_kwargs.items() if k not in ("name", "y") and v is not None}
        if len(args) != 2 or extra or not _is_keras_tensor(args[0]) or _is_keras_tensor(args[1]):
            return None
        c = np.asarray(args[1])
        shape = args[0].shape
        if c.ndim != 0 or not np.issubdtype(c.dtype, np.number) or len(shape) != 4 or shape[-1] is None \
                or (layer.symbol in ("math.truediv", "math.divide") and float(c) == 0.0):
            return None
        scale, offset = _TF_SCALAR[layer.symbol](float(c))
        channels = int(shape[-1])
        return _affine(layer.name, np.full(channels, scale), np.full(channels, offset), False)
    return _rewrite(model, replace)


_KERAS_MODULES = ("tf_keras.", "keras.", "tensorflow.", "tensorflow_model_optimization.", "mobileqat.layers")


def inline_custom_layers(model):
    """A Lambda layer, or a layer of the user's own class (not tf_keras / tfmot / mobileqat), with no weights,
    called once, is replaced by what its ``call`` does on the Keras tensors: the TensorFlow ops it runs become
    TF-op lambdas, named after it (``<name>``, ``<name>_1``, ...; errors name its class), which the next
    rewrites turn into Keras layers (``tf_ops_to_layers``, ``scalar_ops_to_affine``). A layer whose call cannot
    run on Keras tensors is left as it is (the audit then names it)."""
    nodes = layer_nodes(model)

    def custom(layer):
        return ((type(layer) is L.Lambda or not type(layer).__module__.startswith(_KERAS_MODULES))
                and not layer.weights and not isinstance(layer, keras.Model) and len(nodes.get(layer.name, ())) == 1)

    def replace(layer):
        if not custom(layer):
            return None
        node = nodes[layer.name][0]
        if len(tf.nest.flatten(node.call_args)) != 1 or node.call_kwargs:
            return None

        def call(args, kwargs):
            out = layer.call(args[0])
            if not _is_keras_tensor(out) or out is args[0]:
                raise _NotInlined
            made = _layers_between(args[0], out)  # named after the user's layer, which errors then name
            taken = {other.name for other in model.layers} - {layer.name}
            for k, piece in enumerate(made):
                piece._name = layer.name if k == 0 else f"{layer.name}_{k}"
                _unique(piece, taken, None)
                piece._rewritten_from = rewritten_from(layer)
            return out
        return call
    try:
        return _rewrite(model, replace)
    except (_NotInlined, ValueError, TypeError, AttributeError, NotImplementedError):
        return model  # user code that cannot run on Keras tensors: the model as it was, the audit names the layer


class _NotInlined(Exception):
    pass


def _layers_between(start, end):
    """The layers that compute Keras tensor ``end`` from ``start``, from the last one back."""
    found, stack, seen = [], [end], set()
    while stack:
        t = stack.pop()
        if t is start or not _is_keras_tensor(t):
            continue
        layer, node_index, _ = t._keras_history
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(tf.nest.flatten(layer._inbound_nodes[node_index].keras_inputs))
    return found


def _named(layer, name):
    layer._name = name
    return layer


def grouped_to_depthwise(model):
    """Conv2D(groups == input channels) is a depthwise convolution: it becomes DepthwiseConv2D with
    depth_multiplier = filters / groups and the same weights (ConvNeXt's 7x7 convolutions)."""
    def replace(layer):
        if type(layer) is not L.Conv2D or layer.groups == 1 or layer.groups != int(layer.input_shape[-1]):
            return None
        multiplier = layer.filters // layer.groups
        new = L.DepthwiseConv2D(layer.kernel_size, strides=layer.strides, padding=layer.padding,
                                depth_multiplier=multiplier, use_bias=layer.use_bias,
                                activation=layer.activation, dilation_rate=layer.dilation_rate, name=layer.name)
        kernel = layer.kernel.numpy()  # (kh, kw, 1, C*m): output channel c*m + j comes from input c
        kh, kw = kernel.shape[:2]
        weights = [kernel.reshape(kh, kw, layer.groups, multiplier)] + ([layer.bias.numpy()] if layer.use_bias else [])
        return new, weights, []
    return _rewrite(model, replace)


def dense_to_conv(model):
    """Dense on a (N, H, W, C) input applies to the last axis: it becomes the 1x1 Conv2D it is (ConvNeXt's
    pointwise layers), which the int8 CONV_2D computes."""
    def replace(layer):
        if type(layer) is not L.Dense or len(layer.input_shape) != 4:
            return None
        new = L.Conv2D(layer.units, 1, use_bias=layer.use_bias, activation=layer.activation, name=layer.name)
        weights = [layer.kernel.numpy()[None, None]] + ([layer.bias.numpy()] if layer.use_bias else [])
        return new, weights, []
    return _rewrite(model, replace)


def _per_channel_scale(layer):
    """gamma (C,) when ``layer`` is a LayerScale-like layer: a class named "LayerScale" with one weight of
    shape (C,), C the last input axis, that computes x * gamma (checked on a batch of ones); else None."""
    if type(layer).__name__ != "LayerScale" or len(layer.weights) != 1:
        return None
    gamma = layer.weights[0].numpy()
    shape = tuple(layer.input_shape)
    if gamma.shape != (shape[-1],) or None in shape[1:]:
        return None
    ones = np.ones((1,) + shape[1:], np.float32)
    if not np.allclose(layer(ones).numpy(), np.broadcast_to(gamma, ones.shape), rtol=1e-6, atol=0.0):
        return None
    return gamma


def fold_layer_scale(model):
    """A LayerScale (ConvNeXt's per-channel ``x * gamma``, gamma (C,)) whose input is a Conv2D, Dense or
    DepthwiseConv2D with no activation, used by nothing else, folds into that layer: kernel[..., c] and
    bias[c] times gamma[c] (a bias of zeros is added when it had none). Same float function; the folded
    layer then trains the product (one int8 op, one weight grid, as the file holds it)."""
    _require_graph(model)
    nodes, consumers = _model_nodes(model)
    plan = {}
    for layer in model.layers:
        gamma = None if isinstance(layer, L.InputLayer) else _per_channel_scale(layer)
        if gamma is None:
            continue
        parents = tf.nest.flatten(nodes[layer.name].inbound_layers)
        conv = parents[0] if len(parents) == 1 else None
        if (type(conv) not in (L.Conv2D, L.Dense, L.DepthwiseConv2D) or len(consumers.get(conv.name, [])) != 1
                or function_name(conv.activation) != "linear" or getattr(conv, "groups", 1) != 1):
            continue
        kernel = conv.weights[0].numpy()
        if type(conv) is L.DepthwiseConv2D:  # (kh, kw, C_in, m): output channel c * m + j
            scaled = kernel * gamma.reshape(kernel.shape[2], kernel.shape[3])
        else:
            scaled = kernel * gamma
        bias = conv.bias.numpy() if conv.use_bias else np.zeros(gamma.shape, np.float32)
        new = type(conv).from_config(dict(conv.get_config(), use_bias=True))
        plan[conv.name] = (new, [scaled.astype(np.float32), (bias * gamma).astype(np.float32)], [layer.name])
    if not plan:
        return model
    return rebuild(model, lambda layer: plan.get(layer.name))


def fuse_relu(model):
    """A ReLU/ReLU6 layer that is the only user of a plain Conv2D, Conv2DTranspose or Dense (no activation) becomes
    that layer's activation, as the converter fuses it (tf_keras MobileNetV3's squeeze-excite 1x1 convs).
    tfmot's layout transform would otherwise give the pair a no-op config and drop the weight's fake quant."""
    _, consumers = _model_nodes(model)

    def replace(layer):
        if type(layer) not in (L.Conv2D, L.Dense, L.Conv2DTranspose) or function_name(layer.activation) != "linear":
            return None
        users = consumers.get(layer.name, [])
        name = _relu6_like(users[0]) if len(users) == 1 else None
        if name is None:
            return None
        return type(layer).from_config(dict(layer.get_config(), activation=name)), layer.get_weights(), [users[0].name]
    return _rewrite(model, replace)


def _activation_signature(layer):
    """The config of an Activation/ReLU/LeakyReLU layer without its name (equal: the same function), else None."""
    if type(layer) not in (L.Activation, L.ReLU, L.LeakyReLU):
        return None
    config = {k: v for k, v in layer.get_config().items() if k != "name"}
    return type(layer).__name__, json.dumps(config, sort_keys=True, default=str)


def merge_duplicate_activations(model):
    """Two or more identical activation layers (Activation, ReLU, LeakyReLU: same class and config) reading one
    tensor become one: the first in graph order, whose output the others' users take (NASNet's stem: one
    BatchNormalization read by five Activation('relu')). Same float function.

    The converter merges such identical ops itself (and then fuses the one ReLU into a conv whose only reader it
    is), so the QAT model must have one too: with five, the conv kept a fake-quant of its own before them, which the
    file does not carry (the twin was 6 LSB off NASNetMobile's file; measured)."""
    _, consumers = _model_nodes(model)
    merged = {}  # duplicate layer name -> the name of the first identical reader of the same tensor
    for users in consumers.values():
        first = {}
        for user in users:
            sig = _activation_signature(user)
            if sig is None or len(tf.nest.flatten(user._inbound_nodes[0].inbound_layers)) != 1:
                continue
            if sig in first:
                merged[user.name] = first[sig]
            else:
                first[sig] = user.name
    if not merged:
        return model
    for name in set(merged.values()):
        merged[name] = name
    outputs = {}  # name of the layer kept -> its output in the new graph

    def replace(layer):
        first = merged.get(layer.name)
        if first is None:
            return None

        def call(args, kwargs):  # whichever of the group the rebuild reaches first builds the one kept
            if first not in outputs:
                outputs[first] = type(layer).from_config(model.get_layer(first).get_config())(*args, **kwargs)
            return outputs[first]
        return call
    return rebuild(model, replace)


def layers_1d_to_2d(model):
    """1D layers (channels last) over (N, L, C) become their 2D layer over (N, 1, L, C), between a Reshape to
    (N, 1, L, C) (``<name>_to2d``) and one back (``<name>_to1d``): what TensorFlow computes for them, as layers
    mobileqat quantizes. Conv1D -> Conv2D with a 1 x k kernel (``<name>``: the same weights, strides,
    dilation, groups, bias and activation; "causal" as ``ZeroPadding2D`` of (k - 1) * dilation on the left,
    ``<name>_causal``, then "valid"); MaxPooling1D / AveragePooling1D -> their 2D pool of 1 x p;
    GlobalAveragePooling1D / GlobalMaxPooling1D -> the 2D global pool (no Reshape back unless keepdims)."""
    pools = {L.MaxPooling1D: L.MaxPooling2D, L.AveragePooling1D: L.AveragePooling2D}
    global_pools = {L.GlobalAveragePooling1D: L.GlobalAveragePooling2D, L.GlobalMaxPooling1D: L.GlobalMaxPooling2D}

    def replace(layer):
        kind = type(layer)
        if kind not in (L.Conv1D, *pools, *global_pools) or getattr(layer, "data_format", None) != "channels_last" \
                or len(layer.input_shape) != 3:
            return None
        channels, steps, name = int(layer.input_shape[-1]), layer.output_shape[1], layer.name
        if kind in global_pools:
            flat = global_pools[kind](name=name)
            back = (lambda x: L.Reshape((1, channels), name=f"{name}_to1d")(x)) if layer.keepdims else (lambda x: x)
            return lambda args, kwargs: back(flat(L.Reshape((1, -1, channels), name=f"{name}_to2d")(args[0])))
        weights, pad = [], None
        if kind is L.Conv1D:
            (k,), (s,), (d,) = layer.kernel_size, layer.strides, layer.dilation_rate
            pad = (k - 1) * d if layer.padding == "causal" else None
            new = L.Conv2D(layer.filters, (1, k), strides=(1, s), padding="valid" if pad else layer.padding,
                           dilation_rate=(1, d), groups=layer.groups, activation=layer.activation,
                           use_bias=layer.use_bias, name=name)
            weights = [layer.kernel.numpy()[None]] + ([layer.bias.numpy()] if layer.use_bias else [])
        else:
            new = pools[kind]((1, layer.pool_size[0]), strides=(1, layer.strides[0]), padding=layer.padding,
                              name=name)
        new._rewritten_from = rewritten_from(layer)  # errors and scheme rules name the class the user wrote
        out_channels = int(layer.output_shape[-1])

        def call(args, kwargs):
            x = L.Reshape((1, -1, channels), name=f"{name}_to2d")(args[0])
            if pad:
                x = L.ZeroPadding2D(((0, 0), (pad, 0)), name=f"{name}_causal")(x)
            out = L.Reshape((-1 if steps is None else steps, out_channels), name=f"{name}_to1d")(new(x))
            if weights:
                new.set_weights(weights)
            return out
        return call
    return _rewrite(model, replace)


def split_separable(model):
    """SeparableConv2D becomes DepthwiseConv2D (``<name>_dw``, no bias) followed by the 1x1 Conv2D
    (``<name>``, with the bias and activation) it computes, with the same weights (Xception, NASNet)."""
    def replace(layer):
        if type(layer) is not L.SeparableConv2D:
            return None
        dw = L.DepthwiseConv2D(layer.kernel_size, strides=layer.strides, padding=layer.padding,
                               depth_multiplier=layer.depth_multiplier, dilation_rate=layer.dilation_rate,
                               use_bias=False, name=f"{layer.name}_dw")
        pw = L.Conv2D(layer.filters, 1, use_bias=layer.use_bias, activation=layer.activation, name=layer.name)
        weights = [layer.depthwise_kernel.numpy(), layer.pointwise_kernel.numpy()] + (
            [layer.bias.numpy()] if layer.use_bias else [])

        def call(args, kwargs):
            out = pw(dw(args[0]))
            dw.set_weights(weights[:1])
            pw.set_weights(weights[1:])
            return out
        return call
    return _rewrite(model, replace)


def _affine(name, scale, offset, trainable):
    """A per-channel y = x * scale + offset as a call(args, kwargs): a 1x1 DepthwiseConv2D (kernel = scale,
    ``<name>``) and a BatchNormalization in inference mode (beta = offset, mean 0, variance 1, epsilon
    0, ``<name>_bn``) that ``fold_batchnorm`` makes one DEPTHWISE_CONV_2D with bias and no batch statistics."""
    channels = len(scale)
    dw = L.DepthwiseConv2D(1, use_bias=False, trainable=trainable, name=name)
    bn = L.BatchNormalization(epsilon=0.0, trainable=False, name=f"{name}_bn")

    def call(args, kwargs):
        out = bn(dw(args[0]))
        dw.set_weights([np.asarray(scale, np.float32).reshape(1, 1, channels, 1)])
        bn.set_weights([np.ones(channels, np.float32), np.asarray(offset, np.float32),
                        np.zeros(channels, np.float32), np.ones(channels, np.float32)])
        return out
    return call


def layer_norm_axis_ok(layer):
    """True for a LayerNormalization ``layer_norm_to_core`` rewrites: over the last axis only, of a rank 2-4
    input with a known channel count."""
    shape = layer.input_shape
    if not isinstance(layer, L.LayerNormalization) or not isinstance(shape, tuple) or not 2 <= len(shape) <= 4:
        return False
    axes = [a % len(shape) for a in (layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis])]
    return axes == [len(shape) - 1] and shape[-1] is not None and None not in shape[1:]


def _ln_fold_target(layer):
    """True when a LayerNormalization's gamma and beta fold exactly into ``layer`` (its only user): a Dense, or a
    Conv2D (no groups, channels last) with a 1x1 kernel or 'valid' padding (no zero padding sees beta)."""
    if type(layer) is L.Dense:
        return True
    return (type(layer) is L.Conv2D and getattr(layer, "groups", 1) == 1 and layer.data_format == "channels_last"
            and (tuple(layer.kernel_size) == (1, 1) or layer.padding == "valid"))


def _fold_affine_into(layer, gamma, beta):
    """(new layer with a bias, its weights) computing layer(x * gamma + beta) from x: the kernel's input
    channels times gamma, the bias plus beta through the kernel."""
    kernel = layer.kernel.numpy().astype(np.float64)
    bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(kernel.shape[-1])
    scaled = kernel * gamma.reshape((-1, 1))  # (..., C_in, C_out)
    bias = bias + np.tensordot(beta.astype(np.float64), kernel, axes=([0], [kernel.ndim - 2])).reshape(-1, kernel.shape[-1]).sum(0)
    new = type(layer).from_config(dict(layer.get_config(), use_bias=True))
    return new, [scaled.astype(np.float32), bias.astype(np.float32)]


def layer_norm_to_core(model, skip=()):
    """LayerNormalization over the last axis (ConvNeXt's stem, blocks, downsampling and head) becomes a
    ``LayerNormCore`` (``<name>``: (x - mean) * rsqrt(var + eps), six int8 ops); its gamma and beta fold into
    the layer after it where that is its only user and a Dense, or a Conv2D with a 1x1 kernel or 'valid'
    padding (kernel rows times gamma, bias plus beta through the kernel: ConvNeXt's blocks, downsampling
    and head), else they become a 1x1 DepthwiseConv2D with a fixed BatchNormalization (``<name>_affine``,
    ``<name>_affine_bn``) that ``fold_batchnorm`` makes one int8 DEPTHWISE_CONV_2D (gamma trains, beta stays
    fixed), a (N, C) or (N, T, C) input reshaped to (N, 1, T, C) around it. Layers named in ``skip``
    (``quantize``'s keep_float) stay as they are."""
    _require_graph(model)
    skip = {skip} if isinstance(skip, str) else set(skip)
    _, consumers = _model_nodes(model)
    plan = {}
    for layer in model.layers:
        if layer.name in skip or not layer_norm_axis_ok(layer):
            continue
        shape = tuple(layer.input_shape[1:])
        channels = int(shape[-1])
        gamma = layer.gamma.numpy() if layer.scale else np.ones(channels, np.float32)
        beta = layer.beta.numpy() if layer.center else np.zeros(channels, np.float32)
        users = consumers.get(layer.name, [])
        core = LayerNormCore(epsilon=layer.epsilon, name=layer.name)
        if not (layer.scale or layer.center):
            plan[layer.name] = (core, None, [])
        elif len(users) == 1 and _ln_fold_target(users[0]):
            plan[layer.name] = (core, None, [])
            plan[users[0].name] = _fold_affine_into(users[0], gamma, beta) + ([],)
        else:
            plan[layer.name] = _core_and_affine(layer.name, core, shape, gamma, beta, layer.trainable)
    if not plan:
        return model
    return rebuild(model, lambda layer: plan.get(layer.name))


def _core_and_affine(name, core, shape, gamma, beta, trainable):
    affine = _affine(f"{name}_affine", gamma, beta, trainable=trainable)
    channels = int(shape[-1])

    def call(args, kwargs):
        x = args[0]
        if len(shape) != 3:
            x = L.Reshape((1, int(np.prod(shape[:-1], dtype=np.int64)), channels), name=f"{name}_to_4d")(x)
        y = affine((core(x),), {})
        if len(shape) != 3:
            y = L.Reshape(shape, name=f"{name}_from_4d")(y)
        return y
    return call


def drop_linear_activations(model):
    """Activation('linear') layers (ConvNeXt's ``_identity`` where drop_path_rate is 0) compute nothing: their
    users take their input instead (no fake-quant of their own, no op in the file)."""
    def replace(layer):
        if type(layer) is L.Activation and function_name(layer.activation) == "linear":
            return lambda args, kwargs: args[0]
        return None
    return _rewrite(model, replace)


def pool_reshape_to_keepdims(model):
    """A GlobalAveragePooling2D / GlobalMaxPooling2D whose only user is a Reshape to (1, 1, C) (the
    squeeze-excite blocks of tf_keras EfficientNet) becomes the pool with ``keepdims=True`` and the Reshape
    goes: same function, and the file has no RESHAPE, whose batch-dependent shape (SHAPE, STRIDED_SLICE,
    PACK) XNNPACK does not take, so each block's ops stayed on the builtin kernels."""
    _, consumers = _model_nodes(model)
    pools = {}  # pool name -> the Reshape after it
    for layer in model.layers:
        users = consumers.get(layer.name, [])
        if type(layer) in (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D) and not layer.keepdims \
                and layer.data_format == "channels_last" and len(users) == 1 and type(users[0]) is L.Reshape \
                and tuple(users[0].target_shape) == (1, 1, int(layer.output_shape[-1])):
            pools[layer.name] = users[0].name
    reshapes = set(pools.values())

    def replace(layer):
        if layer.name in pools:
            return type(layer)(keepdims=True, name=layer.name), [], []
        if layer.name in reshapes:
            return lambda args, kwargs: args[0]
        return None
    return _rewrite(model, replace)


def constant_shape_reshapes(model):
    """Each Keras Reshape whose output shape is known but for the batch becomes a ConstantShapeReshape to the
    same shape (a -1 in its target resolved): same function, and the file's RESHAPE takes a constant shape,
    so XNNPACK runs it instead of leaving SHAPE, STRIDED_SLICE, PACK and the RESHAPE on the builtin kernels
    (tf_keras MobileNet's classifier, the Reshapes of ``layers_1d_to_2d``)."""
    def replace(layer):
        if type(layer) is not L.Reshape or not isinstance(layer.output_shape, tuple):
            return None
        shape = layer.output_shape[1:]
        if any(d is None for d in shape):
            return None
        return ConstantShapeReshape(shape, name=layer.name), [], []
    return _rewrite(model, replace)


def drop_identity_pools(model):
    """A GlobalAveragePooling2D / GlobalMaxPooling2D with keepdims over a 1 x 1 feature map (MobileNetV3's
    squeeze-excite and head at 32 x 32 inputs) is the identity: it goes, its users take its input. The converter
    removes such a MEAN and lets its reader take the pool's input codes, with the reader's bias still quantized
    at the pool's own output scale; with the pool gone there is no second range for the file and the integer
    twin to part on. (Pools without keepdims stay: the file keeps their op.)"""
    def replace(layer):
        shape = layer.input_shape
        if type(layer) in (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D) and layer.keepdims \
                and layer.data_format == "channels_last" and isinstance(shape, tuple) and len(shape) == 4 \
                and tuple(shape[1:3]) == (1, 1):
            return lambda args, kwargs: args[0]
        return None
    return _rewrite(model, replace)


def preprocessing_to_conv(model):
    """Rescaling (x * scale + offset) and Normalization ((x - mean) / sqrt(variance)) become a fixed
    (non-trainable) 1x1 depthwise FoldedConvBN with the same per-channel scale and offset, written as one
    int8 DEPTHWISE_CONV_2D; the model keeps taking the pixels it took (tf_keras MobileNetV3,
    EfficientNet, RegNet)."""
    def replace(layer):
        if not isinstance(layer, (L.Rescaling, L.Normalization)) or len(layer.input_shape) != 4:
            return None
        channels = int(layer.input_shape[-1])
        if isinstance(layer, L.Rescaling):
            scale = np.broadcast_to(np.asarray(layer.scale, np.float64), (channels,))
            offset = np.broadcast_to(np.asarray(layer.offset, np.float64), (channels,))
        else:
            if tuple(layer.axis) not in ((-1,), (3,)):
                return None
            std = np.maximum(np.sqrt(np.reshape(layer.variance.numpy(), -1)), keras.backend.epsilon())
            scale = np.broadcast_to(1.0 / std, (channels,))
            offset = np.broadcast_to(-np.reshape(layer.mean.numpy(), -1) / std, (channels,))
            if getattr(layer, "invert", False):
                return None
        return _affine(layer.name, scale, offset, trainable=False)
    return _rewrite(model, replace)


def _foldable_bn(layer):
    return (isinstance(layer, L.BatchNormalization) and not layer.virtual_batch_size
            and layer.axis in ([3], [-1], 3, -1) and len(layer.input_shape) == 4)


def standalone_batchnorm(model):
    """A BatchNormalization that cannot fold into a convolution before it (it follows an Add,
    Concatenate, pooling, ...: ResNet50V2, DenseNet121, NASNet) gets a 1x1 DepthwiseConv2D of ones
    (``<bn>_scale``) in front, so that ``fold_batchnorm`` makes the pair one per-channel scale and
    offset (an int8 DEPTHWISE_CONV_2D with bias) that trains as the BatchNormalization did.
    A plain DepthwiseConv2D with no BatchNormalization after it gets a fixed identity one (moving mean 0,
    variance 1, epsilon 0, its bias as beta, no batch statistics), so that it folds the same way."""
    _, consumers = _model_nodes(model)
    nodes = layer_nodes(model)

    def replace(layer):
        if _foldable_bn(layer):
            before = tf.nest.flatten(nodes[layer.name][0].inbound_layers)[0]
            if fold_blocker(before, layer, consumers.get(before.name, [])) is None:
                return None
            channels = int(layer.input_shape[-1])
            ones = L.DepthwiseConv2D(1, use_bias=False, name=f"{layer.name}_scale")
            bn = type(layer).from_config(layer.get_config())

            def call(args, kwargs, bn=bn, weights=layer.get_weights()):
                out = bn(ones(args[0]))
                ones.set_weights([np.ones((1, 1, channels, 1), np.float32)])
                bn.set_weights(weights)
                return out
            return call
        if type(layer) is L.DepthwiseConv2D and not any(
                _foldable_bn(u) for u in consumers.get(layer.name, [])) and function_name(layer.activation) == "linear":
            channels = int(layer.input_shape[-1]) * layer.depth_multiplier
            config = dict(layer.get_config(), use_bias=False)
            dw = L.DepthwiseConv2D.from_config(config)
            bias = layer.bias.numpy() if layer.use_bias else np.zeros(channels, np.float32)
            bn = L.BatchNormalization(epsilon=0.0, trainable=False, name=f"{layer.name}_bias")

            def call(args, kwargs, kernel=layer.depthwise_kernel.numpy()):
                out = bn(dw(args[0]))
                dw.set_weights([kernel])
                bn.set_weights([np.ones(channels, np.float32), bias, np.zeros(channels, np.float32),
                                np.ones(channels, np.float32)])
                return out
            return call
        return None
    return _rewrite(model, replace)


# Merge layers whose Keras call of n > 2 inputs is n - 1 pairwise ops, left to right (exact types).
SPLIT_MERGES = (keras.layers.Add, keras.layers.Multiply, keras.layers.Maximum, keras.layers.Minimum)


def split_merges(model):
    """Add / Multiply / Maximum / Minimum layers of n > 2 inputs become a chain of n - 1 two-input layers of
    the same class named ``<layer>_1``, ..., ``<layer>_<n-2>`` and, last, ``<layer>`` (same function: Keras
    itself combines the inputs left to right). The converter writes one int8 op per pair, each with the
    output range its layer learns; a single layer would leave the partial results in float."""
    _require_graph(model)

    def split(layer):
        return type(layer) in SPLIT_MERGES and len(tf.nest.flatten(layer.input)) > 2

    if not any(split(layer) for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)):
        return model

    def replace(layer):
        if isinstance(layer, keras.layers.InputLayer) or not split(layer):
            return None
        n = len(tf.nest.flatten(layer.input))
        config = layer.get_config()
        names = [f"{layer.name}_{i}" for i in range(1, n - 1)] + [layer.name]
        pairs = [type(layer).from_config(dict(config, name=name)) for name in names]

        def call(args, kwargs):  # [a, b, c] -> second([first([a, b]), c])
            inputs = tf.nest.flatten(args[0])
            out = inputs[0]
            for pair, x in zip(pairs, inputs[1:]):
                out = pair([out, x])
            return out
        return call
    return rebuild(model, replace)


def hard_activations(model):
    """tf_keras MobileNetV3's hard activations become one layer each (same function, float):

      hard_sigmoid(x) = ReLU(6.)(x + 3.) * (1. / 6.)      -> ``layers.HardSigmoid``
      hard_swish(x) = Multiply()([x, hard_sigmoid(x)])   -> ``layers.HardSwish``

    i.e. a TFOpLambda ``tf.__operators__.add(x, 3.0)`` whose only user is a ReLU(6.0) whose only user is a
    TFOpLambda ``tf.math.multiply(., 1/6)``; a hard swish when that product's only user is a Multiply of it
    and the same x. Anything else is left as it is (``quantize``'s audit says what it refuses). A model
    without the pattern is returned unchanged."""
    if not getattr(model, "_is_graph_network", False) or not any(
            getattr(layer, "symbol", None) == "__operators__.add" for layer in model.layers):
        return model  # nothing to rewrite (and the audit explains subclassed models)
    nodes, consumers = _model_nodes(model)

    def only_user(layer):
        users = consumers.get(layer.name, [])
        return users[0] if len(users) == 1 else None

    def tf_op(layer, symbol, constant, tol=0.0):
        """The node of ``layer`` when it is the TFOpLambda tf.<symbol>(tensor, constant), else None."""
        if type(layer).__name__ != "TFOpLambda" or getattr(layer, "symbol", None) != symbol:
            return None
        node = nodes[layer.name]
        args = node.call_args
        c = args[1] if len(args) > 1 else node.call_kwargs.get("y")
        if not (args and hasattr(args[0], "_keras_history") and isinstance(c, (int, float))
                and abs(float(c) - constant) <= tol):
            return None
        return node

    plan = {}
    for layer in model.layers:
        node = tf_op(layer, "__operators__.add", 3.0)
        if node is None:
            continue
        relu = only_user(layer)
        if not (isinstance(relu, keras.layers.ReLU) and activation_name(relu) == "relu6"):
            continue
        mul = only_user(relu)
        if mul is None or tf_op(mul, "math.multiply", 1.0 / 6.0, tol=1e-7) is None:
            continue
        x = node.call_args[0]
        gate_user = only_user(mul)
        if isinstance(gate_user, keras.layers.Multiply):
            pair = tf.nest.flatten(nodes[gate_user.name].call_args[0])
            if len(pair) == 2 and any(t is x for t in pair) and any(t is nodes[mul.name].outputs for t in pair):
                plan[layer.name] = (HardSwish(name=gate_user.name), [], [relu.name, mul.name, gate_user.name], [x])
                continue
        plan[layer.name] = (HardSigmoid(name=relu.name), [], [relu.name, mul.name], [x])
    if not plan:
        return model
    return rebuild(model, lambda layer: plan.get(layer.name))
