"""Serving a LlavaVlm to many clients at once: an engine that owns the KV-cache rows and puts the requests of
every client into the same decode steps (continuous batching), and a cache of image features keyed by the
image's content.

The engine runs the model from one thread, as MindSpore is not thread-safe: `run` in a thread of its own
(serve.py), or `step` called in a loop (run_mindformer.py --run_mode chat). Other threads only `submit` and
`cancel` requests; what a request produces comes back through its `emit` callback, called from the engine's
thread. Each step:

1. New requests join the waiting line; cancelled ones leave it, or free their rows.
2. Waiting requests take the free cache rows, lowest first, and get a first token. A prompt whose start,
   through its last image, was prefilled before (same pictures, same tokens: the prefix cache) continues
   that prefix's cached keys/values: only the tokens after it (the question, ~30 of LLaVA's ~610) are
   computed, in one prefill per shared prefix. The others: their images' features (from the image cache, or
   one vision call for every image not in it), one prefill for all of them, and their prefixes into the
   prefix cache. An admission computes at most `context` padded prompt tokens (one full-context prompt's
   activations): on CPU MindSpore keeps the peak of its memory pool, and 15 prompts of 640 tokens in one
   prefill grew the 474M bench server to 16 GB (bench/RESULTS.md, serving). A request whose prefix another
   request in the same admission is computing waits one step, then continues it.
3. One decode step over rows 0..k-1, k the smallest compiled row count that holds every running row (a lone
   request does not pay for the attention of 15 empty rows; bench/RESULTS.md, serving).
4. Each row samples its token with its own settings and random generator, streams its text, and finishes at
   EOS, a stop string or its token budget, which frees its row for step 2 of the next step.

Rows are independent (own positions, own mask), so a request admitted mid-way does not change the tokens of
the others: greedy answers are the ones `generate` gives for each request alone.
"""
import collections
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from mindspore import Tensor

from llava_generation import penalize_repetition, row_rng, sample
from llava_processor import chat_prompt
from llava_steps import PREFILL_BLOCK

log = logging.getLogger("llava.serving")

# Room for ~54 pictures of the 7B model (576 features x 4096 x 4 bytes = 9.4 MB each), ~14,000 of the tiny one.
DEFAULT_IMAGE_CACHE_BYTES = 512 << 20
# Prefixes are keys and values of every layer: a 7B prompt through one picture (~600 positions x 32 layers x 2
# x 4096 x 4 bytes) is 0.63 GB, the 474M bench model's 39 MB.
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------- inputs

def prepare_images(image_processor, images):
    """PIL images -> [(key, pixels [3, S, S] float32)]. The key is the SHA-256 of the preprocessed pixels and
    of the preprocessing settings, so the same picture sent again (in any file format, under any name, at any
    place in any conversation) finds its features, and a different picture never does: keys made from token
    ids or positions have served one image's answer for another in other engines."""
    settings = repr((image_processor.image_size, image_processor.mean.tolist(), image_processor.std.tolist(),
                     image_processor.pad_to_square, image_processor.pad_color)).encode()
    entries = []
    for image in images:
        pixels = image_processor.preprocess(image)
        digest = hashlib.sha256(settings)
        digest.update(repr((pixels.shape, pixels.dtype.str)).encode())
        digest.update(pixels.tobytes())
        entries.append((digest.hexdigest(), pixels))
    return entries


def prompt_ids(processor, messages, num_images):
    """A conversation (chat_prompt's messages) -> prompt ids; ValueError when its image tags do not match
    `num_images` or it does not fit the context."""
    return processor.encode_templated(chat_prompt(messages), num_images)


def prompt_prefix(request, image_token_id):
    """(key, length): the start of a request's prompt through its last image, which later prompts about the same
    pictures share (the template, the earlier turns, the image slots), and the key of its cached keys/values.
    The key hashes the pictures' keys (their content, prepare_images) with the token ids: every picture's slots
    hold the same ids. (None, 0) without images, or when nothing follows the last image."""
    if not request.images:
        return None, 0
    ids = np.asarray(request.prompt_ids, np.int32)
    length = int(np.flatnonzero(ids == image_token_id)[-1]) + 1
    if length == len(ids):
        return None, 0
    digest = hashlib.sha256(ids[:length].tobytes())
    for key, _ in request.images:
        digest.update(key.encode())
    return digest.hexdigest(), length


# ----------------------------------------------------------------------------------------------- requests

@dataclass
class Output:
    """What a request produced since its last Output: `text` to append; the last one has `finish_reason`
    ("stop": EOS or a stop string, "length": the token budget, "cancelled", "error" with `error`)."""

    text: str = ""
    finish_reason: str = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = None


@dataclass(eq=False)
class Request:
    """One conversation to continue.

    prompt_ids: the templated prompt's ids, `<image>` slots expanded (prompt_ids()).
    images: [(key, pixels)] for the slots, in reading order (prepare_images()).
    settings: GenerationSettings (do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id).
    max_new_tokens: the token budget (prompt + budget must fit the context; the caller checks).
    emit: called with each Output, from the engine's thread.
    seed: the sampler's seed (the same as `generate(seed=seed)` for this prompt alone); None: fresh entropy.
    stop: strings that end the answer (not included in it).
    """

    prompt_ids: list
    images: list
    settings: object
    max_new_tokens: int
    emit: object
    seed: int = None
    stop: tuple = ()
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)


class TextStream:
    """Generated ids -> the answer's text in pieces that add up to what `answer()` gives for the same ids
    (special tokens dropped, surrounding whitespace stripped), cut before the first stop string.

    Text that may still change is held back until it cannot: trailing whitespace (stripped if the answer ends
    there), an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives), and a tail that
    could be the start of a stop string.

    Each id decodes a window of the last few ids, not all of them (a 2000-token answer would otherwise decode
    two million ids): the ids after `start` decoded, minus the ids from `start` to `done` decoded, is the new
    text. Decoding from one id before the new ones keeps what a tokenizer does at the start of a text (a
    SentencePiece word's leading space dropped) out of the difference.
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids, self.sent = [], 0
        self.decoded, self.start, self.done = "", 0, 0  # the text of ids[:done]; the window starts at `start`
        self.stopped = False

    def push(self, token):
        """Add a generated id; returns the text that became final. Sets `stopped` at a stop string."""
        self.ids.append(int(token))
        window = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=True)
        known = self.tokenizer.decode(self.ids[self.start:self.done], skip_special_tokens=True)
        if len(window) > len(known) and not window.endswith("\ufffd"):  # else: wait for the character's last byte
            self.decoded += window[len(known):]
            self.start, self.done = self.done, len(self.ids)
        text = self.decoded.lstrip()
        cuts = [text.find(stop) for stop in self.stop if stop in text]
        if cuts:
            self.stopped = True
            return self._take(text[:min(cuts)].rstrip())
        text = text.rstrip()
        held = max((size for stop in self.stop for size in range(1, len(stop)) if text.endswith(stop[:size])),
                   default=0)
        return self._take(text[:len(text) - held])

    def finish(self):
        """The rest of the answer once no more ids come."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True).strip())

    def _take(self, text):
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece


class Sequence:
    """A request while it holds a cache row."""

    def __init__(self, request, tokenizer):
        self.request = request
        self.history = list(request.prompt_ids)  # the repetition penalty looks at the prompt too, as generate's
        self.rng = row_rng(request.seed, 0)
        self.text = TextStream(tokenizer, request.stop)
        self.generated = 0
        self.first_token_at = None

    @property
    def position(self):
        """Where the last sampled token goes in the cache (the next decode step's input)."""
        return len(self.history) - 1


# ----------------------------------------------------------------------------------------------- caches

class LRUCache:
    """Values with an `nbytes` by key, least recently used out first, at most `capacity` bytes: the image
    features [F, Ht] by image key (prepare_images), and the prompt prefixes (llava_steps.Prefix) by
    prompt_prefix's key. Hits and misses are counted for the logs and /metrics."""

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self.entries = collections.OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def __contains__(self, key):
        return key in self.entries

    def get(self, key):
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value):
        if key in self.entries or value.nbytes > self.capacity:
            return
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.capacity:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes

    def stats(self):
        lookups = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / lookups if lookups else 0.0,
                "entries": len(self.entries), "bytes": self.bytes, "capacity_bytes": self.capacity}


# ----------------------------------------------------------------------------------------------- engine

COUNTERS = ("requests", "finished", "cancelled", "error", "prefills", "prefill_rows", "prefill_tokens", "decode_steps",
            "decode_rows", "max_running", "generated_tokens", "vision_calls", "vision_images")


def decode_row_counts(max_rows):
    """The row counts the decode step is compiled for: powers of two below `max_rows`, and `max_rows`."""
    counts, count = [], 1
    while count < max_rows:
        counts.append(count)
        count *= 2
    return counts + [max_rows]


class Engine:
    """Continuous batching over `max_batch_size` KV-cache rows of a LlavaVlm (see the module docstring).

    `warm_up` (from the engine's thread, before serving) allocates the cache once, for the whole context, and
    compiles the decode step for each row count, so nothing compiles while clients wait.
    """

    def __init__(self, model, tokenizer, max_batch_size, image_cache_bytes,
                 prefix_cache_bytes=DEFAULT_PREFIX_CACHE_BYTES):
        if max_batch_size < 1:
            raise ValueError(f"the max batch size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.runner = model.runner()
        self.context = model.config.seq_length
        self.rows = [None] * max_batch_size
        self.row_counts = decode_row_counts(max_batch_size)
        self.inbox = queue.Queue()
        self.waiting = collections.deque()
        self.image_cache = LRUCache(image_cache_bytes)
        self.prefix_cache = LRUCache(prefix_cache_bytes)
        # Every key from the start: /metrics reads the counters from another thread while this one counts.
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self.ready = threading.Event()

    # -- from any thread

    def submit(self, request):
        self.counters["requests"] += 1
        self.inbox.put(request)

    def cancel(self, request):
        """Stop a request (its client went away): it leaves the waiting line, or frees its row, at the next
        step; its `emit` gets a last Output with finish_reason "cancelled"."""
        request.cancelled = True
        self.inbox.put(None)  # wakes an idle engine

    def metrics(self):
        running = sum(row is not None for row in self.rows)
        return {"ready": self.ready.is_set(), "max_batch_size": len(self.rows), "running": running,
                "waiting": len(self.waiting) + self.inbox.qsize(), **dict(self.counters),
                "image_cache": self.image_cache.stats(), "prefix_cache": self.prefix_cache.stats()}

    # -- from the engine's thread

    def warm_up(self):
        """Allocate the cache and run every step once (a prompt with an image; every row continuing its prefix,
        which grows MindSpore's memory pool to what a full admission needs: growing it within a request cost
        ~0.25 s; each decode row count), so that nothing compiles or allocates while clients wait."""
        self.model.set_train(False)
        self.runner.reserve(len(self.rows), self.context)
        image_size = self.model.config.vision_config.image_size
        features = self.runner.image_features(np.zeros((1, 3, image_size, image_size), np.float32))
        bos = self.model.config.text_config.bos_token_id
        prompt = [bos] + [self.model.image_token_id] * self.model.num_image_features
        self.runner.prefill([prompt], features, rows=[0])
        if len(prompt) < self.context:
            tails = [[bos] * min(PREFILL_BLOCK, self.context - len(prompt))] * len(self.rows)
            self.runner.prefill(tails, rows=list(range(len(self.rows))),
                                prefix=self.runner.read_prefix(0, len(prompt)))
        for count in self.row_counts:
            self.runner.decode(np.zeros(count, np.int32), np.zeros(count, np.int32))
        self.ready.set()

    def run(self, stop):
        """Serve until the `stop` event is set (threading.Event)."""
        while not stop.is_set():
            self.step(timeout=0.1)

    def step(self, timeout=None):
        """One round of the loop in the module docstring. With nothing to do, waits up to `timeout` seconds
        (None: until a request comes) for a request."""
        self._take_requests(block=not self.busy(), timeout=timeout)
        self._drop_cancelled()
        self._admit()
        self._decode()

    def busy(self):
        """Requests submitted, waiting or running."""
        return not self.inbox.empty() or bool(self.waiting) or any(row is not None for row in self.rows)

    def _take_requests(self, block, timeout):
        try:
            item = self.inbox.get(block=block, timeout=timeout if block else None)
            while True:
                if item is not None:
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self):
        for request in [request for request in self.waiting if request.cancelled]:
            self.waiting.remove(request)
            self.counters["cancelled"] += 1
            self._send(request, Output(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))
        for index, sequence in enumerate(self.rows):
            if sequence is not None and sequence.request.cancelled:
                self._finish(index, "cancelled")

    def _admit(self):
        """Waiting requests into the free rows (step 2 of the module docstring)."""
        free = [index for index, sequence in enumerate(self.rows) if sequence is None]
        fresh = []  # (row, request, prefix key, prefix length): computed whole
        continued = {}  # prefix key -> (Prefix, [(row, request)]): computed after their cached prefix
        longest = admitted = 0
        while free and self.waiting:
            request = self.waiting[0]
            key, length = prompt_prefix(request, self.model.image_token_id)
            if key is not None and any(key == entry[2] for entry in fresh):
                break  # a prefix this admission computes: continue it at the next step
            cached = key is not None and key in self.prefix_cache
            longest = max(longest, len(request.prompt_ids) - (length if cached else 0))
            if admitted and longest * (admitted + 1) > self.context:  # bounds any one prefill's padded size
                break
            self.waiting.popleft()
            admitted += 1
            prefix = self.prefix_cache.get(key) if key is not None else None
            if prefix is not None:
                continued.setdefault(key, (prefix, []))[1].append((free.pop(0), request))
            else:
                fresh.append((free.pop(0), request, key, length))
        for prefix, batch in continued.values():
            self._prefill(batch, prefix)
        if fresh and self._prefill([(row, request) for row, request, *_ in fresh]):
            for row, _, key, length in fresh:  # their prefixes, for the requests that follow (rows still hold
                if key is not None:           # them: a row freed at its first token is not reused before this)
                    self.prefix_cache.put(key, self.runner.read_prefix(row, length))
        if fresh or continued:
            stats = self.prefix_cache.stats()
            log.info("prefix cache: %d hits, %d misses (hit rate %.0f%%), %d entries, %.1f MB", stats["hits"],
                     stats["misses"], 100 * stats["hit_rate"], stats["entries"], stats["bytes"] / 1e6)

    def _prefill(self, batch, prefix=None):
        """Prefill [(row, request)] into their rows (after `prefix`, a cached Prefix they all continue), and
        sample each one's first token. False if the prefill failed (the requests get an error)."""
        requests = [request for _, request in batch]
        start = 0 if prefix is None else prefix.length
        prompts = [request.prompt_ids[start:] for request in requests]
        try:
            features = None if prefix is not None else self._image_features(requests)
            logits = self.runner.prefill(prompts, features, rows=[index for index, _ in batch], prefix=prefix)
        except Exception as error:  # pylint: disable=broad-except  (a fault here must not stop the others)
            log.exception("prefill failed")
            self.counters["error"] += len(requests)
            for request in requests:
                self._send(request, Output(finish_reason="error", error=f"internal error: {error}"))
            return False
        self.counters["prefills"] += 1
        self.counters["prefill_rows"] += len(batch)
        self.counters["prefill_tokens"] += sum(len(prompt) for prompt in prompts)
        for (index, request), row_logits in zip(batch, logits):
            self.rows[index] = Sequence(request, self.tokenizer)
            self._next_token(index, row_logits)
        return True

    def _image_features(self, requests):
        """The features of the requests' images in reading order [M, Ht]: from the cache, and one vision call
        for every distinct image not in it. None when no request has an image."""
        wanted = [image for request in requests for image in request.images]
        if not wanted:
            return None
        found, missing = {}, {}
        for key, pixels in wanted:
            if key in found or key in missing:
                self.image_cache.hits += 1  # the same picture twice in one admission: one vision pass
                continue
            features = self.image_cache.get(key)
            if features is None:
                missing[key] = pixels
            else:
                found[key] = features
        if missing:
            computed = self.runner.image_features(np.stack(list(missing.values()))).asnumpy()
            computed = computed.reshape(len(missing), self.model.num_image_features, -1)
            for key, features in zip(missing, computed):
                found[key] = features
                self.image_cache.put(key, features)
            self.counters["vision_calls"] += 1
            self.counters["vision_images"] += len(missing)
        stats = self.image_cache.stats()
        log.info("image cache: %d hits, %d misses (hit rate %.0f%%), %d entries, %.1f MB", stats["hits"],
                 stats["misses"], 100 * stats["hit_rate"], stats["entries"], stats["bytes"] / 1e6)
        return Tensor(np.concatenate([found[key] for key, _ in wanted]))

    def _decode(self):
        running = [index for index, sequence in enumerate(self.rows) if sequence is not None]
        if not running:
            return
        count = next(count for count in self.row_counts if count > running[-1])
        tokens = np.zeros(count, np.int32)  # rows without a sequence: any token at position 0
        positions = np.zeros(count, np.int32)
        for index in running:
            tokens[index] = self.rows[index].history[-1]
            positions[index] = self.rows[index].position
        try:
            logits = self.runner.decode(tokens, positions)
        except Exception as error:  # pylint: disable=broad-except
            log.exception("decode step failed")
            for index in running:
                self._finish(index, "error", f"internal error: {error}")
            return
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(running)
        self.counters["max_running"] = max(self.counters["max_running"], len(running))
        for index in running:
            self._next_token(index, logits[index])

    def _next_token(self, index, logits):
        """Sample row `index`'s next token from its logits [V], stream it, and finish the row if it is done."""
        sequence = self.rows[index]
        request, settings = sequence.request, sequence.request.settings
        # `logits` is this row of a step's fresh array, read once: penalized in place.
        token = sample(penalize_repetition(logits, sequence.history, settings.repetition_penalty), settings,
                       sequence.rng)
        sequence.history.append(token)
        sequence.generated += 1
        self.counters["generated_tokens"] += 1
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        if token in settings.eos_token_id:
            self._finish(index, "stop")
            return
        text = sequence.text.push(token)
        if sequence.text.stopped:
            self._finish(index, "stop", text=text)
        elif sequence.generated >= request.max_new_tokens or len(sequence.history) >= self.context:
            self._finish(index, "length", text=text)
        elif text:
            self._send(request, Output(text=text))

    def _finish(self, index, reason, error=None, text=""):
        sequence, self.rows[index] = self.rows[index], None
        request = sequence.request
        if reason in ("stop", "length"):
            text += sequence.text.finish()
        self.counters["finished" if reason in ("stop", "length") else reason] += 1
        self._send(request, Output(text=text, finish_reason=reason, prompt_tokens=len(request.prompt_ids),
                                   completion_tokens=sequence.generated, error=error))
        now = time.perf_counter()
        decode_seconds = now - sequence.first_token_at
        log.info("request done (%s): %d prompt + %d generated tokens, first token after %.2f s, %.1f tokens/s; "
                 "%d rows running", reason, len(request.prompt_ids), sequence.generated,
                 sequence.first_token_at - request.arrived,
                 (sequence.generated - 1) / decode_seconds if decode_seconds > 0 else 0.0,
                 sum(row is not None for row in self.rows))

    def _send(self, request, output):
        try:
            request.emit(output)
        except Exception:  # pylint: disable=broad-except  (a client that cannot take it is gone)
            log.exception("could not deliver a result; cancelling the request")
            request.cancelled = True
