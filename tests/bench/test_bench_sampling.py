"""The sampling bench family: listed by the CLI, its case grid and byte model, and (at tiny shapes) every
implementation it times sampling the law its sampler defines: the histogram of many rows with identical inputs
against the exact law computed here in float64 (MDLM mixture, SEDD Euler jump, Gibbs conditional, softmax,
top-k + top-p nucleus, Tweedie masses), and the selections against a stable-sort reference. Nothing here runs a
benchmark-sized kernel."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bench_testlib import run_bench  # puts the checkout's bench package on sys.path first
from difforge_bench.families import MODULES, sampling  # noqa: E402
from difforge_bench.impls import FWD  # noqa: E402
from difforge_bench.registry import Unavailable, all_families  # noqa: E402

SHAPES = {s.name: s for s in sampling.SHAPES}
ROW_SAMPLERS = ("mdlm", "sedd_euler", "gibbs_loo", "llada", "topk_topp", "tweedie")
# (sampler, its law test): SEDD Euler once below the clip (c S' = 0.5: tests the jump weight) and once above it
# (c S' = 2: always jumps, so a rule that does not leave the current token out fails; below the clip the law is
# the same either way).
LAWS = (("mdlm", ""), ("sedd_euler", "W=0.5"), ("sedd_euler", "clipped"), ("gibbs_loo", ""), ("llada", ""),
        ("topk_topp", ""), ("tweedie", ""))  # fmt: skip
LAW_ROWS, LAW_VOCAB = 40_000, 64
TV_LIMIT = 0.03  # sampling noise at 40k rows over <= 65 bins: TV ~ 0.016 at most


def test_list_shows_the_sampling_family_and_its_shapes():
    assert "sampling" in MODULES and all_families()["sampling"] is sampling.FAMILY
    result = run_bench("sampling", "--list", "--device", "cpu")
    assert "sampling:" in result.stdout
    for shape in SHAPES:
        assert shape in result.stdout
    assert "mdlm, sedd_euler, gibbs_loo, llada, topk_topp, tweedie, select" in result.stdout


def test_shapes_per_device():
    family = sampling.FAMILY
    assert [s.name for s in family.select_shapes("cuda", False, None)] == ["owt_32x1024", "llada_4x1024"]
    assert [s.name for s in family.select_shapes("cpu", False, None)] == ["cpu_16x64", "cpu_64x64_v2048"]
    assert [s.name for s in family.select_shapes("cpu", True, None)] == ["smoke"]
    owt = SHAPES["owt_32x1024"].dims
    assert owt["B"] * owt["L"] == 32_768 and owt["V"] == 50_257  # the anchor
    assert SHAPES["llada_4x1024"].dims["V"] == 126_464


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu_cases", "gpu_cases"])  # builds cases, runs nothing
def test_case_grid_and_byte_model(device):
    shape = SHAPES["owt_32x1024" if device == "cuda" else "cpu_16x64"]
    cases = {c.config["sampler"]: c for c in sampling.cases(device, shape)}
    assert tuple(cases) == (*ROW_SAMPLERS, "select")
    B, L, V = shape.dims["B"], shape.dims["L"], shape.dims["V"]
    elem = 2 if device == "cuda" else 4
    for name, case in cases.items():
        assert case.mode == FWD and case.flops is None
        assert case.config["dtype"] == ("fp32" if name == "select" or device == "cpu" else "bf16")
        assert not isinstance(case.ours, Unavailable) and not isinstance(case.baselines["eager"], Unavailable)
        assert isinstance(case.baselines["compile"], Unavailable) == (name == "select")
        assert ("flashinfer" in case.baselines) == (name in ("llada", "topk_topp"))
        if device == "cpu" and "flashinfer" in case.baselines:
            assert case.baselines["flashinfer"] == Unavailable("CUDA only")
    step = 8 + 12 + 8 + 20  # point, coef, token, stats per row
    assert cases["mdlm"].bytes_moved == B * L * (V * elem + step)
    assert cases["topk_topp"].bytes_moved == B * (V * elem + step)  # one row per sequence
    assert cases["tweedie"].bytes_moved == B * L * (V * elem + 20)
    assert cases["select"].bytes_moved == B * L * 6 + B * 8
    if device == "cuda":
        assert cases["mdlm"].bytes_moved == 32_768 * (50_257 * 2 + 48)  # 3.29 GB: ~1 ms at 3.35 TB/s


def test_smoke_inputs_have_the_shapes_each_implementation_reads():
    shape = SHAPES["smoke"]
    B, L, V = shape.dims["B"], shape.dims["L"], shape.dims["V"]
    for case in sampling.cases("cpu", shape):
        inputs = case.make_inputs("cpu")
        sampler = sampling.SAMPLERS[case.config["sampler"]]
        if sampler.name == "select":
            assert inputs["key"].shape == inputs["eligible"].shape == (B, L) and inputs["k"].shape == (B,)
            assert bool((inputs["k"] <= inputs["eligible"].sum(1)).all())
            continue
        rows = B if sampler.decode else B * L
        assert inputs["logits"].shape == (rows, V) and inputs["logits"].dtype == torch.float32
        if "coef" in inputs:
            assert inputs["coef"].shape == (rows, 3) and inputs["coef"].dtype == torch.float32
        if sampler.name == "mdlm":  # every row is read and the weights sum to 1
            assert bool((inputs["w_p"] > 0).all()) and torch.allclose(inputs["w_p"] + inputs["w_d"], torch.ones(rows))


# ---- every implementation samples the sampler's law ----


def _law_logits(boost_current: bool) -> torch.Tensor:
    """One row of logits; with boost_current the column V // 3 (the current token of same_rows inputs) holds
    much of the mass, so a rule that forgets to exclude the current token visibly fails."""
    gen = torch.Generator().manual_seed(1)
    row = sampling.LOGIT_SCALE * torch.randn(LAW_VOCAB, generator=gen, dtype=torch.float64)
    if boost_current:
        row[LAW_VOCAB // 3] = row.max() + 1.0
    return row


def _rows(row: torch.Tensor) -> torch.Tensor:
    return row.float().expand(LAW_ROWS, -1).contiguous()


def _law_inputs(name: str, variant: str) -> tuple[dict, torch.Tensor]:
    """Inputs of LAW_ROWS identical rows and the exact law (float64) of each row's token."""
    sampler = sampling.SAMPLERS[name]
    row = _law_logits(boost_current=name != "tweedie")
    inputs = sampling.make_inputs_for(sampler, _rows(row), torch.Generator().manual_seed(0), same_rows=True)
    x = LAW_VOCAB // 3
    p = torch.softmax(row, -1)
    if name == "mdlm":
        w_p = float(inputs["w_p"][0])
        return inputs, torch.cat([w_p * p, torch.tensor([1 - w_p], dtype=torch.float64)])
    if name == "sedd_euler":
        c = float(inputs["c"][0])
        assert int(inputs["current"][0]) == x
        others = torch.ones(LAW_VOCAB, dtype=torch.bool)
        others[x] = False
        target = 2.0 if variant == "clipped" else 0.5
        row = row + (target / (c * row[others].exp().sum())).log()  # scores with c * S' = target
        inputs["logits"] = _rows(row)
        s = row.exp() * others
        jump = min(c * float(s.sum()), 1.0)
        law = jump * s / s.sum()
        law[x] += 1 - jump
        return inputs, law
    if name == "gibbs_loo":
        alpha = float(inputs["alpha"][0])
        return inputs, alpha * p + (1 - alpha) / LAW_VOCAB
    if name == "llada":
        return inputs, p
    if name == "topk_topp":
        ranked, order = torch.sort(row, descending=True)
        kept_p = torch.softmax(ranked[: sampling.TOP_K], -1)
        n_keep = int((kept_p.cumsum(0) < sampling.TOP_P).sum()) + 1  # the smallest top set with mass >= top_p
        law = torch.zeros(LAW_VOCAB, dtype=torch.float64)
        law[order[:n_keep]] = kept_p[:n_keep] / kept_p[:n_keep].sum()
        return inputs, law
    if name == "tweedie":
        # A large step (most columns get a negative, dropped, mass) from the 11th most likely token.
        e, x = 0.3, int(row.argsort(descending=True)[10])
        inputs["e"], inputs["current"] = torch.full((LAW_ROWS,), e), torch.full((LAW_ROWS,), x)
        s = row.exp()
        is_current = torch.arange(LAW_VOCAB) == x
        mass = (s / e + (e - 1) / (LAW_VOCAB * e) * s.sum()) * ((1 - e) / LAW_VOCAB + e * is_current)
        assert int((mass <= 0).sum()) > LAW_VOCAB // 2
        mass = mass.clamp(min=0)
        return inputs, mass / mass.sum()
    raise AssertionError(name)


def _tokens(name: str, impl: str, inputs: dict) -> torch.Tensor:
    sampler = sampling.SAMPLERS[name]
    torch.manual_seed(0)  # the eager compositions draw from torch's global generator
    if impl == "difforge":
        out = sampler.ours(inputs)
    else:
        out = sampling.eager_forward(sampler)(inputs)
    token = out[0] if isinstance(out, tuple) else out
    assert token.shape == (LAW_ROWS,) and token.dtype == torch.int64
    if name == "llada":  # the confidence is the token's probability under softmax(l)
        p = torch.softmax(inputs["logits"].double(), -1).gather(-1, token[:, None])[:, 0]
        torch.testing.assert_close(out[1].double(), p, atol=1e-5, rtol=1e-4)
    return token


@pytest.mark.parametrize("impl", ["eager", "difforge"])
@pytest.mark.parametrize(("name", "variant"), LAWS, ids=[f"{n}-{v}" if v else n for n, v in LAWS])
def test_every_implementation_samples_the_law(name, variant, impl):
    inputs, law = _law_inputs(name, variant)
    assert abs(float(law.sum()) - 1) < 1e-9 and float(law.min()) >= 0
    token = _tokens(name, impl, inputs)
    assert int(token.min()) >= 0 and int(token.max()) < law.numel()
    freq = torch.bincount(token, minlength=law.numel()).double() / LAW_ROWS
    assert float(freq[law == 0].sum()) == 0.0, "a token of probability 0 was drawn"
    tv = 0.5 * float((freq - law).abs().sum())
    assert tv < TV_LIMIT, f"{impl} {name} {variant}: total variation {tv:.4f} from the exact law"


def _select_reference(key: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k eligible positions of largest key (ties to the lower index) by a stable descending sort."""
    selected = torch.zeros_like(eligible)
    for b in range(key.shape[0]):
        candidates = eligible[b].nonzero()[:, 0]
        order = torch.sort(key[b, candidates], descending=True, stable=True).indices
        selected[b, candidates[order[: int(k[b])]]] = True
    return selected


@given(batch=st.integers(1, 4), length=st.integers(sampling.SELECT_MAX_K, 96), seed=st.integers(0, 2**16))
def test_select_implementations_commit_the_top_k_eligible(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    key = torch.rand((batch, length), generator=gen)
    inputs = sampling.make_inputs_for(sampling.SAMPLERS["select"], key, gen)
    want = _select_reference(inputs["key"], inputs["eligible"], inputs["k"])
    assert torch.equal(want.sum(1), inputs["k"])
    assert torch.equal(sampling.eager_select(inputs["key"], inputs["eligible"], inputs["k"]), want)
    assert torch.equal(sampling.SAMPLERS["select"].ours(inputs), want)
