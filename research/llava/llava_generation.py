"""Token generation for LlavaVlm: MindFormers' `generate(...)` signature over a lean prefill + decode loop.

MindFormers' own loop is built for its paged-attention models (block tables, slot mappings) and costs
milliseconds per token on CPU before any model work; this one runs the prompts once (`ModelRunner.prefill`)
and then one compiled decode step per token, and does the sampling arithmetic on the host on [B, V] logits.

Logits processing follows HuggingFace's order so that results match it: repetition penalty, then
temperature, top-k, top-p; greedy takes the first maximum.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np

from mindformers.generation import GenerationConfig

from llava_config import check_value, is_int, is_number
from llava_runtime import interruption_point


@dataclass(frozen=True)
class GenerationSettings:
    """How to continue a prompt; the ranges are checked when the settings are made.

    Resolved once (`resolve`) from the model config < a generation_config < keyword arguments, as in
    MindFormers and HF. `max_new_tokens` wins over `max_length` (prompt plus generated tokens) when set.
    """

    max_new_tokens: int = None
    max_length: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple = (2,)
    pad_token_id: int = 0

    # The model config's names for these settings (the YAML's `model.model_config.*` keys).
    MODEL_CONFIG_KEYS = {"max_new_tokens": "max_new_tokens", "max_length": "max_decode_length",
                         "do_sample": "do_sample", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                         "repetition_penalty": "repetition_penalty", "eos_token_id": "eos_token_id",
                         "pad_token_id": "pad_token_id"}

    def __post_init__(self):
        eos = self.eos_token_id
        check_value("eos_token_id", eos, lambda v: all(map(is_int, v if isinstance(v, (list, tuple)) else [v])),
               "a token id or a list of ids")
        object.__setattr__(self, "eos_token_id", tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        check_value("max_new_tokens", self.max_new_tokens, lambda v: v is None or (is_int(v) and v >= 0),
               "an integer >= 0 (or null: up to max_length)")
        check_value("max_length", self.max_length, lambda v: is_int(v) and v >= 1, "an integer >= 1")
        check_value("do_sample", self.do_sample, lambda v: isinstance(v, bool), "true or false")
        check_value("temperature", self.temperature, lambda v: is_number(v) and v > 0, "a number > 0")
        check_value("top_k", self.top_k, lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: off)")
        check_value("top_p", self.top_p, lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        check_value("repetition_penalty", self.repetition_penalty, lambda v: is_number(v) and v > 0,
               "a number > 0 (1: off)")
        check_value("pad_token_id", self.pad_token_id, is_int, "a token id")

    @classmethod
    def resolve(cls, model_config, generation_config=None, **overrides):
        """Settings from the model config, then `generation_config`, then `overrides`; None values do not override.

        A MindFormers GenerationConfig is taken whole, its own defaults included (as HF and MindFormers take it);
        a dict overrides only the keys it has. Unknown overrides are a TypeError.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"generate() got unexpected arguments: {unknown}")
        values = {name: getattr(model_config, key) for name, key in cls.MODEL_CONFIG_KEYS.items()}
        if generation_config is not None:
            given = generation_config.to_dict() if isinstance(generation_config, GenerationConfig) else generation_config
            values.update({name: given[name] for name in names if given.get(name) is not None})
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    def new_tokens(self, longest_prompt, context):
        """How many tokens to generate after prompts of up to `longest_prompt` tokens in a `context`-token window."""
        if longest_prompt + 1 > context:
            raise ValueError(f"a prompt of {longest_prompt} tokens is longer than the context seq_length={context} "
                             "allows")
        wanted = self.max_new_tokens if self.max_new_tokens is not None else self.max_length - longest_prompt
        return max(0, min(wanted, context - longest_prompt))


def penalize_repetition(logits, history, penalty):
    """HF's rule on one row's logits [V] (in place): a seen token's logit is divided by `penalty` if > 0, else
    multiplied."""
    if penalty != 1.0:
        tokens = np.unique(history)
        values = logits[tokens]
        logits[tokens] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def sample(logits, settings, rng):
    """One row's next token from its logits [V] float32 (already penalised)."""
    if not settings.do_sample:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = np.partition(logits, -settings.top_k)[-settings.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if settings.top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = np.zeros(logits.shape, bool)
        drop[order] = np.cumsum(probs) - probs >= settings.top_p
        logits = np.where(drop, -np.inf, logits)
    probs = np.exp((logits - logits.max()).astype(np.float64))
    return int(rng.choice(probs.size, p=probs / probs.sum()))


def row_rng(seed, row):
    """The sampler of prompt `row` of a call seeded with `seed`: the same seed and row give the same tokens."""
    return np.random.default_rng(None if seed is None else [seed, row])


def prompt_rows(input_ids, pad_token_id):
    """Ragged list of prompts, or a right-padded [B, S] array -> list of lists of ids."""
    if isinstance(input_ids, np.ndarray) or (len(input_ids) and np.isscalar(input_ids[0])):
        rows = []
        for row in np.asarray(input_ids).reshape(-1, np.shape(input_ids)[-1]):
            keep = np.nonzero(row != pad_token_id)[0]
            rows.append(row[:keep[-1] + 1].tolist() if keep.size else [])
        return rows
    return [np.asarray(row, np.int64).reshape(-1).tolist() for row in input_ids]


class LlavaGenerationMixin:
    """`generate` for LlavaVlm (which provides `config` and `runner()`, a llava_steps.ModelRunner); listed before
    MindFormers' PreTrainedModel so this `generate` is the one used."""

    def generate(self, input_ids, generation_config=None, logits_processor=None, streamer=None, seed=None,
                 pixel_values=None, **kwargs):
        """Generate continuations of a batch of prompts.

        Args:
            input_ids: list of token-id lists (ragged), or a right-padded [B, S] array (pad_token_id).
            generation_config: a MindFormers `GenerationConfig` or dict; keyword arguments override it (the
                fields of GenerationSettings: `max_new_tokens`, `max_length`, `do_sample`, `temperature`,
                `top_k`, `top_p`, `repetition_penalty`, `eos_token_id`, `pad_token_id`).
            logits_processor: callables `(histories [B] of lists, logits [B, V]) -> logits`, applied after the
                repetition penalty.
            streamer: an object with `put(ids)` / `end()` (MindFormers' TextStreamer), fed each step's tokens.
            seed: seeds sampling; the same seed gives the same tokens.
            pixel_values: float32 [N, 3, S, S], the images of the `<image>` tokens in reading order.

        Returns:
            list of B lists: each prompt followed by its generated ids (EOS included when reached).
        """
        settings = GenerationSettings.resolve(self.config, generation_config, **kwargs)
        unset = [name for name, parameter in self.weights().items() if parameter.is_meta]
        if unset:
            raise ValueError(f"the model has no weights yet ({unset[0]} and {len(unset) - 1} more): load a checkpoint "
                             "(llava_weights.load_weights) or call init_weights()")
        history = prompt_rows(input_ids, settings.pad_token_id)
        if min(map(len, history)) < 1:
            raise ValueError("every prompt needs at least one token")
        lengths = np.array([len(row) for row in history], np.int32)
        max_new = settings.new_tokens(int(lengths.max()), self.config.seq_length)
        use_cache = self.config.use_past
        runner = self.runner()
        self.set_train(False)
        if use_cache:
            runner.reserve(len(history), int(lengths.max()) + max_new)
        features = None if pixel_values is None else runner.image_features(pixel_values)
        rngs = [row_rng(seed, row) for row in range(len(history))]
        finished = np.zeros(len(history), bool)
        logits = runner.prefill(history, features, use_cache=use_cache) if max_new else None
        for step in range(max_new):
            interruption_point()  # Ctrl-C between tokens (llava_runtime)
            scores = np.stack([penalize_repetition(row.copy(), seen, settings.repetition_penalty)
                               for row, seen in zip(logits, history)])
            for processor in logits_processor or ():
                scores = processor(history, scores)
            tokens = np.array([settings.pad_token_id if done else sample(row, settings, rng)
                               for row, done, rng in zip(scores, finished, rngs)])
            for row in np.nonzero(~finished)[0]:
                history[row].append(int(tokens[row]))
            if streamer is not None:
                streamer.put(tokens)
            finished |= np.isin(tokens, settings.eos_token_id)
            if finished.all() or step == max_new - 1:
                break
            if use_cache:
                logits = runner.decode(tokens, lengths + step)
            else:  # use_past off: every step runs the whole sequence again (the reference path)
                logits = runner.prefill(history, features, use_cache=False)
        if streamer is not None:
            streamer.end()
        return history


def answer(model, tokenizer, processor, questions, images, batch_size=1, seed=None, **settings):
    """Answer each (question, image) pair: processor -> generate -> decode, `batch_size` pairs at a time.

    Yields, in order, {"text": the answer (special tokens dropped, stripped), "token_ids": the generated ids}
    as each batch finishes, so a caller can keep what is done before a later pair fails.
    """
    for start in range(0, len(questions), batch_size):
        inputs = processor(list(questions[start:start + batch_size]), list(images[start:start + batch_size]))
        yield from answer_inputs(model, tokenizer, inputs, seed=seed, **settings)


def answer_inputs(model, tokenizer, inputs, seed=None, **settings):
    """Answer one batch the processor has already made ({"input_ids", "pixel_values"}); yields as `answer` does."""
    outputs = model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"], seed=seed, **settings)
    for prompt_ids, output in zip(inputs["input_ids"], outputs):
        generated = [int(token) for token in output[len(prompt_ids):]]
        yield {"text": tokenizer.decode(generated, skip_special_tokens=True).strip(), "token_ids": generated}
