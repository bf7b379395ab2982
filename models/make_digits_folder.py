"""Write scikit-learn's bundled handwritten digits as an image folder for mobileqat.data.load_image_folder.

    python models/make_digits_folder.py OUT_DIR [--size 32]

sklearn.datasets.load_digits: 1797 real 8x8 grayscale images (values 0..16), shipped inside
scikit-learn (no download). Each is scaled to 0..255, upscaled to --size x --size with Pillow BICUBIC
and saved as OUT_DIR/<digit>/<index>.png (mode 'L'), i.e. 10 class folders "0".."9".
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to create; gets one sub-folder per digit")
    parser.add_argument("--size", type=int, default=32, help="output side in pixels (default 32)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"--size {args.size} is too small; use --size >= 8.")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("make_digits_folder.py needs scikit-learn: pip install scikit-learn (or pip install -e '.[test]').")

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    for d in range(10):
        os.makedirs(os.path.join(args.out_dir, str(d)), exist_ok=True)
    for i, (img, label) in enumerate(zip(images, digits.target)):
        big = Image.fromarray(img, "L").resize((args.size, args.size), Image.BICUBIC)
        big.save(os.path.join(args.out_dir, str(int(label)), f"{i}.png"))
    print(f"wrote {len(images)} images of {args.size}x{args.size} in 10 class folders under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
