"""The machine's fp32 peak as torch reaches it: a large matmul (MKL / oneDNN GEMM) and a large 3x3
convolution (oneDNN, channels_last), in GFLOP/s at the chosen thread count.

Against these, bench_inference.py's GFLOP/s column says how far each inference mode is from what
the hardware does on its best-shaped work.

    python benchmarks/bench_peak.py --threads 1
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import base_parser, clock, machine_info, median, print_machine, setup, time_alternating, write_json


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = setup(args)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    info = machine_info(device)
    print_machine(info)

    n = 256 if args.quick else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    # a ResNet layer3-like 3x3 convolution at the size layer2 has for an 800x1066 image
    channels, height, width = (16, 16, 16) if args.quick else (256, 100, 134)
    x = torch.randn(1, channels, height, width, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    flops = {"matmul": 2 * n ** 3, "conv3x3": 2 * channels * channels * 9 * height * width}
    work = {"matmul": lambda: torch.mm(a, b), "conv3x3": lambda: F.conv2d(x, weight, padding=1)}
    with torch.inference_mode():
        times = time_alternating(work, warmup, repeats, device, clock(args))
    rows = {}
    for name, values in times.items():
        m = median(values)
        rows[name] = {"median_s": m, "gflop": flops[name] / 1e9, "gflop_per_s": flops[name] / 1e9 / m,
                      "times_s": values}
        print(f"{name:8s} {flops[name] / 1e9:7.2f} GFLOP in {m * 1000:8.2f} ms: {flops[name] / 1e9 / m:7.1f} GFLOP/s",
              flush=True)
    write_json("peak", {"benchmark": "peak", "machine": info, "quick": args.quick,
                        "config": {"cpu_time": args.cpu_time, "matmul_n": n, "conv": [channels, height, width],
                                   "repeats": repeats},
                        "results": rows}, args.out)


if __name__ == "__main__":
    main()
