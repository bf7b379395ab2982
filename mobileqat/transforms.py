"""Model rewrites applied before quantization: plain functions ``model -> model``.

``fold_batchnorm`` replaces every Conv2D/DepthwiseConv2D -> BatchNormalization [-> ReLU/ReLU6]
chain by one ``FoldedConvBN`` carrying the same weights and statistics, when every row of
``FOLD_CONDITIONS`` holds (``mobileqat.quantize.audit`` reports the BatchNormalizations that fail one).
"""
from mobileqat._tf import keras, tf
from mobileqat.layers import FoldedConvBN, HardSigmoid, HardSwish

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


def _conv_is_plain(conv, bn, users):  # what FoldedConvBN computes
    if getattr(conv, "groups", 1) != 1 or tuple(conv.dilation_rate) != (1, 1) or conv.data_format != "channels_last":
        return (f"'{conv.name}' is grouped, dilated or channels_first (groups={getattr(conv, 'groups', 1)}, "
                f"dilation_rate={tuple(conv.dilation_rate)}, data_format='{conv.data_format}')")


def _only_consumer(conv, bn, users):
    others = [f"'{u.name}'" for u in users if u is not bn]
    if others:
        return f"the output of '{conv.name}' also goes to {', '.join(others)}"


def _linear_conv(conv, bn, users):
    name = function_name(conv.activation)
    if name != "linear":
        return f"'{conv.name}' applies activation '{name}' before it"


def _scale_and_center(conv, bn, users):
    if not bn.scale or not bn.center:
        return f"it has scale={bn.scale}, center={bn.center}"


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
    (_conv_is_plain, "make the convolution before it ungrouped, undilated and channels_last"),
    (_only_consumer, "make the BatchNormalization the only layer that takes the convolution's output "
                     "(other branches can take the BatchNormalization's output)"),
    (_linear_conv, "give the convolution no activation and put the activation after the BatchNormalization"),
    (_scale_and_center, "use BatchNormalization(scale=True, center=True)"),
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
            momentum=bn.momentum, epsilon=bn.epsilon, weight_quantizer=weight_quantizer,
            name=layer.name)
        gamma, beta, mean, var = (w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
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


def rebuild(model, replace):
    """Rebuild a functional/Sequential model, layer by layer, with fresh layer objects.

    ``replace(layer)`` returns None (clone the layer with its weights) or
    (new_layer, weights: a list for set_weights or a function of the built layer, [names of later layers whose output it takes over]).
    ``new_layer`` may be a tuple of layers, called one after the other; ``weights`` go to the first.
    A fourth element, a list of tensors of ``model``, calls ``new_layer`` on those (their new
    counterparts) instead of on the layer's own call arguments.
    """
    _require_graph(model)
    nodes, _ = _model_nodes(model)
    tensors, taken_over = {}, {}
    new_inputs = []
    for t in model.inputs:
        layer = t._keras_history.layer
        new = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=layer.name)
        tensors[id(t)] = new
        new_inputs.append(new)

    for layer in model.layers:
        if layer.name not in nodes or layer.name in taken_over:
            continue
        node = nodes[layer.name]
        choice = replace(layer)
        if choice is None:
            new_layer = type(layer).from_config(layer.get_config())
            weights, absorbed, inputs = layer.get_weights(), [], None
        else:
            new_layer, weights, absorbed, *inputs = choice
        args = tf.nest.map_structure(
            lambda x: tensors.get(id(x), x), (node.call_args, node.call_kwargs))
        if inputs:
            args = (tuple(tensors[id(t)] for t in inputs[0]), {})
        chain = new_layer if isinstance(new_layer, tuple) else (new_layer,)
        new_layer = chain[0]
        out = new_layer(*args[0], **args[1])
        for then in chain[1:]:
            out = then(out)
        if callable(weights):
            weights(new_layer)
        elif weights is not None:
            new_layer.set_weights(weights)
        last = layer
        for name in absorbed:
            taken_over[name] = True
            last = model.get_layer(name)
        old_out = nodes[last.name].outputs
        for o, n in zip(tf.nest.flatten(old_out), tf.nest.flatten(out)):
            tensors[id(o)] = n
    outputs = tf.nest.map_structure(lambda t: tensors[id(t)], model.outputs)
    return keras.Model(new_inputs, outputs, name=model.name)


def fold_batchnorm(model, weight_quantizer=None):
    """Conv/DepthwiseConv -> BN [-> ReLU/ReLU6] chains become ``FoldedConvBN`` layers (same function).

    Chains that fail a row of ``FOLD_CONDITIONS`` are left as they are."""
    _require_graph(model)
    _, consumers = _model_nodes(model)
    plan = _fold_plan(model, consumers, weight_quantizer)
    return rebuild(model, lambda layer: plan.get(layer.name))


# Activations with an int8 kernel of their own but none fused into CONV_2D / FULLY_CONNECTED.
SPLIT_ACTIVATIONS = ("softmax", "sigmoid")
_SPLIT_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)  # exact types


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
