"""MindFormers-style command line for LLaVA-1.5.

    python run_mindformer.py --config research/llava/llava1_5_7B/predict_llava1_5_7b.yaml \
        --register_path research/llava --run_mode predict \
        --predict_data demo.jpeg 'Describe the image in English:' --modal_type image text \
        --load_checkpoint llava.ckpt --use_parallel False --auto_trans_ckpt False

`--run_mode chat` loads the model once, then answers questions typed in the terminal (`/image PATH` picks the
picture), streaming each answer token by token. `--run_mode finetune` trains instead, with the trainer the
YAML's `trainer:` section names (the bundled tiny model's is demo/train_llava.py):

    python run_mindformer.py --config demo/llava_tiny/finetune_llava_tiny.yaml \
        --register_path research/llava --run_mode finetune

Classes come from the YAML's `type:` / `auto_register:` keys through MindFormers' registry; which keys a YAML
may hold and how they are checked is research/llava/llava_run_config.py's.

A predict run checks everything before it builds the model: the config, the checkpoint (an HF folder, a
llava-ms file or rank shards, research/llava/llava_weights.py; the model's sizes, the vocabulary and the image
normalization are taken from it when it says them, and the YAML's values checked against it), the output
directory, the tokenizer, and every input (each image opened, decoded and preprocessed, each prompt tokenized
and measured against the context). On CPU it picks what runs fast and fits (llava_runtime.plan_cpu) and says so
in one line when that differs from the YAML; keys given with --options are never changed, only checked. Then it builds the model, loads the weights and answers; each answer is
printed and appended, flushed, to OUTPUT_DIR/predict_results.jsonl (started empty by the run) as one object:
{"image", "prompt", "text", "token_ids"} (token_ids: the generated ids only). An error or Ctrl-C later keeps
every answer given so far.

Bad input exits 2 with one line `run_mindformer.py: error: ...` (--verbose adds the traceback); Ctrl-C or
SIGTERM exits 130 with one line.
"""
import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback

import numpy as np


def str_to_bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_model_arguments(parser):
    """The flags of every command line that loads the model (this one and serve.py)."""
    parser.add_argument("--config", required=True, help="YAML file")
    parser.add_argument("--register_path", default=None,
                        help="directory of the plugin's modules (auto_register keys resolve there)")
    parser.add_argument("--load_checkpoint", default=None,
                        help="an HF folder (config.json + safetensors), a llava-ms .ckpt/.safetensors (or a folder "
                             "holding one), or a folder of rank_K/ shards")
    parser.add_argument("--device_target", default=None, choices=["CPU", "Ascend", "GPU"])
    parser.add_argument("--mode", type=int, default=None, choices=[0, 1], help="0 graph, 1 PyNative")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override YAML values by dotted path, e.g. model.model_config.seq_length=1024")
    parser.add_argument("--verbose", action="store_true", help="MindSpore/MindFormers logs and tracebacks")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--run_mode", default=None, choices=["predict", "finetune", "chat"],
                        help="predict: answer --predict_data; finetune: train as the YAML says (train_llava.py); "
                             "chat: read questions from the terminal and stream the answers")
    parser.add_argument("--predict_data", nargs="+", default=None,
                        help="inputs in the order of --modal_type, repeated per example: IMAGE TEXT [IMAGE TEXT ...]")
    parser.add_argument("--modal_type", nargs="+", default=None, choices=["image", "text"],
                        help="modality of each item of an example: image text (or text alone)")
    parser.add_argument("--use_parallel", type=str_to_bool, default=None)
    parser.add_argument("--auto_trans_ckpt", type=str_to_bool, default=None)
    parser.add_argument("--predict_batch_size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


def load_config(args):
    """The run config: the YAML, --options, then the command-line flags (llava_run_config checks all of it)."""
    from llava_run_config import load_run_config

    def flag(name):  # serve.py has only add_model_arguments' flags
        return getattr(args, name, None)

    flags = {"run_mode": flag("run_mode"), "load_checkpoint": args.load_checkpoint,
             "use_parallel": flag("use_parallel"), "auto_trans_ckpt": flag("auto_trans_ckpt"),
             "output_dir": args.output_dir, "seed": flag("seed"),
             "context.device_target": args.device_target, "context.mode": args.mode,
             "model.model_config.batch_size": flag("predict_batch_size")}
    return load_run_config(args.config, args.options, flags)


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
    if not predict_data:
        raise ValueError("--run_mode predict needs --predict_data: IMAGE TEXT pairs with --modal_type image text")
    if not modal_type:
        raise ValueError("--predict_data needs --modal_type, the modality of each item of an example: image text "
                         "(or text for prompts without an image)")
    if sorted(modal_type) not in (["text"], ["image", "text"]):
        raise ValueError(f"--modal_type takes one 'text' and at most one 'image' (LLaVA-1.5 answers about one image "
                         f"per prompt), got {' '.join(modal_type)}")
    if len(predict_data) % len(modal_type):
        raise ValueError(f"--predict_data needs {len(modal_type)} items per example ({' '.join(modal_type)}), "
                         f"got {len(predict_data)}")
    for number, item in enumerate(predict_data, start=1):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal sent that are not UTF-8 arrive as lone surrogates
            raw = item.encode("utf-8", "surrogateescape")
            raise ValueError(f"--predict_data item {number} is not valid UTF-8: {raw[:60]!r}") from None
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
    model_parallel = parallel.get("model_parallel") or 1
    data_parallel = parallel.get("data_parallel") or 1
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


class ResultsFile:
    """OUTPUT_DIR/predict_results.jsonl: started empty, then one line appended and flushed per answer, so an error,
    a crash or Ctrl-C later keeps every answer given (the one file not written whole and renamed)."""

    NAME = "predict_results.jsonl"

    def __init__(self, output_dir):
        from llava_runtime import check_directory_path

        check_directory_path(output_dir, "output_dir")
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, self.NAME)
        self._file = open(self.path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.count = 0

    def append(self, row):
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.count += 1

    def close(self):
        self._file.close()


def encode_examples(processor, examples):
    """Every example through the processor, before the model is built: a missing, unreadable or too large image
    or a too long prompt fails here, naming the example. Returns one processor output per example."""
    encoded = []
    for number, item in enumerate(examples, start=1):
        try:
            ids = processor.encode_prompt(item["prompt"], 0 if item["image"] is None else 1, index=number)
            pixels = None if item["image"] is None else processor.image_processor([item["image"]])
        except (ValueError, OSError) as error:
            raise ValueError(f"--predict_data example {number}: {error}") from None
        encoded.append({"input_ids": [ids], "pixel_values": pixels})
    return encoded


def merge_inputs(encoded):
    """Processor outputs of single examples -> one batch: their ids in order, the images of those that have one."""
    pixels = [item["pixel_values"] for item in encoded if item["pixel_values"] is not None]
    return {"input_ids": [ids for item in encoded for ids in item["input_ids"]],
            "pixel_values": np.concatenate(pixels) if pixels else None}


def explicit_keys(args):
    """The dotted keys the user set with --options: the run never changes them, only checks them."""
    return {option.split("=", 1)[0] for option in args.options}


def start_run(config, explicit=()):
    """What needs no model: the checkpoint's sizes into the config, the context, the parallel group and the CPU
    plan. Returns (rank, notes): `notes` the lines saying how the run differs from the YAML, logged once the
    model is loaded (llava_runtime.follow_checkpoint, plan_cpu)."""
    from llava_runtime import follow_checkpoint, plan_cpu, set_up_context

    checkpoint = config.get("load_checkpoint")
    if not checkpoint:
        raise ValueError("no checkpoint: pass --load_checkpoint (an HF folder, or a file from convert_weight.py)")
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    changes = follow_checkpoint(config, explicit)
    context = config.get("context") or {}
    set_up_context(device_target=context.get("device_target", "CPU"), mode=context.get("mode", 1),
                   device_id=None if config.get("use_parallel") else context.get("device_id", 0),
                   max_device_memory=context.get("max_device_memory"),
                   output_dir=config.get("output_dir") or "./output")
    rank = set_up_parallel(config)
    plan, plan_changed = plan_cpu(config, explicit)
    notes = [(logging.WARNING, f"model sizes from the checkpoint: {', '.join(changes)}")] if changes else []
    if plan:
        notes.append((logging.WARNING if plan_changed else logging.INFO, plan))
    return rank, notes


def build_model(config, log, notes):
    """Build the network and load the checkpoint into it; then log `notes` and this rank's share."""
    from llava_weights import load_weights
    from mindformers.models.build_model import build_network

    started = time.time()
    model = build_network(config.model)
    source = load_weights(model, config.load_checkpoint, auto_trans_ckpt=bool(config.get("auto_trans_ckpt")),
                          save_shards_to=os.path.join(config.get("output_dir") or "./output", "transformed_checkpoint"))
    log.info("model built and %s loaded in %.1f s", source, time.time() - started)
    for level, note in notes:  # everything is checked and loaded: say what differs from the YAML, a line each
        log.log(level, note)
    log_parameter_counts(model, log)
    return model


def build_processor(config):
    from llava_run_config import model_config_of
    from llava_runtime import build_processor as build

    return build(config.processor, model_config_of(config))


def load_model(config, log, explicit=()):
    """The model, ready to answer, as the config says -> (model, tokenizer, processor, rank)."""
    rank, notes = start_run(config, explicit)
    tokenizer, processor = build_processor(config)
    return build_model(config, log, notes), tokenizer, processor, rank


def run_predict(config, examples, log, explicit=()):
    """Check everything, build and load the model, answer: see the module docstring. Returns the result rows."""
    from llava_runtime import interrupts_at_safe_points

    rank, notes = start_run(config, explicit)
    results = ResultsFile(config.get("output_dir") or "./output") if rank == 0 else None
    try:
        started = time.time()
        tokenizer, processor = build_processor(config)
        encoded = encode_examples(processor, examples)
        log.info("%d inputs checked in %.1f s", len(examples), time.time() - started)
        with interrupts_at_safe_points("run_mindformer.py"):
            model = build_model(config, log, notes)
            return _answer(model, tokenizer, config, examples, encoded, results, log)
    finally:
        if results is not None:
            results.close()


def _answer(model, tokenizer, config, examples, encoded, results, log):
    """Answer the encoded examples batch by batch, printing and appending each answer as it comes."""
    from llava_generation import answer_inputs

    rows, batch_size = [], model.config.batch_size
    try:
        for start in range(0, len(examples), batch_size):
            batch = merge_inputs(encoded[start:start + batch_size])
            for item, result in zip(examples[start:start + batch_size],
                                    answer_inputs(model, tokenizer, batch, seed=config.get("seed"))):
                rows.append({"image": item["image"], "prompt": item["prompt"], **result})
                if results is not None:
                    print(f"{item['prompt']}\n{result['text']}\n", flush=True)
                    results.append(rows[-1])
    except KeyboardInterrupt:
        kept = f"{results.count} of {len(examples)} answers kept in {results.path}" if results is not None else ""
        raise KeyboardInterrupt(kept) from None
    if results is not None:
        log.info("results written to %s", results.path)
    return rows


CHAT_HELP = "Ask about a picture: /image PATH loads one (and starts a new conversation). Ctrl-D or Ctrl-C quits."


def run_chat(config, log, lines, out, explicit=()):
    """Answer each line of `lines` (questions, or `/image PATH`), streaming the answer to `out` token by token;
    follow-up questions continue the conversation about the same picture (its features computed once)."""
    from llava_generation import GenerationSettings
    from llava_processor import load_image
    from llava_runtime import interruption_point, interrupts_at_safe_points
    from llava_serving import DEFAULT_IMAGE_CACHE_BYTES, Engine, Request, prepare_images, prompt_ids

    with interrupts_at_safe_points("run_mindformer.py"):  # waiting for a line, Ctrl-C leaves at once
        model, tokenizer, processor, _ = load_model(config, log, explicit)
        engine = Engine(model, tokenizer, max_batch_size=1, image_cache_bytes=DEFAULT_IMAGE_CACHE_BYTES)
        engine.warm_up()
    settings = GenerationSettings.resolve(model.config)
    print(CHAT_HELP, file=out, flush=True)
    messages, images = [], []
    for line in lines:
        line = line.strip()
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                images = prepare_images(processor.image_processor, [load_image(path)])
            except (ValueError, OSError) as error:
                print(f"error: {error}", file=out, flush=True)
                continue
            messages = []
            print(f"(new conversation about {path})", file=out, flush=True)
            continue
        if not line:
            continue
        content = ([{"type": "image"}] * len(images) if not messages else []) + [{"type": "text", "text": line}]
        conversation = messages + [{"role": "user", "content": content}]
        try:
            ids = prompt_ids(processor, conversation, len(images))
            budget = settings.new_tokens(len(ids), model.config.seq_length)
        except ValueError as error:
            print(f"error: {error}; /image PATH starts a new conversation", file=out, flush=True)
            continue
        pieces = []

        def emit(output):
            pieces.append(output)
            print(output.text, end="", file=out, flush=True)

        with interrupts_at_safe_points("run_mindformer.py"):
            engine.submit(Request(ids, images, settings, budget, emit, seed=config.get("seed")))
            while not (pieces and pieces[-1].finish_reason):
                engine.step()
                interruption_point()
        print(file=out, flush=True)
        answer_text = "".join(piece.text for piece in pieces)
        messages = conversation + [{"role": "assistant", "content": [{"type": "text", "text": answer_text}]}]


def report_error(program, error, verbose):
    """`PROGRAM: error: ` and the first line of the error's message on stderr (with --verbose, the traceback
    first); returns the exit status for bad input, 2."""
    if verbose:
        traceback.print_exc()
    message = str(error).strip()
    print(f"{program}: error: {message.splitlines()[0] if message else type(error).__name__}", file=sys.stderr)
    return 2


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO if args.verbose else logging.WARNING)
    log = logging.getLogger("llava")
    run_mode = args.run_mode
    try:
        register_plugin(args.register_path)
        from llava_runtime import leave_at_once_on_signals, quiet_logs, sigterm_as_interrupt
        leave_at_once_on_signals("run_mindformer.py: interrupted")  # nothing is written while imports run
        quiet_logs(args.output_dir or "./output", args.verbose)  # imports MindFormers, and MindSpore with it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sigterm_as_interrupt()  # answers kept, one line, exit 130
        config = load_config(args)
        run_mode = config.get("run_mode") or "predict"
        if run_mode == "finetune":
            build_trainer(config).train(log=lambda message: print(message, flush=True))
            return 0
        if run_mode == "chat":
            run_chat(config, log, sys.stdin, sys.stdout, explicit_keys(args))
            return 0
        examples = predict_examples(args.predict_data, args.modal_type)
        run_predict(config, examples, log, explicit_keys(args))
    except KeyboardInterrupt as interrupt:
        if run_mode == "chat":  # Ctrl-C is the way out of a chat, as Ctrl-D
            print(file=sys.stderr)
            return 0
        if args.verbose:
            traceback.print_exc()
        print(f"run_mindformer.py: interrupted{f'; {interrupt}' if str(interrupt) else ''}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, KeyError) as error:
        return report_error("run_mindformer.py", error, args.verbose)
    return 0


if __name__ == "__main__":
    STATUS = main()
    if STATUS == 130:  # interrupted, its answers written and closed: leave without the teardown of MindSpore's
        sys.stdout.flush()  # runtime in the middle of its work (interrupted runs now and then ended in SIGABRT)
        sys.stderr.flush()
        os._exit(STATUS)
    sys.exit(STATUS)
