import pytest
import torch

from clipscope.sae.model import TopKSAE


def _sae(use_b_dec=True, d_in=16, d_sae=64, k=5, seed=0):
    sae = TopKSAE(d_in, d_sae, k, use_b_dec=use_b_dec)
    sae.init_weights("tied", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if use_b_dec:
            sae.b_dec.normal_(0, 0.5)
    return sae


def test_sparse_decode_equals_dense_matmul():
    sae = _sae()
    x = torch.randn(32, 16)
    x_hat, code = sae(x)
    dense = code.to_dense() @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(x_hat, dense)


def test_encode_is_relu_then_topk_of_the_dense_preactivations():
    sae = _sae()
    x = torch.randn(8, 16)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    dense = torch.relu(pre)
    expected = torch.zeros_like(dense).scatter(1, dense.topk(5, dim=1).indices, dense.topk(5, dim=1).values)
    torch.testing.assert_close(sae.encode(x).to_dense(), expected)


def test_l0_never_exceeds_k_and_counts_only_positive_latents():
    sae = _sae(k=7)
    code = sae.encode(torch.randn(256, 16) * 5)
    assert code.indices.shape == (256, 7)
    assert int(code.l0().max()) <= 7
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative: nothing fires
    assert int(sae.encode(torch.randn(4, 16)).l0().max()) == 0


def test_decoder_rows_are_unit_norm_after_init_and_normalize():
    sae = _sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_parallel_gradient_removal_leaves_only_orthogonal_components():
    sae = _sae()
    x = torch.randn(32, 16)
    x_hat, _ = sae(x)
    (x_hat - x).pow(2).sum().backward()
    assert sae.W_dec.grad.abs().sum() > 0
    before = sae.W_dec.grad.norm(dim=1)
    sae.remove_parallel_decoder_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)  # rows are unit norm: the component left along each
    # float32 leaves a residue proportional to the gradient's size (it was up to 1.8e-5 absolute on some draws)
    torch.testing.assert_close(parallel / before.clamp_min(1e-12), torch.zeros(64), atol=1e-6, rtol=0)


def test_tied_init_sets_decoder_to_normalised_encoder_transpose():
    sae = _sae(use_b_dec=False)
    expected = sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec, expected)


def test_without_b_dec_the_bias_stays_zero_and_untrained():
    sae = TopKSAE(8, 16, 2, use_b_dec=False)
    assert not sae.b_dec.requires_grad
    assert torch.count_nonzero(sae.b_dec) == 0


def test_k_larger_than_dictionary_is_rejected():
    with pytest.raises(ValueError, match="k must be"):
        TopKSAE(8, 4, 5)
