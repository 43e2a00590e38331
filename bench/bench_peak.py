"""This machine's measured peak FP32 FLOP/s (TensorFlow matmul), to put model throughput in proportion.

    python bench/bench_peak.py [--size 2048] [--seconds 5] [--json]

ResNet-20 costs 81.6 MFLOP an image (2 x multiply-adds, forward pass; `forward_flop` counts any depth), so
images/s x 81.6e6 / peak is the fraction of the machine a serving path uses. bench_serving.py calls this.
"""

from __future__ import annotations

import argparse
import json
import os
import time

RESNET20_FLOP = 81.6e6


def forward_flop(depth: int = 20) -> float:
    """FLOP (2 x multiply-adds) of one ResNet v1 forward pass on a 32x32 image: convolutions and the classifier."""
    n = (depth - 2) // 6
    flop = 2 * 32 * 32 * 3 * 3 * 3 * 16  # the input conv
    for size, width, downsample in ((32, 16, False), (16, 32, True), (8, 64, True)):
        c_in = width // 2 if downsample else width
        flop += 2 * size * size * 3 * 3 * c_in * width  # first unit, first conv (stride 2 when downsampling)
        flop += 2 * size * size * 3 * 3 * width * width * (2 * n - 1)  # the other convs of the stage
        if downsample:
            flop += 2 * size * size * c_in * width  # 1x1 projection shortcut
    return float(flop + 2 * 64 * 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    a = tf.random.normal([args.size, args.size])
    b = tf.random.normal([args.size, args.size])
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    matmul(a, b).numpy()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        matmul(a, b).numpy()
        n += 1
    gflops = 2 * args.size**3 * n / (time.perf_counter() - start) / 1e9
    if args.json:
        print(json.dumps({"gflops": gflops, "size": args.size}))
        return
    print(f"FP32 matmul {args.size}x{args.size}: {gflops:.0f} GFLOP/s on {os.cpu_count()} cores; "
          f"= {gflops * 1e9 / RESNET20_FLOP:.0f} ResNet-20 images/s at 100 % of peak")


if __name__ == "__main__":
    main()
