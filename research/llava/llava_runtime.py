"""Process set-up shared by the command line, tests and benchmarks: MindSpore context and CPU threads."""
import os

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
