"""convert_weight.py on a synthetic full-size llava-1.5-7b-hf (fp16, 3 shards, hub layout) against the disk.

    .venv/bin/python bench/bench_convert.py [--work-dir /tmp/llava-convert-bench] [--keep]

The peer is the disk itself, measured in the same run: reading the input shards and writing the same number
of bytes (`cat` into a file, fsync'd). The goal: conversion at disk speed with peak RSS < 2 GB. Needs about
3 x 14 GB free under --work-dir; everything but the synthetic input is removed at the end (--keep keeps it).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(command, **kwargs):
    kwargs.setdefault("stdout", subprocess.PIPE)
    start = time.perf_counter()
    result = subprocess.run(command, check=True, stderr=subprocess.PIPE, text=True, **kwargs)
    return time.perf_counter() - start, result


def drop_page_cache():
    """Make reads come from the disk (root only); returns whether it worked."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="/tmp/llava-convert-bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    source = os.path.join(args.work_dir, "hf")
    output = os.path.join(args.work_dir, "llava-7b.ckpt")
    copy = os.path.join(args.work_dir, "disk-copy.bin")
    if not os.path.exists(os.path.join(source, "model.safetensors.index.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "bench", "make_synthetic_7b.py"),
                        "--output_dir", source], check=True)
    shards = sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(".safetensors"))
    input_bytes = sum(os.path.getsize(path) for path in shards)

    cold = drop_page_cache()
    read_seconds, _ = timed(["cat", *shards], stdout=subprocess.DEVNULL)
    drop_page_cache()
    write_seconds, _ = timed(["sh", "-c", f'cat "$@" > {copy} && sync {copy}', "sh", *shards])
    os.remove(copy)

    drop_page_cache()
    convert_seconds, result = timed(["/usr/bin/time", "-v", sys.executable, os.path.join(REPO, "convert_weight.py"),
                                     "--model", "llava", "--input_path", source, "--output_path", output,
                                     "--dtype", "float16"])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    output_bytes = os.path.getsize(output)

    gb = 1e9
    print(f"\nsynthetic llava-1.5-7b-hf: {len(shards)} fp16 shards, {input_bytes / gb:.2f} GB in, "
          f"{output_bytes / gb:.2f} GB out (page cache dropped before each step: {cold})")
    print(f"{'step':<34}{'seconds':>10}{'GB/s':>10}{'peak RSS GB':>14}")
    print(f"{'disk: read the shards (cat)':<34}{read_seconds:>10.1f}{input_bytes / gb / read_seconds:>10.2f}{'':>14}")
    print(f"{'disk: read + write them (cat >)':<34}{write_seconds:>10.1f}{input_bytes / gb / write_seconds:>10.2f}"
          f"{'':>14}")
    print(f"{'convert_weight.py --dtype float16':<34}{convert_seconds:>10.1f}{input_bytes / gb / convert_seconds:>10.2f}"
          f"{peak_kb * 1024 / gb:>14.2f}")
    print(f"conversion / disk copy time: {convert_seconds / write_seconds:.2f}")
    os.remove(output)
    if not args.keep:
        shutil.rmtree(args.work_dir)


if __name__ == "__main__":
    main()
