"""Quantization schemes as data: bit widths and granularity, turned into quantizer objects.

A ``QuantScheme`` is a frozen description; ``quantize(model, scheme)`` asks it for the
quantizers of each layer. Presets are looked up by name (``"w8a8"``).
"""
import dataclasses

from mobileqat.quantizers import ActivationQuantizer, WeightQuantizer


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How weights and activations are quantized.

    weight_bits / activation_bits: 2..8. Weights are symmetric (zero point 0, narrow range),
    per output channel when ``per_channel``; activations are asymmetric (per tensor).
    ema_decay: decay of the activation range's moving average.
    """

    name: str = "w8a8"
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    ema_decay: float = 0.99

    def weight_quantizer(self):
        return WeightQuantizer(self.weight_bits, per_channel=self.per_channel, narrow_range=True)

    def dense_weight_quantizer(self):
        """Per-tensor: TFLite's converter cannot take per-channel FULLY_CONNECTED weights from QAT."""
        return WeightQuantizer(self.weight_bits, per_channel=False, narrow_range=True)

    def activation_quantizer(self):
        return ActivationQuantizer(self.activation_bits, ema_decay=self.ema_decay)


PRESETS = {
    "w8a8": QuantScheme("w8a8", 8, 8),
}


def get_scheme(scheme):
    """A QuantScheme from a preset name or a QuantScheme."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if scheme in PRESETS:
        return PRESETS[scheme]
    raise ValueError(f"unknown scheme {scheme!r}: use one of {sorted(PRESETS)} or a mobileqat.QuantScheme.")
