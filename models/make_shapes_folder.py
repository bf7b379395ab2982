"""Write the built-in synthetic shapes as an image folder (JPEG or PNG), one image at a time.

    python models/make_shapes_folder.py OUT_DIR [--n 5000] [--size 224] [--format jpg|png] [--seed 0]

Same scenes as mobileqat.data.synthetic_shapes (10 classes: circle, square, ...; difficulty 1.3), drawn
one by one so that memory stays small at any count, saved as OUT_DIR/<class>/<index>.<format> (JPEG
quality 90). For benchmarks of the image-folder input pipelines (models/bench_input_pipeline.py).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to create; gets one sub-folder per class")
    parser.add_argument("--n", type=int, default=5000, help="images in all (classes take turns)")
    parser.add_argument("--size", type=int, default=224, help="side in pixels (default 224)")
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 8 or args.n < 2:
        parser.error("use --size >= 8 and --n >= 2")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from mobileqat import data

    rs = np.random.RandomState(data._derived_seed(args.seed, 0))
    knobs = data._knobs(1.3)
    scale = 4 if args.size <= 64 else (2 if args.size <= 160 else 1)
    for name in data.SHAPE_CLASSES:
        os.makedirs(os.path.join(args.out_dir, name), exist_ok=True)
    for i in range(args.n):
        label = i % len(data.SHAPE_CLASSES)
        rgb = data._render(rs, label, args.size, scale, knobs)
        path = os.path.join(args.out_dir, data.SHAPE_CLASSES[label], f"{i:06d}.{args.format}")
        Image.fromarray(rgb, "RGB").save(path, **({"quality": 90} if args.format == "jpg" else {}))
    print(f"wrote {args.n} {args.format} images of {args.size}x{args.size} in {len(data.SHAPE_CLASSES)} class "
          f"folders under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
