"""Model rewrites applied before quantization: plain functions ``model -> model``.

``fold_batchnorm`` replaces every Conv2D/DepthwiseConv2D -> BatchNormalization [-> ReLU/ReLU6]
chain by one ``FoldedConvBN`` carrying the same weights and statistics.
"""
from mobileqat._tf import keras, tf
from mobileqat.layers import FoldedConvBN


def _model_nodes(model):
    """{layer name: its one node in this model}; consumers {layer name: [layer, ...]}."""
    nodes, consumers = {}, {}
    for layer in model.layers:
        own = [n for i, n in enumerate(layer._inbound_nodes)
               if f"{layer.name}_ib-{i}" in model._network_nodes]
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
    return keras.activations.serialize(layer.activation)


def _relu6_like(layer):
    """"relu" or "relu6" if ``layer`` is an activation layer that a conv can absorb, else None."""
    if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
        name = activation_name(layer)
        return name if name in ("relu", "relu6") else None
    return None


def _fold_plan(model, consumers, weight_quantizer):
    """{conv name: (FoldedConvBN, weights, [absorbed layer names])}."""
    plan = {}
    for layer in model.layers:
        if type(layer) not in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D):
            continue
        users = consumers.get(layer.name, [])
        if len(users) != 1 or not isinstance(users[0], keras.layers.BatchNormalization):
            continue
        bn = users[0]
        if keras.activations.serialize(layer.activation) != "linear" or not bn.scale or not bn.center \
                or layer.dilation_rate != (1, 1) or bn.axis not in ([3], [-1], 3, -1):
            continue
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


def rebuild(model, replace):
    """Rebuild a functional/Sequential model, layer by layer, with fresh layer objects.

    ``replace(layer)`` returns None (clone the layer with its weights) or
    (new_layer, weights: a list for set_weights or a function of the built layer, [names of later layers whose output it takes over]).
    """
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"model '{model.name}' is a subclassed Keras model; mobileqat needs a functional or Sequential "
            "model. Fix: rebuild it with keras.Input and layer calls.")
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
            weights, absorbed = layer.get_weights(), []
        else:
            new_layer, weights, absorbed = choice
        args = tf.nest.map_structure(
            lambda x: tensors.get(id(x), x), (node.call_args, node.call_kwargs))
        out = new_layer(*args[0], **args[1])
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
    """Conv/DepthwiseConv -> BN [-> ReLU/ReLU6] chains become ``FoldedConvBN`` layers (same function)."""
    _, consumers = _model_nodes(model)
    plan = _fold_plan(model, consumers, weight_quantizer)
    return rebuild(model, lambda layer: plan.get(layer.name))
