"""LLaVA-Bench (COCO): the summary reproduces X-LLM's published figures, scores are parsed as LLaVA parses them,
the judge speaks to a real HTTP server (scripted failures included) and resumes, and answering with the micro
model records every question, the unanswered ones included, and resumes."""

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from xllm.common.config import ConfigError
from xllm.config import load_config
from xllm.eval import llava_bench
from xllm.eval.judge import ChatClient, JudgeError
from xllm.eval.llava_bench import main, summarize, summary_json
from xllm.eval.llava_bench_files import read_records
from xllm.eval.llava_bench_review import judge_answers, load_benchmark, parse_score, review, user_message

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"conv": 85.4, "detail": 83.5, "complex": 84.6, "all": 84.5, "failures": 7}
PUBLISHED_WITHOUT_FAILURES = {"conv": 85.8, "detail": 83.6, "complex": 84.6, "all": 84.6, "failures": 7}
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."


@pytest.fixture(scope="module")
def published(shared_dir) -> Path:
    return shared_dir / "benchmarks" / "llava_bench_coco" / "xllm_published" / "review.json"


# ----------------------------------------------------------------------------------------------- summary


@pytest.mark.parametrize("flags, expected", [([], PUBLISHED), (["--exclude-failures"], PUBLISHED_WITHOUT_FAILURES)])
def test_the_command_line_reproduces_the_published_figures(published, flags, expected):
    out = subprocess.run([sys.executable, "-m", "xllm.eval.llava_bench", "summarize", str(published), *flags,
                          "--json"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert json.loads(out.splitlines()[-1]) == expected
    listed = re.findall(r"^  questions? ([\d, ]+): ", out, flags=re.M)  # the failures, one line per reason
    assert sorted(int(i) for ids in listed for i in ids.split(", ")) == [0, 31, 33, 36, 39, 69, 84]


def test_the_summary_function_reproduces_the_published_figures(published):
    reviews = read_records(published, "review")
    assert summary_json(summarize(reviews)) == PUBLISHED
    assert summary_json(summarize(reviews, exclude_failures=True)) == PUBLISHED_WITHOUT_FAILURES
    # LLaVA's own files put the reference first: read the other way round, X-LLM would beat GPT-4.
    assert summary_json(summarize(reviews, reference=1))["all"] == round(8.011 / 6.767 * 100, 1)
    summary = summarize(reviews)
    assert (summary.groups["conv"].model, summary.groups["conv"].reference) == (5.867, 6.867)
    assert [f.question_id for f in summary.failures] == [0, 31, 33, 36, 39, 69, 84]


@pytest.mark.parametrize("content, scores", [
    ("8 9\nAssistant 2 is better.", (8.0, 9.0)), ("7.5 10", (7.5, 10.0)), ("8,9\n", (8.0, 9.0)),
    ("8, 9", None),  # LLaVA turns the comma into a space and splits on single spaces: three tokens
    ("8", None), ("8 9 10\nthree", None), ("Scores: 8 9", None), ("eight nine", None), ("", None),
    ("\n8 9", None),  # only the first line counts
    (None, None)])
def test_scores_are_parsed_as_llava_parses_them(content, scores):
    assert parse_score(content) == scores


def test_reviews_are_read_as_json_lines_with_their_recorded_reference(tmp_path):
    rows = [{"question_id": 0, "category": "conv", "content": "4 8\nreference first", "reference": 1},
            {"question_id": 0, "category": "conv", "tuple": [6.0, 8.0], "reference": 2},  # the swapped pass
            {"question_id": 1, "category": "detail", "content": "The scores are 8 and 9."},  # no reference: 2
            {"question_id": 2, "category": "detail", "tuple": [-1, -1], "failure": "unanswered: image missing",
             "reference": 1}]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(read_records(path, "review"))
    # conv: model 8 and 6 over reference 4 and 8 (both orders pooled); detail: two failures averaged in.
    assert summary.groups["conv"].relative == round(7.0 / 6.0 * 100, 1)
    assert (summary.groups["detail"].model, summary.groups["detail"].relative) == (-1.0, 100.0)
    assert set(summary.by_order) == {1, 2}
    assert [(f.question_id, f.failure) for f in summary.failures] == [
        (1, "[-1, -1]: the reply's first line is not two scores: 'The scores are 8 and 9.'"),
        (2, "unanswered: image missing")]
    left_out = summarize(read_records(path, "review"), exclude_failures=True)
    assert (left_out.groups["detail"].reviews, left_out.groups["detail"].relative) == (0, None)
    assert summary_json(left_out) == {"conv": 116.7, "detail": None, "all": 116.7, "failures": 2}


def test_a_question_reviewed_twice_in_one_order_is_an_error():
    with pytest.raises(ValueError, match="question 3 is reviewed twice"):
        summarize([{"question_id": 3, "tuple": [1, 2]}, {"question_id": 3, "tuple": [2, 3]}])


# ----------------------------------------------------------------------------------------------- judge

RULE = {"conv": {"role": "Assistant", "prompt": "Rate the conversation."},
        "detail": {"role": "Assistant", "prompt": "Rate the description."}}


@pytest.fixture
def bench(tmp_path) -> Path:
    """A benchmark folder in LLaVA's formats: eight questions about two images."""
    folder = tmp_path / "bench"
    folder.mkdir()
    questions = [{"question_id": i, "image": f"00000000000{i // 4}.jpg", "text": f"Question {i}?",
                  "category": "conv" if i % 2 == 0 else "detail"} for i in range(8)]
    contexts = [{"id": f"00000000000{k}", "image": f"00000000000{k}.jpg", "captions": [f"Cap {k}a.", f"Cap {k}b."],
                 "instances": [{"category": "cat", "bbox": [0.1, 0.25, 0.5, 1.0]},
                               {"category": "dog", "bbox": [0.0, 0.333, 0.7, 0.9]}]} for k in range(2)]
    references = [{"question_id": i, "text": f"Reference {i}.", "category": q["category"]}
                  for i, q in enumerate(questions)]
    for name, rows in (("qa90_questions.jsonl", questions), ("caps_boxes_coco2014_val_80.jsonl", contexts),
                       ("qa90_gpt4_answer.jsonl", references)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rule.json").write_text(json.dumps(RULE))
    answers = [{"question_id": i, "prompt": f"Question {i}?", "text": f"Answer {i}.", "answer_id": f"a{i}",
                "model_id": "m", "metadata": {}} for i in range(8)]
    answers[7] = {**answers[7], "text": None, "metadata": {"unanswered": "image missing: 000000000001.jpg"}}
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return folder


class ScriptedJudge:
    """A chat-completions server on 127.0.0.1 that answers each request with the next scripted step:
    ``("reply", content)``, ``("status", code, headers)`` or ``("sleep", seconds)`` (then the next step)."""

    REPORTED_MODEL = "judge-1-0613"  # what the server says it is, not what was asked for

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict] = []  # {"body", "headers", "time"} of every request received
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"body": body, "headers": dict(self.headers), "time": time.monotonic(),
                                       "path": self.path})
                step = judge.script.pop(0) if judge.script else ("status", 500, {})
                if step[0] == "sleep":  # longer than the client waits: it gives up and asks again
                    time.sleep(step[1])
                    return
                if step[0] == "status":
                    self.send_response(step[1])
                    for key, value in step[2].items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted"}')
                    return
                reply = {"id": "x", "object": "chat.completion", "model": judge.REPORTED_MODEL,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": step[1]}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def scripted():
    judge = ScriptedJudge()
    yield judge
    judge.server.shutdown()
    judge.server.server_close()


def judge_args(bench: Path, scripted: ScriptedJudge, output: Path, *extra: str) -> list[str]:
    return ["judge", "--answers", str(bench.parent / "answers.jsonl"), "--output", str(output), "--bench-dir",
            str(bench), "--base-url", scripted.url, "--model", "judge-1", "--seed", "7", "--timeout", "0.5",
            "--backoff", "0.05", "--api-key-env", "TEST_JUDGE_KEY", *extra]


def test_the_judge_records_scores_and_every_failure_and_resumes(bench, scripted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    scripted.script = [("reply", "8 9\nBoth fine."), ("reply", "The scores are 8 and 9."), ("reply", "8\nOne."),
                       ("reply", "8 9 10\nThree."), ("status", 500, {}), ("reply", "7 6\nAfter a 500."),
                       ("status", 429, {"Retry-After": "1"}), ("reply", "6 5\nAfter a 429."),
                       ("sleep", 2.0), ("reply", "5 4\nAfter a timeout.")]
    output = tmp_path / "reviews.jsonl"
    main(judge_args(bench, scripted, output))
    reviews = read_records(output, "review")
    assert [r["tuple"] for r in reviews] == [[8.0, 9.0], [-1, -1], [-1, -1], [-1, -1], [7.0, 6.0], [6.0, 5.0],
                                             [5.0, 4.0], [-1, -1]]
    assert [r["question_id"] for r in reviews if "failure" in r] == [1, 2, 3, 7]
    assert "is not two scores: 'The scores are 8 and 9.'" in reviews[1]["failure"]
    assert reviews[7]["failure"] == "unanswered: image missing: 000000000001.jpg" and reviews[7]["content"] is None
    assert reviews[0] == {"id": 1, "question_id": 0, "answer1_id": 0, "answer2_id": "a0", "category": "conv",
                          "reference": 1, "swapped": False, "content": "8 9\nBoth fine.", "tuple": [8.0, 9.0],
                          "judge": {"base_url": scripted.url, "requested_model": "judge-1", "temperature": 0.2,
                                    "max_tokens": 1024, "seed": 7, "model": ScriptedJudge.REPORTED_MODEL}}

    # Seven questions asked (the unanswered one is not), plus one retry each after the 500, 429 and timeout.
    assert len(scripted.requests) == 10
    assert scripted.requests[7]["time"] - scripted.requests[6]["time"] >= 1.0  # Retry-After: 1 honoured
    assert scripted.requests[5]["time"] - scripted.requests[4]["time"] < 0.5  # the backoff given: 0.05 s
    first = scripted.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["headers"]["Authorization"] == "Bearer sk-test"
    assert first["body"] == {"model": "judge-1", "temperature": 0.2, "max_tokens": 1024, "seed": 7, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "[Context]\nCap 0a.\nCap 0b.\n\ncat: [0.1, 0.25, 0.5, 1.0]\n"
                                    "dog: [0.0, 0.333, 0.7, 0.9]\n\n[Question]\nQuestion 0?\n\n"
                                    "[Assistant 1]\nReference 0.\n\n[End of Assistant 1]\n\n"
                                    "[Assistant 2]\nAnswer 0.\n\n[End of Assistant 2]\n\n"
                                    "[System]\nRate the conversation.\n\n"}]}
    printed = capsys.readouterr().out
    assert "4 failures" in printed and "question 7: unanswered" in printed

    before = output.read_text()
    main(judge_args(bench, scripted, output))  # resumed: every review is there, nothing is asked again
    assert len(scripted.requests) == 10 and output.read_text() == before


def test_the_swapped_pass_puts_the_model_first_and_is_pooled(bench, scripted, tmp_path):
    output = tmp_path / "reviews.jsonl"
    scripted.script = [("reply", "4 8")] * 7 + [("reply", "8 6")] * 7
    main(judge_args(bench, scripted, output, "--swap"))
    reviews = read_records(output, "review")
    assert [(r["swapped"], r["reference"]) for r in reviews] == [(False, 1)] * 8 + [(True, 2)] * 8
    assert [r["id"] for r in reviews] == list(range(1, 17))
    swapped = scripted.requests[7]["body"]["messages"][1]["content"]
    assert "[Assistant 1]\nAnswer 0.\n\n[End of Assistant 1]\n\n[Assistant 2]\nReference 0." in swapped
    assert (reviews[8]["answer1_id"], reviews[8]["answer2_id"]) == ("a0", 0)
    summary = summarize(reviews, exclude_failures=True)
    # Reference first: model 8 vs 4; model first: model 8 vs 6. Pooled: 8 / 5.
    assert (summary.by_order[1].relative, summary.by_order[2].relative, summary.groups["all"].relative) == (
        200.0, 133.3, 160.0)


def test_a_judge_that_never_answers_stops_the_run_and_a_rerun_goes_on(bench, scripted, tmp_path):
    output, loaded = tmp_path / "reviews.jsonl", load_benchmark(bench)
    client = ChatClient(scripted.url, "judge-1", retries=2, backoff=0.01, timeout=0.5)
    scripted.script = [("reply", "8 9"), ("status", 503, {}), ("status", 503, {}), ("status", 503, {})]
    with pytest.raises(JudgeError, match="no reply after 3 attempts; last: HTTP 503"):
        judge_answers(loaded, bench.parent / "answers.jsonl", output, client)
    assert [r["question_id"] for r in read_records(output, "review")] == [0]  # what was done is kept
    scripted.script = [("reply", "7 7")] * 6
    reviews = judge_answers(loaded, bench.parent / "answers.jsonl", output, client)
    assert len(reviews) == 8 and len(scripted.requests) == 4 + 6
    with pytest.raises(ValueError, match="question 0 was written .* with judge settings"):
        judge_answers(loaded, bench.parent / "answers.jsonl", output, ChatClient(scripted.url, "judge-2"))


def test_an_empty_or_filtered_reply_is_a_failure(bench, scripted):
    loaded, answer = load_benchmark(bench), {"question_id": 0, "text": "Answer 0.", "answer_id": "a0"}
    client = ChatClient(scripted.url, "judge-1", backoff=0.01)
    scripted.script = [("reply", ""), ("reply", None)]
    empty, filtered = (review(loaded, loaded.questions[0], answer, client, swapped=False) for _ in range(2))
    assert (empty["tuple"], empty["failure"]) == ([-1, -1], "the reply's first line is not two scores: ''")
    assert (filtered["tuple"], filtered["content"]) == ([-1, -1], None)
    assert filtered["failure"] == "the reply has no message content (finish_reason 'stop')"


def test_a_client_error_is_not_retried(scripted):
    scripted.script = [("status", 401, {})]
    with pytest.raises(JudgeError, match="HTTP 401"):
        ChatClient(scripted.url, "judge-1", backoff=0.01).complete([{"role": "user", "content": "hi"}])
    assert len(scripted.requests) == 1


def test_the_real_files_make_llavas_prompt(shared_dir):
    bench = load_benchmark(shared_dir / "benchmarks" / "llava_bench_coco")
    assert len(bench.questions) == 90
    question = bench.questions[0]
    message = user_message(question, bench.contexts[question["image"]], "REF", "MODEL", bench.rule["conv"])
    context = bench.contexts["000000441147.jpg"]
    assert message.startswith(f"[Context]\n{context['captions'][0]}\n")
    assert f"\n\nsuitcase: {context['instances'][0]['bbox']}\n" in message
    assert message.endswith(f"[System]\n{bench.rule['conv']['prompt']}\n\n")


# ----------------------------------------------------------------------------------------------- answer


def write_answer_config(tmp_path: Path, micro_model_cfg: dict, bench: Path, **run) -> Path:
    cfg = {"model": micro_model_cfg,
           "datasets": {"bench": {"builder": "llava_bench", "root": str(bench), "image_size": 32}},
           "run": {"output_dir": str(tmp_path / "out"), "eval_batch_size": 2, "max_new_tokens": 3, "threads": 1,
                   **run}}
    path = tmp_path / "answer.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


@pytest.fixture
def image_bench(tmp_path) -> Path:
    """Six questions on three images: one under the question's name, one under COCO's, one missing."""
    folder = tmp_path / "image_bench"
    (folder / "images").mkdir(parents=True)
    questions = [{"question_id": i, "image": f"00000000000{i // 2 + 1}.jpg", "text": f"What is in image {i // 2}?",
                  "category": "conv" if i % 2 == 0 else "detail"} for i in range(6)]
    (folder / "qa90_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "images" / "000000000001.jpg")
    Image.new("RGB", (30, 40), (30, 30, 200)).save(folder / "images" / "COCO_val2014_000000000002.jpg")
    return folder


def counted_generate(monkeypatch) -> list[int]:
    """Patches the model's generate to count the questions each call answers."""
    from xllm.models.xllm import XLLM

    calls, generate = [], XLLM.generate

    def counting(self, inputs, *args, **kwargs):
        calls.append(len(inputs["prompt"]))
        return generate(self, inputs, *args, **kwargs)

    monkeypatch.setattr(XLLM, "generate", counting)
    return calls


def test_answering_records_every_question_and_resumes(tmp_path, micro_model_cfg, image_bench, monkeypatch,
                                                      one_thread):
    import torch
    from safetensors.torch import save_file

    from xllm.models.builder import build_model
    from xllm.models.config import resolve_model

    model = build_model(resolve_model(micro_model_cfg))
    checkpoint = tmp_path / "stage2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k.startswith(("interfaces.image", "adapters.image"))}, checkpoint)
    cfg_path, output = write_answer_config(tmp_path, micro_model_cfg, image_bench), tmp_path / "answers.jsonl"
    calls = counted_generate(monkeypatch)
    args = ["answer", "--cfg-path", str(cfg_path), "--checkpoint", str(checkpoint), "--output", str(output)]
    main(args)
    answers = read_records(output, "answer")
    assert [a["question_id"] for a in answers] == list(range(6)) and calls == [2, 2]
    assert [a["metadata"]["image"] for a in answers[:4]] == ["000000000001.jpg"] * 2 + [
        "COCO_val2014_000000000002.jpg"] * 2
    first = answers[0]
    assert set(first) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert first["prompt"] == "What is in image 0?" and isinstance(first["text"], str)
    assert first["model_id"] == "xllm-tiny" and len(first["answer_id"]) == 22
    assert first["metadata"] == {"prompt_template": "<Image><ImageHere></Image> {question}", "image_size": 32,
                                 "max_new_tokens": 3, "num_beams": 1, "do_sample": False,
                                 "checkpoint": [str(checkpoint)], "image": "000000000001.jpg"}
    for missing in answers[4:]:
        assert missing["text"] is None and missing["metadata"]["image"] is None
        assert missing["metadata"]["unanswered"] == (f"image missing: neither 000000000003.jpg nor "
                                                     f"COCO_val2014_000000000003.jpg is in {image_bench / 'images'}")

    # An interrupted run: two answers and half a line. The image now there, the rest is answered, in order.
    lines = output.read_text().splitlines()
    output.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:30])
    Image.new("RGB", (32, 32), (30, 200, 30)).save(image_bench / "images" / "000000000003.jpg")
    main(args)
    resumed = read_records(output, "answer")
    assert calls == [2, 2, 2, 2] and [a["question_id"] for a in resumed] == list(range(6))
    assert resumed[:4] == answers[:4]  # deterministic: the same answers and ids as before
    assert all(a["text"] is not None for a in resumed)

    main(args)  # complete: no model is asked anything
    assert calls == [2, 2, 2, 2] and read_records(output, "answer") == resumed
    other = write_answer_config(tmp_path, micro_model_cfg, image_bench, max_new_tokens=5)
    with pytest.raises(ValueError, match="answers.jsonl: the answer to question 0 was made by 'xllm-tiny' with"):
        main(["answer", "--cfg-path", str(other), "--checkpoint", str(checkpoint), "--output", str(output)])
    assert torch.get_num_threads() == 1


def test_the_benchmark_config_is_checked_like_every_config(tmp_path):
    cfg = load_config("tiny/eval_llava_bench.yaml")
    assert cfg.datasets.llava_bench_coco.root == "../shared/benchmarks/llava_bench_coco"
    with pytest.raises(ConfigError, match="unknown config key 'datasets.llava_bench_coco.image_folder'"):
        load_config("tiny/eval_llava_bench.yaml", ["datasets.llava_bench_coco.image_folder=x"])
    with pytest.raises(ValueError, match="scored by an LLM judge"):  # what evaluate.py meets
        llava_bench.requires_judge(["a"], ["b"], ["en"])
