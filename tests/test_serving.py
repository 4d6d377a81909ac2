"""llava_serving on the bundled tiny model, in process and step by step: the prompt template against
llava-1.5-hf's own chat template, the text stream, the caches, and the engine's batching (admission into freed
rows, prompts continuing a cached prefix, answers equal to `generate` alone, cancellation)."""
from collections import Counter
import os

import numpy as np
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

import shapes_task
from conftest import PLUGIN, REFERENCE_DIR, TINY
from llava_weights import load_weights
from llava_generation import GenerationSettings
from llava_processor import build_prompt, chat_prompt
from llava_runtime import build_components, set_up_context
from llava_serving import (Engine, LRUCache, Request, TextStream, decode_row_counts, prepare_images, prompt_ids,
                           prompt_prefix)
from llava_tokenizer import LlavaTokenizer
from run_mindformer import load_config, parse_args, register_plugin

set_up_context("CPU", mode=1)

# llava-hf/llava-1.5-7b-hf's chat_template.json (as transformers' tests/models/llava/test_processing_llava.py
# carries it).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def text(value):
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}
CONVERSATIONS = [
    [{"role": "user", "content": [IMAGE, text("What shape is blue?")]}],
    [{"role": "user", "content": [text("Compare them."), IMAGE, IMAGE]}],
    [{"role": "system", "content": [text("Answer briefly.")]},
     {"role": "user", "content": [IMAGE, text("What shape is blue?")]},
     {"role": "assistant", "content": [text("The blue shape is a cross.")]},
     {"role": "user", "content": [text("And the red one?"), text("Be exact.")]}],
    [{"role": "user", "content": [text("Hello")]}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_is_llava_hf_chat_template(messages):
    rendered = render_jinja_template([messages], chat_template=LLAVA_HF_TEMPLATE, add_generation_prompt=True)[0][0]
    assert chat_prompt(messages) == rendered


def test_one_question_is_the_processor_template():
    assert chat_prompt(CONVERSATIONS[0]) == build_prompt("What shape is blue?")


class WordTokenizer:
    """decode() of a fixed vocabulary (id -> piece), with a special id that skip_special_tokens drops."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


def stream_all(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces


def test_text_stream_holds_back_what_may_change_and_adds_up_to_the_answer():
    tokenizer = WordTokenizer(["</s>", " The", " cat", " sat", ".", " ", "\ufffd", "END", "E"])
    assert stream_all(tokenizer, [1, 2, 5, 3, 4]) == ["The", " cat", "", "  sat", ".", ""]  # the space waits
    assert "".join(stream_all(tokenizer, [1, 6, 2])) == "The\ufffd cat"  # a lone U+FFFD waits for the next piece
    # A stop string: the answer ends before it; a tail that may start it waits until it cannot.
    assert stream_all(tokenizer, [1, 2, 8, 3], stop=("EN",)) == ["The", " cat", "", "E sat", ""]
    assert stream_all(tokenizer, [1, 2, 8, 7, 3], stop=("END",)) == ["The", " cat", "", "E", ""]
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(tokenizer.pieces), 12).tolist()
        stop = ("END",) if rng.random() < 0.5 else ()
        full = tokenizer.decode(ids).lstrip()
        expected = (full[:full.find("END")] if "END" in full and stop else full).strip()
        assert "".join(stream_all(tokenizer, ids, stop)) == expected


class CountingTokenizer:
    """A tokenizer's decode, counting the ids it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded_ids = tokenizer, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_text_stream_of_llama_ids_is_the_whole_decode_and_decodes_a_window_per_id():
    """The LLaMA SentencePiece tokenizer: word-start spaces, byte-fallback pieces (<0x..>: a character in several
    ids), special ids: the pieces add up to the decode of all ids; each id decodes a few ids, not all so far."""
    tokenizer = CountingTokenizer(LlavaTokenizer(os.path.join(REFERENCE_DIR, "llama2_tokenizer.model")))
    rng = np.random.default_rng(3)
    accented = tokenizer.tokenizer.encode("Café, naïve — 東京 ok", add_special_tokens=False)
    for trial in range(40):
        ids = rng.integers(0, 32000, 60).tolist()
        ids[10:10] = accented  # multi-byte characters split over byte pieces
        ids[30:30] = rng.integers(3, 259, 6).tolist()  # raw bytes: some never make a character
        if trial % 2:
            ids[20] = 2  # EOS: a special id, dropped
        expected = tokenizer.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert "".join(stream_all(tokenizer, ids)) == expected, trial
    tokenizer.decoded_ids = 0
    long_answer = [rng.choice(accented + [450, 6635, 338, 263]) for _ in range(2000)]
    pieces = stream_all(tokenizer, long_answer)
    assert "".join(pieces) == tokenizer.tokenizer.decode(long_answer, skip_special_tokens=True).strip()
    assert tokenizer.decoded_ids < 20 * len(long_answer) + 2 * len(long_answer)  # the window, then finish()


def test_lru_cache_is_bounded_in_bytes_and_least_recently_used_goes_first():
    cache = LRUCache(capacity=3 * 400)
    features = {key: np.zeros((10, 10), np.float32) for key in "abcd"}  # 400 bytes each
    for key in "abc":
        cache.put(key, features[key])
    assert cache.get("a") is features["a"]  # a is now the most recent
    cache.put("d", features["d"])  # over capacity: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("c") is not None
    assert cache.stats() == {"hits": 2, "misses": 1, "hit_rate": 2 / 3, "entries": 3, "bytes": 1200,
                             "capacity_bytes": 1200}
    cache.put("huge", np.zeros(1000, np.float32))  # larger than the whole cache: not kept, nothing evicted
    assert cache.stats()["entries"] == 3


def test_prompt_prefix_ends_at_the_last_image_and_its_key_is_the_pictures_content_and_the_tokens():
    def request(ids, *keys):
        return Request(ids, [(key, None) for key in keys], None, 1, None)
    image = 9
    key, length = prompt_prefix(request([1, 5, image, image, 6, image, 7, 8], "a", "b"), image)
    assert length == 6
    assert prompt_prefix(request([1, 5, image, image, 6, image, 4], "a", "b"), image) == (key, length)  # other tail
    for other in (request([1, 5, image, image, 6, image, 7, 8], "a", "c"),  # another picture, the same ids
                  request([1, 5, image, image, 6, image, 7, 8], "b", "a"),  # the pictures in another order
                  request([1, 3, image, image, 6, image, 7, 8], "a", "b")):  # another text before them
        assert prompt_prefix(other, image)[0] not in (None, key)
    assert prompt_prefix(request([1, 5, 7]), image) == (None, 0)  # no picture
    assert prompt_prefix(request([1, 5, image], "a"), image) == (None, 0)  # nothing after it to compute


def test_decode_row_counts():
    assert decode_row_counts(1) == [1]
    assert decode_row_counts(4) == [1, 2, 4]
    assert decode_row_counts(6) == [1, 2, 4, 6]


# ---------------------------------------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def tiny():
    register_plugin(PLUGIN)
    args = parse_args(["--config", os.path.join(TINY, "predict_llava_tiny.yaml"),
                       "--options", f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}"])
    model, tokenizer, processor = build_components(load_config(args))
    load_weights(model, os.path.join(TINY, "llava_tiny.ckpt"))
    return model, tokenizer, processor


class Recorder:
    """A request's emit callback: every Output, and the step at which the last came."""

    def __init__(self, engine):
        self.engine, self.outputs, self.finished_at = engine, [], None

    def __call__(self, output):
        self.outputs.append(output)
        if output.finish_reason:
            self.finished_at = self.engine.counters["decode_steps"]

    @property
    def text(self):
        return "".join(output.text for output in self.outputs)


def ask(engine, processor, question, image, budget, settings, **options):
    images = prepare_images(processor.image_processor, [image]) if image is not None else []
    messages = [{"role": "user", "content": [IMAGE] * len(images) + [text(question)]}]
    recorder = Recorder(engine)
    request = Request(prompt_ids(processor, messages, len(images)), images, settings, budget, recorder, **options)
    engine.submit(request)
    return request, recorder


def test_rows_free_for_waiting_requests_and_answers_equal_generate_alone(tiny):
    """Two rows, five requests: a never-ending one (EOS off) keeps its row while four short ones take turns in
    the other; each short answer is the one generate gives for it alone, and they all finish first."""
    model, tokenizer, processor = tiny
    engine = Engine(model, tokenizer, max_batch_size=2, image_cache_bytes=1 << 20)
    engine.warm_up()
    greedy = GenerationSettings.resolve(model.config)
    scenes = [shapes_task.random_scene(np.random.default_rng(seed)) for seed in range(3)]
    images = [shapes_task.render(scene) for scene in scenes] + [shapes_task.render(shapes_task.demo_scene())]
    long_request, long_answer = ask(engine, processor, "Describe the image.", images[0], 60,
                                    GenerationSettings.resolve(model.config, eos_token_id=()))
    shorts = [ask(engine, processor, question, image, 32, greedy)
              for question, image in zip(["What shape is blue?", "How many shapes are there?",
                                          "Describe the image.", "What color is the triangle?"], images)]
    while engine.busy():
        engine.step()
    assert long_answer.outputs[-1].finish_reason == "length" and long_answer.outputs[-1].completion_tokens == 60
    assert all(recorder.finished_at < long_answer.finished_at for _, recorder in shorts)
    assert engine.counters["max_running"] == 2 and engine.counters["prefill_rows"] == 5
    for request, recorder in shorts:
        alone = model.generate([request.prompt_ids], pixel_values=np.stack([request.images[0][1]]))[0]
        generated = alone[len(request.prompt_ids):]
        assert recorder.text == tokenizer.decode(generated, skip_special_tokens=True).strip()
        assert recorder.outputs[-1].completion_tokens == len(generated)
        assert recorder.outputs[-1].finish_reason == "stop"
    # Four distinct pictures (the long request's is the first short one's): each through the tower once.
    assert engine.counters["vision_images"] == 4


def test_seeded_sampling_equals_generate_with_that_seed(tiny):
    model, tokenizer, processor = tiny
    engine = Engine(model, tokenizer, max_batch_size=2, image_cache_bytes=1 << 20)
    engine.warm_up()
    image = shapes_task.render(shapes_task.demo_scene())
    sampling = GenerationSettings.resolve(model.config, do_sample=True, temperature=1.5)
    request, recorder = ask(engine, processor, "Describe the image.", image, 20, sampling, seed=5)
    ask(engine, processor, "Describe the image.", image, 20, sampling, seed=6)  # a neighbour in the batch
    while engine.busy():
        engine.step()
    alone = model.generate([request.prompt_ids], pixel_values=np.stack([request.images[0][1]]), seed=5,
                           do_sample=True, temperature=1.5, max_new_tokens=20)[0][len(request.prompt_ids):]
    assert recorder.text == tokenizer.decode(alone, skip_special_tokens=True).strip()


def test_cancelled_requests_free_their_rows(tiny):
    model, tokenizer, processor = tiny
    engine = Engine(model, tokenizer, max_batch_size=1, image_cache_bytes=1 << 20)
    engine.warm_up()
    endless = GenerationSettings.resolve(model.config, eos_token_id=())
    running, running_answer = ask(engine, processor, "Describe the image.", None, 100, endless)
    waiting, waiting_answer = ask(engine, processor, "Describe the image.", None, 100, endless)
    for _ in range(3):
        engine.step()
    assert engine.rows[0].request is running and list(engine.waiting) == [waiting]
    engine.cancel(waiting)
    engine.cancel(running)
    engine.step()
    assert engine.rows == [None] and not engine.waiting and not engine.busy()
    assert running_answer.outputs[-1].finish_reason == "cancelled"
    assert waiting_answer.outputs == [waiting_answer.outputs[-1]]  # it never started
    assert waiting_answer.outputs[-1].finish_reason == "cancelled"
    assert engine.counters["cancelled"] == 2


def test_questions_about_a_cached_prefix_compute_only_their_tails_and_answer_as_generate_alone(tiny):
    """A first question about a picture prefills it whole and keeps its prefix; three more questions about it,
    sent together with a question about another picture, continue that prefix in one prefill (only their tails
    computed), and a second question about the other picture, sent with its first, waits a step and continues
    its prefix too. Every answer is generate's for the request alone."""
    model, tokenizer, processor = tiny
    engine = Engine(model, tokenizer, max_batch_size=6, image_cache_bytes=1 << 20, prefix_cache_bytes=1 << 20)
    engine.warm_up()
    greedy = GenerationSettings.resolve(model.config)
    picture, other = (shapes_task.render(shapes_task.random_scene(np.random.default_rng(seed))) for seed in (7, 8))
    questions = ["What shape is blue?", "How many shapes are there?", "Describe the image.",
                 "What color is the triangle?"]
    asked = [ask(engine, processor, questions[0], picture, 24, greedy)]
    while engine.busy():
        engine.step()
    first = asked[0][0]
    _, length = prompt_prefix(first, model.image_token_id)
    assert engine.counters["prefill_tokens"] == len(first.prompt_ids)
    assert engine.prefix_cache.stats()["entries"] == 1 and engine.prefix_cache.stats()["misses"] == 1
    before = dict(engine.counters)
    tables, sharing = [], engine.runner.cache.sharing  # what the decode steps were told rows share
    engine.runner.cache.sharing = lambda rows: tables.append(sharing(rows)) or tables[-1]
    asked += [ask(engine, processor, question, picture, 24, greedy) for question in questions[1:]]
    asked += [ask(engine, processor, question, other, 24, greedy) for question in questions[:2]]
    while engine.busy():
        engine.step()
    # The three rows continuing the first prefix read it from one of them (the decode kernel's shared reads).
    assert any(max(Counter(tuple(row) for row in table.tolist() if row[1] == length).values(), default=0) == 3
               for table in tables)
    # Three tails after the cached prefix (one prefill), the other picture whole, then its second question's tail.
    tails = [len(request.prompt_ids) - length for request, _ in asked[1:4] + asked[5:]]
    assert engine.counters["prefill_tokens"] - before["prefill_tokens"] == sum(tails) + len(asked[4][0].prompt_ids)
    assert engine.counters["prefills"] - before["prefills"] == 3
    assert engine.counters["vision_images"] - before["vision_images"] == 1
    assert engine.prefix_cache.stats()["hits"] == 4 and engine.prefix_cache.stats()["entries"] == 2
    for request, recorder in asked:
        alone = model.generate([request.prompt_ids], pixel_values=np.stack([request.images[0][1]]),
                               max_new_tokens=24)[0][len(request.prompt_ids):]
        assert recorder.text == tokenizer.decode(alone, skip_special_tokens=True).strip()
