"""Quantization schemes as data: bit widths and granularity, turned into quantizer objects; rules that
choose a scheme per layer (mixed precision).

A ``QuantScheme`` is a frozen description; ``quantize(model, scheme)`` asks it for the quantizers of
each layer. Presets are looked up by name (``PRESETS``: "w8a8", "w4a8", "w8a16", "w4a8_lsq"). Learned quantizers are
fields like any other: ``{"weight_bits": 4, "weight_method": "lsq", "activation_method": "pact"}``.

Mixed precision is plain data, in Python or a JSON file, e.g. 8-bit first and last layers, 4-bit
weights elsewhere::

    {"default": "w4a8",
     "rules": [{"match": {"position": "first"}, "scheme": "w8a8"},
               {"match": {"position": "last"}, "scheme": "w8a8"},
               {"match": {"name": "block_1*", "type": "DepthwiseConv2D"}, "scheme": {"weight_bits": 6}}]}

A rule's ``match`` holds one or more of (all must hold):
  "name":     a glob (``fnmatch``, case-sensitive) or a list of globs over layer names;
  "regex":    a regular expression the whole layer name must match;
  "type":     a class name or list of them, the class the user wrote (SeparableConv2D, Dense, ...);
  "position": "first" or "last": the first / last layer with weights in graph order.
Its ``scheme`` is a preset name or a dict of ``QuantScheme`` fields (missing fields from "w8a8").
Rules choose the weight quantization of layers with weights (Conv2D, DepthwiseConv2D,
SeparableConv2D, Dense, Conv2DTranspose); the first rule that matches a layer decides; layers no rule
matches take ``default``. A rule that matches no layer, only layers without weights, or only layers an
earlier rule already decided is an error naming the rule and the fix. Layers are matched on the model
after ``quantize``'s rewrites, by the names and classes the user wrote (rewrites keep names).
"""
import dataclasses
import fnmatch
import json
import os
import re

from mobileqat.quantizers import (ActivationQuantizer, LSQActivationQuantizer, LSQWeightQuantizer, PACTQuantizer,
                                  SymmetricActivationQuantizer, WeightQuantizer)

WEIGHT_METHODS = ("minmax", "lsq")
ACTIVATION_METHODS = ("ema", "pact", "lsq")


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How weights and activations are quantized.

    weight_bits: 2..8. Weights are symmetric (zero point 0, narrow range: codes in
      [-(2^(b-1)-1), 2^(b-1)-1]), per output channel when ``per_channel``. Below 8 bits the file
      holds int8 tensors whose codes lie on the b-bit grid (``WeightQuantizer``).
    activation_bits: 8 (int8 activations, asymmetric, per tensor) or 16 (TFLite int16x8: int16
      activations, symmetric with zero point 0, per tensor; 8-bit weights only; int32 bias). A 16-bit
      model runs on the builtin kernels only: XNNPACK does not delegate int16x8 ops.
    ema_decay: decay of the activation range's moving average.
    packed_int4: Dense layers with weight_bits == 4 and an even input count get packed INT4 weights in the file (FULLY_CONNECTED
      with int4 weights runs on the reference kernels and XNNPACK; half the bytes of int8). Other
      layers keep int8 tensors on the 4-bit grid (int4 CONV_2D is not delegated to XNNPACK, int4
      DEPTHWISE_CONV_2D not in the reference kernels).
    Dense and Conv2DTranspose weights are per-tensor whatever ``per_channel`` says (the converter
    cannot write them per channel from a QAT graph).
    weight_method: "minmax" (range = max|w|, ``WeightQuantizer``) or "lsq" (learned step size,
      ``LSQWeightQuantizer``).
    activation_method: "ema" (moving-average min/max, ``ActivationQuantizer``), "lsq" (learned step and offset,
      ``LSQActivationQuantizer``) or "pact" (learned clipping level, ``PACTQuantizer``) on the outputs that are
      non-negative by construction (a fused or standalone ReLU / ReLU6, as in the paper); the other outputs of a
      "pact" scheme, which may be negative, keep "ema".
    pact_l2: L2 weight on PACT's alpha (0: none).
    lsq_init: initial LSQ weight step: "max" (max|w| / Qp, the min-max grid; default) or "paper" (2 mean|w| /
      sqrt(Qp), which starts 4-bit depthwise channels on a 3-bit grid: ``LSQWeightQuantizer``).
    """

    name: str = "w8a8"
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    ema_decay: float = 0.99
    packed_int4: bool = False
    weight_method: str = "minmax"
    activation_method: str = "ema"
    pact_l2: float = 0.0
    lsq_init: str = "max"

    def __post_init__(self):
        if self.lsq_init not in LSQWeightQuantizer.INITS:
            raise ValueError(f"QuantScheme '{self.name}': lsq_init={self.lsq_init!r}; use one of "
                             f"{list(LSQWeightQuantizer.INITS)}.")
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"QuantScheme '{self.name}': weight_method={self.weight_method!r}; use one of "
                             f"{list(WEIGHT_METHODS)}.")
        if self.activation_method not in ACTIVATION_METHODS:
            raise ValueError(f"QuantScheme '{self.name}': activation_method={self.activation_method!r}; use one of "
                             f"{list(ACTIVATION_METHODS)}.")
        if not isinstance(self.pact_l2, (int, float)) or isinstance(self.pact_l2, bool) or not self.pact_l2 >= 0:
            raise ValueError(f"QuantScheme '{self.name}': pact_l2={self.pact_l2!r}; use a number >= 0 (0: no L2 on "
                             "PACT's alpha).")
        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8:
            raise ValueError(f"QuantScheme '{self.name}': weight_bits={self.weight_bits!r}; use an integer from 2 to 8.")
        if self.activation_bits not in (8, 16):
            raise ValueError(f"QuantScheme '{self.name}': activation_bits={self.activation_bits!r}; mobileqat "
                             "exports int8 activations only, or int16 activations with 8-bit weights (TFLite "
                             "int16x8): use activation_bits=8, or 16 (preset 'w8a16').")
        if self.activation_bits == 16 and (self.weight_bits != 8 or self.packed_int4):
            raise ValueError(f"QuantScheme '{self.name}': activation_bits=16 with weight_bits={self.weight_bits}"
                             f"{', packed_int4' if self.packed_int4 else ''}; TFLite's int16x8 ops take 8-bit "
                             "weights: use weight_bits=8 (preset 'w8a16').")

    def _weights(self, per_channel, packed_int4=False):
        if self.weight_method == "lsq":
            return LSQWeightQuantizer(self.weight_bits, per_channel=per_channel, packed_int4=packed_int4,
                                      init=self.lsq_init)
        return WeightQuantizer(self.weight_bits, per_channel=per_channel, narrow_range=True, packed_int4=packed_int4)

    def weight_quantizer(self):
        return self._weights(self.per_channel)

    def dense_weight_quantizer(self):
        """Per-tensor: TFLite's converter cannot take per-channel FULLY_CONNECTED weights from QAT."""
        return self._weights(False)

    def fully_connected_weight_quantizer(self, inputs):
        """Dense with ``inputs`` input features: per-tensor (as ``dense_weight_quantizer``), packed INT4 when
        ``packed_int4``, 4 bits and an even input count (XNNPACK refuses int4 FULLY_CONNECTED with an odd one)."""
        return self._weights(False, self.packed_int4 and self.weight_bits == 4 and inputs % 2 == 0)

    def activation_quantizer(self, layer=None):
        """The output quantizer of ``layer`` (a layer of the folded model; None: a tensor of unknown sign)."""
        if self.activation_bits == 16:
            return SymmetricActivationQuantizer(16, ema_decay=self.ema_decay)
        if self.activation_method == "lsq":
            return LSQActivationQuantizer(self.activation_bits)
        if self.activation_method == "pact" and layer is not None and nonnegative_output(layer):
            return PACTQuantizer(self.activation_bits, l2=self.pact_l2)
        return ActivationQuantizer(self.activation_bits, ema_decay=self.ema_decay)

    def to_dict(self):
        return dataclasses.asdict(self)


def nonnegative_output(layer):
    """True when ``layer``'s output is >= 0 by construction: its own activation (fused into a conv, Dense or
    ``FoldedConvBN``, or an Activation/ReLU layer) is ReLU or ReLU6."""
    from mobileqat import transforms
    from mobileqat._tf import keras
    if isinstance(layer, (keras.layers.Activation, keras.layers.ReLU)):
        return transforms.activation_name(layer) in ("relu", "relu6", "relu_n")
    activation = getattr(layer, "activation", None)
    return activation is not None and transforms.function_name(activation) in ("relu", "relu6")


PRESETS = {
    "w8a8": QuantScheme("w8a8", 8, 8),
    # 4-bit weights: int8 tensors on the 4-bit grid, packed INT4 for Dense (FULLY_CONNECTED, which XNNPACK runs)
    "w4a8": QuantScheme("w4a8", 4, 8, packed_int4=True),
    # TFLite int16x8: int16 activations (symmetric, zero point 0), int8 per-channel weights
    "w8a16": QuantScheme("w8a16", 8, 16),
    # the same with learned step sizes (LSQ) for weights and activations
    "w4a8_lsq": QuantScheme("w4a8_lsq", 4, 8, packed_int4=True, weight_method="lsq", activation_method="lsq"),
}
_FIELDS = {f.name for f in dataclasses.fields(QuantScheme)}
MATCH_KEYS = ("name", "regex", "type", "position")
# the classes (as the user wrote them) whose weights a scheme quantizes
WEIGHTED_CLASSES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense", "Conv2DTranspose")


def get_scheme(scheme):
    """A QuantScheme from a preset name, a dict of QuantScheme fields or a QuantScheme."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if isinstance(scheme, dict):
        unknown = sorted(set(scheme) - _FIELDS)
        if unknown:
            raise ValueError(f"scheme {scheme!r}: unknown field(s) {unknown}; QuantScheme fields are {sorted(_FIELDS)}.")
        fields = dict(scheme)
        fields.setdefault("name", "custom:" + ",".join(f"{k}={v}" for k, v in sorted(scheme.items())))
        return QuantScheme(**fields)
    if isinstance(scheme, str) and scheme in PRESETS:
        return PRESETS[scheme]
    raise ValueError(f"unknown scheme {scheme!r}: use one of {sorted(PRESETS)}, a dict of QuantScheme fields "
                     f"{sorted(_FIELDS)} or a mobileqat.QuantScheme.")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: ``match`` (dict, keys of ``MATCH_KEYS``) and the ``scheme`` it gives."""
    match: dict
    scheme: QuantScheme
    source: object = None  # the scheme as written ("w8a8" or a dict), for reports

    def describe(self, i):
        return f"rule {i} {json.dumps({'match': self.match, 'scheme': self.source})}"


@dataclasses.dataclass(frozen=True)
class SchemeRules:
    """Mixed precision: ``rules`` (first match wins) and the ``default`` scheme for the other layers."""
    rules: tuple
    default: QuantScheme = PRESETS["w8a8"]
    default_source: object = "w8a8"

    def to_dict(self):
        """The plain data these rules came from (JSON-serializable)."""
        return {"default": self.default_source,
                "rules": [{"match": r.match, "scheme": r.source} for r in self.rules]}


def _scheme_source(scheme):
    return scheme.to_dict() if isinstance(scheme, QuantScheme) else scheme


def parse_rules(data, where="rules"):
    """``SchemeRules`` from plain data: {"default": scheme, "rules": [...]} or a list of rules (default
    "w8a8"). Raises ValueError naming the rule and what is wrong."""
    if isinstance(data, SchemeRules):
        return data
    if isinstance(data, (list, tuple)):
        data = {"rules": list(data)}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected {{'default': ..., 'rules': [...]}} or a list of rules, got "
                         f"{type(data).__name__}.")
    unknown = sorted(set(data) - {"default", "rules"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; use 'default' (a scheme) and 'rules' (a list).")
    default_source = _scheme_source(data.get("default", "w8a8"))
    default = get_scheme(data.get("default", "w8a8"))
    rules = []
    for i, item in enumerate(data.get("rules", [])):
        text = f"{where}: rule {i} {item!r}"
        if not isinstance(item, dict) or set(item) != {"match", "scheme"}:
            raise ValueError(f"{text}: a rule is {{'match': {{...}}, 'scheme': ...}} (exactly these two keys).")
        match = item["match"]
        if not isinstance(match, dict) or not match:
            raise ValueError(f"{text}: 'match' must be a non-empty dict with keys from {list(MATCH_KEYS)} "
                             "(for every layer use 'default').")
        bad = sorted(set(match) - set(MATCH_KEYS))
        if bad:
            raise ValueError(f"{text}: unknown match key(s) {bad}; use {list(MATCH_KEYS)}.")
        if "position" in match and match["position"] not in ("first", "last"):
            raise ValueError(f"{text}: position {match['position']!r}; use 'first' or 'last'.")
        if "regex" in match:
            try:
                re.compile(match["regex"])
            except re.error as e:
                raise ValueError(f"{text}: regex {match['regex']!r} does not compile ({e}).") from e
        for key in ("name", "type"):
            if key in match and not (isinstance(match[key], str) or (
                    isinstance(match[key], list) and all(isinstance(v, str) for v in match[key]))):
                raise ValueError(f"{text}: '{key}' must be a string or a list of strings.")
        try:
            scheme = get_scheme(item["scheme"])
        except ValueError as e:
            raise ValueError(f"{text}: {e}") from e
        rules.append(Rule(dict(match), scheme, _scheme_source(item["scheme"])))
    return SchemeRules(tuple(rules), default, default_source)


def load_rules(path):
    """``SchemeRules`` from a JSON file (see the module docstring for the format)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"scheme rules file {path}: cannot read it ({e.strerror}).") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"scheme rules file {path}: not valid JSON ({e}).") from e
    return parse_rules(data, where=path)


def as_scheme_or_rules(scheme):
    """What ``quantize(model, scheme=...)`` accepts -> a QuantScheme or SchemeRules: a preset name, a
    QuantScheme, a dict of QuantScheme fields, rules (SchemeRules, a {"default", "rules"} dict or a list
    of rules) or the path of a JSON rules file (str ending in .json or os.PathLike)."""
    if isinstance(scheme, (QuantScheme, SchemeRules)):
        return scheme
    if isinstance(scheme, os.PathLike) or (isinstance(scheme, str) and scheme.lower().endswith(".json")):
        return load_rules(scheme)
    if isinstance(scheme, (list, tuple)) or (isinstance(scheme, dict) and ({"rules", "default"} & set(scheme))):
        return parse_rules(scheme)
    return get_scheme(scheme)


def resolved(scheme):
    """Plain data of what ``scheme`` (anything ``as_scheme_or_rules`` takes; None stays None) means, preset names
    replaced by their fields: the key of a finished stage, so that a preset whose fields change (``w4a8_lsq``'s
    weight initialisation did) is not taken for the one measured before."""
    if scheme is None:
        return None
    s = as_scheme_or_rules(scheme)
    if isinstance(s, QuantScheme):
        return s.to_dict()
    return {"default": s.default.to_dict(), "rules": [{"match": r.match, "scheme": r.scheme.to_dict()} for r in s.rules]}


def _original_classes(model):
    """{layer name: class name the user wrote} over the model and the models nested in it (a nested
    layer also under ``<nested>_<layer>``, the name ``flatten_nested`` gives it where names clash)."""
    out = {}
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):  # a nested model
            for name, cls in _original_classes(layer).items():
                out.setdefault(name, cls)
                out.setdefault(f"{layer.name}_{name}", cls)
        out.setdefault(layer.name, type(layer).__name__)
    return out


def user_weighted_layers(original, rewritten, weighted_types):
    """[(name, user class)] of the layers of ``rewritten`` (the model after quantize's rewrites) with
    weights to quantize that the user wrote, in graph order. ``weighted_types``: the classes of
    ``rewritten`` whose kernel a scheme quantizes. Layers a rewrite added (a BatchNormalization's or a
    Rescaling's fixed 1x1 depthwise) are left out; a SeparableConv2D's depthwise half ``<name>_dw``
    counts as the SeparableConv2D."""
    classes = _original_classes(original)
    out = []
    for layer in rewritten.layers:
        if type(layer) not in weighted_types:
            continue
        cls = classes.get(layer.name)
        if cls is None and layer.name.endswith("_dw") and classes.get(layer.name[:-3]) == "SeparableConv2D":
            cls = "SeparableConv2D"
        if cls in WEIGHTED_CLASSES:
            out.append((layer.name, cls))
    return out


def _matches(match, name, cls, position):
    if "name" in match:
        globs = [match["name"]] if isinstance(match["name"], str) else match["name"]
        if not any(fnmatch.fnmatchcase(name, g) for g in globs):
            return False
    if "regex" in match and not re.fullmatch(match["regex"], name):
        return False
    if "type" in match:
        types = [match["type"]] if isinstance(match["type"], str) else match["type"]
        if cls not in types:
            return False
    if "position" in match and match["position"] not in position:
        return False
    return True


def assign(rules, layers, other_layers=()):
    """{layer name: (QuantScheme, rule index or None)} for ``layers`` [(name, class)] with weights, in graph
    order, under ``rules`` (SchemeRules). ``other_layers`` [(name, class)]: the model's layers without
    weights, to tell a rule that names one of them apart from a rule that names nothing.
    Raises ValueError listing every rule that matches no layer with weights or decides none."""
    positions = {}
    if layers:
        positions.setdefault(layers[0][0], set()).add("first")
        positions.setdefault(layers[-1][0], set()).add("last")
    out, problems = {}, []
    for i, rule in enumerate(rules.rules):
        hits = [n for n, c in layers if _matches(rule.match, n, c, positions.get(n, ()))]
        if not hits:
            others = [f"'{n}' ({c})" for n, c in other_layers if _matches(rule.match, n, c, ())]
            if others:
                why = (f"matches only layers without weights to quantize ({', '.join(others[:5])}"
                       f"{', ...' if len(others) > 5 else ''})")
            else:
                why = "matches no layer of the model"
            problems.append(f"{rule.describe(i)} {why}; fix: match layers with weights ("
                            f"{', '.join(WEIGHTED_CLASSES)}), e.g. {_examples(layers)}, or remove the rule")
            continue
        new = [n for n in hits if n not in out]
        if not new:
            firsts = sorted({out[n][1] for n in hits})
            problems.append(f"{rule.describe(i)} decides no layer: every layer it matches "
                            f"({', '.join(repr(n) for n in hits[:5])}) is taken by an earlier rule "
                            f"({', '.join(f'rule {j}' for j in firsts)}; the first matching rule wins); "
                            "fix: move it before that rule, narrow that rule, or remove it")
            continue
        for n in new:
            out[n] = (rule.scheme, i)
    if problems:
        raise ValueError("scheme rules that cannot apply (none was skipped):\n"
                         + "\n".join(f"  - {p}" for p in problems))
    for n, _ in layers:
        out.setdefault(n, (rules.default, None))
    return out


def _examples(layers):
    names = [f"'{n}' ({c})" for n, c in layers[:4]]
    return ", ".join(names) + (", ..." if len(layers) > 4 else "") if names else "(the model has none)"
