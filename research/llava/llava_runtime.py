"""Process set-up shared by the command line, tests and benchmarks: MindSpore context and CPU threads."""
import contextlib
import os
import signal
import time

_cpu_threads_set = False


def set_up_context(device_target="CPU", mode=1, threads=None, device_id=0, max_device_memory=None, output_dir=None):
    """MindSpore context for inference; safe to call more than once.

    device_id, max_device_memory (e.g. "58GB"): the YAML's `context:` keys, for Ascend and GPU (a CPU process
    has one device and no device memory of its own; under msrun each worker is given its device).

    output_dir: where MindSpore's failure dumps go (MS_OM_PATH: `output_dir/rank_K/om/analyze_fail.ir` when a
    graph fails to compile) instead of the working directory.

    (MindSpore's on-disk compile cache is deliberately not used: a graph cached for one image count was
    reused for another and failed in Reshape, see the notes of issue 4.)

    On CPU the default op thread pool is far larger than the core count and thrashes, so it is pinned to
    the cores available to this process (MindSpore accepts that once per process); and PyNative's
    asynchronous launch is switched off: its launcher thread fights the op threads for the cores, which made
    a tiny model's generation over 20 times slower (bench/RESULTS.md, runtime settings).
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel  (quiet_logs must run before it)

    global _cpu_threads_set
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (graph) or 1 (PyNative), got {mode}")
    ms.set_context(mode=mode, device_target=device_target)
    if output_dir is not None:  # read when a dump is written, so setting it now is in time
        os.environ["MS_OM_PATH"] = os.path.abspath(output_dir)
    if device_target != "CPU":
        if device_id is not None:  # None under msrun, which gives each worker its device
            ms.set_context(device_id=device_id)
        if max_device_memory:
            ms.set_context(max_device_memory=max_device_memory)
    if device_target == "CPU" and not _cpu_threads_set:
        ms.device_context.cpu.op_tuning.threads_num(threads or len(os.sched_getaffinity(0)))
        ms.runtime.launch_blocking()
        _cpu_threads_set = True


def check_directory_path(path, what):
    """Raise ValueError if a directory cannot be made at `path` because it, or a folder above it, is a file."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: {folder} is a file, not a directory")


def sigterm_as_interrupt():
    """Make SIGTERM raise KeyboardInterrupt, as Ctrl-C does (call from the main thread).

    Once it has compiled a graph, MindSpore answers Ctrl-C (SIGINT) with its own handler, which sends the
    process SIGTERM; SIGTERM's default action would kill it on the spot: a terminal chat would end with
    status 143 instead of cleanly, a server without letting its running requests finish (uvicorn shuts down
    gracefully on SIGTERM while it serves, then raises it again, which this turns into KeyboardInterrupt).
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)


_stderr = None  # a copy of the first caller's stderr: a silenced import points file descriptor 2 elsewhere


def _leaving(message):
    """A signal handler that prints `message` and exits 130 at once."""
    global _stderr
    if _stderr is None:
        _stderr = os.dup(2)

    def leave(_signum, _frame):
        os.write(_stderr, f"{message}\n".encode())
        os._exit(130)
    return leave


def leave_at_once_on_signals(message):
    """From now until other handlers are set, Ctrl-C or SIGTERM print `message` and exit 130 at once: while
    MindSpore and MindFormers are imported, an exception raised inside the initialization of their C++ modules
    aborts the process or fails the import with a traceback (call it before anything is written)."""
    leave = _leaving(message)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, leave)


_interrupted = False  # a signal came inside `interrupts_at_safe_points`, for the next `interruption_point`
SAME_INTERRUPT_S = 0.5


@contextlib.contextmanager
def interrupts_at_safe_points(program):
    """Inside the block (main thread), Ctrl-C and SIGTERM raise KeyboardInterrupt at the next
    `interruption_point()` (between generated tokens, loaded tensors), or at the block's end, instead of
    wherever Python is. Op by op, MindSpore calls back into Python from C++ at every launch (the kernels' shape
    functions), and a KeyboardInterrupt raised inside such a callback can abort the process (SIGABRT: no answers
    kept, no message) instead of unwinding. A second signal leaves at once, status 130: what was written
    stays (answers are appended one by one). Signals within SAME_INTERRUPT_S of the first are the same one:
    once it has compiled a graph, MindSpore answers Ctrl-C by sending the process SIGTERM."""
    global _interrupted
    leave = _leaving(f"{program}: interrupted")
    first = []

    def defer(signum, frame):
        global _interrupted
        if first and time.monotonic() - first[0] >= SAME_INTERRUPT_S:
            leave(signum, frame)
        first[:] = first or [time.monotonic()]
        _interrupted = True

    handlers = {signum: signal.signal(signum, defer) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        interruption_point()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        _interrupted = False


def interruption_point():
    """Raise KeyboardInterrupt if a signal came inside `interrupts_at_safe_points` (else nothing, anywhere)."""
    global _interrupted
    if _interrupted:
        _interrupted = False
        raise KeyboardInterrupt


def quiet_logs(output_dir, verbose=False):
    """Keep MindSpore/MindFormers quiet unless `verbose`, and keep their files under `output_dir`.

    Call before the first `import mindformers`: its logger writes to LOCAL_DEFAULT_PATH/log, its dynamic
    module cache (where `auto_register` copies plugin files) defaults to ./modules, and at import it warns
    about optional packages this plugin does not use. No hub is ever contacted.
    """
    import contextlib
    import io
    import logging

    check_directory_path(output_dir, "output_dir")  # MindFormers makes its log folder there as it is imported
    output_dir = os.path.abspath(output_dir)
    os.environ.setdefault("LOCAL_DEFAULT_PATH", output_dir)
    os.environ.setdefault("OM_MODULES_CACHE", os.path.join(output_dir, "modules"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["GLOG_v"] = "1" if verbose else "3"
    if verbose:
        import mindformers  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import mindformers  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    for handler in logging.getLogger("mindformers").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def build_processor(processor_config, model_config):
    """Tokenizer and processor from a processor section (with its `tokenizer:`) through MindFormers' registry,
    sized by `model_config` (a LlavaConfig: no model is built): image size, image features per image and
    context length follow it unless the section gives them (llava_run_config checks that they agree). The
    tokenizer is checked against the model's vocabulary.

    Returns:
        (tokenizer, processor).
    """
    import copy  # pylint: disable=import-outside-toplevel

    from mindformers.models.build_tokenizer import build_tokenizer  # pylint: disable=import-outside-toplevel
    from mindformers.tools.register import (MindFormerModuleType,  # pylint: disable=import-outside-toplevel
                                            MindFormerRegister)
    from llava_tokenizer import check_vocab_fits  # pylint: disable=import-outside-toplevel

    processor_config = copy.deepcopy(processor_config)
    tokenizer = build_tokenizer(processor_config.pop("tokenizer"))
    vision = model_config.vision_config
    processor = MindFormerRegister.get_instance_from_cfg(
        processor_config, MindFormerModuleType.PROCESSOR,
        default_args={"tokenizer": tokenizer, "num_image_features": vision.num_image_features,
                      "max_length": model_config.seq_length, "image_size": vision.image_size})
    check_vocab_fits(tokenizer, model_config.text_config.vocab_size, model_config.image_token_id)
    return tokenizer, processor


def build_components(config, processor_config=None):
    """Model, tokenizer and processor from a run config through MindFormers' registry (YAML `type:` and
    `auto_register:` keys); the processor as `build_processor` makes it for the model.

    processor_config: the processor section, with its `tokenizer:` (default `config.processor`).
    """
    from mindformers.models.build_model import build_network  # pylint: disable=import-outside-toplevel

    model = build_network(config.model)
    tokenizer, processor = build_processor(processor_config if processor_config is not None else config.processor,
                                           model.config)
    return model, tokenizer, processor


# ------------------------------------------------------------------------------------------- the run config
# Before anything is built, the YAML is made to agree with the checkpoint it loads and the device it runs on.
# `explicit` is the set of dotted keys the user gave with --options: those are never changed, only checked.

def _sub_section(model_config, part):
    """(dict holding the `part` sub-config's keys, its dotted path) for the YAML's nested or flat form."""
    section = model_config.get(part)
    if section is None:
        section = model_config[part] = {}
    if section.get("model_config") is not None:
        return section["model_config"], f"model.model_config.{part}.model_config"
    return section, f"model.model_config.{part}"


def _agree(holder, key, value, dotted, explicit, changes, source, aliases=()):
    """Make holder[key] (or an alias of it) `value` from `source`: refused when the user set it, noted when it
    changes a value the YAML had."""
    present = next((name for name in (key, *aliases) if name in holder), key)
    current = holder.get(present)
    if current == value:
        return
    given = dotted.rsplit(".", 1)[0] + "." + present
    if given in explicit:
        raise ValueError(f"--options {given}={current} contradicts {source}, whose {key} is {value}")
    if current is not None:
        changes.append(f"{key} {current} -> {value}")
    holder[present] = value


def follow_checkpoint(config, explicit=()):
    """Take the model's sizes from the checkpoint when it says them (an HF folder's config.json, llava-ms
    metadata), the processor's image size with them (the YAML ties the two), and from a checkpoint folder its
    tokenizer.model and preprocessor_config.json for what the YAML does not name. Returns the changes made to
    the YAML's values ("num_layers 32 -> 2", ...); raises ValueError for a value the user set that disagrees."""
    from llava_config import BUILD_KEYS, LlavaConfig, LlavaTextConfig  # pylint: disable=import-outside-toplevel
    from llava_weights import checkpoint_architecture  # pylint: disable=import-outside-toplevel

    model_config, processor, changes = config.model.model_config, config.get("processor"), []
    checkpoint = checkpoint_architecture(config.load_checkpoint) if config.get("load_checkpoint") else None
    if checkpoint is None:
        return changes

    def resolved():
        return LlavaConfig(**{key: value for key, value in model_config.items() if key not in BUILD_KEYS})

    tied_image_size = processor is not None and processor.get("image_size") == resolved().vision_config.image_size
    aliases = {name: [alias for alias, canonical in LlavaTextConfig.aliases.items() if canonical == name]
               for name in checkpoint["text_config"]}
    for part in ("vision_config", "text_config"):
        holder, prefix = _sub_section(model_config, part)
        for key, value in checkpoint[part].items():
            _agree(holder, key, value, f"{prefix}.{key}", explicit, changes, "the checkpoint",
                   aliases[key] if part == "text_config" else ())
    _agree(model_config, "image_token_id", checkpoint["image_token_id"], "model.model_config.image_token_id",
           explicit, changes, "the checkpoint")
    model = resolved()
    if tied_image_size:
        _agree(processor, "image_size", model.vision_config.image_size, "processor.image_size", explicit, [],
               "the checkpoint")
    if processor is not None and os.path.isdir(config.load_checkpoint):
        _take_folder_files(config.load_checkpoint, processor, model, explicit, changes)
    return changes


def _take_folder_files(folder, processor, model, explicit, changes):
    """A checkpoint folder's tokenizer.model and preprocessor_config.json, for what the YAML does not name."""
    import json  # pylint: disable=import-outside-toplevel

    tokenizer = processor.get("tokenizer")
    vocab = os.path.join(folder, "tokenizer.model")
    if tokenizer is not None and not tokenizer.get("vocab_file") and os.path.isfile(vocab):
        tokenizer["vocab_file"] = vocab
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            preprocessor = dict(json.load(f))
        crop = preprocessor.get("crop_size") or {}
        crop = crop.get("height") if isinstance(crop, dict) else crop
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not an image processor config ({error})") from None
    if crop not in (None, model.vision_config.image_size):
        raise ValueError(f"{path} crops images to {crop} px but the model's vision image_size is "
                         f"{model.vision_config.image_size}")
    for key in ("image_mean", "image_std"):
        if preprocessor.get(key) is not None and processor.get(key) is None:
            _agree(processor, key, list(preprocessor[key]), f"processor.{key}", explicit, changes, path)


def plan_cpu(config, explicit=()):
    """On CPU, pick what is fast and fits: float32 activations; 16-bit weights kept (as the YAML has them) when
    llava-ms's kernels can multiply them, else float32 weights; vision and prompt op by op (a compiled graph
    keeps every activation allocated on CPU). Keys the user set with --options are kept. Returns (a line saying
    what runs, whether a YAML value was changed), or (None, False) off CPU."""
    import llava_kernels  # pylint: disable=import-outside-toplevel

    if (config.get("context") or {}).get("device_target", "CPU") != "CPU":
        return None, False
    model_config = config.model.model_config
    kernels = model_config.get("cpu_kernels", True) and llava_kernels.available()
    choices = {"compute_dtype": "float32", "compile_prefill": False}
    if not kernels and model_config.get("param_init_type", "float32") != "float32":
        choices["param_init_type"] = "float32"  # MindSpore's CPU MatMul would cast them at every use
    changed = False
    for key, value in choices.items():
        if f"model.model_config.{key}" not in explicit and model_config.get(key) != value:
            changed = changed or key in model_config
            model_config[key] = value
    weights = model_config.get("param_init_type", "float32")
    matmuls = f"llava-ms kernels ({llava_kernels.describe()})" if kernels else \
        f"MindSpore's MatMul in {model_config.get('compute_dtype', 'float32')}"
    prompts = "compiled" if model_config.get("compile_prefill") else "op by op"
    return f"CPU: weights {weights}, matmuls by {matmuls}; vision and prompts {prompts}", changed
