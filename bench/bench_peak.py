"""This machine's measured peak FP32 FLOP/s (TensorFlow matmul), to put model throughput in proportion.

    python bench/bench_peak.py [--size 2048] [--seconds 5]

ResNet-20 costs 81.6 MFLOP an image (2 x multiply-adds, forward pass), so images/s x 81.6e6 / peak is the fraction
of the machine a serving path uses.
"""

from __future__ import annotations

import argparse
import os
import time

RESNET20_FLOP = 81.6e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=5.0)
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
    print(f"FP32 matmul {args.size}x{args.size}: {gflops:.0f} GFLOP/s on {os.cpu_count()} cores; "
          f"= {gflops * 1e9 / RESNET20_FLOP:.0f} ResNet-20 images/s at 100 % of peak")


if __name__ == "__main__":
    main()
