"""An OpenAI-compatible chat endpoint for a trained model (``python -m xllm.serve``, ``python -m xllm.demo.web``).

``POST /v1/chat/completions`` takes OpenAI's request (``model``, ``messages``, ``stream``, ``max_tokens``,
``temperature``, ``top_p``, ``seed``) and answers in OpenAI's format, streamed as server-sent events when asked,
so any OpenAI client (the LLaVA-Bench judge, evaluation harnesses) can talk to the model; ``GET /v1/models``
lists it. A message's content is text or a list of parts: ``text``, ``image_url``, ``video_url`` and
``audio_url`` (speech) with a ``data:`` URL or a file path inside a ``--media-root`` folder, or OpenAI's
``input_audio`` (base64 data). Media are never fetched from the network. Earlier rounds become the history, a
system message leads the first question. One request generates at a time (a lock): the model is one.

The standard library's threading HTTP server is enough for one model behind one lock, and adds no dependency.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import logging
import mimetypes
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from xllm.common.logging import setup_logging
from xllm.demo.session import load_run
from xllm.models.xllm import XLLM
from xllm.processors.collator import media_span

log = logging.getLogger(__name__)

PART_MODALITY = {"image_url": "image", "video_url": "video", "audio_url": "speech", "input_audio": "speech"}
MIME_MODALITY = {"image": "image", "video": "video", "audio": "speech"}


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: HTTPStatus, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "code": self.code}}


@dataclass
class Service:
    model: XLLM
    processors: dict
    name: str
    media_roots: list[Path] = field(default_factory=list)
    max_request_bytes: int = 20 * 2 ** 20
    max_new_tokens: int = 256
    page: str | None = None  # the chat page ``GET /`` serves (``xllm.demo.web``), if any
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ----------------------------------------------------------------- media

    def _medium_file(self, url: str, modality: str) -> tuple[Path, bool]:
        """The file behind a URL (a temporary one for ``data:`` URLs, to delete after) and whether it is temporary."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            mime = header[5:].split(";")[0]
            if MIME_MODALITY.get(mime.split("/")[0]) != modality or ";base64" not in header:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"a {modality} part needs a base64 data URL of a {modality} "
                                   f"type, got {header[:60]!r}", "unsupported_media")
            return self._temporary(payload, mimetypes.guess_extension(mime) or ""), True
        if url.startswith(("http://", "https://", "ftp://")):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"media URLs are never fetched ({url[:80]}): send a data URL or "
                               "a file inside a --media-root folder", "media_url_not_allowed")
        path = Path(url.removeprefix("file://")).expanduser().resolve()
        if not any(path.is_relative_to(root) for root in self.media_roots):
            raise RequestError(HTTPStatus.FORBIDDEN, f"{path} is outside the served media folders "
                               f"({', '.join(map(str, self.media_roots)) or 'none: start with --media-root'})",
                               "media_path_not_allowed")
        if not path.is_file():
            raise RequestError(HTTPStatus.BAD_REQUEST, f"media file {path} does not exist", "media_not_found")
        return path, False

    def _temporary(self, payload: str, suffix: str) -> Path:
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"a data URL's payload is not base64 ({error})") from None
        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
            handle.write(data)
        return Path(handle.name)

    def load_medium(self, part: dict) -> tuple[str, object]:
        kind = part.get("type")
        modality = PART_MODALITY[kind]
        if modality not in self.processors:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"this model reads no {modality} (it reads "
                               f"{', '.join(sorted(self.processors)) or 'text only'})", "unsupported_media")
        if kind == "input_audio":
            audio = part.get("input_audio") or {}
            file, temporary = self._temporary(str(audio.get("data", "")), "." + str(audio.get("format", "wav"))), True
        else:
            file, temporary = self._medium_file(str((part.get(kind) or {}).get("url", "")), modality)
        try:
            return modality, self.processors[modality](file)
        except (OSError, ValueError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the {modality} could not be read: {error}",
                               "unreadable_media") from None
        finally:
            if temporary:
                file.unlink(missing_ok=True)

    # ----------------------------------------------------------------- messages

    def conversation(self, messages: list) -> dict:
        """The model's inputs: the last user message is the prompt, earlier (user, assistant) pairs the history."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list")
        system, turns, media = [], [], {}
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("system", "user", "assistant"):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"messages[{index}].role must be system, user or "
                                   f"assistant, got {role!r}")
            text = self._content(message.get("content"), f"messages[{index}].content", media)
            if role == "system":
                system.append(text)
            else:
                turns.append((role, text))
        if not turns or turns[-1][0] != "user":
            raise RequestError(HTTPStatus.BAD_REQUEST, "the last message must be the user's")
        if system:
            turns[0] = (turns[0][0], "\n".join(system) + "\n" + turns[0][1])
        history, question = [], None
        for role, text in turns:
            if role == "user":
                if question is not None:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "two user messages follow each other: earlier "
                                       "rounds need the assistant's reply between them")
                question = text
            else:
                if question is None:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "an assistant message answers no user message")
                history.append((question, text))
                question = None
        return {"prompt": [question], "history": [history], **{m: items for m, items in media.items()}}

    def _content(self, content, where: str, media: dict) -> str:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{where} must be a string or a list of parts")
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(str(part.get("text", "")))
            elif kind in PART_MODALITY:
                modality, tensor = self.load_medium(part)
                media.setdefault(modality, []).append(tensor)
                pieces.append(media_span(modality))
            else:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: unknown part type {kind!r} (text, "
                                   f"{', '.join(PART_MODALITY)})")
        return " ".join(p for p in pieces if p)

    # ----------------------------------------------------------------- completions

    def settings(self, request: dict) -> dict:
        if request.get("model") != self.name:
            raise RequestError(HTTPStatus.NOT_FOUND, f"model {request.get('model')!r} is not served here; this "
                               f"server serves {self.name!r}", "model_not_found")
        generation = {"max_new_tokens": int(request.get("max_tokens") or request.get("max_completion_tokens")
                                            or self.max_new_tokens)}
        temperature = float(request.get("temperature") or 0.0)
        if temperature > 0:
            generation.update(do_sample=True, temperature=temperature, top_p=float(request.get("top_p", 1.0)))
        return generation

    def replies(self, request: dict, generation: dict):
        """The reply so far after every new token, generated under the lock."""
        inputs = self.conversation(request.get("messages"))
        with self.lock:
            if request.get("seed") is not None:
                torch.manual_seed(int(request["seed"]))
            yield from self.model.stream(inputs, **generation)

    def finish_reason(self, reply: str, generation: dict) -> str:
        used = len(self.model.require_llm().layout.tokenize(reply)) if reply else 0
        return "length" if used >= generation["max_new_tokens"] else "stop"

    def completion(self, request: dict) -> dict:
        generation = self.settings(request)
        reply = ""
        for reply in self.replies(request, generation):
            pass
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                                 "finish_reason": self.finish_reason(reply, generation)}]}


def handler_for(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # through logging, not stderr
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, body: dict) -> None:
            self._send(status, json.dumps(body, ensure_ascii=False).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path == "/" and service.page is not None:
                self._send(200, service.page.encode(), "text/html; charset=utf-8")
            elif self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": service.name, "object": "model",
                                                             "owned_by": "xllm"}]})
            else:
                self._json(404, RequestError(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found").body())

        def do_POST(self) -> None:
            try:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise RequestError(HTTPStatus.NOT_FOUND, f"no route {self.path}", "not_found")
                length = int(self.headers.get("Content-Length") or 0)
                if length > service.max_request_bytes:
                    raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request holds {length} bytes, more "
                                       f"than the {service.max_request_bytes} this server accepts", "too_large")
                try:
                    request = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError as error:
                    raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({error})") from None
                if not isinstance(request, dict):
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
                if request.get("stream"):
                    self._stream(request)
                else:
                    self._json(200, service.completion(request))
            except RequestError as error:
                self._json(error.status, error.body())

        def _stream(self, request: dict) -> None:
            generation = service.settings(request)
            replies = service.replies(request, generation)
            first = next(replies, "")  # errors in the request surface before the stream's headers
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": service.name}

            def event(delta: dict, finish: str | None = None) -> None:
                body = {**identity, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant", "content": ""})
            shown = ""
            for reply in itertools.chain([first], replies) if first else ():
                # A reply decoded anew may change its last characters (a piece that completes a word): send only
                # what extends what was sent.
                if reply.startswith(shown) and len(reply) > len(shown):
                    event({"content": reply[len(shown):]})
                    shown = reply
            event({}, service.finish_reason(shown, generation))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), handler_for(service))


def service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run folder (train.py's output_dir)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 unless told otherwise")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the name clients ask for (default: the run folder's name)")
    parser.add_argument("--media-root", action="append", default=[], help="a folder whose files requests may name")
    parser.add_argument("--max-request-mb", type=float, default=20.0)
    parser.add_argument("--device", default="cpu")


def service_from(args: argparse.Namespace) -> Service:
    setup_logging()
    model, processors = load_run(args.checkpoint, args.device)
    return Service(model, processors, args.model_name or Path(args.checkpoint).resolve().name,
                   [Path(root).expanduser().resolve() for root in args.media_root], int(args.max_request_mb * 2 ** 20))
