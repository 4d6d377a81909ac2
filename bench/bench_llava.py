"""LLaVA inference speed on this CPU: llava-ms against HuggingFace transformers (torch, fp32 and bf16), one run.

    .venv/bin/python bench/bench_llava.py [--rounds 2] [--runs 3] [--work-dir /tmp/llava-bench]

Builds a random-weight LLaVA with the full CLIP ViT-L/14-336 tower and a LLaMA text model of hidden 1024,
8 layers, 16 heads, intermediate 2816, vocab 32064 (474M parameters), saves it as HF safetensors and converts
it with convert_weight.py. Then each system runs in its own process (so peak RSS is its own), the systems in
alternation for --rounds rounds; each process loads, warms up once and measures --runs times: one image,
a ~600-token prompt, greedy, exactly 32 new tokens, 2 threads. The time to the first token and the decode
rate come from one generate call each run (a streamer timestamps every token: TTFT = first token - start,
decode = 31 tokens / (last token - first token)), so each run gives its own rate. Printed: medians of
vision+projector ms (timed on its own), prefill ms (TTFT - vision), time to first token, decode tokens/s, peak
RSS; ratios ours/HF; whether the fp32 tokens agree; and the floors (FLOPs over the measured matmul rate, decode
bytes over the measured memory bandwidth).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "research", "llava"), REPO]
REFERENCE = os.path.join(REPO, "tests", "data", "llama2_tokenizer.model")
THREADS = 2
NEW_TOKENS = 32
QUESTION = "Describe the image in English, with the colours and the positions of every object you can see:"
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14)
TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32064)
# ours: the default config (vision and prefill op by op, the decode step compiled); ours-compiled:
# compile_prefill True (vision and prefill compiled too: faster prompts, several GB more memory on CPU).
SYSTEMS = ("hf-fp32", "hf-bf16", "ours", "ours-compiled")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------------
# Model files
# ------------------------------------------------------------------------------------------------------------

def build_model_files(work_dir):
    """HF safetensors + our converted checkpoint (kept between runs)."""
    hf_dir = os.path.join(work_dir, "hf")
    checkpoint = os.path.join(work_dir, "llava-bench.ckpt")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        code = f"""
import sys, torch
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
torch.manual_seed(0)
config = LlavaConfig(vision_config=CLIPVisionConfig(**{VISION!r}, hidden_act="quick_gelu", projection_dim=768),
                     text_config=LlamaConfig(**{TEXT!r}, max_position_embeddings=4096, tie_word_embeddings=False),
                     image_token_index=32000, vision_feature_layer=-2, image_seq_length=576, pad_token_id=32001)
model = LlavaForConditionalGeneration(config)
print(sum(p.numel() for p in model.parameters()), "parameters")
model.save_pretrained({hf_dir!r})
"""
        subprocess.run([sys.executable, "-c", code], check=True)
    if not os.path.exists(checkpoint):
        subprocess.run([sys.executable, os.path.join(REPO, "convert_weight.py"), "--model", "llava",
                        "--input_path", hf_dir, "--output_path", checkpoint, "--dtype", "float32"], check=True)
    return hf_dir, checkpoint


def prompt_inputs(image_size):
    """The same ids and pixels for every system: our processor (equal to HF's, see tests/test_processor.py)."""
    import numpy as np
    from PIL import Image
    from llava_processor import LlavaProcessor
    from llava_tokenizer import LlavaTokenizer

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8))
    processor = LlavaProcessor(LlavaTokenizer(REFERENCE), num_image_features=576, image_size=image_size)
    inputs = processor([QUESTION], [image])
    return inputs["input_ids"][0], inputs["pixel_values"]


# ------------------------------------------------------------------------------------------------------------
# Workers: one system each, in their own process
# ------------------------------------------------------------------------------------------------------------

def run_hf(hf_dir, dtype, runs):
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(THREADS)
    ids, pixels = prompt_inputs(336)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch_dtype).eval()
    input_ids = torch.tensor([ids])
    pixel_values = torch.tensor(pixels).to(torch_dtype)

    def vision():
        return model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                              vision_feature_select_strategy="default")

    def generate(streamer):
        return model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)[0, len(ids):].tolist()

    with torch.inference_mode():
        return measure(vision, generate, runs)


def run_ours(checkpoint, runs, compile_prefill):
    import numpy as np
    from llava_runtime import set_up_context
    set_up_context("CPU", mode=1, threads=THREADS)
    import mindspore as ms
    from llava_checkpoint import load_checkpoint_into
    from llava_config import LlavaConfig
    from llava_model import LlavaVlm

    ids, pixels = prompt_inputs(336)
    config = LlavaConfig(vision_config=VISION, text_config=dict(TEXT), seq_length=2048,
                         compile_prefill=compile_prefill)
    model = LlavaVlm(config)
    load_checkpoint_into(model, checkpoint)
    runner = model.runner()
    pixel_tensor = ms.Tensor(pixels)

    def vision():
        return runner.image_features(pixel_tensor).asnumpy()  # as generate runs it

    def generate(streamer):
        # eos -1: exactly NEW_TOKENS tokens, as HF's min_new_tokens does.
        return [int(t) for t in model.generate([ids], pixel_values=pixels, max_new_tokens=NEW_TOKENS,
                                               eos_token_id=-1, streamer=streamer)[0][len(ids):]]

    del np
    return measure(vision, generate, runs, prompt_put=False)


class TokenClock:
    """A streamer (`put` / `end`, as HF's and ours call it) that timestamps every generated token."""

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


def measure(vision, generate, runs, prompt_put=True):
    """Warm-up once, then `runs` times: the vision pass alone, then one generate call whose tokens are
    timestamped (time to first token, and the decode rate over the other NEW_TOKENS - 1 tokens)."""
    vision()
    generate(TokenClock(prompt_put))
    rows = []
    for _ in range(runs):
        start = time.perf_counter()
        vision()
        vision_ms = (time.perf_counter() - start) * 1000
        clock = TokenClock(prompt_put)
        start = time.perf_counter()
        tokens = generate(clock)
        if len(clock.times) != NEW_TOKENS:
            raise RuntimeError(f"expected {NEW_TOKENS} token timestamps, got {len(clock.times)}")
        first_ms = (clock.times[0] - start) * 1000
        rows.append({"vision_ms": vision_ms, "prefill_ms": first_ms - vision_ms, "ttft_ms": first_ms,
                     "decode_tok_s": (NEW_TOKENS - 1) / (clock.times[-1] - clock.times[0])})
    return {"rows": rows, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------------------------
# Floors
# ------------------------------------------------------------------------------------------------------------

def floors(prompt_length):
    """The machine's measured matmul rate and memory bandwidth (the best MindSpore or torch reaches here, 2
    threads) and the work they bound: FLOPs of vision and prefill, bytes read per decode token."""
    from llava_runtime import set_up_context
    set_up_context("CPU", mode=1, threads=THREADS)
    import numpy as np
    import mindspore as ms
    import torch
    from mindspore import ops

    torch.set_num_threads(THREADS)

    def best_of(fn, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    # GEMM at the vision MLP's shape.
    a, b = np.random.rand(577, 1024).astype(np.float32), np.random.rand(1024, 4096).astype(np.float32)
    flops = 2 * 577 * 1024 * 4096
    matmul, a_ms, b_ms = ops.MatMul(), ms.Tensor(a), ms.Tensor(b)
    a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
    gflops = {"mindspore": flops / best_of(lambda: matmul(a_ms, b_ms).asnumpy()) / 1e9,
              "torch": flops / best_of(lambda: a_torch @ b_torch) / 1e9}
    # Read bandwidth: a sum over 512 MB (16x the L3 cache), both threads.
    values = torch.rand(128 * 1024 * 1024)
    bandwidth = values.numel() * 4 / best_of(values.sum) / 1e9

    hidden_v, inner_v, tokens_v = VISION["hidden_size"], VISION["intermediate_size"], 577
    vision_layers = VISION["num_hidden_layers"] - 1  # the last layer's output is never used
    vision_flops = vision_layers * 2 * (4 * tokens_v * hidden_v ** 2 + 2 * tokens_v * hidden_v * inner_v
                                        + 2 * tokens_v ** 2 * hidden_v)
    vision_flops += 2 * 576 * (3 * 14 * 14) * hidden_v + 2 * 576 * (hidden_v * 1024 + 1024 * 1024)  # patches, projector
    hidden, inner, layers, vocab = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_hidden_layers"], TEXT["vocab_size"]
    s = prompt_length
    prefill_flops = layers * 2 * (4 * s * hidden ** 2 + 3 * s * hidden * inner + s * s * hidden) + 2 * hidden * vocab
    decode_bytes = 4 * (layers * (4 * hidden ** 2 + 3 * hidden * inner + 2 * hidden) + hidden * vocab + hidden)
    return {"gflops": max(gflops.values()), "gflops_by_library": gflops, "bandwidth_gb_s": bandwidth,
            "vision_flops": vision_flops,
            "prefill_flops": prefill_flops, "decode_bytes": decode_bytes}


# ------------------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------------------

def worker_main(args):
    if args.worker == "floors":
        result = floors(args.prompt_length)
    elif args.worker.startswith("hf-"):
        result = run_hf(args.hf_dir, args.worker.split("-")[1], args.runs)
    else:
        result = run_ours(args.checkpoint, args.runs, compile_prefill=args.worker == "ours-compiled")
    print("RESULT " + json.dumps(result), flush=True)


def launch(args, worker, hf_dir, checkpoint, prompt_length=0):
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), GLOG_v="3")
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--runs", str(args.runs),
               "--hf-dir", hf_dir, "--checkpoint", checkpoint, "--prompt-length", str(prompt_length)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.split("RESULT ", 1)[1])


def summarize(results):
    keys = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s")
    table = {}
    for system, outcomes in results.items():
        rows = [row for outcome in outcomes for row in outcome["rows"]]
        table[system] = {key: statistics.median(row[key] for row in rows) for key in keys}
        table[system]["peak_rss_mb"] = max(outcome["peak_rss_mb"] for outcome in outcomes)
    return table


def print_report(table, floor, tokens_agree, prompt_length):
    columns = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb")
    print(f"\nprompt {prompt_length} tokens + {NEW_TOKENS} new, {THREADS} threads, medians")
    print(f"{'system':<22}" + "".join(f"{c:>15}" for c in columns))
    for system, row in table.items():
        print(f"{system:<22}" + "".join(f"{row[c]:>15.1f}" for c in columns))
    for variant in ("ours", "ours-compiled"):
        for peer in ("hf-fp32", "hf-bf16"):
            if variant in table and peer in table:
                label = f"{variant}/{peer}"
                print(f"{label:<22}" + "".join(f"{table[variant][c] / table[peer][c]:>15.2f}" for c in columns))
    print(f"\nfp32 tokens identical (ours vs HF): {tokens_agree}")
    vision_floor = floor["vision_flops"] / floor["gflops"] / 1e6
    prefill_floor = floor["prefill_flops"] / floor["gflops"] / 1e6
    decode_ceiling = floor["bandwidth_gb_s"] * 1e9 / floor["decode_bytes"]
    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in floor["gflops_by_library"].items())
    print(f"matmul rate (577x1024x4096 GEMM): {rates} GFLOP/s; read bandwidth {floor['bandwidth_gb_s']:.1f} GB/s")
    print(f"floors: vision {vision_floor:.0f} ms, prefill {prefill_floor:.0f} ms, TTFT {vision_floor + prefill_floor:.0f} ms; "
          f"decode ceiling {decode_ceiling:.0f} tok/s ({floor['decode_bytes'] / 1e6:.0f} MB of fp32 weights per token)")
    for system, row in table.items():
        print(f"  {system:<16} vision at {vision_floor / row['vision_ms']:.0%} of its floor, prefill "
              f"{prefill_floor / row['prefill_ms']:.0%}, decode {row['decode_tok_s'] / decode_ceiling:.0%} of the "
              f"fp32 ceiling")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work-dir", default="/tmp/llava-bench")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-length", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    os.makedirs(args.work_dir, exist_ok=True)
    hf_dir, checkpoint = build_model_files(args.work_dir)
    results = {system: [] for system in args.systems}
    for round_index in range(args.rounds):
        for system in args.systems:
            print(f"round {round_index + 1}/{args.rounds}: {system}", file=sys.stderr, flush=True)
            results[system].append(launch(args, system, hf_dir, checkpoint))
    prompt_length = len(prompt_inputs(336)[0])
    floor = launch(args, "floors", hf_dir, checkpoint, prompt_length)
    table = summarize(results)
    agree = None
    if "hf-fp32" in results and "ours" in results:
        agree = all(outcome["tokens"] == results["hf-fp32"][0]["tokens"]
                    for outcome in results["ours"] + results.get("ours-compiled", []))
    print_report(table, floor, agree, prompt_length)
    return None


if __name__ == "__main__":
    main()
