"""Bad input raises a clear error naming the argument (DESIGN.md "Ops: rules"), never a crash or a silent answer:
through the Python wrappers (ValueError) and through torch.ops.difforge directly (the binding's checks). Rows that
cannot be sampled (NaN / +inf logits, no finite logit, invalid coefficients) get token -1 from the op and a ValueError
naming the row from the wrappers."""

from __future__ import annotations

import math

import pytest
import torch

difforge = pytest.importorskip("difforge")
ops = difforge.ops
raw = torch.ops.difforge

ERRORS = (RuntimeError, ValueError)
R, V = 4, 10


def raises(match):
    return pytest.raises(ERRORS, match=match)


def step_args(**over):
    args = dict(logits=torch.randn(R, V), point=torch.full((R,), V), coef=torch.tensor([0.5, 0.3, 0.2]))
    args.update(over)
    return args


def raw_step(logits=None, point=None, coef=None, rule="mixture", temperature=1.0, greedy=False, top_k=0, top_p=1.0,
             seed=0, offset=0):  # fmt: skip
    logits = torch.randn(R, V) if logits is None else logits
    point = torch.full((R,), V) if point is None else point
    coef = torch.tensor([[0.5, 0.3, 0.2]] * R) if coef is None else coef
    return raw.discrete_step(logits, point, coef, rule, temperature, greedy, top_k, top_p, seed, offset)


def test_valid_baseline_runs():
    """The unmodified inputs of this file are valid (so every raise below is due to the one change)."""
    ops.discrete_step(**step_args())
    raw_step()
    ops.tweedie_step(torch.randn(R, V), torch.zeros(R, dtype=torch.long), 0.5)
    ops.select_positions(torch.randn(R, V), torch.ones(R, V, dtype=torch.bool), 2, threshold=0.5)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(rule="gibbs"), "rule must be one of"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(offset=-1), "offset"),
        (dict(offset=2**32), "offset"),
    ],
)
def test_discrete_step_scalar_arguments(over, match):
    args = step_args()
    with raises(match):
        ops.discrete_step(args.pop("logits"), args.pop("point"), args.pop("coef"), **over)
    raw_match = match.replace("rule must be one of", "rule must be")
    with raises(None if over.get("seed") == 2**63 else raw_match):  # 2**63 does not fit the schema's int64
        raw_step(**over)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(logits=torch.randn(R, 1)), "V >= 2|at least 2 columns"),
        (dict(logits=torch.tensor(1.0)), "V >= 2|at least one dim"),
        (dict(point=torch.full((R, 1), V)), "point must have shape"),
        (dict(point=torch.full((R + 1,), V)), "point must have shape"),
        (dict(coef=torch.ones(2)), "coef must be \\[..., 3\\]"),
        (dict(coef=torch.ones(R + 1, 3)), "coef of shape .* does not broadcast"),
    ],
)
def test_discrete_step_shapes(over, match):
    args = step_args(**over)
    with raises(match):
        ops.discrete_step(args["logits"], args["point"], args["coef"])


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(logits=torch.randn(R, V, dtype=torch.float64)), "logits must be float32, float16 or bfloat16"),
        (dict(logits=torch.randint(0, 5, (R, V))), "logits must be float32, float16 or bfloat16"),
        (dict(logits=torch.randn(R, 1)), "at least 2 columns"),
        (dict(logits=torch.randn(V, R).t()), "stride 1 in its last dim"),
        (dict(point=torch.full((R,), V, dtype=torch.int32)), "point must be Long"),
        (dict(point=torch.full((R, 1), V)), "point must have shape \\[4\\]"),
        (dict(coef=torch.ones(R, 3, dtype=torch.float64)), "coef must be Float"),
        (dict(coef=torch.ones(R, 2)), "coef must have shape \\[4, 3\\]"),
        (dict(coef=torch.ones(3)), "coef must have shape \\[4, 3\\]"),
        (dict(temperature=1e-60), "temperature must be finite and > 0 \\(in float32\\)"),
    ],
)
def test_discrete_step_raw_op_checks(over, match):
    with raises(match):
        raw_step(**over)


def test_wrapper_rejects_transposed_logits_clearly():
    with raises("stride 1 in its last dim"):
        ops.discrete_step(torch.randn(V, R).t(), torch.full((R,), V), torch.tensor([1.0, 0, 0]))


# ---- rows that cannot be sampled: token -1, NaN stats; the wrapper names the first one ----

BAD_ROWS = {
    "nan_logit": (lambda l: l.index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(math.nan)), None),
    "posinf_logit": (lambda l: l.index_put_((torch.tensor(2), torch.tensor(0)), torch.tensor(math.inf)), None),
    "no_finite_logit": (lambda l: l[2].fill_(-math.inf), None),
    "negative_weight": (None, [0.5, -0.1, 0.6]),
    "nan_weight": (None, [math.nan, 0.1, 0.6]),
    "infinite_weight": (None, [0.5, math.inf, 0.1]),
    "all_zero_weights": (None, [0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_rows(name):
    spoil_logits, row_coef = BAD_ROWS[name]
    logits = torch.randn(R, V)
    coef = torch.tensor([[0.5, 0.3, 0.2]] * R)
    if spoil_logits:
        spoil_logits(logits)
    if row_coef:
        coef[2] = torch.tensor(row_coef)
    token, stats = ops.discrete_step(logits, V, coef, check=False)
    assert token[2] == -1 and stats[2].isnan().all()
    assert (token[[0, 1, 3]] >= 0).all()
    with raises(r"1 row\(s\) cannot be sampled, the first at index \(2,\)"):
        ops.discrete_step(logits, V, coef)


@pytest.mark.parametrize("rule", ["euler", "tau_leap", "ctmc"])
@pytest.mark.parametrize("c", [-0.1, math.nan, math.inf])
def test_jump_rules_reject_invalid_rate_factors(rule, c):
    coef = torch.tensor([[0.1, 0.0, 0.0]] * R)
    coef[1, 0] = c
    token, _ = ops.discrete_step(torch.randn(R, V), torch.zeros(R, dtype=torch.long), coef, rule=rule, check=False)
    assert token[1] == -1 and (token[[0, 2, 3]] >= 0).all()


def test_bad_row_index_in_leading_dims():
    logits = torch.randn(2, 3, V)
    logits[1, 2, 0] = math.nan
    with raises(r"the first at index \(1, 2\)"):
        ops.discrete_step(logits, V, torch.tensor([1.0, 0.0, 0.0]))
    with raises(r"1 row\(s\) cannot be sampled, the first at index \(\)"):  # one row, no leading dims
        ops.discrete_step(logits[1, 2], V, torch.tensor([1.0, 0.0, 0.0]))


# ---- tweedie_step ----


def test_tweedie_arguments():
    x, cur = torch.randn(R, V), torch.zeros(R, dtype=torch.long)
    for e in (0.0, 1.5, -0.2, math.nan):
        with raises("e = exp"):
            ops.tweedie_step(x, cur, e)
    with raises("current must have shape"):
        ops.tweedie_step(x, cur[:2], 0.5)
    with raises("does not broadcast"):
        ops.tweedie_step(x, cur, torch.full((R + 1,), 0.5))
    with raises("V >= 2"):
        ops.tweedie_step(torch.randn(R, 1), cur, 0.5)
    with raises("seed"):
        ops.tweedie_step(x, cur, 0.5, seed=-3)
    with raises("log_score must be float32"):
        raw.tweedie_step(x.double(), cur, torch.full((R,), 0.5), 0, 0)
    with raises("current must be Long"):
        raw.tweedie_step(x, cur.int(), torch.full((R,), 0.5), 0, 0)
    with raises("e must have shape"):
        raw.tweedie_step(x, cur, torch.full((1,), 0.5), 0, 0)
    with raises("offset"):
        raw.tweedie_step(x, cur, torch.full((R,), 0.5), 0, 2**32)


def test_tweedie_bad_rows():
    x = torch.randn(5, V)
    x[0, 1] = math.nan
    x[1] = -math.inf
    current = torch.tensor([0, 0, V, -1, 0])
    e = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0])
    token = ops.tweedie_step(x, current, e, check=False)
    assert (token == -1).all()
    with raises(r"5 row\(s\) cannot be sampled, the first at index \(0,\)"):
        ops.tweedie_step(x, current, e)


# ---- select_positions ----


def test_select_positions_arguments():
    key, elig = torch.randn(R, V), torch.ones(R, V, dtype=torch.bool)
    with raises("key must be \\[B, L\\]"):
        ops.select_positions(key[0], elig[0], 1)
    with raises("eligible must have key's shape"):
        ops.select_positions(key, elig[:, :2], 1)
    for k in (-1, 1.5):
        with raises("k must be an int >= 0"):
            ops.select_positions(key, elig, k)
    with raises("k must be an integer tensor"):
        ops.select_positions(key, elig, torch.ones(R))
    with raises("does not broadcast"):
        ops.select_positions(key, elig, torch.ones(R + 1, dtype=torch.long))
    with raises("does not broadcast"):
        ops.select_positions(key, elig, 1, threshold=torch.ones(2))
    for tau in (-1.0, math.inf, math.nan):
        with raises("gumbel_tau"):
            ops.select_positions(key, elig, 1, gumbel_tau=tau)
    with raises("offset"):
        ops.select_positions(key, elig, 1, offset=-1)
    k = torch.ones(R, dtype=torch.long)
    with raises("key must be float32"):
        raw.select_positions(key.half(), elig, k, None, 0.0, 0, 0)
    with raises("eligible must be Bool"):
        raw.select_positions(key, elig.int(), k, None, 0.0, 0, 0)
    with raises("k must be Long"):
        raw.select_positions(key, elig, k.int(), None, 0.0, 0, 0)
    with raises("threshold must have shape \\[4\\]"):
        raw.select_positions(key, elig, k, torch.ones(R, 1), 0.0, 0, 0)
    with raises("gumbel_tau must be finite and >= 0"):
        raw.select_positions(key, elig, k, None, -0.5, 0, 0)
    with raises("seed must be in"):
        raw.select_positions(key, elig, k, None, 0.0, -1, 0)


@pytest.mark.cuda
def test_device_mismatch_is_named():
    logits = torch.randn(R, V, device="cuda")
    with raises("point is on cpu but logits is on cuda"):
        raw_step(logits=logits, coef=torch.tensor([[0.5, 0.3, 0.2]] * R, device="cuda"))
    with raises("eligible is on cpu but key is on cuda"):
        raw.select_positions(logits, torch.ones(R, V, dtype=torch.bool), torch.ones(R, dtype=torch.long, device="cuda"),
                             None, 0.0, 0, 0)  # fmt: skip
