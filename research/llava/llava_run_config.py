"""What a run YAML may hold, and loading it: the one home of the YAML's keys (run_mindformer.py; the server too).

`load_run_config(path, options, flags)` reads the YAML, applies `--options KEY=VALUE` (values typed as YAML types
them) and the command-line flags, and checks every key and value before anything is built:

* every key is one that something reads. The keys of `model:` and `processor:` are those of the classes built
  from them (LlavaConfig and its vision / text configs, LlavaProcessor, LlavaImageProcessor, LlavaTokenizer: their
  parameters, fields and aliases); the top-level, `context:` and `parallel_config:` keys are run_mindformer.py's
  own (`RUN_KEYS`, `CONTEXT_KEYS`, `PARALLEL_KEYS`, with their ranges). With `run_mode: finetune` the sections of
  the trainer the YAML names (`TRAINER_SECTIONS`) are that trainer's to check;
* `IGNORED_KEYS`: a few keys of upstream MindFormers YAMLs, accepted so those files load, and never read;
* anything else is an error naming the closest known key;
* the values of `model.model_config` are checked by LlavaConfig (sizes, dtypes) and GenerationSettings
  (generation settings), and the processor must agree with the model: image size, context length and image
  features per image (a processor left at 336 px for a 224 px model would fail deep inside MindSpore).

Errors are ValueError (FileNotFoundError for a missing file) with a one-line message; nothing here prints or
exits.
"""
import difflib
import inspect
import os

import yaml
from mindformers.models.llama import LlamaTokenizer

from llava_config import (BUILD_KEYS, TOKEN_ID_DEFAULTS, LlavaCLIPConfig, LlavaConfig, LlavaTextConfig, check_value,
                          is_int)
from llava_generation import GenerationSettings
from llava_processor import LlavaImageProcessor, LlavaProcessor
from llava_tokenizer import LlavaTokenizer

__all__ = ["load_run_config", "model_config_of", "parse_option", "RUN_KEYS", "CONTEXT_KEYS", "PARALLEL_KEYS",
           "IGNORED_KEYS", "TRAINER_SECTIONS"]


def _is_bool(value):
    return isinstance(value, bool)


def _is_path(value):
    return isinstance(value, str) and value != ""


# Leaf checks: key -> (valid, what is expected). A None leaf is a key checked by the class that reads it.
RUN_KEYS = {
    "run_mode": (lambda v: v in ("predict", "finetune", "chat"), "predict, finetune or chat"),
    "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "output_dir": (_is_path, "a directory path"),
    "load_checkpoint": (lambda v: v is None or isinstance(v, str), "a checkpoint path"),
}
PREDICT_RUN_KEYS = {
    "use_parallel": (_is_bool, "true or false"),
    "auto_trans_ckpt": (_is_bool, "true or false"),
}
CONTEXT_KEYS = {
    "mode": (lambda v: v in (0, 1), "0 (graph) or 1 (PyNative)"),
    "device_target": (lambda v: v in ("CPU", "Ascend", "GPU"), "CPU, Ascend or GPU"),
    "device_id": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "max_device_memory": (lambda v: isinstance(v, str) and v.upper().endswith("GB"), "a size such as \"58GB\""),
}
PARALLEL_KEYS = {
    "model_parallel": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "data_parallel": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
}
# Upstream MindFormers predict YAMLs carry these; nothing here uses them (pipeline and sequence parallelism,
# micro-batching, data sinking and the trainer class are training or upstream-runtime settings).
IGNORED_KEYS = ("trainer.type", "trainer.model_name", "micro_batch_interleave_num", "runner_config.sink_mode",
                "parallel_config.pipeline_stage", "parallel_config.use_seq_parallel", "parallel_config.micro_batch_num",
                "parallel_config.vocab_emb_dp", "parallel_config.gradient_aggregation_group")
# With run_mode finetune: the sections the trainer named by `trainer:` reads (demo/train_llava.py for the tiny model).
TRAINER_SECTIONS = ("trainer", "runner_config", "optimizer", "lr_schedule", "train_dataset")

ANY = "any keys"  # a section whose keys another component checks
IGNORED = "ignored"


def _parameters(function, *leave_out):
    """The named parameters of `function` (self and **kwargs left out, and `leave_out`)."""
    return [name for name, parameter in inspect.signature(function).parameters.items()
            if name not in ("self", *leave_out) and parameter.kind is not parameter.VAR_KEYWORD]


def _built(*names):
    """A section MindFormers' registry builds: its `type` and `auto_register`, and `names`."""
    return dict.fromkeys(("type", "auto_register", *names))


def _sub_config(config_class):
    """A vision / text config section: its fields flat or (upstream form) under `model_config:`."""
    fields = [*config_class.defaults, *getattr(config_class, "aliases", ()), *getattr(config_class, "other_keys", ())]
    return {**_built(*fields), "arch": ANY, "model_config": _built(*fields)}


def _schema(run_mode):
    """What a YAML of `run_mode` may hold: nested dicts of key -> sub-schema, a leaf check, None, ANY or IGNORED."""
    model_keys = _parameters(LlavaConfig.__init__, "vision_config", "text_config", "model_parallel")
    model = {
        # model_parallel is set from parallel_config.model_parallel, not from here.
        "model_config": {**_built(*model_keys, *TOKEN_ID_DEFAULTS),
                         "vision_config": _sub_config(LlavaCLIPConfig), "text_config": _sub_config(LlavaTextConfig)},
        "arch": _built(),
    }
    schema = {**RUN_KEYS, "model": model, "context": dict(CONTEXT_KEYS)}
    if run_mode == "finetune":
        schema.update(dict.fromkeys(TRAINER_SECTIONS, ANY))
        return schema
    # LlavaTokenizer passes its other arguments on to MindFormers' LlamaTokenizer.
    tokenizer = _built(*_parameters(LlavaTokenizer.__init__), *_parameters(LlamaTokenizer.__init__))
    schema.update(PREDICT_RUN_KEYS)
    schema["processor"] = {**_built(*_parameters(LlavaProcessor.__init__, "tokenizer", "image_processor")),
                           "tokenizer": tokenizer,
                           "image_processor": _built(*_parameters(LlavaImageProcessor.__init__))}
    schema["parallel_config"] = dict(PARALLEL_KEYS)
    for key in IGNORED_KEYS:
        _set_by_path(schema, key, IGNORED, "IGNORED_KEYS")
    return schema


def _paths(schema, prefix=""):
    """Every dotted key of `schema` (a section's own path included)."""
    for key, sub in schema.items():
        yield prefix + key
        if isinstance(sub, dict):
            yield from _paths(sub, f"{prefix}{key}.")


def _unknown_key(where, key, schema):
    close = difflib.get_close_matches(key, list(_paths(schema)), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def _check_keys(values, schema, where, full_schema, prefix=""):
    """Every key of `values` known to `schema`, sections mappings, leaf values within their ranges."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key(where, path, full_schema)
        sub = schema[key]
        if isinstance(sub, dict) and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {path} must be a section (indented key: value lines), got {value!r}")
            _check_keys(value, sub, where, full_schema, path + ".")
        elif isinstance(sub, tuple):
            check_value(f"{where}: {path}", value, *sub)


def _check_option_key(key, schema):
    """An --options key must lead through known sections to a known key (or into a section checked elsewhere)."""
    node = schema
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if node in (ANY, IGNORED):
                return
            raise _unknown_key("--options", key, schema)
        node = node[part]


def parse_option(option):
    """'a.b.c=VALUE' -> ('a.b.c', VALUE typed as YAML types it: 3 -> int, true -> bool, null -> None, else str)."""
    key, equals, raw = option.partition("=")
    if not equals or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--options takes KEY=VALUE with a dotted KEY (e.g. model.model_config.seq_length=1024), "
                         f"got {option!r}")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(f"--options {option!r}: the value is not valid YAML ({_yaml_problem(error)})") from None


def _set_by_path(config, dotted_key, value, where):
    """config['a']['b']['c'] = value for 'a.b.c'; missing sections are created."""
    *parents, last = dotted_key.split(".")
    node, path = config, []
    for key in parents:
        path.append(key)
        if node.get(key) is None:
            node[key] = {}
        elif not isinstance(node[key], dict):
            raise ValueError(f"{where}: cannot set {dotted_key}: {'.'.join(path)} is {node[key]!r}, not a section")
        node = node[key]
    node[last] = value


def _yaml_problem(error):
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_yaml(path):
    if os.path.isdir(path):
        raise ValueError(f"config file {path} is a directory; give a YAML file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as stream:
            values = yaml.safe_load(stream)
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if values is None:
        raise ValueError(f"config file {path} is empty; it needs at least model: and processor: sections")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must be a mapping of sections (model:, processor:, ...), "
                         f"not a {type(values).__name__}")
    return values


def _require(values, dotted_key, where, what):
    """The value at `dotted_key`, which must be there and not empty."""
    node = values
    for key in dotted_key.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    if node is None or node == {} or node == "":
        raise ValueError(f"{where} has no {dotted_key} ({what})")
    return node


def model_config_of(config):
    """The LlavaConfig of a run config's `model.model_config` (cheap: no model is built). Raises ValueError."""
    values = {key: value for key, value in dict(config["model"]["model_config"]).items() if key not in BUILD_KEYS}
    try:
        return LlavaConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.model_config: {error}") from None


def _check_processor_fits(processor, model_config):
    """The processor's sizes, where the YAML gives them, must be the model's: the YAML ties them with aliases,
    which an --options override of one of them unties."""
    vision = model_config.vision_config
    expected = {"image_size": (vision.image_size, "the vision config's image_size"),
                "max_length": (model_config.seq_length, "model.model_config.seq_length"),
                "num_image_features": (vision.num_image_features, "the vision config's features per image")}
    given = {key: (processor[key], f"processor.{key}") for key in expected if processor.get(key) is not None}
    image_size = (processor.get("image_processor") or {}).get("image_size")
    if image_size is not None:
        given["image_size"] = (image_size, "processor.image_processor.image_size")
    for key, (value, name) in given.items():
        model_value, model_name = expected[key]
        if value != model_value:
            raise ValueError(f"{name} is {value!r} but {model_name} is {model_value}: they must be equal (leave "
                             f"{name} out and it follows the model)")


def load_run_config(path, options=(), flags=None):
    """The run config: the YAML at `path`, then `options` ("KEY=VALUE" strings), then `flags` ({dotted key: value};
    None values are not set), checked as the module docstring says.

    Returns:
        MindFormerConfig (a dict with attribute access, what MindFormers' builders take).

    Raises:
        FileNotFoundError: no file at `path`. ValueError: anything else, in one line naming the key or file.
    """
    from mindformers.tools.register import MindFormerConfig

    values = _read_yaml(path)
    parsed = [parse_option(option) for option in options]
    for key, value in parsed:
        _set_by_path(values, key, value, "--options")
    for key, value in (flags or {}).items():
        if value is not None:
            _set_by_path(values, key, value, "command line")
    run_mode = values.get("run_mode") or "predict"
    check_value(f"config {path}: run_mode", run_mode, *RUN_KEYS["run_mode"])
    schema = _schema(run_mode)
    for key, _ in parsed:
        _check_option_key(key, schema)
    _check_keys(values, schema, f"config {path}", schema)

    where = f"config {path}"
    _require(values, "model.model_config", where, "the sizes and settings of LlavaConfig")
    _require(values, "model.model_config.type", where, "LlavaConfig")
    _require(values, "model.arch.type", where, "the network class, LlavaVlm")
    model_config = model_config_of(values)
    try:
        GenerationSettings.resolve(model_config)
    except ValueError as error:
        raise ValueError(f"model.model_config: {error}") from None
    if run_mode != "finetune":  # predict, chat, and serve.py's runs
        processor = _require(values, "processor", where, "the tokenizer and the image settings")
        _require(values, "processor.type", where, "LlavaProcessor")
        _require(values, "processor.tokenizer.type", where, "LlavaTokenizer")
        # processor.tokenizer.vocab_file may be left out: a checkpoint folder's tokenizer.model is taken then
        # (llava_runtime.follow_checkpoint), and the tokenizer names what is missing when neither has one.
        _check_processor_fits(processor, model_config)
    return MindFormerConfig(**values)
