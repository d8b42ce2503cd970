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
