"""OpenAI-compatible HTTP server for LLaVA-1.5: chat completions (streamed or not), a chat page at /, and the
requests of every client batched into the same generation steps.

    python serve.py --config demo/llava_tiny/predict_llava_tiny.yaml --register_path research/llava \
        --load_checkpoint demo/llava_tiny/llava_tiny.ckpt [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] \
        [--allowed-local-media-path DIR] [--image-cache-mb 512] [--prefix-cache-mb 1024]

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health (200 once the model is loaded and compiled,
503 before), GET /metrics (batching, image-cache and prefix-cache counters, JSON), GET / (the chat page,
web/chat.html).

This file is the HTTP side only: OpenAI's request and response shapes, images from URLs, server-sent events.
The model runs in one thread of its own, in research/llava/llava_serving.py's Engine; requests reach it
through `Engine.submit` and their tokens come back through a callback that hands them to the event loop.
"""
import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import os
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO = os.path.dirname(os.path.abspath(__file__))
CHAT_PAGE = os.path.join(REPO, "web", "chat.html")
# A request carries its images inline (base64 data URLs), so the cap is for a few photos: 32 MiB.
MAX_BODY_BYTES = 32 << 20
MAX_STOP_STRINGS = 4  # as OpenAI's API

log = logging.getLogger("llava.serve")


def parse_args(argv=None):
    from run_mindformer import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="requests generated together (KV-cache rows); more wait for a free row")
    parser.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                        help="allow file:// image URLs under DIR (default: no local files)")
    parser.add_argument("--image-cache-mb", type=float, default=None,
                        help="memory for the features of recently seen images, MiB (default 512)")
    parser.add_argument("--prefix-cache-mb", type=float, default=None,
                        help="memory for the keys/values of recent prompts through their last image, which "
                             "questions about the same pictures continue, MiB (default 1024)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    for flag in ("image_cache_mb", "prefix_cache_mb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        parser.error(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a directory")
    return args


# ------------------------------------------------------------------------------------------------ errors

class ApiError(Exception):
    """A request the server cannot serve, answered in OpenAI's error shape with `status`."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ schemas

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted; LLaVA-1.5 sees every image at one size


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]]]
    name: Optional[str] = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    """The chat-completions parameters this server honours; any other is refused by name, as OpenAI does."""

    model: str
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extra sampling parameters (the openai client sends them with extra_body); ignore_eos: answers of
    # exactly the token budget, for benchmarks
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    ignore_eos: bool = False


def validation_message(error):
    """pydantic's first complaint as 'messages.0.role: Input should be ...'."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("function-", "tagged-")))
    return where, f"{where}: {first['msg']}" if where else first["msg"]


# ------------------------------------------------------------------------------------------------ requests

def conversation_of(messages):
    """OpenAI messages -> (chat_prompt's messages, image URLs in reading order)."""
    converted, urls = [], []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content = []
        for part in parts:
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            elif role != "user":
                raise ApiError(400, f"messages.{index}: images go in user messages, not {message.role}",
                               param=f"messages.{index}.content")
            else:
                content.append({"type": "image"})
                urls.append(part.image_url.url)
        converted.append({"role": role, "content": content})
    if converted[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be the user's, got {messages[-1].role}", param="messages")
    return converted, urls


def load_request_image(url, number, allowed_dir):
    """One image_url (data:image/...;base64, http(s) or an allowed file://) -> RGB PIL image. Reading,
    downloading and their caps are llava_processor's (decode_image, load_image)."""
    from llava_processor import decode_image, is_url, load_image

    name = f"image {number}"
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not (header.startswith("data:image/") and header.endswith(";base64")):
                raise ValueError(f"{name}: a data URL must be data:image/<type>;base64,<data>, got {header[:40]!r}")
            try:
                data = base64.b64decode(payload, validate=True)
            except binascii.Error as error:
                raise ValueError(f"{name}: the data URL is not valid base64 ({error})") from None
            return decode_image(io.BytesIO(data), name)
        if is_url(url):
            return load_image(url)
        if url.startswith("file://"):
            if allowed_dir is None:
                raise ValueError(f"{name}: file:// URLs are refused; the server allows local files only under "
                                 "--allowed-local-media-path")
            path = os.path.realpath(urllib.parse.unquote(urllib.parse.urlparse(url).path))
            allowed = os.path.realpath(allowed_dir)
            if os.path.commonpath([path, allowed]) != allowed:
                raise ValueError(f"{name}: {url!r} is outside the allowed local media path")
            return load_image(path)
        raise ValueError(f"{name}: image_url must be a data:image/...;base64 URL, an http(s) URL or a file:// URL, "
                         f"got {url[:40]!r}")
    except (ValueError, OSError) as error:  # FileNotFoundError included
        raise ApiError(400, str(error), param="messages") from None


def completion_budget(chat, prompt_tokens, settings, context):
    """The request's token budget: max_completion_tokens / max_tokens if given (400 when the context cannot
    hold it), else what generate would give (the model config's max_new_tokens, within the context)."""
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens (images included); the context is "
                            f"{context} tokens and must leave at least one for the answer", param="messages",
                       code="context_length_exceeded")
    wanted = chat.max_completion_tokens or chat.max_tokens
    if wanted is None:
        return settings.new_tokens(prompt_tokens, context)
    if wanted > room:
        param = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param}={wanted} does not fit: the prompt is {prompt_tokens} tokens of the "
                            f"{context}-token context, which leaves {room}", param=param,
                       code="context_length_exceeded")
    return wanted


def sampling_settings(chat, model_config):
    """GenerationSettings from the model config (as run_mindformer.py), overridden by the request. temperature
    0 is greedy; any other temperature samples."""
    from llava_generation import GenerationSettings

    overrides = {"top_p": chat.top_p, "top_k": chat.top_k, "repetition_penalty": chat.repetition_penalty}
    if chat.temperature == 0:
        overrides["do_sample"] = False
    elif chat.temperature is not None:
        overrides.update(do_sample=True, temperature=chat.temperature)
    if chat.ignore_eos:
        overrides["eos_token_id"] = ()
    try:
        return GenerationSettings.resolve(model_config, **overrides)
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def stop_strings(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {stops!r}", param="stop")
    return tuple(stops)


# ------------------------------------------------------------------------------------------------ the model

class ModelService:
    """The engine and its thread: loads the model, warms it up (then /health is ready) and runs the engine
    until `close`. A load failure is kept in `error` and stops the server (`on_failure`)."""

    def __init__(self, config, args, on_failure):
        self.config, self.args, self.on_failure = config, args, on_failure
        self.engine = self.processor = self.error = None
        self.model_name = os.path.splitext(os.path.basename(os.path.normpath(config.load_checkpoint or "llava")))[0]
        self.created = int(time.time())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llava-engine", daemon=True)

    @property
    def ready(self):
        return self.engine is not None and self.engine.ready.is_set()

    def start(self):
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)

    def _run(self):
        from run_mindformer import explicit_keys, load_model
        from llava_serving import DEFAULT_IMAGE_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES, Engine

        def mebibytes(value, default):
            return default if value is None else int(value * (1 << 20))

        try:
            model, tokenizer, self.processor, _ = load_model(self.config, log, explicit_keys(self.args))
            engine = Engine(model, tokenizer, self.args.max_batch_size,
                            mebibytes(self.args.image_cache_mb, DEFAULT_IMAGE_CACHE_BYTES),
                            mebibytes(self.args.prefix_cache_mb, DEFAULT_PREFIX_CACHE_BYTES))
            self.context = model.config.seq_length
            self.model_config = model.config
            self.max_images = (self.context - 1) // model.num_image_features
            self.image_tokens = model.num_image_features
            started = time.time()
            engine.warm_up()
            log.info("warm-up (cache allocation, compiles) took %.1f s", time.time() - started)
            self.engine = engine
        except Exception as error:  # pylint: disable=broad-except  (reported as one line; the server stops)
            if self.args.verbose:
                traceback.print_exc()
            self.error = error
            self.on_failure()
            return
        print(f"serve.py: {self.model_name} ready on http://{self.args.host}:{self.args.port} "
              f"(max batch size {self.args.max_batch_size})", flush=True)
        engine.run(self.stop)


# ------------------------------------------------------------------------------------------------ the app

def create_app(service):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from llava_serving import Request as EngineRequest, prepare_images, prompt_ids

    app = FastAPI(title="llava-ms", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, error):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, error):  # unknown paths and methods, in the same shape
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, error):
        log.error("internal error: %s", error, exc_info=error)
        return JSONResponse(ApiError(500, "internal error", kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if service.ready:
            return {"status": "ok"}
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return service.engine.metrics() if service.ready else {"ready": False}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.created, "owned_by": "llava-ms"}]}

    @app.get("/")
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type="text/html")

    async def read_json(http_request):
        declared = http_request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
        body = bytearray()
        async for chunk in http_request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is over the {MAX_BODY_BYTES}-byte limit")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
        return data

    async def build_request(data, emit):
        """Validated OpenAI request -> (engine Request, its ChatRequest); every fault is an ApiError (4xx)."""
        try:
            chat = ChatRequest.model_validate(data)
        except ValidationError as error:
            param, message = validation_message(error)
            raise ApiError(400, message, param=param or None) from None
        if chat.model != service.model_name:
            raise ApiError(404, f"the model {chat.model!r} does not exist; this server serves "
                                f"{service.model_name!r}", param="model", code="model_not_found")
        if chat.n != 1:
            raise ApiError(400, f"n must be 1 (one answer per request), got {chat.n}", param="n")
        messages, urls = conversation_of(chat.messages)
        if len(urls) > service.max_images:
            raise ApiError(400, f"{len(urls)} images do not fit the {service.context}-token context: each takes "
                                f"{service.image_tokens} tokens, so at most {service.max_images} fit",
                           param="messages")
        settings = sampling_settings(chat, service.model_config)
        stop = stop_strings(chat.stop)
        allowed = service.args.allowed_local_media_path
        images = await asyncio.gather(*(asyncio.to_thread(load_request_image, url, number, allowed)
                                        for number, url in enumerate(urls, 1)))

        def encode():  # tokenizing and preprocessing: CPU work, off the event loop
            return (prompt_ids(service.processor, messages, len(images)),
                    prepare_images(service.processor.image_processor, images))
        try:
            ids, entries = await asyncio.to_thread(encode)
        except ValueError as error:
            raise ApiError(400, str(error), param="messages", code="context_length_exceeded"
                           if "longer than the context" in str(error) else None) from None
        budget = completion_budget(chat, len(ids), settings, service.context)
        return EngineRequest(ids, entries, settings, budget, emit, seed=chat.seed, stop=stop), chat

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        if not service.ready:
            raise ApiError(503, "the model is still loading; GET /health says when it is ready",
                           kind="server_error")
        data = await read_json(http_request)
        loop = asyncio.get_running_loop()
        outputs = asyncio.Queue()
        request, chat = await build_request(data, lambda output: loop.call_soon_threadsafe(outputs.put_nowait,
                                                                                            output))
        service.engine.submit(request)
        reply = Reply(service.model_name)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(stream(reply, request, outputs, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(reply, request, outputs, http_request)

    async def stream(reply, request, outputs, include_usage):
        finished = False
        try:
            yield sse(reply.chunk({"role": "assistant", "content": ""}))
            while True:
                output = await outputs.get()
                if output.finish_reason in ("error", "cancelled"):
                    yield sse(ApiError(500, output.error or "the request was cancelled", kind="server_error").body())
                    break
                if output.text:
                    yield sse(reply.chunk({"content": output.text}))
                if output.finish_reason:
                    finished = True
                    yield sse(reply.chunk({}, output.finish_reason))
                    if include_usage:
                        yield sse(dict(reply.chunk_base(), choices=[], usage=usage(output)))
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response is cancelled here) or the stream ended early
            if not finished:
                service.engine.cancel(request)

    async def collect(reply, request, outputs, http_request):
        texts = []
        try:
            while True:
                try:
                    output = await asyncio.wait_for(outputs.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        service.engine.cancel(request)
                        return JSONResponse({}, status_code=499)  # nobody reads it
                    continue
                texts.append(output.text)
                if output.finish_reason:
                    break
        except asyncio.CancelledError:
            service.engine.cancel(request)
            raise
        if output.finish_reason in ("error", "cancelled"):
            raise ApiError(500, output.error or "the request was cancelled", kind="server_error")
        return reply.completion("".join(texts), output.finish_reason, usage(output))

    return app


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(output):
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens}


class Reply:
    """OpenAI's response objects for one completion (one id, one creation time)."""

    def __init__(self, model):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model

    def chunk_base(self):
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def chunk(self, delta, finish_reason=None):
        return dict(self.chunk_base(), choices=[{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason}])

    def completion(self, text, finish_reason, counts):
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": counts}


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO if args.verbose else logging.WARNING)
    sys.path.insert(0, REPO)
    from run_mindformer import load_config, register_plugin, report_error

    try:
        register_plugin(args.register_path)
        from llava_runtime import quiet_logs, sigterm_as_interrupt
        quiet_logs(args.output_dir or "./output", args.verbose)
        sigterm_as_interrupt()
        config = load_config(args)
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(None, host=args.host, port=args.port, access_log=args.verbose,
                                               log_level="info" if args.verbose else "warning"))
        service = ModelService(config, args, on_failure=lambda: setattr(server, "should_exit", True))
        server.config.app = create_app(service)
        service.start()
        try:
            server.run()  # until Ctrl-C / SIGTERM: stops taking requests, lets the running ones finish
        except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down (llava_runtime)
            pass
        service.close()
        if service.error is not None:
            raise service.error
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as error:
        return report_error("serve.py", error, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
