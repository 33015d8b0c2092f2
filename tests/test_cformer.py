import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

from xllm.common.config import typed
from xllm.models.interfaces.cformer import CFormerInterface

MICRO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_tokens=64,
             dropout=0.0)


def make(**options) -> CFormerInterface:
    torch.manual_seed(0)
    cfg = typed(CFormerInterface.Config, {**MICRO, **options}, "interface")
    return CFormerInterface.build(cfg, input_dim=24).eval()


def frames(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(len(lengths), max(lengths), 24)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return x * mask[..., None], mask


def test_output_holds_one_vector_per_fired_token_and_zeros_elsewhere():
    cformer = make()
    x, mask = frames([40, 25])
    out = cformer.fire(x, mask)
    assert out.hidden.shape == (2, int(out.cif.lengths.max()), 32)
    assert torch.equal(out.mask.sum(1), out.cif.lengths)
    assert (out.hidden * ~out.mask[..., None]).abs().sum() == 0
    hidden, hidden_mask = cformer(x, mask)
    assert torch.equal(hidden, out.hidden) and torch.equal(hidden_mask, out.mask)


def test_target_lengths_fire_exactly_that_many_tokens_with_the_quantity_loss():
    cformer = make()
    x, mask = frames([40, 25, 31])
    targets = torch.tensor([7, 3, 12])
    out = cformer.fire(x, mask, targets)
    assert out.cif.lengths.tolist() == [7, 3, 12]
    expected = (out.cif.alphas.sum(1) - targets).abs().mean()
    assert torch.allclose(out.cif.quantity_loss, expected)


def test_a_row_does_not_depend_on_the_padding_of_its_batch():
    cformer = make()
    x, mask = frames([40, 25])
    together = cformer.fire(x, mask, torch.tensor([6, 4]))
    alone = cformer.fire(x[1:, :25], mask[1:, :25], torch.tensor([4]))
    assert torch.allclose(together.hidden[1, :4], alone.hidden[0], atol=1e-5)


def test_gradients_reach_cif_weights_projection_and_transformer():
    cformer = make().train()
    x, mask = frames([30, 20])
    out = cformer.fire(x, mask, torch.tensor([5, 4]))
    (out.hidden.pow(2).sum() + out.cif.quantity_loss).backward()
    for name in ("input_proj.weight", "cif.weight_proj.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        grad = dict(cformer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_silence_that_fires_nothing_gives_zero_positions():
    cformer = make()
    with torch.no_grad():
        cformer.cif.weight_proj.bias.fill_(-50.0)  # every alpha ~ 0: nothing integrates to a token
    x, mask = frames([30, 20])
    hidden, out_mask = cformer(x, mask)
    assert hidden.shape == (2, 0, 32) and out_mask.shape == (2, 0)


def test_transformer_layers_start_from_a_bert_folder(tmp_path):
    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=96), add_pooling_layer=False)
    bert.save_pretrained(tmp_path)
    cformer = make(bert_path=str(tmp_path))
    assert cformer.output_dim == 48  # the folder's width, not the config's 32
    key = "encoder.layer.1.output.dense.weight"
    assert torch.equal(cformer.bert.state_dict()[key], bert.state_dict()[key])
    x, mask = frames([30])
    assert cformer(x, mask)[0].shape[-1] == 48


def test_a_missing_bert_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make(bert_path=str(tmp_path / "nowhere"))


def test_an_unknown_option_is_a_config_error():
    with pytest.raises(ValueError, match="interface.hiden_size"):
        typed(CFormerInterface.Config, OmegaConf.create({"hiden_size": 8}), "interface")
