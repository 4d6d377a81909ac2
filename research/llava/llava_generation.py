"""Token generation for LlavaVlm: MindFormers' `generate(...)` signature, a lean prefill + decode loop.

MindFormers' own loop is built for its paged-attention models (block tables, slot mappings) and costs
milliseconds per token on CPU before any model work; this one calls the model's `prefill` once and its
`decode` once per token, and does the sampling arithmetic on the host on [B, V] logits.

Logits processing follows HuggingFace's order so that results match it: repetition penalty, then
temperature, top-k, top-p; greedy takes the first maximum.
"""
import numpy as np

from mindformers.generation import GenerationConfig

_SETTINGS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "eos_token_id", "pad_token_id")


def _resolve_settings(model_config, generation_config, kwargs):
    """Model config < generation_config < keyword arguments, as in MindFormers and HF."""
    settings = {
        "max_new_tokens": model_config.max_new_tokens,
        "max_length": model_config.max_decode_length,
        "do_sample": model_config.do_sample,
        "temperature": model_config.temperature,
        "top_k": model_config.top_k,
        "top_p": model_config.top_p,
        "repetition_penalty": model_config.repetition_penalty,
        "eos_token_id": model_config.eos_token_id,
        "pad_token_id": model_config.pad_token_id,
    }
    if generation_config is not None:
        values = generation_config.to_dict() if isinstance(generation_config, GenerationConfig) else generation_config
        settings.update({key: values[key] for key in _SETTINGS if values.get(key) is not None})
    settings.update({key: kwargs.pop(key) for key in _SETTINGS if kwargs.get(key) is not None})
    eos = settings["eos_token_id"]
    settings["eos_token_id"] = set(eos if isinstance(eos, (list, tuple)) else [eos])
    if settings["temperature"] <= 0:
        raise ValueError(f"temperature must be > 0, got {settings['temperature']}")
    if not 0 < settings["top_p"] <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {settings['top_p']}")
    return settings


def _as_rows(input_ids, pad_token_id):
    """Ragged list of prompts, or a right-padded [B, S] array -> list of 1-D int arrays."""
    if isinstance(input_ids, np.ndarray) or (len(input_ids) and np.isscalar(input_ids[0])):
        array = np.asarray(input_ids).reshape(-1, np.shape(input_ids)[-1])
        rows = []
        for row in array:
            keep = np.nonzero(row != pad_token_id)[0]
            rows.append(row[:keep[-1] + 1] if keep.size else row[:0])
        return rows
    return [np.asarray(row, np.int64).reshape(-1) for row in input_ids]


def _right_padded(rows, pad_token_id):
    """Ragged rows -> ([B, S] int32 padded with pad_token_id, lengths [B])."""
    lengths = np.array([len(row) for row in rows], np.int32)
    padded = np.full((len(rows), lengths.max()), pad_token_id, np.int32)
    for target, row in zip(padded, rows):
        target[:len(row)] = row
    return padded, lengths


def apply_repetition_penalty(logits, history, penalty):
    """HF's rule on [B, V] logits: a seen token's logit is divided by `penalty` if > 0, else multiplied."""
    if penalty == 1.0:
        return logits
    for row, seen in zip(logits, history):
        tokens = np.unique(seen)
        values = row[tokens]
        row[tokens] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def sample_next(logits, settings, rng):
    """[B, V] float32 logits (already penalised) -> next token ids [B]."""
    if not settings["do_sample"]:
        return logits.argmax(-1)
    logits = logits / settings["temperature"]
    top_k = settings["top_k"]
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if settings["top_p"] < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = np.cumsum(probs, -1) - probs >= settings["top_p"]
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    probs = np.exp((logits - logits.max(-1, keepdims=True)).astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


class GenerationLoop:
    """Mixin for a model with `prefill`, `decode`, `allocate_kv_cache` and a LlavaConfig `config`;
    listed before MindFormers' PreTrainedModel so this `generate` is the one used."""

    def generate(self, input_ids, generation_config=None, logits_processor=None, streamer=None, seed=None,
                 **kwargs):
        """Generate continuations of a batch of prompts.

        Args:
            input_ids: list of token-id lists (ragged), or a right-padded [B, S] array (pad_token_id).
            generation_config: a MindFormers `GenerationConfig` or dict; keyword arguments override it
                (`max_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
                `repetition_penalty`, `eos_token_id`, `pad_token_id`).
            logits_processor: callables `(token_history [B] of arrays, logits [B, V]) -> logits`, applied
                after the repetition penalty.
            streamer: an object with `put(ids)` / `end()` (MindFormers' TextStreamer), fed each new step.
            seed: seeds the sampler; the same seed gives the same tokens.
            pixel_values: float32 [N, 3, S, S], the images of the `<image>` tokens in reading order.

        Returns:
            list of B lists: each prompt followed by its generated ids (EOS included when reached).
        """
        pixel_values = kwargs.pop("pixel_values", kwargs.pop("images", None))
        settings = _resolve_settings(self.config, generation_config, kwargs)
        if kwargs:
            raise TypeError(f"generate() got unexpected arguments: {sorted(kwargs)}")
        prompts = _as_rows(input_ids, settings["pad_token_id"])
        lengths = np.array([len(row) for row in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        longest = int(lengths.max())
        max_new = settings["max_new_tokens"]
        if max_new is None:
            max_new = settings["max_length"] - longest
        if longest + 1 > self.config.seq_length:
            raise ValueError(f"a prompt of {longest} tokens is longer than the context "
                             f"seq_length={self.config.seq_length} allows")
        max_new = max(0, min(max_new, self.config.seq_length - longest))
        rng = np.random.default_rng(seed)

        use_cache = self.config.use_past
        self.set_train(False)
        if use_cache:
            self.allocate_kv_cache(len(prompts), longest + max_new)
        history = [list(prompt) for prompt in prompts]
        finished = np.zeros(len(prompts), bool)
        positions = lengths.copy()
        pad = settings["pad_token_id"]
        logits = self.prefill(*_right_padded(history, pad), pixel_values, use_cache) if max_new else None
        for step in range(max_new):
            scores = apply_repetition_penalty(logits.asnumpy().copy(), history, settings["repetition_penalty"])
            for processor in logits_processor or ():
                scores = processor(history, scores)
            tokens = sample_next(scores, settings, rng)
            tokens = np.where(finished, settings["pad_token_id"], tokens)
            for row in np.nonzero(~finished)[0]:
                history[row].append(int(tokens[row]))
            if streamer is not None:
                streamer.put(tokens)
            finished |= np.isin(tokens, list(settings["eos_token_id"]))
            if finished.all() or step == max_new - 1:
                break
            if use_cache:
                logits = self.decode(tokens, positions)
                positions = positions + 1
            else:  # use_past off: every step runs the whole sequence again (the reference path)
                logits = self.prefill(*_right_padded(history, pad), pixel_values, use_cache)
        if streamer is not None:
            streamer.end()
        return history
