"""difforge.nn.AdaLNModulate: torch.nn.LayerNorm / RMSNorm state-dict compatibility and forward semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaln_testlib import Case, make_case, reference

difforge = pytest.importorskip("difforge")
AdaLNModulate = difforge.nn.AdaLNModulate

D = 24
CONFIGS = [
    pytest.param("layernorm", True, id="layernorm-affine"),
    pytest.param("layernorm", False, id="layernorm-plain"),
    pytest.param("rmsnorm", True, id="rmsnorm-affine"),
    pytest.param("rmsnorm", False, id="rmsnorm-plain"),
]


def _torch_norm(norm, affine, eps=1e-6):
    if norm == "layernorm":
        return nn.LayerNorm(D, eps=eps, elementwise_affine=affine)
    return nn.RMSNorm(D, eps=eps, elementwise_affine=affine)


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p is getattr(module, "weight", None) else 0.0))
    return module


@pytest.mark.parametrize("norm,affine", CONFIGS)
def test_state_dict_keys_shapes_dtypes_match_torch(norm, affine):
    ours = AdaLNModulate(D, norm=norm, elementwise_affine=affine).state_dict()
    theirs = _torch_norm(norm, affine).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k]), f"{k}: initial values differ from torch's (ones / zeros)"


@pytest.mark.parametrize("norm,affine", CONFIGS)
def test_torch_weights_load_into_module(norm, affine):
    """nn.LayerNorm / nn.RMSNorm -> AdaLNModulate (strict); with scale = shift = None the outputs agree."""
    ref = _randomize(_torch_norm(norm, affine), 1)
    ours = AdaLNModulate(D, norm=norm, elementwise_affine=affine)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2)) + 0.3
    torch.testing.assert_close(ours(x, None, None), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,affine", CONFIGS)
def test_module_weights_load_into_torch(norm, affine):
    """AdaLNModulate -> nn.LayerNorm / nn.RMSNorm (strict)."""
    ours = _randomize(AdaLNModulate(D, norm=norm, elementwise_affine=affine), 3)
    ref = _torch_norm(norm, affine)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours(x, None, None), ref(x), rtol=1e-5, atol=1e-5)


def test_layernorm_without_bias_matches_torch_bias_false():
    ours = AdaLNModulate(D, norm="layernorm", elementwise_affine=True, bias=False)
    ref = _randomize(nn.LayerNorm(D, eps=1e-6, elementwise_affine=True, bias=False), 5)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == ["weight"]
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(ours(x, None, None), ref(x), rtol=1e-5, atol=1e-5)


def test_loading_a_layernorm_state_into_an_rmsnorm_module_fails():
    ours = AdaLNModulate(D, norm="rmsnorm", elementwise_affine=True)
    with pytest.raises(RuntimeError, match="bias"):
        ours.load_state_dict(nn.LayerNorm(D).state_dict(), strict=True)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
@pytest.mark.parametrize("norm,affine", CONFIGS)
def test_forward_matches_functional_and_reference(norm, affine, eps, device):
    module = _randomize(AdaLNModulate(D, norm=norm, elementwise_affine=affine, eps=eps), 6).to(device)
    case = make_case("frame", norm=norm, D=D, L=6, eps=eps, device=device, seed=7)
    case = case.replace(weight=module.weight, bias=module.bias)
    y = module(case.x, case.scale, case.shift)
    torch.testing.assert_close(y.double(), reference(case).y, rtol=1e-5, atol=1e-5)
    y_fn = difforge.ops.adaln_modulate(case.x, case.scale, case.shift, weight=module.weight, bias=module.bias,
                                       norm=norm, eps=eps)  # fmt: skip
    assert torch.equal(y, y_fn)


def test_forward_gated_and_layout_kwargs(device):
    module = _randomize(AdaLNModulate(D, norm="layernorm", elementwise_affine=True), 8).to(device)
    case = make_case("varlen", gate="tensor", D=D, device=device, seed=9).replace(weight=module.weight, bias=module.bias)
    x_out, y = module.forward_gated(case.x, case.o, case.gate, case.scale, case.shift, cu_seqlens=case.cu_seqlens)
    ref = reference(case)
    torch.testing.assert_close(x_out.double(), ref.x_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), ref.y, rtol=1e-5, atol=1e-5)
    rep = make_case("repeat", D=D, R=2, device=device, seed=10).replace(weight=module.weight, bias=module.bias)
    torch.testing.assert_close(
        module(rep.x, rep.scale, rep.shift, batch_repeat=2).double(), reference(rep).y, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_parameters_receive_gradients(norm):
    module = _randomize(AdaLNModulate(D, norm=norm, elementwise_affine=True), 11)
    case = make_case("sample", norm=norm, D=D, seed=12)
    gen = torch.Generator().manual_seed(13)
    dy = torch.randn(case.x.shape, generator=gen)
    module(case.x, case.scale, case.shift).backward(dy)

    w = module.weight.detach().double().requires_grad_()
    b = module.bias.detach().double().requires_grad_() if module.bias is not None else None
    y = reference(case.replace(weight=w, bias=b)).y
    grads = torch.autograd.grad(y, [t for t in (w, b) if t is not None], dy.double())
    torch.testing.assert_close(module.weight.grad.double(), grads[0], rtol=1e-4, atol=1e-4)
    if b is not None:
        torch.testing.assert_close(module.bias.grad.double(), grads[1], rtol=1e-4, atol=1e-4)


def test_low_precision_parameters():
    module = AdaLNModulate(D, norm="layernorm", elementwise_affine=True, dtype=torch.bfloat16)
    _randomize(module, 14)
    assert module.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, D, dtype=torch.bfloat16, requires_grad=True)
    y = module(x, None, None)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.weight.grad.dtype == torch.bfloat16 and module.bias.grad.dtype == torch.bfloat16
    want = reference(Case(x=x.detach(), weight=module.weight.detach(), bias=module.bias.detach())).y
    torch.testing.assert_close(y.double(), want, rtol=1.6e-2, atol=1e-2)


def test_constructor_validation():
    with pytest.raises(ValueError, match="norm"):
        AdaLNModulate(D, norm="groupnorm")
    with pytest.raises(ValueError, match="dim"):
        AdaLNModulate(0)


def test_repr_mentions_configuration():
    text = repr(AdaLNModulate(D, norm="rmsnorm", elementwise_affine=True, eps=1e-5))
    assert "rmsnorm" in text and str(D) in text and "1e-05" in text
