"""The functional SAE matches an independently written nn.Module SAE, loss and gradients."""

import pytest
import torch
import torch.nn as nn

from sae_ensemble import sae


class ReferenceSAE(nn.Module):
    """Plain nn.Module SAE written from the formulas, sharing no code with sae.py."""

    def __init__(self, variant, W_enc, b_enc, W_dec, b_dec, l1, bias_decay, k, use_b_dec):
        super().__init__()
        self.variant, self.l1, self.bias_decay, self.k, self.use_b_dec = variant, l1, bias_decay, k, use_b_dec
        self.W_enc = nn.Parameter(W_enc.clone())
        self.b_enc = nn.Parameter(b_enc.clone())
        self.W_dec = nn.Parameter(W_dec.clone())
        self.b_dec = nn.Parameter(b_dec.clone())

    def forward(self, x):
        centre = self.b_dec if self.use_b_dec else torch.zeros_like(self.b_dec)
        pre = torch.einsum("bd,nd->bn", x - centre, self.W_enc) + self.b_enc
        c = torch.clamp(pre, min=0)
        if self.variant == "topk":
            idx = pre.topk(self.k, dim=1).indices
            keep = torch.zeros_like(pre).scatter(1, idx, 1.0)
            c = c * keep
        rows = self.W_enc if self.variant == "tied" else self.W_dec
        dictionary = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
        x_hat = torch.einsum("bn,nd->bd", c, dictionary) + centre
        l1 = 0.0 if self.variant == "topk" else self.l1
        loss = ((x_hat - x) ** 2).sum() / x.numel() + l1 * c.abs().sum() / x.shape[0]
        return loss + self.bias_decay * torch.sqrt((self.b_enc**2).sum())


@pytest.mark.parametrize("variant,use_b_dec", [("relu", True), ("relu", False), ("tied", True), ("topk", True)])
def test_loss_and_gradients_match_reference_module(variant, use_b_dec):
    torch.manual_seed(0)
    d, n, B = 16, 24, 32
    params = sae.init_params(variant, d, n, seed=3)
    # Move away from init so every term (biases included) is exercised.
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    hp = sae.make_hparams(variant, n, l1=0.02, bias_decay=0.3, k=5, use_b_dec=use_b_dec)
    x = torch.randn(B, d)

    layout = sae.Layout.of([variant], [5])
    grads, aux = torch.func.grad(sae.loss, has_aux=True)(params, hp, x, layout)

    reference = ReferenceSAE(variant, **params, l1=0.02, bias_decay=0.3, k=5, use_b_dec=use_b_dec)
    ref_loss = reference(x)
    ref_loss.backward()
    torch.testing.assert_close(aux["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        param = getattr(reference, name)
        ref_grad = torch.zeros_like(param) if param.grad is None else param.grad  # unused -> zero
        torch.testing.assert_close(grads[name], ref_grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_padded_member_computes_the_same_loss_as_unpadded():
    d, n, pad = 8, 10, 16
    x = torch.randn(20, d)
    for variant in ("relu", "tied", "topk"):
        small = sae.init_params(variant, d, n, seed=1)
        padded = sae.init_params(variant, d, n, seed=1, n_padded=pad)
        layout = sae.Layout.of([variant], [3])
        loss_small, _ = sae.loss(small, sae.make_hparams(variant, n, 0.1, 0.1, 3), x, layout)
        loss_padded, aux = sae.loss(padded, sae.make_hparams(variant, n, 0.1, 0.1, 3, n_padded=pad), x, layout)
        torch.testing.assert_close(loss_small, loss_padded)
        assert (
            sae.encode(padded, sae.make_hparams(variant, n, 0.1, 0.1, 3, n_padded=pad), x, layout)[:, n:] == 0
        ).all()


def test_unknown_variant_is_rejected_with_the_allowed_list():
    with pytest.raises(ValueError, match="unknown SAE variant 'crosscoder'; allowed: relu, tied, topk"):
        sae.init_params("crosscoder", 4, 4, seed=0)


class SAELensTopK(nn.Module):
    """SAELens' TopKTrainingSAE as its source writes it (rescale_acts_by_decoder_norm=True, an unconstrained W_dec,
    AuxK over the scaled pre-activations), from the formulas, sharing no code with sae.py."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, coefficient):
        super().__init__()
        self.k, self.dead, self.k_aux, self.coefficient = k, dead, k_aux, coefficient
        self.W_enc, self.b_enc = nn.Parameter(W_enc.clone()), nn.Parameter(b_enc.clone())
        self.W_dec, self.b_dec = nn.Parameter(W_dec.clone()), nn.Parameter(b_dec.clone())

    def forward(self, x):
        norms = self.W_dec.norm(dim=-1)
        hidden = ((x - self.b_dec) @ self.W_enc.T + self.b_enc) * norms
        top = hidden.topk(self.k, dim=-1)
        acts = torch.zeros_like(hidden).scatter(-1, top.indices, top.values.relu())
        x_hat = (acts / norms) @ self.W_dec + self.b_dec
        residual = (x - x_hat).detach()
        n_dead = int(self.dead.sum())
        aux_top = torch.where(self.dead.bool(), hidden, -torch.inf).topk(min(self.k_aux, n_dead), dim=-1)
        aux_acts = torch.zeros_like(hidden).scatter(-1, aux_top.indices, aux_top.values)
        aux = ((aux_acts / norms) @ self.W_dec - residual).pow(2).mean() * min(n_dead / self.k_aux, 1.0)
        return (x_hat - x).pow(2).mean() + self.coefficient * aux


def test_a_learned_norm_topk_member_is_saelens_topk_sae():
    """Member.learned_decoder_norm: loss and gradients (the decoder's through its norms too) equal SAELens' TopK
    training SAE's, AuxK included (our loss is a mean over d_in where SAELens sums: one factor d_in, which Adam
    ignores)."""
    torch.manual_seed(0)
    d, n, B, k, k_aux = 16, 24, 32, 4, 6
    params = sae.init_params("topk", d, n, seed=3)
    params = {name: value + 0.1 * torch.randn_like(value) for name, value in params.items()}
    params["W_dec"] = params["W_dec"] * torch.rand(n, 1).add(0.5)  # norms 0.5-1.5, no longer unit
    hp = sae.make_hparams(
        "topk", n, k=k, auxk_coefficient=0.5, k_aux=k_aux, auxk_dead_tokens=10, learned_decoder_norm=True
    )
    hp["dead"] = (torch.rand(n) < 0.5).float()
    layout = sae.Layout.of(["topk"], [k], k_aux=k_aux, learned_norm=True)
    x = torch.randn(B, d)
    grads, aux = torch.func.grad(sae.loss, has_aux=True)(params, hp, x, layout)
    reference = SAELensTopK(**params, k=k, dead=hp["dead"], k_aux=k_aux, coefficient=0.5)
    reference(x).backward()
    torch.testing.assert_close(aux["loss"], reference(x).detach(), rtol=1e-5, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(grads[name], getattr(reference, name).grad, rtol=1e-4, atol=1e-6, msg=name)
    unit = sae.Layout.of(["topk"], [k], k_aux=k_aux)  # the same params as a unit-row member: another SAE
    assert not torch.allclose(sae.loss(params, hp, x, unit)[0], aux["loss"])


def test_the_learned_norm_backward_equals_autograd_and_folding_keeps_the_sae():
    """sae.effective_backward (the kernels' path) against autograd through sae.effective, on a stack with padding
    and a unit-row member; sae.folded: unit rows, the same codes and reconstruction, and `effective` leaves it."""
    torch.manual_seed(1)
    M, d, n = 3, 8, 12
    stack = {
        name: torch.stack(
            [sae.init_params("topk", d, size, seed=m, n_padded=n)[name] for m, size in enumerate((12, 9, 12))]
        )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    stack = {name: value + 0.1 * torch.randn_like(value) * (value != 0) for name, value in stack.items()}
    stack["W_dec"] = stack["W_dec"] * torch.rand(M, n, 1).add(0.5)
    members = [
        sae.make_hparams("topk", size, k=3, n_padded=n, learned_decoder_norm=on)
        for size, on in ((12, True), (9, True), (12, False))
    ]
    hp = {name: torch.stack([h[name] for h in members]) for name in members[0]}
    layout = sae.Layout.of(["topk"] * M, [3] * M, learned_norm=True)
    cotangent = {name: torch.randn_like(value) for name, value in stack.items()}
    _, back = torch.func.vjp(lambda p: sae.effective(p, hp, layout), stack)
    expected = back(cotangent)[0]
    scales = sae.decoder_scales(stack, hp)
    got = sae.effective_backward(stack, hp, {name: g.clone() for name, g in cotangent.items()}, scales)
    for name in stack:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    x = torch.randn(20, d)
    for m in range(M):
        one = {name: value[m] for name, value in stack.items()}
        h = {name: value[m] for name, value in hp.items()}
        folded = sae.folded(one, h, layout)
        if m < 2:  # learned norms folded: unit rows (member 2 keeps its params: its rows are normalised in use)
            assert torch.allclose(folded["W_dec"].norm(dim=-1)[: (12, 9)[m]], torch.ones((12, 9)[m]))
        else:
            assert all(torch.equal(folded[name], one[name]) for name in one)
        codes, folded_codes = sae.encode(one, h, x, layout), sae.encode(folded, h, x, layout)
        torch.testing.assert_close(folded_codes, codes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(folded, h, folded_codes, layout), sae.decode(one, h, codes, layout))
        for name, value in sae.effective(folded, h, layout).items():
            torch.testing.assert_close(value, folded[name], rtol=1e-6, atol=1e-7)
