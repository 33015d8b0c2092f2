import pytest
import torch

from cif_reference import reference_integrate_and_fire
from xllm.models.interfaces.cif import CIF, integrate_and_fire


def assert_matches_reference(x, alphas, threshold=1.0, tail_threshold=0.5):
    fired, lengths = integrate_and_fire(x, alphas, threshold, tail_threshold)
    ref_rows, ref_lengths = reference_integrate_and_fire(x, alphas, threshold, tail_threshold)
    assert lengths.tolist() == ref_lengths
    assert fired.shape[1] == max(ref_lengths)
    for b, ref in enumerate(ref_rows):
        torch.testing.assert_close(fired[b, : ref_lengths[b]].double(), ref, atol=1e-5, rtol=1e-5)
        assert (fired[b, ref_lengths[b] :] == 0).all()


def test_hand_example():
    # Weights 0.6, 0.6, 0.6, 0.6: token 0 = 0.6 x0 + 0.4 x1, token 1 = 0.2 x1 + 0.6 x2 + 0.2 x3,
    # leftover 0.4 < 0.5 is dropped.
    x = torch.eye(4)[None]
    fired, lengths = integrate_and_fire(x, torch.full((1, 4), 0.6))
    assert lengths.tolist() == [2]
    torch.testing.assert_close(fired[0], torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.2, 0.6, 0.2]]))
    # With 0.7 each the leftover 0.8 fires a third token, rescaled from 0.8 to a full weight.
    fired, lengths = integrate_and_fire(x, torch.full((1, 4), 0.7))
    assert lengths.tolist() == [3]
    torch.testing.assert_close(fired[0, 2], torch.tensor([0.0, 0.0, 0.1, 0.7]) / 0.8)


def test_frame_crossing_two_boundaries():
    # Weights 0.3, 2.5, 0.4 (total 3.2): the middle frame completes token 0 (0.7), fills token 1 alone (1.0)
    # and starts token 2 (0.8), which the last frame completes (0.2); its remaining 0.2 is dropped.
    x = torch.eye(3)[None]
    fired, lengths = integrate_and_fire(x, torch.tensor([[0.3, 2.5, 0.4]]))
    assert lengths.tolist() == [3]
    torch.testing.assert_close(fired[0], torch.tensor([[0.3, 0.7, 0.0], [0.0, 1.0, 0.0], [0.0, 0.8, 0.2]]))


@pytest.mark.parametrize("seed", range(5))
def test_random_alphas_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 37, 8, generator=g)
    alphas = torch.rand(4, 37, generator=g)
    alphas[1, 20:] = 0.0  # a padded row
    assert_matches_reference(x, alphas)


@pytest.mark.parametrize("seed", range(5))
def test_large_alphas_match_reference(seed):
    # Scaled alphas can exceed 1 and even 2: frames spanning several tokens.
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(3, 25, 6, generator=g)
    alphas = torch.rand(3, 25, generator=g) * 3.2
    assert (alphas > 2.0).any()
    assert_matches_reference(x, alphas)
    assert_matches_reference(x, alphas, threshold=1.5, tail_threshold=0.9)


def test_long_sequences_match_reference():
    # Hundreds of tokens: the boundaries must not drift with the length of the running sum.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1500, 4, generator=g)
    assert_matches_reference(x, torch.rand(2, 1500, generator=g))


def test_module_scales_to_target_lengths_and_masks_padding():
    torch.manual_seed(0)
    cif = CIF(dim=16)
    x = torch.randn(3, 40, 16)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    mask[2, 10:] = False
    targets = torch.tensor([7, 12, 23])
    out = cif(x, mask, target_lengths=targets)
    assert out.lengths.tolist() == targets.tolist()
    assert out.fired.shape == (3, 23, 16)
    assert out.mask.sum(1).tolist() == targets.tolist()
    assert (out.alphas[~mask] == 0).all() and (out.alphas[mask] > 0).all()
    expected_loss = (out.alphas.sum(1) - targets).abs().mean()
    torch.testing.assert_close(out.quantity_loss, expected_loss)
    # Padding content never reaches the output.
    x2 = x.clone()
    x2[~mask] = 1e3
    torch.testing.assert_close(cif(x2, mask, target_lengths=targets).fired, out.fired)
    # The loss trains the weight predictor.
    out.quantity_loss.backward()
    assert cif.weight_proj.weight.grad.abs().sum() > 0


def test_module_inference_uses_predicted_lengths():
    torch.manual_seed(1)
    cif = CIF(dim=8).eval()
    x = torch.randn(2, 30, 8)
    out = cif(x)
    assert out.quantity_loss is None
    totals = out.alphas.sum(1)
    expected = torch.floor(totals) + ((totals - torch.floor(totals)) >= 0.5).long()
    assert out.lengths.tolist() == expected.long().tolist()
    ref_rows, _ = reference_integrate_and_fire(x, out.alphas.detach())
    for b in range(2):
        torch.testing.assert_close(out.fired[b, : out.lengths[b]].detach().double(), ref_rows[b], atol=1e-5, rtol=1e-5)


def test_fired_vectors_carry_gradient_to_alphas():
    x = torch.randn(1, 6, 4)
    alphas = torch.full((1, 6), 0.45, requires_grad=True)
    fired, _ = integrate_and_fire(x, alphas)
    fired.sum().backward()
    assert alphas.grad is not None and alphas.grad.abs().sum() > 0
