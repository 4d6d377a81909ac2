"""LLaVA inference speed on this CPU: llava-ms against HuggingFace transformers (torch, fp32 and bf16), one run.

    .venv/bin/python bench/bench_llava.py [--rounds 2] [--runs 3] [--work-dir /tmp/llava-bench]

Builds a random-weight LLaVA with the full CLIP ViT-L/14-336 tower and a LLaMA text model of hidden 1024,
8 layers, 16 heads, intermediate 2816, vocab 32064 (474M parameters) and saves it as an HF folder, which every
system loads as it is. Each system runs in its own process (so peak RSS is its own), the systems in alternation
for --rounds rounds; each process loads, answers once to warm up, then measures --runs times: the vision pass
alone, then one generate call (one image, a ~600-token prompt, greedy, exactly 32 new tokens, 2 threads) whose
tokens are timestamped: time to first token from the call, decode tokens/s over the other 31 tokens. Printed:
medians of vision ms, prefill ms (time to first token minus the vision pass), time to first token, decode
tokens/s, peak RSS; ratios; whether float32 tokens agree with HF's; the host's probes and the floors.

    hf-fp32, hf-bf16   transformers, float32 / bfloat16 weights and arithmetic
    ours               the CPU defaults: float16 weights (as the 7B YAML has them), llava-ms's kernels
    ours-fp32          float32 weights through the same kernels (its tokens must be HF fp32's)
"""
import argparse
import os
import subprocess
import sys
import time

import bench_common as common

VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14)
TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32064)
SYSTEMS = ("hf-fp32", "hf-bf16", "ours", "ours-fp32")
KEYS = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s")


def build_model_files(work_dir):
    """The HF folder (kept between runs)."""
    hf_dir = os.path.join(work_dir, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        code = f"""
import torch
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
    return hf_dir


def prompt_inputs():
    """The same ids and pixels for every system: our processor (equal to HF's, see tests/test_processor.py)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from llava_processor import LlavaProcessor  # pylint: disable=import-outside-toplevel
    from llava_tokenizer import LlavaTokenizer  # pylint: disable=import-outside-toplevel

    image = Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8))
    inputs = LlavaProcessor(LlavaTokenizer(common.TOKENIZER), num_image_features=576, image_size=336)([common.QUESTION],
                                                                                                      [image])
    return inputs["input_ids"][0], inputs["pixel_values"]


def measure(vision, generate, runs, prompt_put):
    """Warm up once, then `runs` times: the vision pass alone, then one timestamped generate call."""
    vision()
    common.timed_generation(generate, prompt_put)
    rows = []
    for _ in range(runs):
        start = time.perf_counter()
        vision()
        vision_ms = (time.perf_counter() - start) * 1000
        tokens, row, _ = common.timed_generation(generate, prompt_put)
        rows.append(dict(row, vision_ms=vision_ms, prefill_ms=row["ttft_ms"] - vision_ms))
    return {"rows": rows, "tokens": tokens, "peak_rss_mb": common.peak_rss_mb()}


def run_hf(hf_dir, dtype, runs):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import LlavaForConditionalGeneration  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(common.THREADS)
    ids, pixels = prompt_inputs()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch_dtype).eval()
    input_ids = torch.tensor([ids])
    pixel_values = torch.tensor(pixels).to(torch_dtype)

    def vision():
        return model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                              vision_feature_select_strategy="default")

    def generate(streamer):
        return model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=common.NEW_TOKENS,
                              min_new_tokens=common.NEW_TOKENS, do_sample=False, streamer=streamer)[0, len(ids):].tolist()

    with torch.inference_mode():
        return measure(vision, generate, runs, prompt_put=True)


def run_ours(hf_dir, runs, weights):
    from llava_runtime import set_up_context  # pylint: disable=import-outside-toplevel
    set_up_context("CPU", mode=1, threads=common.THREADS)
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from llava_config import LlavaConfig  # pylint: disable=import-outside-toplevel
    from llava_model import LlavaVlm  # pylint: disable=import-outside-toplevel
    from llava_weights import load_weights  # pylint: disable=import-outside-toplevel

    ids, pixels = prompt_inputs()
    model = LlavaVlm(LlavaConfig(vision_config=VISION, text_config=dict(TEXT), seq_length=2048,
                                 param_init_type=weights))
    load_weights(model, hf_dir)
    runner = model.runner()
    pixel_tensor = ms.Tensor(pixels)

    def vision():
        return runner.image_features(pixel_tensor).asnumpy()  # as generate runs it

    def generate(streamer):  # eos -1: exactly NEW_TOKENS tokens, as HF's min_new_tokens does
        return [int(t) for t in model.generate([ids], pixel_values=pixels, max_new_tokens=common.NEW_TOKENS,
                                               eos_token_id=-1, streamer=streamer)[0][len(ids):]]

    return measure(vision, generate, runs, prompt_put=False)


def floors(probes, prompt_length):
    """FLOPs of vision and prefill, bytes of weights read per decode token (16-bit and float32)."""
    hidden_v, inner_v, tokens_v = VISION["hidden_size"], VISION["intermediate_size"], 577
    vision_layers = VISION["num_hidden_layers"] - 1  # the last layer's output is never used
    vision = vision_layers * 2 * (4 * tokens_v * hidden_v ** 2 + 2 * tokens_v * hidden_v * inner_v
                                  + 2 * tokens_v ** 2 * hidden_v)
    vision += 2 * 576 * (3 * 14 * 14) * hidden_v + 2 * 576 * (hidden_v * 1024 + 1024 * 1024)  # patches, projector
    hidden, inner, layers, vocab = (TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_hidden_layers"],
                                    TEXT["vocab_size"])
    s = prompt_length
    prefill = layers * 2 * (4 * s * hidden ** 2 + 3 * s * hidden * inner + s * s * hidden) + 2 * hidden * vocab
    weights = layers * (4 * hidden ** 2 + 3 * hidden * inner) + hidden * vocab
    best_16bit = max(rate for name, rate in probes["gflops"].items() if "fp32" not in name)
    return {"vision_ms": vision / best_16bit / 1e6, "prefill_ms": prefill / best_16bit / 1e6,
            "ceiling_16bit": probes["bandwidth_gb_s"] * 1e9 / (2 * weights),
            "ceiling_fp32": probes["bandwidth_gb_s"] * 1e9 / (4 * weights), "weights": weights}


def print_report(results, probes, prompt_length):
    table = {}
    for system, outcomes in results.items():
        table[system] = common.medians([row for outcome in outcomes for row in outcome["rows"]], KEYS)
        table[system]["peak_rss_mb"] = max(outcome["peak_rss_mb"] for outcome in outcomes)
    columns = (*KEYS, "peak_rss_mb")
    print(f"\nprompt {prompt_length} tokens + {common.NEW_TOKENS} new, {common.THREADS} threads, medians")
    print(f"{'system':<16}" + "".join(f"{c:>15}" for c in columns))
    for system, row in table.items():
        print(f"{system:<16}" + "".join(f"{row[c]:>15.1f}" for c in columns))
    for ours in ("ours", "ours-fp32"):
        for peer in ("hf-bf16", "hf-fp32"):
            if ours in table and peer in table:
                print(f"{ours + '/' + peer:<16}" + "".join(f"{table[ours][c] / table[peer][c]:>15.2f}" for c in columns))
    if "ours-fp32" in results and "hf-fp32" in results:
        agree = all(o["tokens"] == results["hf-fp32"][0]["tokens"] for o in results["ours-fp32"])
        print(f"\nfloat32 tokens identical (ours-fp32 vs hf-fp32): {agree}")
    common.print_probes(probes)
    floor = floors(probes, prompt_length)
    print(f"floors at the best 16-bit GEMM rate: vision {floor['vision_ms']:.0f} ms, prefill {floor['prefill_ms']:.0f} ms; "
          f"decode ceiling {floor['ceiling_16bit']:.0f} tok/s with 16-bit weights, {floor['ceiling_fp32']:.0f} with "
          f"float32 ({floor['weights'] / 1e6:.0f}M decoder + lm_head weights read per token)")


def worker_main(args):
    if args.worker == "probes":
        return common.report(common.host_probes(gemm=(577, 1024, 4096)))
    if args.worker.startswith("hf-"):
        return common.report(run_hf(args.hf_dir, args.worker.split("-")[1], args.runs))
    return common.report(run_ours(args.hf_dir, args.runs, "float32" if args.worker == "ours-fp32" else "float16"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work-dir", default="/tmp/llava-bench")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    os.makedirs(args.work_dir, exist_ok=True)
    hf_dir = build_model_files(args.work_dir)
    results = {system: [] for system in args.systems}
    for round_index in range(args.rounds):
        for system in args.systems:
            print(f"round {round_index + 1}/{args.rounds}: {system}", file=sys.stderr, flush=True)
            results[system].append(common.run_worker(__file__, ["--worker", system, "--runs", str(args.runs),
                                                                "--hf-dir", hf_dir]))
    probes = common.run_worker(__file__, ["--worker", "probes"])
    print_report(results, probes, len(prompt_inputs()[0]))
    return None


if __name__ == "__main__":
    main()
