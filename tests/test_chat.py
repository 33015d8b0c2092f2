"""Streaming generation, the chat session and terminal chat, and the OpenAI-compatible server over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from xllm.common.config import save_config
from xllm.demo.cli import chat
from xllm.demo.session import ChatSession, load_run
from xllm.infer import infer, read_requests
from xllm.models.builder import build_model, build_processors
from xllm.models.config import resolve_model
from xllm.runners.parallel import trainable_state
from xllm.demo.server import Service, make_server

QUESTION = "<Image><ImageHere></Image> Describe the image."


@pytest.fixture(scope="module")
def chat_cfg(micro_model_cfg) -> dict:
    image = {**micro_model_cfg["modalities"]["image"], "processor": {"name": "image", "image_size": 32}}
    return {**micro_model_cfg, "modalities": {"image": image}}


@pytest.fixture(scope="module")
def model_and_processors(chat_cfg):
    torch.manual_seed(0)
    model = build_model(resolve_model(chat_cfg))
    return model, build_processors(model.config)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "shape.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def reference_answer(model, processors, path: Path, question: str = QUESTION, max_new_tokens: int = 12) -> str:
    image = processors["image"](path)[None]
    return model.generate({"image": image, "prompt": [question]}, max_new_tokens=max_new_tokens)[0]


@pytest.mark.parametrize("backend", ["hf_causal", "chatglm"])
def test_streamed_replies_grow_to_the_generated_answer(backend, chat_cfg, micro_chatglm, image_file):
    cfg = chat_cfg if backend == "hf_causal" else {**chat_cfg, "model_type": "tiny_zh",
                                                   "llm": {"backend": "chatglm", "path": str(micro_chatglm)}}
    torch.manual_seed(0)
    model = build_model(resolve_model(cfg))
    processors = build_processors(model.config)
    image = processors["image"](image_file)[None]
    inputs = {"image": image, "prompt": [QUESTION]}
    full = model.generate(inputs, max_new_tokens=12)[0]
    replies = list(model.stream(inputs, max_new_tokens=12))
    assert replies and replies[-1].strip() == full
    assert len(replies) <= 12
    with pytest.raises(ValueError, match="one sample at a time"):
        list(model.stream({"image": torch.cat([image, image]), "prompt": [QUESTION, QUESTION]}))


def test_a_run_folder_loads_with_its_trained_weights(tmp_path, chat_cfg):
    torch.manual_seed(5)
    trained = build_model(resolve_model(chat_cfg))
    step = tmp_path / "run" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    save_file(trainable_state(trained), str(step / "model.safetensors"))
    save_config(OmegaConf.create({"model": resolve_model(chat_cfg)}), tmp_path / "run")
    model, processors = load_run(tmp_path / "run")
    assert set(processors) == {"image"}
    for name, value in trainable_state(trained).items():
        assert torch.equal(model.get_parameter(name), value), name
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(tmp_path)


def test_a_session_keeps_the_dialogue_and_its_media(model_and_processors, image_file):
    model, processors = model_and_processors
    session = ChatSession(model, processors, max_new_tokens=12)
    session.attach("image", image_file)
    first = list(session.ask("Describe the image."))[-1]
    assert first == reference_answer(model, processors, image_file)
    second = list(session.ask("And its colour?"))[-1]
    history = [(QUESTION, first)]
    image = processors["image"](image_file)[None]
    expected = model.generate({"image": image, "prompt": ["And its colour?"], "history": [history]},
                              max_new_tokens=12)[0]
    assert second == expected and session.history == [*history, ("And its colour?", second)]
    with pytest.raises(ValueError, match="reads no speech"):
        session.attach("speech", image_file)
    session.reset()
    assert session.history == [] and session.media == {}


def test_terminal_chat_attaches_asks_and_resets(model_and_processors, image_file):
    model, processors = model_and_processors
    out = io.StringIO()
    chat(ChatSession(model, processors, max_new_tokens=12),
         [f"/image {image_file}", "Describe the image.", "/video clip.mp4", "/reset", "/quit", "never read"], out)
    text = out.getvalue()
    assert f"(image attached: {image_file})" in text
    assert f"xllm: {reference_answer(model, processors, image_file)}\n" in text
    assert "(not attached: this model reads no video" in text and "(conversation reset)" in text


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(model_and_processors, image_file):
    model, processors = model_and_processors
    service = Service(model, processors, "micro", [image_file.parent.resolve()], max_request_bytes=200_000,
                      max_new_tokens=12)
    httpd = make_server(service, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def post(url: str, body: dict | bytes) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def image_message(url: str, text: str = "Describe the image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_the_server_answers_as_openai_does_plain_and_streamed(server, model_and_processors, image_file):
    model, processors = model_and_processors
    expected = reference_answer(model, processors, image_file)
    status, body = post(server, {"model": "micro", "messages": image_message(data_url(image_file)), "max_tokens": 12})
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "micro"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected}
    status, body = post(server, {"model": "micro", "messages": image_message(str(image_file)), "stream": True})
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with urllib.request.urlopen(server + "/v1/models") as response:
        assert json.loads(response.read())["data"][0]["id"] == "micro"


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "micro", "messages": image_message("https://example.com/cat.png")}, 400, "media_url_not_allowed"),
    ({"model": "micro", "messages": image_message("/etc/hostname")}, 403, "media_path_not_allowed"),
    ({"model": "micro", "messages": image_message("data:text/plain;base64,aGVsbG8=")}, 400, "unsupported_media"),
    ({"model": "micro", "messages": image_message("data:image/png;base64,aGVsbG8=")}, 400, "unreadable_media"),
    ({"model": "micro", "messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {
        "url": "data:audio/wav;base64,aGVsbG8="}}]}]}, 400, "unsupported_media"),
    ({"model": "micro", "messages": []}, 400, "invalid_request"),
    ({"model": "micro", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_request"),
    (b"{not json", 400, "invalid_request"),
    ({"model": "micro", "messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "too_large"),
])
def test_the_server_refuses_bad_requests_with_openai_errors(server, body, status, code):
    got, raw = post(server, body)
    error = json.loads(raw)["error"]
    assert (got, error["code"]) == (status, code), error["message"]


def test_batch_inference_answers_in_order_records_failures_and_resumes(model_and_processors, image_file, tmp_path):
    model, processors = model_and_processors
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": "a", "prompt": "Describe the image.", "image": str(image_file)},
             {"id": "b", "prompt": QUESTION, "image": [str(image_file)]},
             {"id": "c", "prompt": "Describe the image.", "image": str(tmp_path / "absent.png")},
             {"id": "d", "prompt": "What is said?", "speech": str(image_file)}]
    requests.write_text("\n".join(json.dumps(line) for line in lines[:3]) + "\n")
    output = tmp_path / "answers.jsonl"
    generation = {"max_new_tokens": 12}
    assert infer(model, processors, read_requests(requests), output, 2, generation) == 3
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = reference_answer(model, processors, image_file)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["text"] == rows[1]["text"] == expected and rows[0]["prompt"] == QUESTION
    assert rows[0]["generation"] == generation
    assert rows[2]["text"] is None and "absent.png" in rows[2]["error"]
    requests.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert infer(model, processors, read_requests(requests), output, 2, generation) == 1  # only "d" is new
    last = json.loads(output.read_text().splitlines()[-1])
    assert last["id"] == "d" and last["text"] is None and "reads no speech" in last["error"]
    requests.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "a", "prompt": "y"}))
    with pytest.raises(ValueError, match="request ids repeat"):
        read_requests(requests)
