"""MindFormers-style command line for LLaVA-1.5.

    python run_mindformer.py --config research/llava/llava1_5_7B/predict_llava1_5_7b.yaml \
        --register_path research/llava --run_mode predict \
        --predict_data demo.jpeg 'Describe the image in English:' --modal_type image text \
        --load_checkpoint llava.ckpt --use_parallel False --auto_trans_ckpt False

`--run_mode finetune` trains instead, with the trainer the YAML's `trainer:` section names (the bundled tiny
model's is demo/train_llava.py):

    python run_mindformer.py --config demo/llava_tiny/finetune_llava_tiny.yaml \
        --register_path research/llava --run_mode finetune

Classes come from the YAML's `type:` / `auto_register:` keys through MindFormers' registry. Each answer is
printed, and OUTPUT_DIR/predict_results.jsonl gets one object per input:
{"image", "prompt", "text", "token_ids"} (token_ids: the generated ids only).
"""
import argparse
import json
import logging
import os
import sys
import time
import traceback

import yaml



def str_to_bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML file")
    parser.add_argument("--register_path", default=None,
                        help="directory of the plugin's modules (auto_register keys resolve there)")
    parser.add_argument("--run_mode", default=None, choices=["predict", "finetune"],
                        help="predict: answer --predict_data; finetune: train as the YAML says (train_llava.py)")
    parser.add_argument("--predict_data", nargs="+", default=None,
                        help="inputs in the order of --modal_type, repeated per example: IMAGE TEXT [IMAGE TEXT ...]")
    parser.add_argument("--modal_type", nargs="+", default=None, help="modality of each item: image text")
    parser.add_argument("--load_checkpoint", default=None, help="a .ckpt file, or a directory holding one")
    parser.add_argument("--use_parallel", type=str_to_bool, default=None)
    parser.add_argument("--auto_trans_ckpt", type=str_to_bool, default=None)
    parser.add_argument("--device_target", default=None, choices=["CPU", "Ascend", "GPU"])
    parser.add_argument("--mode", type=int, default=None, choices=[0, 1], help="0 graph, 1 PyNative")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--predict_batch_size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override YAML values by dotted path, e.g. model.model_config.seq_length=1024")
    parser.add_argument("--verbose", action="store_true", help="MindSpore/MindFormers logs and tracebacks")
    return parser.parse_args(argv)


def set_by_path(config, dotted_key, value):
    """config['a']['b']['c'] = value for 'a.b.c'; missing levels are created."""
    *parents, last = dotted_key.split(".")
    node = config
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[last] = value


def load_config(args):
    """The YAML with --options and the command-line flags applied (flags win)."""
    from mindformers.tools.register import MindFormerConfig

    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file not found: {args.config}")
    config = MindFormerConfig(args.config)
    for option in args.options:
        if "=" not in option:
            raise ValueError(f"--options takes KEY=VALUE, got {option!r}")
        key, raw = option.split("=", 1)
        set_by_path(config, key, yaml.safe_load(raw))
    flags = {"run_mode": args.run_mode, "load_checkpoint": args.load_checkpoint, "use_parallel": args.use_parallel,
             "auto_trans_ckpt": args.auto_trans_ckpt, "output_dir": args.output_dir, "seed": args.seed,
             "context.device_target": args.device_target, "context.mode": args.mode,
             "model.model_config.batch_size": args.predict_batch_size}
    for key, value in flags.items():
        if value is not None:
            set_by_path(config, key, value)
    return config


def register_plugin(register_path):
    """Make `auto_register: module.Class` keys resolvable, and the plugin's sibling imports work."""
    if not register_path:
        return
    path = os.path.realpath(register_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--register_path is not a directory: {register_path}")
    os.environ["REGISTER_PATH"] = path
    sys.path.insert(0, path)


def predict_examples(predict_data, modal_type):
    """Group --predict_data by --modal_type into [{"image": path or None, "prompt": text}]."""
    modal_type = modal_type or ["text"]
    unknown = sorted(set(modal_type) - {"image", "text"})
    if unknown or modal_type.count("text") != 1:
        raise ValueError(f"--modal_type takes 'image' and exactly one 'text', got {modal_type}")
    if not predict_data or len(predict_data) % len(modal_type):
        raise ValueError(f"--predict_data needs {len(modal_type)} items per example ({' '.join(modal_type)}), "
                         f"got {len(predict_data or [])}")
    examples = []
    for start in range(0, len(predict_data), len(modal_type)):
        items = dict(zip(modal_type, predict_data[start:start + len(modal_type)]))
        examples.append({"image": items.get("image"), "prompt": items["text"]})
    return examples


def build_trainer(config):
    """The trainer the YAML's `trainer:` section names, through MindFormers' registry. Its `auto_register` may
    name a module outside --register_path in MindFormers' `folder--module.Class` form; that folder is put on
    sys.path so the module's own sibling imports resolve too."""
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    section = config.get("trainer") or {}
    if not section.get("type"):
        raise ValueError("--run_mode finetune needs a trainer: section with a type (e.g. ShapesTaskTrainer)")
    reference = section.get("auto_register")
    if reference:
        if "--" in reference:
            folder = os.path.realpath(reference.split("--", 1)[0])
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"trainer.auto_register {reference!r}: no folder {folder}")
            sys.path.insert(0, folder)
        MindFormerRegister.auto_register(reference, MindFormerModuleType.TRAINER)
    trainer_class = MindFormerRegister.get_cls(MindFormerModuleType.TRAINER, section["type"])
    return trainer_class(config)


def set_up_parallel(config):
    """With --use_parallel: join the msrun job and check its size. Returns this process' rank."""
    parallel = config.get("parallel_config") or {}
    model_parallel = int(parallel.get("model_parallel") or 1)
    data_parallel = int(parallel.get("data_parallel") or 1)
    if not config.get("use_parallel"):
        config.model.model_config.model_parallel = 1
        return 0
    from mindspore.communication import get_group_size, get_rank, init

    init()
    world = get_group_size()
    if world != model_parallel * data_parallel:
        raise ValueError(f"world size {world} != model_parallel {model_parallel} x data_parallel {data_parallel}: "
                         "launch as many workers as the parallel_config asks for")
    if data_parallel != 1:
        raise ValueError(f"data_parallel {data_parallel} is not supported for predict; set data_parallel: 1")
    config.model.model_config.model_parallel = model_parallel
    return get_rank()


def parameter_counts(model):
    """(parameters this process holds, those under `language_model.layers.`), KV caches not counted."""
    total = decoder = 0
    for name, parameter in model.weights().items():
        total += parameter.size
        if name.startswith("language_model.layers."):
            decoder += parameter.size
    return total, decoder


def log_parameter_counts(model, log):
    """One line per rank (each worker's log under msrun): what share of the weights this rank holds."""
    total, decoder = parameter_counts(model)
    parallel = model.tensor_parallel
    log.info("rank %d/%d holds %d parameters, %d in the decoder layers", parallel.rank, parallel.size, total, decoder)


def explicit_keys(args):
    """The dotted keys the user set with --options: the run never changes them, only checks them."""
    return {option.split("=", 1)[0] for option in args.options}


def run_predict(config, examples, log, explicit=()):
    from llava_generation import answer
    from llava_runtime import build_components, follow_checkpoint, plan_cpu, set_up_context
    from llava_weights import load_weights

    if not config.get("load_checkpoint"):
        raise ValueError("no checkpoint: pass --load_checkpoint (an HF folder, or a file from convert_weight.py)")
    changes = follow_checkpoint(config, explicit)
    if changes:
        log.warning("model sizes from the checkpoint: %s", ", ".join(changes))
    plan, plan_changed = plan_cpu(config, explicit)
    if plan:
        (log.warning if plan_changed else log.info)(plan)
    context = config.get("context") or {}
    output_dir = config.get("output_dir") or "./output"
    set_up_context(device_target=context.get("device_target", "CPU"), mode=context.get("mode", 1),
                   device_id=None if config.get("use_parallel") else context.get("device_id", 0),
                   max_device_memory=context.get("max_device_memory"))
    rank = set_up_parallel(config)
    started = time.time()
    model, tokenizer, processor = build_components(config)
    source = load_weights(model, config.load_checkpoint, auto_trans_ckpt=bool(config.get("auto_trans_ckpt")),
                          save_shards_to=os.path.join(output_dir, "transformed_checkpoint"))
    log.info("model built and %s loaded in %.1f s", source, time.time() - started)
    log_parameter_counts(model, log)

    batch_size = int(config.model.model_config.get("batch_size") or 1)
    results = []
    answers = answer(model, tokenizer, processor, [item["prompt"] for item in examples],
                     [item["image"] for item in examples], batch_size, seed=config.get("seed"))
    for item, result in zip(examples, answers):
        results.append({"image": item["image"], "prompt": item["prompt"], **result})
        if rank == 0:
            print(f"{item['prompt']}\n{result['text']}\n", flush=True)

    if rank != 0:
        return results
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "predict_results.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    log.info("results written to %s", path)
    return results


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO if args.verbose else logging.WARNING)
    log = logging.getLogger("llava")
    try:
        register_plugin(args.register_path)
        from llava_runtime import quiet_logs
        quiet_logs(args.output_dir or "./output", args.verbose)
        config = load_config(args)
        run_mode = config.get("run_mode") or "predict"
        if run_mode == "finetune":
            build_trainer(config).train(log=lambda message: print(message, flush=True))
            return 0
        if run_mode != "predict":
            raise ValueError(f"run_mode {run_mode!r} is not supported; use predict or finetune")
        examples = predict_examples(args.predict_data, args.modal_type)
        run_predict(config, examples, log, explicit_keys(args))
    except (ValueError, TypeError, OSError, KeyError) as error:
        if args.verbose:
            traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"run_mindformer.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
