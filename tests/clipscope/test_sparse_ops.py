"""The sparse encoder backward and sparse decoder give the dense reference's results."""

import pytest
import torch

from clipscope.config import TrainConfig
from clipscope.sae.dense_reference import DenseTopKSAE
from clipscope.sae.metrics import FiringTracker
from clipscope.sae.model import TopKSAE
from clipscope.sae import sparse_ops
from clipscope.sae.sparse_ops import topk_unsorted
from worker.train.loop import train_step
from worker.train.recipes import make_recipe

D_IN, D_SAE, K = 48, 384, 12


def pair(use_b_dec: bool, seed: int = 0):
    sparse = TopKSAE(D_IN, D_SAE, K, use_b_dec=use_b_dec)
    sparse.init_weights("tied", generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sparse.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
        if use_b_dec:
            sparse.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 2))
    dense = DenseTopKSAE(D_IN, D_SAE, K, use_b_dec=use_b_dec)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


@pytest.fixture(params=["cpu", "accelerator"])
def paths(request, monkeypatch):
    """Which of sparse_ops' paths run: the CPU's, or those a GPU takes (no value read back to the
    host: plain top-k, masked AuxK, embedding_bag decode, CSR by binary search), here on the CPU.
    Yields the names of the path-specific functions that ran, to check the choice took effect."""
    if request.param == "accelerator":
        monkeypatch.setattr(sparse_ops, "on_cpu", lambda t: False)
    ran = []
    for name in ("_decode_sddmm", "_decode_embedding_bag"):
        monkeypatch.setattr(sparse_ops, name, lambda *a, name=name, real=getattr(sparse_ops, name): ran.append(name) or real(*a))
    yield request.param, ran


def _bagged_products(monkeypatch, samples: int, latents: int) -> list[int]:
    """Makes :func:`sparse_ops.csr_product_into` take its embedding_bag path from ``samples`` samples on,
    ``latents`` rows a block; returns the list its blocks are recorded in (their numbers of rows).
    Told apart from the decode's bags by their table: the product's is the dense operand, not a
    ``[D_SAE, D_IN]`` dictionary."""
    monkeypatch.setattr(sparse_ops, "_BAG_PRODUCT_SAMPLES", samples)
    monkeypatch.setattr(sparse_ops, "_BAG_PRODUCT_BYTES", latents * D_IN * 4)
    blocks, real = [], torch.nn.functional.embedding_bag

    def recorded(indices, weight, *args, offsets=None, **kwargs):
        if weight.shape[0] != D_SAE:
            blocks.append(len(offsets))
        return real(indices, weight, *args, offsets=offsets, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "embedding_bag", recorded)
    return blocks


def _tracker(dead_every: int):
    tracker = FiringTracker(D_SAE, dead_after=1)
    tracker.since_fired.zero_()
    tracker.since_fired[::dead_every] = 5  # every dead_every-th latent is dead
    return tracker


@pytest.mark.parametrize(("recipe", "auxk_k", "chunk_rows"), [("seed", 20, None), ("topk", 20, None), ("topk", 200, None), ("seed", 20, 5), ("topk", 20, 5)])
def test_loss_and_every_gradient_equal_the_dense_reference(recipe, auxk_k, chunk_rows, paths, monkeypatch):
    """``auxk_k`` 200 asks for more latents than are dead (128): the slots past them hold nothing.
    ``chunk_rows`` 5: the CPU encoder takes the batch of 32 five rows at a time (the last chunk two),
    the CPU decode sums it in passes over 50 latents (the last one short), and the weight gradients
    are summed by embedding_bag 50 latents at a time; a GPU takes it whole."""
    kind, ran = paths
    if chunk_rows:
        monkeypatch.setattr(sparse_ops, "_ENCODE_ROWS", chunk_rows)
        monkeypatch.setattr(sparse_ops, "_DECODE_BLOCKED_ROWS", 8)
        monkeypatch.setattr(sparse_ops, "_DECODE_LATENTS", 50)
        bags = _bagged_products(monkeypatch, samples=8, latents=50)
        calls, blocked = [], []
        monkeypatch.setattr(sparse_ops, "_encode", lambda xc, *a, real=sparse_ops._encode: calls.append(len(xc)) or real(xc, *a))  # noqa: E731
        monkeypatch.setattr(sparse_ops, "_decode_by_blocks", lambda i, *a, real=sparse_ops._decode_by_blocks: blocked.append(len(i)) or real(i, *a))  # noqa: E731
    cfg = TrainConfig(recipe=recipe, auxk_k=auxk_k)
    sparse, dense = pair(use_b_dec=recipe == "topk")
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    tracker = _tracker(3)
    outs = []
    for sae in (sparse, dense):
        r = make_recipe(cfg, 100, D_IN, D_SAE)
        r.prepare(sae)
        out = r.loss(sae, x, step=10, tracker=tracker)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].x_hat, outs[1].x_hat, rtol=1e-5, atol=1e-5)
    if recipe == "topk":
        assert outs[1].extra["auxk"] > 0, "the test must exercise AuxK"
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(sparse, name), getattr(dense, name)
        if b.grad is None:
            assert a.grad is None, name
            continue
        assert b.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    if chunk_rows:
        assert calls == ([5] * 6 + [2] if kind == "cpu" else [32]), "the CPU encoder runs in chunks, a GPU's whole"
        # the TopK code, and with topk AuxK's (b_dec's gradient through the encoder is no decode here: more slots than latents)
        assert blocked == ([32, 32] if recipe == "topk" and kind == "cpu" else [32] if kind == "cpu" else [])
        products = 2 if recipe == "topk" else 1  # the encoder's and the decoder's weight gradients; seed's decoder is frozen
        assert bags == (([50] * 7 + [34]) * products if kind == "cpu" else []), "on the CPU, blocks of 50 latents (the last one short)"
    assert set(ran) == {"_decode_sddmm" if kind == "cpu" else "_decode_embedding_bag"}


@pytest.mark.parametrize("batch", [8, 64])
def test_b_dec_gradient_through_the_encoder_equals_the_dense_reference(batch, paths, monkeypatch):
    """b_dec's gradient from the encoder's input: a decode of the encoder's rows summed over samples
    while the slots (8 x 12) are fewer than the latents (384), one product of b_enc's gradient with
    the encoder weight when they are more (64 x 12)."""
    decoded = []
    monkeypatch.setattr(sparse_ops, "_bag_decode", lambda i, v, w, real=sparse_ops._bag_decode: decoded.append(w.data_ptr()) or real(i, v, w))
    sparse, dense = pair(use_b_dec=True)
    x = torch.randn(batch, D_IN, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    for sae in (sparse, dense):
        (sae.decode(sae.encode(x)) - x).pow(2).sum().backward()
    for name in ("b_dec", "b_enc"):
        assert getattr(dense, name).grad.abs().sum() > 0, name
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad, rtol=1e-4, atol=1e-5, msg=name)
    by_encoder = decoded.count(sparse.encoder_weight.data_ptr())
    assert by_encoder == (1 if batch * K < D_SAE else 0)
    assert decoded.count(sparse.W_dec.data_ptr()) == (1 if paths[0] == "cpu" else 0), "the CPU's forward decode"


def test_input_gradient_equals_the_dense_reference():
    sparse, dense = pair(use_b_dec=True)
    grads = []
    for sae in (sparse, dense):
        x = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(4)).requires_grad_()
        sae.decode(sae.encode(x)).pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe", ["seed", "topk"])
def test_training_steps_stay_equal_to_the_dense_reference(recipe, paths):
    """Five steps of the real training step (kept gradient buffers, parallel-gradient removal,
    renormalisation) on both implementations, through the CPU's paths and a GPU's."""
    cfg = TrainConfig(recipe=recipe)
    sparse, dense = pair(use_b_dec=recipe == "topk")
    sides = []
    for sae in (sparse, dense):
        r = make_recipe(cfg, 50, D_IN, D_SAE)
        r.prepare(sae)
        sides.append((sae, r, torch.optim.Adam(r.parameters(sae), lr=1e-3), _tracker(4)))
    for step in range(5):
        x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(10 + step))
        for sae, r, opt, tracker in sides:
            train_step(sae, r, opt, tracker, x, step, 1e-3)
    assert set(paths[1]) == {"_decode_sddmm" if paths[0] == "cpu" else "_decode_embedding_bag"}
    torch.testing.assert_close(sides[0][3].since_fired, sides[1][3].since_fired, rtol=0, atol=0)
    for name in ("encoder_weight", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bagged", [False, True])
def test_the_kept_gradient_buffer_is_overwritten_not_added_to(bagged, monkeypatch):
    """Through MKL's CSR product and through embedding_bag in blocks (its path for many samples)."""
    bags = _bagged_products(monkeypatch, samples=8, latents=100) if bagged else []
    sparse, dense = pair(use_b_dec=True)
    x1, x2 = torch.randn(2, 16, D_IN, generator=torch.Generator().manual_seed(6))
    sparse.decode(sparse.encode(x1)).pow(2).sum().backward()
    kept = sparse.encoder_weight.grad.data_ptr(), sparse.W_dec.grad.data_ptr()
    sparse.zero_grad_()
    assert sparse.encoder_weight.grad is None and sparse.W_dec.grad is None
    for sae in (sparse, dense):
        sae.decode(sae.encode(x2)).pow(2).sum().backward()
    assert (sparse.encoder_weight.grad.data_ptr(), sparse.W_dec.grad.data_ptr()) == kept, "the buffers are reused"
    for name in ("encoder_weight", "W_dec"):
        torch.testing.assert_close(getattr(sparse, name).grad, getattr(dense, name).grad, rtol=1e-4, atol=1e-6, msg=name)
    sparse.decode(sparse.encode(x2)).pow(2).sum().backward()  # without zero_grad_: accumulates, as autograd does
    torch.testing.assert_close(sparse.W_dec.grad, 2 * dense.W_dec.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparse.encoder_weight.grad, 2 * dense.encoder_weight.grad, rtol=1e-4, atol=1e-6)
    assert len(bags) == (3 * 2 * 4 if bagged else 0), "three backward passes, two products, four blocks of latents"


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("bagged", [False, True])
def test_the_csr_product_is_written_into_its_output(bagged, accumulate, monkeypatch):
    """``csr_product_into`` on both CPU paths: rows with no entry, a block of 7 rows with none (rows 7-13),
    the last block short; without ``accumulate`` the output's old values (NaN here) count for nothing."""
    bags = _bagged_products(monkeypatch, samples=20, latents=7) if bagged else []
    g = torch.Generator().manual_seed(7)
    by_sample = torch.randn(D_SAE, 20, generator=g) * (torch.rand(D_SAE, 20, generator=g) < 0.2)
    by_sample[5:16] = 0
    dense = torch.randn(20, D_IN, generator=g)
    old = torch.randn(D_SAE, D_IN, generator=g)
    out = old.clone() if accumulate else torch.full((D_SAE, D_IN), float("nan"))
    got = sparse_ops.csr_product_into(out, by_sample.to_sparse_csr(), dense, accumulate=accumulate)
    assert got is out
    torch.testing.assert_close(out, by_sample @ dense + (old if accumulate else 0), rtol=1e-5, atol=1e-5)
    assert bags == ([7] * 54 + [6] if bagged else [])


@pytest.mark.parametrize("latents", [7, 50, 383])
def test_the_decode_by_latent_blocks_gives_embedding_bags_sums(latents, monkeypatch):
    """Blocks of 7, 50 (the last one short) and 383 of 384 latents; zero values, and samples with no slot in a block."""
    monkeypatch.setattr(sparse_ops, "_DECODE_LATENTS", latents)
    g = torch.Generator().manual_seed(latents)
    W = torch.randn(D_SAE, D_IN, generator=g)
    indices = torch.stack([torch.randperm(D_SAE, generator=g)[:K] for _ in range(40)])
    values = torch.rand(40, K, generator=g) * (torch.rand(40, K, generator=g) > 0.3)
    indices[3] = torch.arange(K)  # a sample whose slots all lie in the first block
    expected = torch.nn.functional.embedding_bag(indices, W, per_sample_weights=values, mode="sum")
    torch.testing.assert_close(sparse_ops._decode_by_blocks(indices, values, W), expected, rtol=1e-5, atol=1e-5)


def _plain_layout(codes: list[torch.Tensor], d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The by-latent layout by its definition: every slot as (latent, stacked sample, flattened slot), sorted."""
    triples, offset, slot = [], 0, 0
    for code in codes:
        for sample, row in enumerate(code.tolist()):
            for latent in row:
                triples.append((latent, offset + sample, slot))
                slot += 1
        offset += code.shape[0]
    triples.sort()
    counts = torch.zeros(d_sae + 1, dtype=torch.long)
    for latent, _, _ in triples:
        counts[latent + 1] += 1
    return counts.cumsum(0), torch.tensor([t[1] for t in triples]), torch.tensor([t[2] for t in triples])


def _codes(batch: int, widths: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(D_SAE, generator=g)[:w] for _ in range(batch)]) for w in widths]


@pytest.mark.parametrize("kind", ["cpu", "accelerator"])
@pytest.mark.parametrize("widths", [(K,), (K, 5), (K, 0)])
@pytest.mark.parametrize("batch", [8, 3000])
def test_the_by_latent_layout_lists_each_latents_samples_in_order(batch, widths, kind, monkeypatch):
    """One code, a TopK code stacked with a narrower AuxK code, and with an empty one; 3,000 samples
    (36,000 slots) take torch's radix sort, 8 its comparison sort; row pointers by counting (the
    CPU) and by binary search (a GPU)."""
    if kind == "accelerator":
        monkeypatch.setattr(sparse_ops, "on_cpu", lambda t: False)
    codes = _codes(batch, widths, seed=batch + sum(widths))
    for got, expected, name in zip(sparse_ops._latent_layout(codes, D_SAE), _plain_layout(codes, D_SAE), ("crow", "cols", "order")):
        assert got.dtype == torch.long, name
        assert torch.equal(got, expected), name


def test_two_backward_passes_over_the_same_codes_share_one_layout(monkeypatch):
    """The second request for the same index tensors takes the kept layout; a third, other tensors
    of the same values, or the same tensors changed in place get one built anew."""
    built = []
    monkeypatch.setattr(sparse_ops, "_latent_layout", lambda *a, real=sparse_ops._latent_layout: built.append(1) or real(*a))
    codes = _codes(6, (K, 5), seed=9)
    first = sparse_ops._shared_layout(codes, D_SAE)
    assert sparse_ops._shared_layout(codes, D_SAE) is first and len(built) == 1
    sparse_ops._shared_layout(codes, D_SAE)
    assert len(built) == 2, "a layout is taken once"
    sparse_ops._shared_layout([c.clone() for c in codes], D_SAE)
    assert len(built) == 3, "tensors are matched by identity, not by value"
    sparse_ops._shared_layout(codes, D_SAE)  # kept for these very tensors
    codes[0][0, 0] = next(latent for latent in range(D_SAE) if latent not in codes[0][0].tolist())
    layout = sparse_ops._shared_layout(codes, D_SAE)
    assert len(built) == 5, "a tensor changed in place gets a new layout"
    for got, expected in zip(layout, _plain_layout(codes, D_SAE)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("recipe", ["seed", "topk"])
def test_a_training_step_sorts_its_slots_by_latent_once(recipe, paths, monkeypatch):
    """The decoder's backward pass and the encoder's share the layout of the same codes (with AuxK's in
    the topk recipe); off the CPU seed's frozen decoder needs none, and the encoder builds it."""
    built = []
    monkeypatch.setattr(sparse_ops, "_latent_layout", lambda *a, real=sparse_ops._latent_layout: built.append(len(a[0])) or real(*a))
    sparse, _ = pair(use_b_dec=recipe == "topk")
    r = make_recipe(TrainConfig(recipe=recipe, auxk_k=20), 50, D_IN, D_SAE)
    r.prepare(sparse)
    train_step(sparse, r, torch.optim.Adam(r.parameters(sparse), lr=1e-3), _tracker(3), torch.randn(16, D_IN), 0, 1e-3)
    assert built == [2 if recipe == "topk" else 1]


@pytest.mark.parametrize(("batch", "width", "k"), [(16, 4096, 50), (3, 800, 100), (5, 1000, 7), (4, 96, 10)])
def test_topk_unsorted_gives_torch_topk_values_with_ties_and_infinities(batch, width, k):
    g = torch.Generator().manual_seed(width)
    pre = torch.randn(batch, width, generator=g)
    pre[0] = torch.randint(-3, 4, (width,), generator=g).float()  # many ties
    pre[1, ::3] = float("-inf")
    values, indices = topk_unsorted(pre, k)
    expected = pre.topk(k, dim=-1).values
    torch.testing.assert_close(values.sort(dim=-1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(pre.gather(1, indices), values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == k for row in indices), "no index twice in a row"


def test_slots_that_relu_zeroed_get_no_gradient_as_in_the_dense_reference():
    sparse, dense = pair(use_b_dec=False)
    with torch.no_grad():
        for sae in (sparse, dense):
            sae.b_enc.fill_(-3.0)  # most pre-activations negative: fewer than k latents fire
    x = torch.randn(16, D_IN, generator=torch.Generator().manual_seed(5))
    assert (sparse.encode(x).l0() < K).all()
    for sae in (sparse, dense):
        code = sae.encode(x)
        (sae.decode(code).pow(2).sum() + code.values.sum()).backward()
    torch.testing.assert_close(sparse.encoder_weight.grad, dense.encoder_weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparse.b_enc.grad, dense.b_enc.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trains_w", [True, False])
@pytest.mark.parametrize("use_sink", [True, False])
def test_both_decode_backwards_give_autograds_gradients(trains_w, use_sink):
    """The CPU's SDDMM backward and the embedding_bag backward used off the CPU, for two codes decoded together."""
    from clipscope.sae import sparse_ops

    g = torch.Generator().manual_seed(3)
    W = torch.randn(D_SAE, D_IN, generator=g)
    codes = [(torch.rand(b, D_SAE, generator=g).topk(k, dim=1).indices, torch.rand(b, k, generator=g)) for b, k in ((5, K), (3, 2 * K))]
    out_grads = [torch.randn(b, D_IN, generator=g) for b in (5, 3)]

    def run(decode):
        sae = TopKSAE(D_IN, D_SAE, K) if use_sink else None
        weight = (sae.W_dec if use_sink else torch.nn.Parameter(torch.empty_like(W))).requires_grad_(trains_w)
        with torch.no_grad():
            weight.copy_(W)
        values = [v.clone().requires_grad_() for _, v in codes]
        outs = decode([(i, v) for (i, _), v in zip(codes, values)], weight, sae)
        sum((o * og).sum() for o, og in zip(outs, out_grads)).backward()
        return [o.detach() for o in outs], [v.grad for v in values], weight.grad

    def dense(codes, weight, _sink):  # autograd through dense codes: the plain maths
        return [torch.zeros(len(i), D_SAE).scatter(1, i, v) @ weight for i, v in codes]

    expected = run(dense)
    for decode in (sparse_ops._decode_sddmm, sparse_ops._decode_embedding_bag):
        outs, value_grads, weight_grad = run(decode)
        for got, want in zip(outs + value_grads, expected[0] + expected[1]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if trains_w:
            torch.testing.assert_close(weight_grad, expected[2], rtol=1e-5, atol=1e-5)
        else:
            assert weight_grad is None


@pytest.mark.parametrize("recipe", ["seed", "topk"])
def test_a_training_step_off_the_cpu_never_reads_a_value_back_to_the_host(recipe, monkeypatch):
    """On the meta device tensors have shapes but no values, so an operation that would read one
    back to the host (``.item()``, ``nonzero``, ``bincount``, ``unique``: a stall of a GPU every
    step) raises there; and the code takes its off-CPU paths, as on a GPU. torch has no meta kernel
    for a CSR-times-dense product, so that product alone is replaced by a check of its operands."""
    products = []

    def accumulate_grad(self, name, by_sample, dense):
        param = getattr(self, name)
        assert by_sample.layout == torch.sparse_csr and by_sample.shape == (param.shape[0], dense.shape[0])
        assert dense.shape[1] == param.shape[1]
        products.append(name)
        param.grad = torch.empty_like(param)

    monkeypatch.setattr(TopKSAE, "accumulate_grad", accumulate_grad)
    sae = TopKSAE(D_IN, D_SAE, K, use_b_dec=recipe == "topk").to("meta")
    r = make_recipe(TrainConfig(recipe=recipe), 100, D_IN, D_SAE)
    r.prepare(sae)
    tracker = FiringTracker(D_SAE, dead_after=1, device="meta")
    optimizer = torch.optim.Adam(r.parameters(sae), lr=1e-3, foreach=True)  # fused Adam has no meta kernel: one CUDA kernel
    out = train_step(sae, r, optimizer, tracker, torch.empty(16, D_IN, device="meta"), 0, 1e-3)
    assert sorted(products) == (["W_dec", "encoder_weight"] if recipe == "topk" else ["encoder_weight"])  # seed's decoder is frozen
    # what the training loop sums every step stays on the device: a host tensor there would be
    # copied to the GPU every step, a copy that waits for the device
    outputs = {"loss": out.loss, "mse": out.mse, "x_hat": out.x_hat, **out.extra}
    assert {name: t.device.type for name, t in outputs.items()} == dict.fromkeys(outputs, "meta")


def test_an_auxk_code_the_loss_does_not_read_adds_no_gradient():
    """Autograd hands the encoder no gradient for unread outputs (it does not make zeros for them)."""
    g = torch.Generator().manual_seed(5)
    weight, b_enc, b_dec = torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_SAE, generator=g) * 0.1, torch.zeros(D_IN)
    x = torch.randn(8, D_IN, generator=g)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for mask, k_aux in ((None, 0), (dead, 20)):
        w, b = weight.clone().requires_grad_(), b_enc.clone().requires_grad_()
        values, _, aux_values, _ = sparse_ops.topk_encode(x, w, b, b_dec, K, mask, k_aux)
        assert aux_values.shape[1] == k_aux and (k_aux == 0 or aux_values.abs().sum() > 0)
        (values * torch.arange(K)).sum().backward()
        grads.append((w.grad, b.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
