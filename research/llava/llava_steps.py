"""Running a LlavaVlm for generation: three steps, each either compiled or op by op, and the host-side work
around them (padding prompts, where image features go, which KV-cache rows a prompt fills).

    VisionStep   pixels [N, 3, S, S] -> image features [N*F, Ht]
    PrefillStep  prompts [B, S] + image features -> logits of each prompt's last token [B, V], and the
                 prompts' keys/values, which the runner writes into their cache rows. Prompts may continue
                 a cached prefix (its keys/values, read back from a row: ModelRunner.read_prefix): then only
                 the tokens after it are computed
    DecodeStep   one token for each of the first B cache rows [B] + those rows' cached keys/values ->
                 logits [B, V], and the tokens' keys/values, which the runner writes at each row's position

Each step has `eager` (op by op, PyNative) and `compiled` (the same function as one graph, ms.jit). Op-by-op
dispatch, not arithmetic, bounds speed on CPU, so the decode step is always compiled. The vision and prefill
steps are compiled only with `compile_prefill: True`: on CPU MindSpore keeps every activation of a compiled
graph allocated (several GB for the ViT-L tower and a 600-token prefill), which costs more than the faster
prompt gains there (bench/RESULTS.md); the Ascend YAML turns it on. A compiled step compiles once per input
shape: the vision step per image count, the prefill per (batch, prompt length rounded up to PREFILL_BLOCK),
the decode per (rows, cache length). The steps share the model's cells, so they see its weights; the KV cache
(KVCache, llava_model.py) is written between steps, in place, and read by the decode step as inputs.
"""
from dataclasses import dataclass

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

PREFILL_BLOCK = 32  # compiled prefills pad prompts to a multiple of this: it bounds the number of graphs
MASK_VALUE = -1e9  # finite: fully masked padding rows must not produce NaN


def causal_mask(length, prefix_length=0):
    """[1, 1, T, P+T] float32 for T tokens after a P-position prefix (P = 0: a whole prompt): the prefix all
    visible, then 0 on and below the diagonal, a large negative above."""
    return Tensor(np.triu(np.full((length, prefix_length + length), MASK_VALUE, np.float32), prefix_length + 1)[
        None, None])


@dataclass(frozen=True)
class Prefix:
    """The keys and values of the first `length` positions of a prompt (ModelRunner.read_prefix): per layer
    [1, H, length, D]. Prompts that continue it (ModelRunner.prefill(prefix=...)) attend to them instead of
    computing them again."""

    keys: tuple
    values: tuple
    length: int
    tag: int  # names it in the KV cache, which tracks the rows that hold it (KVCache.sharing)

    @property
    def nbytes(self):
        return sum(tensor.size * tensor.itemsize for tensor in self.keys + self.values)


def merge_image_features(text_embeddings, image_features, merge_index):
    """[B, S, Ht] token embeddings, [M, Ht] image features -> [B, S, Ht] where position i holds row
    merge_index[i] of [text embeddings (flattened); image features]: one gather, no data-dependent op."""
    batch, length, hidden = text_embeddings.shape
    table = ops.concat((text_embeddings.reshape(batch * length, hidden), image_features), axis=0)
    return ops.gather(table, merge_index, 0).reshape(batch, length, hidden)


class VisionStep(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def eager(self, pixel_values):
        """pixel_values [N, C, S, S] float32 -> image features [N*F, Ht] float32."""
        return self.model.image_features(pixel_values)

    @ms.jit
    def compiled(self, pixel_values):
        return self.eager(pixel_values)


class PrefillStep(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.language_model = model.language_model
        self.lm_head = model.lm_head

    def eager(self, text_ids, image_features, merge_index, positions, mask, last_index, prefix_keys=None,
              prefix_values=None):
        """text_ids, positions [B, S] int32; image_features [M, Ht]; merge_index [B*S]; mask [1, 1, S, S];
        last_index [B] (flat index of each row's last token) -> (logits [B, V] float32, keys, values: per layer
        [B, H, S, D]).

        prefix_keys, prefix_values: per layer [1, H, P, D], the first P positions that these prompts continue
        (positions P.., mask [1, 1, S, P+S])."""
        batch, length = text_ids.shape
        hidden = merge_image_features(self.language_model.embed_tokens(text_ids), image_features, merge_index)
        hidden, keys, values = self.language_model(hidden, positions, mask, prefix_keys, prefix_values,
                                                   prefix_keys is not None)
        last = ops.gather(hidden.reshape(batch * length, -1), last_index, 0)
        return self.lm_head(last).astype(ms.float32), keys, values

    @ms.jit
    def compiled(self, text_ids, image_features, merge_index, positions, mask, last_index, prefix_keys=None,
                 prefix_values=None):
        return self.eager(text_ids, image_features, merge_index, positions, mask, last_index, prefix_keys,
                          prefix_values)


class DecodeStep(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.language_model = model.language_model
        self.lm_head = model.lm_head

    def eager(self, token_ids, positions, mask, cached_keys, cached_values, sharing):
        """token_ids, positions [B, 1] int32; mask [B, 1, 1, L]; cached_keys, cached_values: per layer
        [B, H, L, D] (KVCache.views); sharing [B, 2] int32 (KVCache.sharing) -> (logits [B, V] float32, keys,
        values: per layer [B, H, 1, D])."""
        hidden, keys, values = self.language_model(self.language_model.embed_tokens(token_ids), positions, mask,
                                                   cached_keys, cached_values, False, sharing)
        return self.lm_head(hidden[:, 0]).astype(ms.float32), keys, values

    # jit_level O1 (MindSpore's graph fusion passes): ~10% faster per token than O0 (bench/RESULTS.md).
    @ms.jit(jit_level="O1")
    def compiled(self, token_ids, positions, mask, cached_keys, cached_values, sharing):
        return self.eager(token_ids, positions, mask, cached_keys, cached_values, sharing)


class ModelRunner:
    """The steps of one LlavaVlm and the KV cache they fill: `reserve` cache rows, `prefill` prompts into rows,
    then `decode` one token per row at a time. Logits come back as numpy float32 [rows, V]."""

    def __init__(self, model):
        self.model = model
        self.cache = model.language_model.kv_cache
        self.vision_step = VisionStep(model)
        self.prefill_step = PrefillStep(model)
        self.decode_step = DecodeStep(model)

    @property
    def compile_prefill(self):
        return self.model.config.compile_prefill

    def image_features(self, pixel_values):
        """pixel_values [N, C, S, S] (numpy or Tensor) -> image features [N*F, Ht] float32 Tensor."""
        if not isinstance(pixel_values, Tensor):
            pixel_values = Tensor(np.asarray(pixel_values, np.float32))
        step = self.vision_step.compiled if self.compile_prefill else self.vision_step.eager
        return step(pixel_values)

    def reserve(self, rows, length):
        """A cache of `rows` rows of at least `length` positions."""
        self.cache.allocate(rows, length)

    def prefill(self, prompts, image_features=None, rows=None, use_cache=True, prefix=None):
        """Run prompts (lists of token ids, ragged; `<image>` slots included) once; logits of each one's last
        token [len(prompts), V].

        image_features: [M, Ht] for the prompts' `<image>` slots in reading order (see `image_features`).
        rows: the cache rows the prompts' keys/values go to (default 0..n-1); without `use_cache` nothing is
        kept. Each prompt is padded after its end; decode overwrites or masks every padding slot before
        reading it.
        prefix: a Prefix (read_prefix) that every prompt continues: the prompts are then only the tokens after
        its P positions, and their rows get the prefix's keys/values followed by theirs.
        """
        start = 0 if prefix is None else prefix.length
        lengths = np.array([len(prompt) for prompt in prompts], np.int32)
        batch = len(prompts)
        block = PREFILL_BLOCK if self.compile_prefill else 1  # op by op, any length runs without a compile
        padded_length = -(-int(lengths.max()) // block) * block
        if use_cache:
            padded_length = max(int(lengths.max()), min(padded_length, self.cache.length - start))
        padded = np.full((batch, padded_length), self.model.config.pad_token_id, np.int32)
        for target, prompt in zip(padded, prompts):
            target[:len(prompt)] = prompt
        num_images = 0 if image_features is None else image_features.shape[0] // self.model.num_image_features
        text_ids, merge_index = self.model.merge_plan(padded, num_images)
        if image_features is None:
            image_features = ops.zeros((1, self.model.config.text_config.hidden_size), ms.float32)  # never gathered
        positions = np.broadcast_to(np.arange(start, start + padded_length, dtype=np.int32), (batch, padded_length))
        last_index = lengths - 1 + np.arange(batch, dtype=np.int32) * padded_length
        inputs = [Tensor(text_ids), image_features, Tensor(merge_index), Tensor(positions),
                  causal_mask(padded_length, start), Tensor(last_index)]
        if prefix is not None:
            # mutable: a tuple of tensors is otherwise a constant of a compiled graph (as in `decode`).
            inputs += [ms.mutable(prefix.keys), ms.mutable(prefix.values)]
        run = self.prefill_step.compiled if self.compile_prefill else self.prefill_step.eager
        logits, keys, values = run(*inputs)
        logits = logits.asnumpy()  # before the cache writes, as in `decode`
        if use_cache:
            rows = np.arange(batch) if rows is None else rows
            if prefix is not None:
                self.cache.write_prefix(rows, prefix.keys, prefix.values, prefix.tag)
            self.cache.write(rows, np.full(batch, start), keys, values)
        return logits

    def read_prefix(self, row, length):
        """The first `length` positions of cache row `row` (a prompt prefilled there) as a Prefix that later
        prompts can continue."""
        keys, values, tag = self.cache.read(row, length)
        return Prefix(keys, values, length, tag)

    def decode(self, tokens, positions):
        """One compiled step over the first len(tokens) cache rows: tokens [n] at positions [n] (each row's own)
        -> logits [n, V]. Rows that hold no sequence take any token at position 0 and are ignored. Each n
        compiles once."""
        positions = np.asarray(positions, np.int32).reshape(-1, 1)
        rows = len(positions)
        token_ids = Tensor(np.asarray(tokens, np.int32).reshape(-1, 1))
        cached_keys, cached_values = self.cache.views(rows)
        # mutable: a tuple of tensors is otherwise a constant of the graph, and the cache changes every step.
        logits, keys, values = self.decode_step.compiled(token_ids, Tensor(positions),
                                                         self.cache.decode_mask(positions), ms.mutable(cached_keys),
                                                         ms.mutable(cached_values), Tensor(self.cache.sharing(rows)))
        # Wait for the step before queueing the cache writes: queued behind a running graph, MindSpore's op
        # launcher competes with it for the cores (a decode step ~1.5x slower; bench/RESULTS.md).
        logits = logits.asnumpy()
        self.cache.write(np.arange(rows), positions[:, 0], keys, values)
        return logits
