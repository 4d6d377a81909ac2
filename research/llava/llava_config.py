"""Configuration of LLaVA-1.5: a CLIP vision tower, a 2-layer GELU projector and a LLaMA decoder.

The YAML keeps the key paths of MindFormers' retired plugin::

    model.model_config.vision_config.model_config.{hidden_size, num_hidden_layers, ...}
    model.model_config.text_config.model_config.{hidden_size, num_layers, num_heads, ...}
    model.model_config.{seq_length, compute_dtype, use_past, do_sample, top_k, top_p, max_decode_length}

so the sub-configs arrive either as config objects, as flat dicts, or as dicts (or configs built from
them by MindFormers, e.g. a ``LlamaConfig``) that carry the real keys under ``model_config``.
"""
import numpy as np
from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

# Keys that describe how MindFormers builds a sub-config, not the sub-model itself.
BUILD_KEYS = ("type", "arch", "auto_register", "model_config")
# The special token ids: the text config's, which LlavaConfig takes over unless given its own.
TOKEN_ID_DEFAULTS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001}
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def check_value(name, value, valid, expected):
    """Raise ValueError("{name} must be {expected}, got {value!r}") unless valid(value)."""
    if not valid(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_like_defaults(what, config, defaults, signed=()):
    """Each field of `defaults` checked by the type of its default: integers (sizes, counts) >= 1, or any integer
    for the names in `signed`; floats > 0; strings. Runs before the checks that do arithmetic on them, so a
    `seq_length=abc` is named, not met as a TypeError."""
    for name, default in defaults.items():
        value, label = getattr(config, name), f"{what} {name}"
        if isinstance(default, int) and name in signed:
            check_value(label, value, is_int, "an integer")
        elif isinstance(default, int):
            check_value(label, value, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        elif isinstance(default, float):
            check_value(label, value, lambda v: is_number(v) and v > 0, "a number > 0")
        else:
            check_value(label, value, lambda v: isinstance(v, str), "a string")


def _sub_config_values(config):
    """The keyword arguments of a sub-config, from a config object or a (possibly nested) dict."""
    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    config = dict(config or {})
    nested = config.get("model_config")
    if nested is not None:
        nested = nested.to_dict() if isinstance(nested, PretrainedConfig) else dict(nested)
        config.update(nested)
    return {key: value for key, value in config.items() if key not in BUILD_KEYS}


def _take_own_values(values, defaults, aliases=None):
    """Split keyword arguments into this config's own fields (defaults filled) and the rest."""
    aliases = aliases or {}
    own = dict(defaults)
    rest = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name in own:
            own[name] = value
        else:
            rest[key] = value
    return own, rest


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlavaCLIPConfig(PretrainedConfig):
    """CLIP ViT vision tower (defaults: ViT-L/14 at 336 px, as in LLaVA-1.5)."""

    model_type = "llava_clip"
    defaults = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, num_channels=3, layer_norm_eps=1e-5,
                    hidden_act="quick_gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")

    def __init__(self, **kwargs):
        own, rest = _take_own_values(_sub_config_values(kwargs), self.defaults)
        super().__init__(**rest)
        self.__dict__.update(own)
        _check_like_defaults("vision", self, self.defaults, signed=("vision_feature_layer",))
        if self.hidden_act != "quick_gelu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported; CLIP uses 'quick_gelu'")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' (drop CLS) or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if not 0 <= self.num_computed_layers <= self.num_hidden_layers:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is outside the "
                             f"{self.num_hidden_layers} encoder layers")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_features(self):
        """Image features per image that replace the `<image>` tokens (576 for ViT-L/14-336)."""
        return self.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def num_computed_layers(self):
        """Encoder layers that are run: those after `vision_feature_layer` are never used."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.num_hidden_layers + layer + 1


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlavaTextConfig(PretrainedConfig):
    """LLaMA decoder (defaults: LLaMA-2-7B / Vicuna-7B with llava-hf's 32064 vocabulary)."""

    model_type = "llava_text"
    defaults = dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
                    vocab_size=32064, rms_norm_eps=1e-5, rope_theta=10000.0)
    # HF spellings are accepted too, so a config.json's text_config can be passed as it is.
    aliases = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
    # Read too: the token ids, and what is checked against the sizes (GQA is refused, head_dim must agree).
    other_keys = (*TOKEN_ID_DEFAULTS, "head_dim", "num_key_value_heads", "n_kv_heads")

    def __init__(self, **kwargs):
        own, rest = _take_own_values(_sub_config_values(kwargs), self.defaults, self.aliases)
        for key, value in TOKEN_ID_DEFAULTS.items():
            rest.setdefault(key, value)
        head_dim = rest.pop("head_dim", None)
        super().__init__(**rest)
        self.__dict__.update(own)
        _check_like_defaults("text", self, self.defaults)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        self.head_dim = self.hidden_size // self.num_heads
        if head_dim not in (None, self.head_dim):
            raise ValueError(f"text head_dim {head_dim} differs from hidden_size/num_heads = {self.head_dim}")
        # LLaMA-2-7B has no grouped-query attention; a config asking for it is refused, not misread.
        kv_heads = rest.get("num_key_value_heads", rest.get("n_kv_heads")) or self.num_heads
        if kv_heads != self.num_heads:
            raise ValueError(f"grouped-query attention (n_kv_heads {kv_heads} != num_heads {self.num_heads}) "
                             "is not supported by LLaVA-1.5")


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlavaConfig(PretrainedConfig):
    """LLaVA-1.5: vision tower config, text decoder config and the generation/runtime settings.

    Args:
        vision_config: LlavaCLIPConfig or dict (upstream YAML form allowed).
        text_config: LlavaTextConfig, LlamaConfig or dict (upstream YAML form allowed).
        image_token_id: id of `<image>`; each such id in a prompt receives one image feature.
        seq_length: the context length: prompt plus generated tokens; sizes the KV cache.
        compute_dtype: matmul dtype ("float32" on CPU; "float16"/"bfloat16" on Ascend). Norms and
            softmax always run in float32.
        use_past: KV cache on (prefill once, then one token per step).
        cpu_kernels: on CPU, run every linear through llava-ms's kernels (llava_kernels.py) when they are built:
            float32 activations, weights read at their own width, bfloat16 arithmetic for prompts when the CPU
            has it. False: MindSpore's MatMul in compute_dtype (the weights cast to it at every use).
        compile_prefill: compile the vision tower and the prompt prefill as graphs too (the decode step always
            is; see llava_steps.py). Off by default: on CPU MindSpore keeps every activation of a compiled graph
            allocated, which costs more memory than the faster prompt gains there (bench/RESULTS.md). The Ascend
            YAML turns it on.
        model_parallel: ranks the attention/MLP blocks are split across (the YAML's
            `parallel_config.model_parallel`, applied by run_mindformer.py when --use_parallel is on).
    """

    model_type = "llava"

    def __init__(self, vision_config=None, text_config=None, image_token_id=32000,
                 projector_hidden_act="gelu", seq_length=2048, batch_size=1, compute_dtype="float32",
                 param_init_type="float32", use_past=True, do_sample=False, top_k=0, top_p=1.0,
                 temperature=1.0, repetition_penalty=1.0, max_decode_length=1024, max_new_tokens=None,
                 compile_prefill=False, cpu_kernels=True, model_parallel=1, **kwargs):
        if not isinstance(vision_config, LlavaCLIPConfig):
            vision_config = LlavaCLIPConfig(**_sub_config_values(vision_config))
        if not isinstance(text_config, LlavaTextConfig):
            text_config = LlavaTextConfig(**_sub_config_values(text_config))
        for key in TOKEN_ID_DEFAULTS:
            kwargs.setdefault(key, getattr(text_config, key))
        super().__init__(**kwargs)
        self.vision_config = vision_config
        self.text_config = text_config
        self.image_token_id = image_token_id
        if projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {projector_hidden_act!r} is not supported; LLaVA-1.5 uses 'gelu'")
        self.projector_hidden_act = projector_hidden_act
        check_value("seq_length", seq_length, lambda v: is_int(v) and v >= 2, "an integer >= 2")
        check_value("batch_size", batch_size, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        check_value("image_token_id", image_token_id, lambda v: is_int(v) and v >= 0, "a token id (integer >= 0)")
        for name, value in (("compute_dtype", compute_dtype), ("param_init_type", param_init_type)):
            check_value(name, value, lambda v: v in DTYPE_NAMES, f"one of {', '.join(DTYPE_NAMES)}")
        for name, value in (("use_past", use_past), ("compile_prefill", compile_prefill), ("cpu_kernels", cpu_kernels)):
            check_value(name, value, lambda v: isinstance(v, bool), "true or false")
        check_value("model_parallel", model_parallel, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        self.param_init_type = param_init_type
        self.use_past = use_past
        self.do_sample = do_sample
        self.top_k = top_k
        self.top_p = top_p
        self.temperature = temperature
        self.repetition_penalty = repetition_penalty
        self.max_decode_length = max_decode_length
        self.max_new_tokens = max_new_tokens
        self.compile_prefill = compile_prefill
        self.cpu_kernels = cpu_kernels
        self.model_parallel = model_parallel

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["text_config"] = self.text_config.to_dict()
        return output


# What of an HF LLaVA config.json sizes or configures the model; the rest (torch dtype, architectures, ...) is not
# ours to read.
_HF_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                   "patch_size", "num_channels", "layer_norm_eps", "hidden_act")
_HF_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta",
                 "bos_token_id", "eos_token_id", "pad_token_id")


def config_from_hf(hf, **settings):
    """A LlavaConfig from the dict of an HF LLaVA config.json (`settings`: other LlavaConfig arguments).

    Missing text keys get LlavaTextConfig's defaults, which are the LLaMA-2-7B values transformers fills in
    for the hub's sparse text_config. Raises ValueError for what LLaVA-1.5 does not support.
    """
    hf_vision, hf_text = hf.get("vision_config") or {}, hf.get("text_config") or {}
    vision = {key: hf_vision[key] for key in _HF_VISION_KEYS if key in hf_vision}
    text = {key: hf_text[key] for key in _HF_TEXT_KEYS if hf_text.get(key) is not None}
    if "vocab_size" not in text and "vocab_size" in hf:  # older configs keep it at the top level
        text["vocab_size"] = hf["vocab_size"]
    feature_layer = hf.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(f"vision_feature_layer {feature_layer!r} (several layers) is not supported; "
                         "LLaVA-1.5 uses a single layer")
    vision["vision_feature_layer"] = feature_layer
    vision["vision_feature_select_strategy"] = hf.get("vision_feature_select_strategy", "default")
    image_token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       projector_hidden_act=hf.get("projector_hidden_act", "gelu"), **settings)


def architecture(config):
    """What a checkpoint's tensors are the weights of: every size and setting of the vision tower and the text
    model, and the `<image>` id (nested like the YAML's model_config, with plain values). Checkpoints carry it
    (an HF folder's config.json, convert_weight.py's metadata), and a YAML must agree with it."""
    vision = {key: getattr(config.vision_config, key) for key in LlavaCLIPConfig.defaults}
    text = {key: getattr(config.text_config, key) for key in (*LlavaTextConfig.defaults, *TOKEN_ID_DEFAULTS)}
    return {"vision_config": vision, "text_config": text, "image_token_id": config.image_token_id}
