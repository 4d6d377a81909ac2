"""Write a synthetic, full-size llava-1.5-7b-hf checkpoint in the hub layout, for benchmarks.

Every one of the 686 tensors of `llava-hf/llava-1.5-7b-hf` is written under its hub name and shape (taken
from the reference key list), in float16, split over 3 shards with `model.safetensors.index.json` and a
hub-like `config.json`, `preprocessor_config.json` and LLaMA-2's `tokenizer.model`: about 14 GB, exactly the
sizes and files a converter or `run_mindformer.py --load_checkpoint` meets with the real folder.

The values are one small random block repeated, written tensor by tensor straight to disk, so the
generator needs a few MB of memory and runs at disk speed. The values mean nothing; only sizes, names and
file layout matter for measuring time and memory.

    python bench/make_synthetic_7b.py --output_dir /tmp/llava-7b-synth
    /usr/bin/time -v python convert_weight.py --model llava --input_path /tmp/llava-7b-synth \
        --output_path /tmp/llava-7b.ckpt --dtype float16
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_KEYS = os.path.join(REPO, "tests", "data", "hf_llava15_7b_keys.tsv")
BLOCK_VALUES = 1 << 20  # 2 MB of float16, repeated

# The hub's config.json for llava-1.5-7b-hf: sparse text_config (transformers fills LLaMA-2-7B defaults).
HUB_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
# The hub's preprocessor_config.json (CLIPImageProcessor at 336 px).
HUB_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
DEFAULT_TOKENIZER = os.path.join(REPO, "tests", "data", "llama2_tokenizer.model")  # LLaMA-2's vocabulary


def read_keys(path):
    """[(hub name, shape)] from the reference TSV (name, JSON shape, v5 name; '#' starts a comment)."""
    keys = []
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, shape = line.rstrip("\n").split("\t")[:2]
                keys.append((name, tuple(json.loads(shape))))
    return keys


def split_shards(keys, count, itemsize=2):
    """Consecutive groups of tensors of about equal byte size, like the hub's shards."""
    total = sum(math.prod(shape) * itemsize for _, shape in keys)
    shards, current, size = [], [], 0
    for name, shape in keys:
        current.append((name, shape))
        size += math.prod(shape) * itemsize
        if size >= total * (len(shards) + 1) / count and len(shards) < count - 1:
            shards.append(current)
            current = []
    shards.append(current)
    return shards


def write_shard(path, tensors, block):
    """One safetensors file, written tensor by tensor from the repeated block."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, shape in tensors:
            remaining = math.prod(shape) * 2
            while remaining:
                step = min(remaining, len(block))
                f.write(block[:step])
                remaining -= step
    return offset + 8 + len(header_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--keys", default=DEFAULT_KEYS, help="reference key list (TSV)")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keys = read_keys(args.keys)
    os.makedirs(args.output_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    block = memoryview((rng.standard_normal(BLOCK_VALUES) * 0.02).astype(np.float16).tobytes())
    started, total, weight_map = time.monotonic(), 0, {}
    shards = split_shards(keys, args.shards)
    for index, tensors in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(os.path.join(args.output_dir, file_name), tensors, block)
        weight_map.update({name: file_name for name, _ in tensors})
        print(f"wrote {file_name}: {len(tensors)} tensors", file=sys.stderr)
    parameters = sum(math.prod(shape) for _, shape in keys)
    with open(os.path.join(args.output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": parameters * 2}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(args.output_dir, "config.json"), "w") as f:
        json.dump(HUB_CONFIG, f, indent=2)
    with open(os.path.join(args.output_dir, "preprocessor_config.json"), "w") as f:
        json.dump(HUB_PREPROCESSOR, f, indent=2)
    shutil.copyfile(DEFAULT_TOKENIZER, os.path.join(args.output_dir, "tokenizer.model"))
    print(f"{args.output_dir}: {len(keys)} tensors, {parameters:,} parameters, {total / 1e9:.2f} GB "
          f"in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
