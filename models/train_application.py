"""Train a tf_keras.applications model (weights=None) on the built-in synthetic shapes and save it, the float model a
user brings to `mobileqat auto --model-file` / `mobileqat run --model-file`.

    python models/train_application.py OUT.keras [--model MobileNetV3Small] [--train 5000] [--test 1000] [--epochs 10]

Input 32x32x3 in [-1, 1] (the data's scaling; include_preprocessing=False), 10 classes, `mobileqat.fit` (Adam,
cosine decay, learning rate 2e-3, seed 0). The applications' BatchNormalization momentum (0.999) leaves the moving
statistics far from the data after a few hundred steps (the saved model then predicts one class), so after
training each BatchNormalization's moving mean and variance are re-estimated, layer by layer in order, over 2,000
training images in inference mode. Prints the Keras test accuracy before and after that.
"""
import argparse
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

import mobileqat as mq  # noqa: E402
from mobileqat._tf import keras  # noqa: E402


def reestimate_batchnorm(model, x, batch_size=250):
    """Set each BatchNormalization's moving mean/variance (in model order) to its input's per-channel mean and
    variance over ``x`` (N, H, W, C), computed with the statistics already re-estimated upstream."""
    for bn in (layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)):
        feats = keras.Model(model.input, bn.input).predict(x, batch_size=batch_size, verbose=0)
        axes = tuple(range(feats.ndim - 1))
        bn.moving_mean.assign(feats.mean(axes))
        bn.moving_variance.assign(feats.var(axes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to save the float model (.keras or .h5)")
    parser.add_argument("--model", default="MobileNetV3Small", help="a tf_keras.applications builder name")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    builder = getattr(keras.applications, args.model, None)
    if builder is None:
        parser.error(f"--model {args.model}: not in tf_keras.applications (e.g. MobileNetV3Small, EfficientNetB0).")
    keras.utils.set_random_seed(0)
    ds = mq.synthetic_shapes(n_train=args.train, n_test=args.test)
    extra = {"include_preprocessing": False} if args.model.startswith(("MobileNetV3", "EfficientNetV2")) else {}
    model = builder(input_shape=(32, 32, 3), weights=None, classes=10, **extra)
    mq.fit(model, ds.x_train, ds.y_train, epochs=args.epochs, learning_rate=2e-3)

    def accuracy():
        return float(np.mean(model.predict(ds.x_test, verbose=0).argmax(-1) == ds.y_test))
    print(f"Keras test accuracy after training: {accuracy():.4f}")
    reestimate_batchnorm(model, ds.x_train[:2000])
    print(f"Keras test accuracy after re-estimating batch norm: {accuracy():.4f}")
    model.save(args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
