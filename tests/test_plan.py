"""The memory plan: meta-device counts, and the bytes autograd keeps for backward measured by rule."""

import torch
from torch import nn

from xllm.models.llm.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, parameter_report
from xllm.common.paths import configs_dir
from xllm.plan import CHATGLM_6B, SavedBytes, checkpointed, meta_model, plan
from xllm.config import load_config


def test_saved_bytes_follow_autograd_rules_for_frozen_and_checkpointed_layers():
    with torch.device("meta"):
        block = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).requires_grad_(False)
        x = torch.empty(8, 64, requires_grad=True)
    saved = SavedBytes(block)
    # A frozen linear keeps its weight (a parameter: not counted) for the input's gradient, never its input; GELU
    # keeps its [8, 256] input: 8 * 256 * 4 bytes.
    assert saved.measure(lambda: block(x)) == 8 * 256 * 4
    assert saved.measure(lambda: checkpointed(block)(x)) == 8 * 64 * 4  # the block's input only
    block[0].weight.requires_grad_(True)  # a trainable first layer also keeps its input
    assert saved.measure(lambda: block(x)) == 8 * 256 * 4 + 8 * 64 * 4


def test_the_paper_plan_counts_chatglm_6b_on_the_meta_device():
    cfg = load_config("paper/stage2_image.yaml")
    model, config, notes = meta_model(cfg.model)
    assert all(p.is_meta for p in model.parameters())
    reference = ChatGLMForConditionalGeneration.from_config(ChatGLMConfig.from_json(configs_dir() / CHATGLM_6B))
    counted = sum(p.numel() for p in {id(p): p for p in model.llm.parameters()}.values())
    assert counted == parameter_report(reference).parameters == 6_173_286_400
    assert any("ChatGLM-6B's published sizes" in note for note in notes)
    table = plan("paper/stage2_image.yaml", 8, "bfloat16", 48, 64)
    assert "LLM 6,173,286,400" in table and "in bfloat16" in table
    rows = {line[:36].strip(): [float(v) for v in line[36:].split()] for line in table.splitlines()[3:]
            if line[:1].isalpha() and not line.startswith("note")}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["gradients (fp32)"][0] == round(trainable * 4 / 1024 ** 3, 2)
    ddp1, ddp8, fsdp1, fsdp8 = rows["frozen weights"]
    assert ddp1 == ddp8 == fsdp1 and abs(fsdp8 - ddp1 / 8) <= 0.01  # FSDP divides the frozen weights
    assert rows["activations / sample, checkpointed"][0] < 0.5 * rows["activations / sample"][0]
