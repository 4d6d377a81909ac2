"""LLaVA-1.5-7B on this CPU: llava-ms against HuggingFace transformers in bfloat16, same files, same run.

    .venv/bin/python bench/bench_7b.py [--rounds 2] [--runs 2] [--folder /tmp/llava-7b-synth]

The files: a full-size synthetic llava-1.5-7b-hf folder (bench/make_synthetic_7b.py: 14.1 GB of float16 in 3
shards, config.json, preprocessor_config.json, tokenizer.model), made when missing. The values are random, so the
answers mean nothing; sizes, files and arithmetic are the real model's.

Systems, each in its own process, one after the other (never two 7B models in memory), alternating for --rounds:

    hf-bf16   transformers LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=bfloat16)
    ours      what `run_mindformer.py --config research/llava/llava1_5_7B/predict_llava1_5_7b.yaml
              --device_target CPU --load_checkpoint FOLDER` does: the shipped YAML, the sizes and vocabulary from
              the folder, the CPU plan (float16 weights, llava-ms kernels)

Both on 2 threads, one image and a ~600-token prompt, greedy, exactly 32 new tokens. Per process: the wall
time from the process start to the first token of its first answer (imports, load, compile, vision, prefill),
then --runs more answers (time to first token, decode tokens/s from the token timestamps of the same call),
and the process's peak RSS. Printed: medians, ours/HF, the host's probes, and the floors: weight bytes per
decode token over the measured read bandwidth, vision + prefill FLOPs over the best measured 16-bit GEMM rate.
"""
import argparse
import os
import subprocess
import sys

import bench_common as common

YAML_7B = os.path.join(common.PLUGIN, "llava1_5_7B", "predict_llava1_5_7b.yaml")
SYSTEMS = ("hf-bf16", "ours")
KEYS = ("ttft_ms", "decode_tok_s")


def prompt_inputs(processor):
    """The same ids and pixels for both systems: our processor (equal to HF's, tests/test_processor.py)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    image = Image.fromarray((np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8))
    inputs = processor([common.QUESTION], [image])
    return inputs["input_ids"][0], inputs["pixel_values"]


def measure(generate, runs, prompt_put):
    """The first answer (its first token's wall clock), then `runs` more."""
    tokens, _, first_token_wall = common.timed_generation(generate, prompt_put)
    rows = [common.timed_generation(generate, prompt_put)[1] for _ in range(runs)]
    return {"first_token_wall": first_token_wall, "rows": rows, "tokens": tokens, "peak_rss_mb": common.peak_rss_mb()}


def run_hf(folder, runs):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import LlavaForConditionalGeneration  # pylint: disable=import-outside-toplevel
    from llava_processor import LlavaProcessor  # pylint: disable=import-outside-toplevel
    from llava_tokenizer import LlavaTokenizer  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(common.THREADS)
    model = LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ids, pixels = prompt_inputs(LlavaProcessor(LlavaTokenizer(os.path.join(folder, "tokenizer.model"))))
    input_ids, pixel_values = torch.tensor([ids]), torch.tensor(pixels).to(torch.bfloat16)

    def generate(streamer):
        return model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=common.NEW_TOKENS,
                              min_new_tokens=common.NEW_TOKENS, do_sample=False, streamer=streamer)[0, len(ids):].tolist()

    with torch.inference_mode():
        return measure(generate, runs, prompt_put=True)


def run_ours(folder, runs, work_dir):
    """run_mindformer.py's own loading path: the YAML checked, the folder's sizes, the CPU plan, the weights."""
    import logging  # pylint: disable=import-outside-toplevel
    from llava_runtime import quiet_logs  # pylint: disable=import-outside-toplevel
    quiet_logs(work_dir)
    import run_mindformer  # pylint: disable=import-outside-toplevel
    from llava_run_config import load_run_config  # pylint: disable=import-outside-toplevel

    run_mindformer.register_plugin(common.PLUGIN)
    config = load_run_config(YAML_7B, flags={"load_checkpoint": folder, "context.device_target": "CPU",
                                             "output_dir": work_dir})
    _, notes = run_mindformer.start_run(config)
    plan = notes[-1][1]  # on CPU the last note is the plan's line
    _, processor = run_mindformer.build_processor(config)
    model = run_mindformer.build_model(config, logging.getLogger("bench"), notes)
    ids, pixels = prompt_inputs(processor)

    def generate(streamer):  # eos -1: exactly NEW_TOKENS tokens, as HF's min_new_tokens does
        return model.generate([ids], pixel_values=pixels, max_new_tokens=common.NEW_TOKENS, eos_token_id=-1,
                              streamer=streamer)[0][len(ids):]

    result = measure(generate, runs, prompt_put=False)
    result["plan"] = plan
    return result


def floors(probes, prompt_length):
    """Weight bytes read per decode token (16-bit decoder + lm_head), and vision + prefill FLOPs."""
    hidden, inner, layers, vocab = 4096, 11008, 32, 32064
    decode_bytes = 2 * (layers * (4 * hidden ** 2 + 3 * hidden * inner) + hidden * vocab)
    tokens_v, hidden_v, inner_v = 577, 1024, 4096
    vision = 23 * 2 * (4 * tokens_v * hidden_v ** 2 + 2 * tokens_v * hidden_v * inner_v + 2 * tokens_v ** 2 * hidden_v)
    vision += 2 * 576 * (hidden_v * hidden + hidden * hidden)  # projector
    s = prompt_length
    prefill = layers * 2 * (4 * s * hidden ** 2 + 3 * s * hidden * inner + s * s * hidden) + 2 * hidden * vocab
    best_16bit = max(rate for name, rate in probes["gflops"].items() if "fp32" not in name)
    return {"decode_bytes": decode_bytes, "decode_ceiling_tok_s": probes["bandwidth_gb_s"] * 1e9 / decode_bytes,
            "prefill_flops": vision + prefill, "ttft_floor_s": (vision + prefill) / best_16bit / 1e9}


def worker_main(args):
    if args.worker == "probes":
        return common.report(common.host_probes())
    if args.worker == "hf-bf16":
        return common.report(run_hf(args.folder, args.runs))
    return common.report(run_ours(args.folder, args.runs, args.work_dir))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default="/tmp/llava-7b-synth", help="a llava-1.5-7b-hf folder (made if missing)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--work-dir", default="/tmp/llava-7b-bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    if not os.path.exists(os.path.join(args.folder, "config.json")):
        subprocess.run([sys.executable, os.path.join(common.REPO, "bench", "make_synthetic_7b.py"),
                        "--output_dir", args.folder], check=True)
    os.makedirs(args.work_dir, exist_ok=True)
    results = {system: [] for system in args.systems}
    for round_index in range(args.rounds):
        for system in args.systems:
            print(f"round {round_index + 1}/{args.rounds}: {system}", file=sys.stderr, flush=True)
            results[system].append(common.run_worker(__file__, ["--worker", system, "--folder", args.folder,
                                                                "--runs", str(args.runs), "--work-dir", args.work_dir]))
    probes = common.run_worker(__file__, ["--worker", "probes", "--folder", args.folder])
    print_report(results, probes)


def print_report(results, probes):
    prompt_length = 576 + 40  # image features + the template and question, about
    floor = floors(probes, prompt_length)
    columns = ("start_to_first_token_s", "ttft_ms", "decode_tok_s", "peak_rss_gb")
    table = {}
    for system, outcomes in results.items():
        rows = [row for outcome in outcomes for row in outcome["rows"]]
        table[system] = common.medians(rows, KEYS)
        table[system]["start_to_first_token_s"] = sorted(o["first_token_wall"] - o["started"] for o in outcomes)[
            len(outcomes) // 2]
        table[system]["peak_rss_gb"] = max(outcome["peak_rss_mb"] for outcome in outcomes) / 1024
    print(f"\nllava-1.5-7b (synthetic weights), ~{prompt_length}-token prompt + {common.NEW_TOKENS} new, "
          f"{common.THREADS} threads, medians")
    print(f"{'system':<12}" + "".join(f"{c:>24}" for c in columns))
    for system, row in table.items():
        print(f"{system:<12}" + "".join(f"{row[c]:>24.2f}" for c in columns))
    if "ours" in table and "hf-bf16" in table:
        print(f"{'ours/hf-bf16':<12}" + "".join(f"{table['ours'][c] / table['hf-bf16'][c]:>24.2f}" for c in columns))
    if "ours" in results:
        print(f"ours ran: {results['ours'][0]['plan']}")
    common.print_probes(probes)
    print(f"floors: decode ceiling {floor['decode_ceiling_tok_s']:.2f} tok/s ({floor['decode_bytes'] / 1e9:.1f} GB of "
          f"16-bit weights per token); vision + prefill {floor['prefill_flops'] / 1e12:.1f} TFLOP -> "
          f"{floor['ttft_floor_s']:.1f} s at the best 16-bit GEMM rate")
    for system, row in table.items():
        print(f"  {system:<10} decode at {row['decode_tok_s'] / floor['decode_ceiling_tok_s']:.0%} of the ceiling, "
              f"vision + prefill at {floor['ttft_floor_s'] * 1000 / row['ttft_ms']:.0%} of its floor")


if __name__ == "__main__":
    main()
