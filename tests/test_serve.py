"""serve.py, live on 127.0.0.1 with the bundled tiny model (conftest.live_server), through the official `openai`
client and plain HTTP: the demo answers, streaming, usage, multi-turn, batching of concurrent clients, the
image-feature cache, client disconnects, and a 4xx JSON error for every kind of bad request."""
import base64
import concurrent.futures
import io
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

import shapes_task
from conftest import PLUGIN, REPO, TINY
from llava_processor import LlavaProcessor
from llava_tokenizer import LlavaTokenizer

MODEL = "llava_tiny"
DEMO_PNG = os.path.join(TINY, "demo.png")
with open(os.path.join(TINY, "demo.json"), encoding="utf-8") as spec:
    DEMO_ANSWERS = {item["question"]: item["answer"] for item in json.load(spec)["questions"]}
MAKE_DEMO_QUESTIONS = ["Describe the image.", "How many shapes are there?", "What color is the triangle?",
                       "What shape is blue?"]
FIRST_ANSWER = "The blue shape is a cross."
FOLLOW_UP = "What color is the triangle?"
MULTI_TURN_PROMPT = f"USER: <image>\nWhat shape is blue? ASSISTANT: {FIRST_ANSWER} USER: {FOLLOW_UP} ASSISTANT:"


def data_url(image, kind="png"):
    """A PIL image or a file path as a data:image/...;base64 URL."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            raw = f.read()
    else:
        buffer = io.BytesIO()
        image.save(buffer, format=kind.upper())
        raw = buffer.getvalue()
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def user(question, *images):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}} for url in images]
            + [{"type": "text", "text": question}]}


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server["url"] + "/v1", api_key="unused", max_retries=0)


def ask(client, question, image_url=None, **options):
    messages = [user(question, image_url)] if image_url else [{"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)


def metrics(live_server):
    return httpx.get(live_server["url"] + "/metrics").json()


@pytest.fixture(scope="module")
def command_line_answers(tmp_path_factory):
    """run_mindformer.py's answers (text and ids) to the demo questions and to the multi-turn prompt."""
    root = tmp_path_factory.mktemp("cli")
    data = [item for question in MAKE_DEMO_QUESTIONS + [MULTI_TURN_PROMPT] for item in (DEMO_PNG, question)]
    subprocess.run([sys.executable, os.path.join(REPO, "run_mindformer.py"), "--config",
                    os.path.join(TINY, "predict_llava_tiny.yaml"), "--register_path", PLUGIN, "--run_mode", "predict",
                    "--load_checkpoint", os.path.join(TINY, "llava_tiny.ckpt"), "--modal_type", "image", "text",
                    "--predict_data", *data, "--output_dir", str(root), "--options",
                    f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}"],
                   check=True, capture_output=True, cwd=str(root), timeout=300)
    with open(root / "predict_results.jsonl", encoding="utf-8") as f:
        return {row["prompt"]: row for row in map(json.loads, f)}


def test_demo_questions_answered_as_the_command_line_does(client, command_line_answers):
    image = data_url(DEMO_PNG)
    for question in MAKE_DEMO_QUESTIONS:
        reply = ask(client, question, image)
        expected = command_line_answers[question]
        assert reply.choices[0].message.content == expected["text"] == DEMO_ANSWERS[question]
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
        # 1 BOS + the template's text + 9 image slots; the answer's tokens with its EOS
        assert reply.usage.completion_tokens == len(expected["token_ids"])
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.model == MODEL and reply.object == "chat.completion"


def test_prompt_tokens_are_the_processor_ids(client):
    processor = LlavaProcessor(LlavaTokenizer(os.path.join(TINY, "tokenizer.model")), num_image_features=9,
                               max_length=128, image_size=48)
    for image in (data_url(DEMO_PNG), None):
        expected = processor.encode_prompt("What shape is blue?", 1 if image else 0)
        assert ask(client, "What shape is blue?", image).usage.prompt_tokens == len(expected)


def test_streamed_chunks_add_up_to_the_answer(client):
    image = data_url(DEMO_PNG)
    whole = ask(client, "Describe the image.", image)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[user("Describe the image.", image)],
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 5  # token by token, not one block
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert len({chunk.id for chunk in chunks}) == 1


def test_stream_ends_with_done(live_server):
    body = {"model": MODEL, "messages": [user("What shape is blue?", data_url(DEMO_PNG))], "stream": True}
    with httpx.stream("POST", live_server["url"] + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_multi_turn_follows_the_template(client, command_line_answers):
    """The follow-up gets the answer run_mindformer.py gives to the same conversation written out."""
    image = data_url(DEMO_PNG)
    reply = client.chat.completions.create(model=MODEL, temperature=0, messages=[
        user("What shape is blue?", image), {"role": "assistant", "content": FIRST_ANSWER},
        {"role": "user", "content": FOLLOW_UP}])
    expected = command_line_answers[MULTI_TURN_PROMPT]
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.completion_tokens == len(expected["token_ids"])


def test_max_tokens_stop_and_seed(client):
    image = data_url(DEMO_PNG)
    cut = ask(client, "Describe the image.", image, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert cut.choices[0].message.content == "A yellow square"
    assert ask(client, "Describe the image.", image, max_completion_tokens=3).choices[0].message.content == \
        "A yellow square"
    stopped = ask(client, "Describe the image.", image, stop=[" and", ", a red"])
    assert stopped.choices[0].message.content == "A yellow square" and stopped.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL, messages=[user("Describe the image.", image)],
                                              temperature=2.0, top_p=0.95, seed=seed).choices[0].message.content
               for seed in (1, 1, 2, 3, 4)]
    assert sampled[0] == sampled[1] and len(set(sampled[1:])) > 1


def scenes(count, seed):
    """(image, {question: right answer}) for `count` fresh shapes-task scenes."""
    rng = np.random.default_rng(seed)
    made = [shapes_task.random_scene(rng) for _ in range(count)]
    return [(shapes_task.render(scene), {q: a for _, q, a in shapes_task.questions(scene)}) for scene in made]


def test_concurrent_clients_get_the_answers_of_one_at_a_time_and_are_batched(client, live_server):
    """16 clients at once, mixed pictures, questions and budgets, 4 cache rows: the same greedy answers as one
    at a time, and the metrics show several rows generated in the same steps, each request prefilled once after
    its picture's cached prefix (the one-at-a-time pass cached the four)."""
    pictures = [data_url(image) for image, _ in scenes(3, seed=1)] + [data_url(DEMO_PNG)]
    questions = ["Describe the image.", "How many shapes are there?", "What color is the triangle?",
                 "What shape is blue?"]
    jobs = [(questions[i % 4], pictures[(i * 3) % 4], [None, 2, 5, 40][i % 4]) for i in range(16)]

    def run(job):
        question, picture, budget = job
        reply = ask(client, question, picture, max_tokens=budget) if budget else ask(client, question, picture)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens

    alone = [run(job) for job in jobs]
    before = metrics(live_server)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    after = metrics(live_server)
    assert together == alone
    assert after["max_running"] == 4  # every row busy at once
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decode_rows"] - before["decode_rows"]
    assert rows > 2 * steps  # on average more than two requests per decode step
    assert after["prefill_rows"] - before["prefill_rows"] == 16
    assert after["prefix_cache"]["hits"] - before["prefix_cache"]["hits"] == 16


def test_second_question_about_a_picture_does_not_run_the_vision_tower(client, live_server):
    (first, first_answers), (second, second_answers), *others = scenes(9, seed=2)
    before = metrics(live_server)
    ask(client, "What shape is blue?", data_url(first))
    after_first = metrics(live_server)
    assert after_first["vision_images"] == before["vision_images"] + 1
    # The same pixels in another file format, with another question: it continues the first question's cached
    # prefix (the prompt through the picture), computing only its own tokens, and answers right.
    question = next(iter(first_answers))
    reply = ask(client, question, data_url(first, "bmp"))
    after_second = metrics(live_server)
    assert after_second["vision_images"] == after_first["vision_images"]
    assert after_second["prefix_cache"]["hits"] == after_first["prefix_cache"]["hits"] + 1
    assert after_second["prefill_tokens"] - after_first["prefill_tokens"] < reply.usage.prompt_tokens - 9
    assert reply.choices[0].message.content == first_answers[question]
    # Another picture behind the same prompt tokens is never served from the first one's entry.
    question = next(q for q in second_answers if first_answers.get(q) not in (None, second_answers[q]))
    assert ask(client, question, data_url(second)).choices[0].message.content == second_answers[question]
    assert ask(client, question, data_url(first)).choices[0].message.content == first_answers[question]
    assert metrics(live_server)["vision_images"] == after_first["vision_images"] + 1
    # Bounded: six pictures fit in 30 KB, five prefixes in 200 KB; seven more pictures push the first out.
    for image, _ in others:
        ask(client, "What shape is blue?", data_url(image), max_tokens=1)
    evicted = metrics(live_server)
    ask(client, "What shape is blue?", data_url(first), max_tokens=1)
    assert metrics(live_server)["vision_images"] == evicted["vision_images"] + 1
    assert evicted["image_cache"]["bytes"] <= 0.03 * (1 << 20)
    assert 4 * 40_000 < evicted["prefix_cache"]["bytes"] <= 0.2 * (1 << 20)
    log_text = live_server["log"].read_text()
    assert "image cache:" in log_text and "prefix cache:" in log_text  # hit rates in the (verbose) log


def test_local_files_only_under_the_allowed_path(client, live_server, tmp_path):
    inside = live_server["media"] / "demo.png"
    inside.write_bytes(open(DEMO_PNG, "rb").read())
    assert ask(client, "What shape is blue?", inside.as_uri()).choices[0].message.content == FIRST_ANSWER
    outside = tmp_path / "demo.png"
    outside.write_bytes(inside.read_bytes())
    with pytest.raises(openai.BadRequestError, match="outside the allowed local media path"):
        ask(client, "What shape is blue?", outside.as_uri())
    link = live_server["media"] / "link.png"
    link.symlink_to(outside)  # a link inside pointing outside is outside
    with pytest.raises(openai.BadRequestError, match="outside the allowed local media path"):
        ask(client, "What shape is blue?", link.as_uri())


def long_request(budget=110):
    """A streamed request that generates exactly `budget` tokens (ignore_eos) of a text-only prompt."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "Describe the image."}], "stream": True,
            "max_tokens": budget, "ignore_eos": True, "temperature": 0}


def test_a_client_that_disconnects_frees_its_row(live_server):
    before = metrics(live_server)
    with httpx.stream("POST", live_server["url"] + "/v1/chat/completions", json=long_request()) as response:
        lines = response.iter_lines()
        [next(lines) for _ in range(4)]  # the role chunk and a few tokens
    deadline = time.time() + 10
    while metrics(live_server)["running"] and time.time() < deadline:
        time.sleep(0.05)
    after = metrics(live_server)
    assert after["running"] == 0 and after["cancelled"] == before.get("cancelled", 0) + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 110


BAD_REQUESTS = [
    # (what, body (dict or raw bytes), status, words the error message must contain)
    ("bad JSON", b'{"model": "llava_tiny", "messages": [', 400, "not valid JSON"),
    ("not an object", b'[1, 2]', 400, "JSON object"),
    ("unknown model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4o"),
    ("no messages", {"model": MODEL, "messages": []}, 400, "messages"),
    ("unknown parameter", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_token": 5}, 400,
     "max_token"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "messages.0.role"),
    ("n > 1", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    ("temperature out of range", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": 5}, 400, "temperature"),
    ("five stop strings", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "stop": list("abcde")}, 400, "stop"),
    ("last message not the user's", {"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yes"}]},
     400, "last message"),
    ("image in an assistant message", {"model": MODEL, "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]},
        {"role": "user", "content": "hi"}]}, 400, "user messages"),
    ("too many images", {"model": MODEL, "messages": [user("hi", *["data:image/png;base64,AA=="] * 15)]}, 400,
     "at most 14"),
    ("not base64", {"model": MODEL, "messages": [user("hi", "data:image/png;base64,@@@")]}, 400, "base64"),
    ("not an image", {"model": MODEL, "messages": [user("hi", "data:image/png;base64,"
                                                        + base64.b64encode(b"hello").decode())]}, 400, "image 1"),
    ("unsupported URL scheme", {"model": MODEL, "messages": [user("hi", "ftp://example.com/a.png")]}, 400,
     "image_url must be"),
    ("unreachable URL", {"model": MODEL, "messages": [user("hi", "http://127.0.0.1:9/a.png")]}, 400,
     "could not download"),
    ("missing local file", {"model": MODEL, "messages": [user("hi", "file:///nonexistent/a.png")]}, 400,
     "outside the allowed"),
    ("prompt over the context", {"model": MODEL, "messages": [{"role": "user", "content": "shape " * 200}]}, 400,
     "context"),
    ("max_tokens over the context", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 500}, 400, "max_tokens=500"),
    ("body over the cap", b'{"model": "' + b"x" * (33 << 20) + b'"}', 413, "limit"),
]


def test_every_bad_request_gets_a_4xx_json_error_while_a_good_stream_completes(live_server):
    url = live_server["url"] + "/v1/chat/completions"
    good = {}

    def stream_good():
        with httpx.stream("POST", url, json=long_request(), timeout=60) as response:
            good["lines"] = [line for line in response.iter_lines() if line]
    streamer = threading.Thread(target=stream_good)
    streamer.start()
    missing = {"model": MODEL, "messages": [user("hi", (live_server["media"] / "missing.png").as_uri())]}
    for what, body, status, words in BAD_REQUESTS + [("missing allowed file", missing, 400, "does not exist")]:
        if isinstance(body, dict):
            response = httpx.post(url, json=body, timeout=30)
        else:
            response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, what
        assert words in error["message"], (what, error["message"])
    # The same faults through the openai client surface as its own error types.
    client = openai.OpenAI(base_url=live_server["url"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "shape " * 200}])
    streamer.join(timeout=60)
    chunks = [json.loads(line[6:]) for line in good["lines"][:-1]]
    assert good["lines"][-1] == "data: [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for chunk in chunks if chunk["choices"][0]["delta"].get("content")) > 50
    assert httpx.get(live_server["url"] + "/nope").json()["error"]["message"] == "Not Found"


def test_health_models_and_chat_page(client, live_server):
    assert httpx.get(live_server["url"] + "/health").json() == {"status": "ok"}
    assert [model.id for model in client.models.list()] == [MODEL]
    page = httpx.get(live_server["url"] + "/")
    assert page.status_code == 200 and "<title>LLaVA chat</title>" in page.text


def test_a_checkpoint_that_does_not_load_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "serve.py"), "--config",
                             os.path.join(TINY, "predict_llava_tiny.yaml"), "--register_path", PLUGIN,
                             "--load_checkpoint", str(tmp_path / "missing.ckpt"), "--port", "0",
                             "--output_dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("serve.py: error: ") and "missing.ckpt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, words", [(["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
                                          (["--image-cache-mb", "-1"], "--image-cache-mb must be >= 0"),
                                          (["--prefix-cache-mb", "-2"], "--prefix-cache-mb must be >= 0"),
                                          (["--allowed-local-media-path", "/nonexistent"], "is not a directory")])
def test_bad_flags_are_refused_before_loading(flags, words):
    result = subprocess.run([sys.executable, os.path.join(REPO, "serve.py"), "--config", "x.yaml", *flags],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and words in result.stderr


def chat_command(tmp_path):
    return [sys.executable, os.path.join(REPO, "run_mindformer.py"), "--config",
            os.path.join(TINY, "predict_llava_tiny.yaml"), "--register_path", PLUGIN, "--run_mode", "chat",
            "--load_checkpoint", os.path.join(TINY, "llava_tiny.ckpt"), "--output_dir", str(tmp_path), "--options",
            f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}"]


def test_terminal_chat_streams_answers_and_follows_up(command_line_answers, tmp_path):
    """run_mindformer.py --run_mode chat: /image, a question, a follow-up (the same answer as the written-out
    conversation), then EOF exits 0."""
    result = subprocess.run(
        chat_command(tmp_path),
        input=f"/image {tmp_path / 'nope.png'}\n/image {DEMO_PNG}\nWhat shape is blue?\n{FOLLOW_UP}\n",
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "does not exist" in lines[1] and lines[2] == f"(new conversation about {DEMO_PNG})"
    assert lines[3:] == [FIRST_ANSWER, command_line_answers[MULTI_TURN_PROMPT]["text"]]


def test_terminal_chat_exits_cleanly_on_ctrl_c(tmp_path):
    import signal
    process = subprocess.Popen(
        chat_command(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=str(tmp_path))
    assert "Ask about a picture" in process.stdout.readline()  # loaded, waiting for a question
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in stderr
