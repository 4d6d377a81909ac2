"""serve.py under load on this CPU: requests/s, tokens/s and time to first token for 1, 4 and 16 concurrent
clients, the image-feature cache's effect on a follow-up question, and one question through the batch command.

    .venv/bin/python bench/bench_serve.py [--work-dir /tmp/llava-bench] [--port 8431] [--rounds 3]

The model is bench_llava.py's 474M-parameter LLaVA (full CLIP ViT-L/14-336 tower, 8-layer LLaMA text model,
random weights; an HF folder built there and kept in --work-dir, served as it is) with the 7B YAML's CPU
defaults (16-bit weights through llava-ms's kernels), a 768-token context and 16 cache rows (16 x 768 positions:
0.4 GB of float16 KV cache). Each request: one picture (576 image tokens), a ~30-token question, 32 new tokens
exactly (ignore_eos), greedy, streamed; its time to first token is the first content chunk. Clients run closed
loops (the next request when the answer is complete), from one asyncio thread. The throughput requests all
ask about one picture, asked about once before: they continue its cached prefix.

Printed: the host's own probes (GEMM rates, read bandwidth: bench_common.py's), then per concurrency level
requests/s, generated tokens/s, p50/p95 time to first token and the mean rows per decode step (medians over
--rounds rounds of all levels in turn; the 16-vs-1 ratio within each round, and its median); the first
question about a new picture against a follow-up about it (its prefix and features cached); and the wall time of
run_mindformer.py answering one question (process start, load, compile, answer) for comparison.
"""
import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import yaml
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "bench"), os.path.join(REPO, "research", "llava"), REPO]
import bench_common as common  # noqa: E402  pylint: disable=wrong-import-position
import bench_llava  # noqa: E402  pylint: disable=wrong-import-position

YAML_7B = os.path.join(REPO, "research", "llava", "llava1_5_7B", "predict_llava1_5_7b.yaml")
CONTEXT = 768
MAX_BATCH = 16
NEW_TOKENS = 32
QUESTIONS = ["Describe the image in English, with the colours and the positions of every object you can see:",
             "What is in the top left corner of this picture, and what colour is it? Answer in one sentence:",
             "Count the objects in the image and say which one is the largest, and where it is placed:",
             "Is this photo taken indoors or outdoors? Explain what in the picture tells you so, briefly:"]
LEVELS = ((1, 3), (4, 2), (16, 1))  # (concurrent clients, requests each)
MODEL_NAME = "hf"  # serve.py names the model after the checkpoint: bench_llava's folder


def write_yaml(work_dir):
    """The 7B YAML with a CONTEXT-token context and the LLaMA-2 tokenizer (the model's sizes come from the HF
    folder, the dtypes and compiling from the CPU plan, as for any run)."""
    with open(YAML_7B, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config["model"]["model_config"]["seq_length"] = CONTEXT
    config["processor"]["max_length"] = CONTEXT  # the YAML ties the two with an alias, which loading resolves
    config["processor"]["tokenizer"]["vocab_file"] = common.TOKENIZER
    path = os.path.join(work_dir, "serve_bench.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    return path


def picture(seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def ask_async(client, url, image_url, question):
    """One streamed request -> (time to first token s, total s, generated tokens)."""
    body = {"model": MODEL_NAME, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": question}]}]}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
    return first - start, time.perf_counter() - start, tokens


async def closed_loops(url, image_url, clients, each):
    """`clients` closed loops of `each` requests, from one thread (asyncio: on a 2-core host, 16 client threads
    contending for the GIL would take CPU time from the server they measure) -> [[result of ask_async]]."""
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients)) as client:
        async def loop(k):
            return [await ask_async(client, url, image_url, QUESTIONS[(k + i) % 4]) for i in range(each)]
        return await asyncio.gather(*(loop(k) for k in range(clients)))


def ask(url, image_url, question):
    """One request alone -> ask_async's result."""
    async def one():
        async with httpx.AsyncClient(timeout=900) as client:
            return await ask_async(client, url, image_url, question)
    return asyncio.run(one())


def load(url, image_url, clients, each):
    """`clients` closed loops of `each` requests -> a row of the table."""
    before = httpx.get(url + "/metrics").json()
    start = time.perf_counter()
    results = asyncio.run(closed_loops(url, image_url, clients, each))
    wall = time.perf_counter() - start
    after = httpx.get(url + "/metrics").json()
    done = [result for loop in results for result in loop]
    ttfts = sorted(ttft for ttft, _, _ in done)
    steps = after["decode_steps"] - before["decode_steps"]
    return {"clients": clients, "requests": len(done), "wall_s": wall, "requests_s": len(done) / wall,
            "tokens_s": sum(tokens for *_, tokens in done) / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))],
            "rows_per_step": (after["decode_rows"] - before["decode_rows"]) / steps if steps else 0.0}


def start_server(args, yaml_path, checkpoint, log):
    command = [sys.executable, os.path.join(REPO, "serve.py"), "--config", yaml_path, "--register_path",
               os.path.join(REPO, "research", "llava"), "--load_checkpoint", checkpoint, "--device_target", "CPU",
               "--port", str(args.port), "--max-batch-size", str(MAX_BATCH),
               "--output_dir", tempfile.mkdtemp(prefix="serve_output", dir=args.work_dir)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=args.work_dir,
                               env=dict(os.environ, OMP_NUM_THREADS=str(common.THREADS)))
    url = f"http://127.0.0.1:{args.port}"
    started = time.perf_counter()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("serve.py exited; see its log")
        time.sleep(1)


def command_line_seconds(args, yaml_path, checkpoint, image):
    """run_mindformer.py answering one question, from process start to exit."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "picture.png")
        image.save(path)
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(REPO, "run_mindformer.py"), "--config", yaml_path,
                        "--register_path", os.path.join(REPO, "research", "llava"), "--run_mode", "predict",
                        "--load_checkpoint", checkpoint, "--device_target", "CPU", "--modal_type", "image", "text",
                        "--predict_data", path,
                        QUESTIONS[0], "--output_dir", directory, "--options",
                        f"model.model_config.max_new_tokens={NEW_TOKENS}"], check=True, capture_output=True,
                       cwd=directory)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="/tmp/llava-bench")
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--rounds", type=int, default=3, help="times each concurrency level runs (medians)")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint = bench_llava.build_model_files(args.work_dir)
    assert os.path.basename(checkpoint) == MODEL_NAME
    yaml_path = write_yaml(args.work_dir)
    probes = common.run_worker(bench_llava.__file__, ["--worker", "probes"])

    with open(os.path.join(args.work_dir, "serve.log"), "w", encoding="utf-8") as log:
        process, url, ready_s = start_server(args, yaml_path, checkpoint, log)
        try:
            _, shared_url = picture(0)
            ask(url, shared_url, QUESTIONS[0])  # the shared picture's features into the cache
            rounds = [[load(url, shared_url, clients, each) for clients, each in LEVELS] for _ in range(args.rounds)]
            first, follow = [], []
            for seed in (1, 2, 3):
                _, fresh = picture(seed)
                first.append(ask(url, fresh, QUESTIONS[0])[0])
                follow.append(ask(url, fresh, QUESTIONS[1])[0])
            cache = httpx.get(url + "/metrics").json()["prefix_cache"]
        finally:
            process.terminate()
            process.wait(timeout=120)
    batch_command_s = command_line_seconds(args, yaml_path, checkpoint, picture(1)[0])

    common.print_probes(probes)
    print(f"serve.py ready (load + warm-up compiles) after {ready_s:.1f} s; context {CONTEXT}, {MAX_BATCH} rows; "
          f"each request: 1 picture + ~30-token question (~610 prompt tokens), {NEW_TOKENS} new tokens\n")
    print(f"{'clients':>8}{'requests':>10}{'wall_s':>9}{'req/s':>9}{'tok/s':>9}{'ttft_p50_s':>12}{'ttft_p95_s':>12}"
          f"{'rows/step':>11}   (medians of {args.rounds} rounds; requests and wall per round)")
    for level in range(len(LEVELS)):
        runs = [round_rows[level] for round_rows in rounds]
        row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{row['clients']:>8.0f}{row['requests']:>10.0f}{row['wall_s']:>9.1f}{row['requests_s']:>9.3f}"
              f"{row['tokens_s']:>9.1f}{row['ttft_p50_s']:>12.2f}{row['ttft_p95_s']:>12.2f}"
              f"{row['rows_per_step']:>11.2f}")
    ratios = [round_rows[-1]["tokens_s"] / round_rows[0]["tokens_s"] for round_rows in rounds]
    print(f"\ntokens/s, 16 clients / 1 client, per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")
    print(f"time to first token, new picture: {', '.join(f'{t:.2f}' for t in first)} s; follow-up about it "
          f"(cached prefix): {', '.join(f'{t:.2f}' for t in follow)} s; median ratio "
          f"{statistics.median(first) / statistics.median(follow):.2f}x; prefix cache {cache['hits']} hits / "
          f"{cache['misses']} misses")
    print(f"run_mindformer.py, one question (process start, load, compile, answer): {batch_command_s:.1f} s")


if __name__ == "__main__":
    main()
