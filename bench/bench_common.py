"""What the LLaVA benchmarks share: timing a generate call token by token, the peak memory of a process, and the
host's own probes (read bandwidth, matmul rates) printed beside every table: this host is shared and its speed
drifts, so a table is read against the probes taken in the same run."""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "research", "llava")
sys.path[:0] = [PLUGIN, REPO]
TOKENIZER = os.path.join(REPO, "tests", "data", "llama2_tokenizer.model")
THREADS = 2
NEW_TOKENS = 32
QUESTION = "Describe the image in English, with the colours and the positions of every object you can see:"


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TokenClock:
    """A streamer (`put` / `end`, as HF's generate and ours call it) that timestamps every generated token."""

    def __init__(self, prompt_put):
        self.skip = 1 if prompt_put else 0  # HF's generate first puts the prompt itself
        self.times = []

    def put(self, _):
        if self.skip:
            self.skip -= 1
        else:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def timed_generation(generate, prompt_put):
    """One `generate(streamer)` call: (tokens, {"ttft_ms", "decode_tok_s"}, wall-clock time of the first token).

    Time to first token from the call; decode rate over the NEW_TOKENS - 1 tokens after the first, from their
    timestamps: both from the same call, so each run gives its own rate."""
    clock = TokenClock(prompt_put)
    start = time.perf_counter()
    tokens = generate(clock)
    if len(clock.times) != NEW_TOKENS:
        raise RuntimeError(f"expected {NEW_TOKENS} token timestamps, got {len(clock.times)}")
    first_token_wall = time.time() - (time.perf_counter() - clock.times[0])
    return tokens, {"ttft_ms": (clock.times[0] - start) * 1000,
                    "decode_tok_s": (NEW_TOKENS - 1) / (clock.times[-1] - clock.times[0])}, first_token_wall


def medians(rows, keys):
    return {key: statistics.median(row[key] for row in rows) for key in keys}


def run_worker(script, arguments, threads=THREADS):
    """Run `script --worker ...` in a fresh process; returns its RESULT json plus "started": the wall clock just
    before the process was made (for times measured from the process start)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOG_v="3")
    started = time.time()
    process = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, env=env)
    if process.returncode != 0 or "RESULT " not in process.stdout:
        raise RuntimeError(f"{script} {' '.join(arguments)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.split("RESULT ", 1)[1])
    result["started"] = started
    return result


def report(result):
    print("RESULT " + json.dumps(result), flush=True)


def best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def host_probes(gemm=(600, 4096, 4096)):
    """The host's read bandwidth (a sum over 2 GB, larger than any cache here) and matmul rates at `gemm`
    (M, K, N): torch float32 and bfloat16 (oneDNN), MindSpore's float32 MatMul and llava-ms's kernel with a
    float16 weight (the prompt path)."""
    from llava_runtime import set_up_context  # pylint: disable=import-outside-toplevel
    set_up_context("CPU", mode=1, threads=THREADS)
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from mindspore import ops  # pylint: disable=import-outside-toplevel
    import llava_kernels  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(THREADS)
    m, k, n = gemm
    flops = 2 * m * k * n
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(n, k).astype(np.float32)
    rates = {}
    # Ours and MindSpore's first: torch's OpenMP threads keep spinning for a while after its own products.
    if llava_kernels.available():
        b16 = b.astype(np.float16)
        rates["llava kernels fp16 weight"] = flops / best_of(lambda: llava_kernels.matmul_numpy(a, b16)) / 1e9
    matmul, a_ms, b_ms = ops.MatMul(transpose_b=True), ms.Tensor(a), ms.Tensor(b)
    rates["mindspore fp32"] = flops / best_of(lambda: matmul(a_ms, b_ms).asnumpy()) / 1e9
    a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
    b_bf16 = b_torch.bfloat16()  # as HF holds its weights
    rates["torch fp32"] = flops / best_of(lambda: a_torch @ b_torch.T) / 1e9
    rates["torch bf16"] = flops / best_of(lambda: a_torch.bfloat16() @ b_bf16.T) / 1e9
    values = torch.rand(512 * 1024 * 1024)  # 2 GB of float32
    bandwidth = values.numel() * 4 / best_of(values.sum, repeats=3) / 1e9
    return {"gemm": f"{m}x{k}x{n}", "gflops": rates, "bandwidth_gb_s": bandwidth,
            "kernels": llava_kernels.describe()}


def print_probes(probes):
    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in probes["gflops"].items())
    print(f"host probes: read bandwidth {probes['bandwidth_gb_s']:.1f} GB/s; GEMM {probes['gemm']} GFLOP/s: {rates}")
    print(f"llava-ms kernels: {probes['kernels']}")
