"""llava-ms's CPU matmul paths for float16 weights by row count: which one each row count should take.

    .venv/bin/python bench/bench_kernels.py [--rounds 12] [--rows 1,4,8,16,32,64,128,600]

For every product of one decode step of bench_llava.py's 474M model (8 layers: q/k/v 3072x1024, o 1024x1024,
gate/up 5632x1024, down 1024x2816; lm_head 32064x1024; 272 MB of float16 weights) and of one layer of the 7B
(12288x4096, 4096x4096, 22016x4096, 4096x11008; 405 MB), the time of all of them for M rows of x (a decode
step of M sequences, or a prompt of M tokens) through each path, forced with llava_kernels.configure:

    decode   the decode kernels: float16 widened to float32 in registers, float32 FMA
    packed   the packed kernel: x and W rounded to bfloat16 in cache, vdpbf16ps (AVX512-BF16 CPUs)
    onednn   oneDNN's matmul: W converted to bfloat16 1024 rows at a time, then multiplied

Paths alternate within each round (the host drifts); medians over --rounds rounds. The weights are larger than
the caches, as in a real step. Printed beside the host's probes (read bandwidth, GEMM rates) and the floor of
reading the weights once at that bandwidth.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as common  # noqa: E402  pylint: disable=wrong-import-position

MODELS = {
    "474M decode step (8 layers + lm_head)": [(3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)] * 8
                                            + [(32064, 1024)],
    "7B, one layer": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
}
PATHS = {"decode": dict(large="decode", m_large=1 << 30), "packed": dict(large="packed", m_large=1),
         "onednn": dict(large="onednn", m_large=1)}


def time_paths(shapes, rows, rounds):
    """{path: median seconds} for all `shapes`' products of `rows` rows of x."""
    import llava_kernels  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    weights = [(rng.random(shape, dtype=np.float32) - 0.5).astype(np.float16) for shape in shapes]
    inputs = {k: rng.random((rows, k), dtype=np.float32) for k in {shape[1] for shape in shapes}}

    def step():
        start = time.perf_counter()
        for weight in weights:
            llava_kernels.matmul_numpy(inputs[weight.shape[1]], weight)
        return time.perf_counter() - start

    times = {path: [] for path in PATHS}
    for path, settings in PATHS.items():  # a first call each: scratch buffers, oneDNN primitives
        llava_kernels.configure(**settings)
        step()
    for _ in range(rounds):
        for path, settings in PATHS.items():
            llava_kernels.configure(**settings)
            times[path].append(step())
    llava_kernels.reset()
    return {path: statistics.median(values) for path, values in times.items()}, sum(w.nbytes for w in weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,600")
    args = parser.parse_args()
    rows = [int(value) for value in args.rows.split(",")]
    probes = common.host_probes(gemm=(577, 1024, 4096))
    import llava_kernels  # pylint: disable=import-outside-toplevel
    if "avx512bf16" not in llava_kernels.describe():
        print("this CPU has no AVX512-BF16: the packed path runs oneDNN's", file=sys.stderr)
    common.print_probes(probes)
    for model, shapes in MODELS.items():
        print(f"\n{model}: ms per call (medians of {args.rounds} rounds), and each path / the fastest")
        print(f"{'rows':>6}" + "".join(f"{path:>10}" for path in PATHS) + f"{'best':>9}"
              + "".join(f"{path + '/best':>13}" for path in PATHS))
        for count in rows:
            times, nbytes = time_paths(shapes, count, args.rounds)
            best = min(times, key=times.get)
            print(f"{count:>6}" + "".join(f"{times[path] * 1e3:>10.2f}" for path in PATHS) + f"{best:>9}"
                  + "".join(f"{times[path] / times[best]:>13.2f}" for path in PATHS))
        floor = nbytes / (probes["bandwidth_gb_s"] * 1e9) * 1e3
        print(f"floor: reading the {nbytes / 1e6:.0f} MB of weights once at the probed bandwidth: {floor:.2f} ms")


if __name__ == "__main__":
    main()
