"""Margin losses and the entanglement algebra of `align.losses.margin`: closed forms, autograd, methods.md §4.5."""

import dataclasses
import inspect
import itertools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.losses.margin import (
    MARGIN_LOSS_TABLE,
    MARGIN_LOSSES,
    PURE_MARGIN_LOSSES,
    REFERENCE_FREE_LOSSES,
    MarginHyperparameters,
    condition_ratio,
    cosine,
    first_order_deltas,
    margin_loss,
    normalized_pair_surrogate,
    normalized_update_coefficients,
)


# One pair, hand-picked: log π_w = −10, log π_l = −12, log π_ref,w = −11, log π_ref,l = −11.5, |y_w| = 4, |y_l| = 5.
POINT = dict(lw=-10.0, ll=-12.0, rw=-11.0, rl=-11.5, len_w=4, len_l=5)


def _terms(name, lw, ll, rw, rl, len_w, len_l, **hparams):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return margin_loss(
        name,
        t(lw),
        t(ll),
        t(rw),
        t(rl),
        torch.tensor([len_w]),
        torch.tensor([len_l]),
        MarginHyperparameters(**hparams),
    )


# Expected values from the closed forms in the docstrings (computed with the `math` module):
#   dpo:   z = 0.1·((−10+11) − (−12+11.5)) = 0.15, ℓ = log(1+e^−z), d = 0.1·σ(−z)
#   ipo:   u = 1/4 − (−0.5)/5 = 0.35, ℓ = (u − 5)², c = 2(5 − u) = 9.3, d = c/|y|
#   slic:  ℓ = 1 − 0.15, d = β (active)
#   simpo: β=2, γ=0.5: z = 2(−10/4 + 12/5) − 0.5 = −0.7, c = 2σ(0.7)
#   r_dpo: m = 0.15 + 0.2·(4 − 5) = −0.05
#   cpo:   z = 0.1·2 = 0.2, ℓ = log(1+e^−z) + 10/4, d_w = 0.1σ(−z) + 1/4
CLOSED_FORMS = [
    ("dpo", {}, POINT, 0.6209570477895321, 0.04625701546562505, 0.04625701546562505),
    ("ipo", {}, POINT, 21.6225, 2.325, 1.86),
    ("slic", {}, POINT, 0.85, 0.1, 0.1),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, POINT, 1.1031860488854581, 0.3340938860840831, 0.26727510886726646),
    ("r_dpo", {"rdpo_alpha": 0.2}, POINT, 0.7184596480132863, 0.051249739648421035, 0.051249739648421035),
    # DPOP, chosen 0.2 below its reference: m = 0.1(−0.2 + 0.5 − 50·0.2) = −0.97, d_w = 0.1σ(0.97)·51; above: = DPO
    (
        "dpop",
        {"dpop_lambda": 50.0},
        {**POINT, "lw": -11.2},
        1.2914188131718445,
        3.6981094387280944,
        0.07251194977898225,
    ),
    ("dpop", {"dpop_lambda": 50.0}, POINT, 0.6209570477895321, 0.04625701546562505, 0.04625701546562505),
    ("cpo", {"cpo_alpha": 1.0}, POINT, 3.0981388693815917, 0.2950166002687522, 0.04501660026875222),
]


@pytest.mark.parametrize(("name", "hparams", "point", "loss", "d_w", "d_l"), CLOSED_FORMS)
def test_closed_form_values(name, hparams, point, loss, d_w, d_l):
    terms = _terms(name, **point, **hparams)
    assert terms.loss.item() == pytest.approx(loss, rel=1e-12)
    assert terms.d_chosen.item() == pytest.approx(d_w, rel=1e-12)
    assert terms.d_rejected.item() == pytest.approx(d_l, rel=1e-12)


def test_closed_form_pair_weights():
    assert _terms("dpo", **POINT).pair_weight.item() == pytest.approx(0.04625701546562505)
    assert _terms("ipo", **POINT).pair_weight.item() == pytest.approx(9.3)
    assert _terms("simpo", **POINT, beta=2.0).pair_weight.item() == pytest.approx(2.0 / (1 + math.exp(-0.7)))
    assert _terms("dpop", **POINT).pair_weight is None
    assert _terms("cpo", **POINT).pair_weight is None


def _random_batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    logps = lambda: -torch.rand(n, generator=g, dtype=torch.float64) * 60 - 1  # noqa: E731
    lw, ll = logps().requires_grad_(), logps().requires_grad_()
    # Reference log-probs a few nats away, so the batch crosses the hinge, the DPOP penalty and IPO's target.
    rw = lw.detach() + 8 * torch.randn(n, generator=g, dtype=torch.float64)
    rl = ll.detach() + 8 * torch.randn(n, generator=g, dtype=torch.float64)
    len_w = torch.randint(1, 40, (n,), generator=g)
    len_l = torch.randint(1, 40, (n,), generator=g)
    return lw, ll, rw, rl, len_w, len_l


HPARAMS = MarginHyperparameters(beta=0.3, simpo_gamma=0.7, rdpo_alpha=0.05, dpop_lambda=5.0, cpo_alpha=0.5)


@pytest.mark.parametrize("name", MARGIN_LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_coefficients_equal_autograd(name, seed):
    """d_w = −∂ℓ/∂log π_w and d_l = ∂ℓ/∂log π_l, checked with autograd on a batch that crosses every branch."""
    lw, ll, rw, rl, len_w, len_l = _random_batch(seed)
    terms = margin_loss(name, lw, ll, rw, rl, len_w, len_l, HPARAMS)
    grad_w, grad_l = torch.autograd.grad(terms.loss.sum(), [lw, ll])
    torch.testing.assert_close(terms.d_chosen, -grad_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms.d_rejected, grad_l, rtol=1e-10, atol=1e-12)
    assert not terms.d_chosen.requires_grad and not terms.d_rejected.requires_grad


def test_branches_are_exercised():
    """The random batch above reaches both sides of the hinge, the DPOP penalty and IPO's target."""
    lw, ll, rw, rl, len_w, len_l = _random_batch(0)
    z = HPARAMS.beta * ((lw - rw) - (ll - rl))
    assert (z < 1).any() and (z >= 1).any()
    assert (lw < rw).any() and (lw >= rw).any()
    ipo_c = margin_loss("ipo", lw, ll, rw, rl, len_w, len_l, HPARAMS).pair_weight
    assert (ipo_c > 0).any() and (ipo_c < 0).any()


@pytest.mark.parametrize("name", sorted(PURE_MARGIN_LOSSES))
def test_pure_margin_coefficients_factor_through_the_pair_weight(name):
    """For a loss of one margin, d_w·(∂u/∂log π_w)⁻¹ = d_l·(−∂u/∂log π_l)⁻¹ = c."""
    lw, ll, rw, rl, len_w, len_l = _random_batch(3)
    terms = margin_loss(name, lw, ll, rw, rl, len_w, len_l, HPARAMS)
    scale_w = len_w.double() if name in {"ipo", "simpo"} else torch.ones_like(lw)
    scale_l = len_l.double() if name in {"ipo", "simpo"} else torch.ones_like(ll)
    torch.testing.assert_close(terms.d_chosen * scale_w, terms.pair_weight)
    torch.testing.assert_close(terms.d_rejected * scale_l, terms.pair_weight)


def test_reference_free_losses_ignore_the_reference():
    lw, ll, rw, rl, len_w, len_l = _random_batch(4)
    for name in REFERENCE_FREE_LOSSES:
        with_ref = margin_loss(name, lw, ll, rw, rl, len_w, len_l, HPARAMS).loss
        without = margin_loss(name, lw, ll, None, None, len_w, len_l, HPARAMS).loss
        torch.testing.assert_close(with_ref, without)
    with pytest.raises(ValueError, match="needs the reference"):
        margin_loss("dpo", lw, ll, None, None, len_w, len_l, HPARAMS)
    with pytest.raises(ValueError, match="Unknown margin loss 'kto'"):
        margin_loss("kto", lw, ll, rw, rl, len_w, len_l, HPARAMS)


TENSOR_ARGUMENTS = (
    "chosen_logps",
    "rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
)


@pytest.mark.parametrize("name", MARGIN_LOSSES)
def test_dispatcher_calls_each_row_with_the_arguments_it_names(name, monkeypatch):
    """`margin_loss` passes every row's function exactly the tensors its parameters name, β, and the row's constant;
    the row's flags agree with the function's signature and with whether it returns a pair weight."""
    row = MARGIN_LOSS_TABLE[name]
    batch = _random_batch(7)
    given = dict(zip(TENSOR_ARGUMENTS, batch, strict=True))
    calls = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return row.function(*args, **kwargs)

    monkeypatch.setitem(MARGIN_LOSS_TABLE, name, dataclasses.replace(row, function=recorder))
    terms = margin_loss(name, *batch, HPARAMS)
    ((args, kwargs),) = calls
    signature = inspect.signature(row.function)
    bound = signature.bind(*args, **kwargs).arguments
    tensors = [p for p in signature.parameters if p in TENSOR_ARGUMENTS]
    others = [p for p in signature.parameters if p not in TENSOR_ARGUMENTS]
    assert tensors[:2] == ["chosen_logps", "rejected_logps"]
    assert row.needs_reference == ("ref_chosen_logps" in tensors) == ("ref_rejected_logps" in tensors)
    assert row.uses_lengths == ("chosen_lengths" in tensors) == ("rejected_lengths" in tensors)
    for parameter in tensors:
        assert bound[parameter] is given[parameter], parameter
    assert others[0] == "beta" and bound["beta"] == HPARAMS.beta
    if row.constant is None:
        assert others == ["beta"]
    else:  # the constant is the hyperparameter field named after its loss (HPARAMS holds distinct values)
        assert len(others) == 2 and bound[others[1]] == getattr(HPARAMS, row.constant)
        assert row.constant.split("_")[0] == name.replace("_", "")
    assert row.single_margin == (terms.pair_weight is not None)


def _docs_loss_table() -> dict[str, dict[str, str]]:
    """The `margin_loss` table of docs/margin.md: {name: {column: cell}} in the order of its rows."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "margin.md").read_text()
    lines = text[text.index("| `margin_loss` |") :].splitlines()

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]

    columns = cells(lines[0])
    rows = {}
    for line in itertools.takewhile(lambda line: line.startswith("|"), lines[2:]):
        row = dict(zip(columns, cells(line), strict=True))
        rows[row["`margin_loss`"].strip("`")] = row
    return rows


def test_docs_list_is_the_loss_table():
    """docs/margin.md lists the table's losses in its order (plus `trl`), with its reference, margin and paper."""
    rows = _docs_loss_table()
    assert list(rows) == [*MARGIN_LOSSES, "trl"]
    for name, row in MARGIN_LOSS_TABLE.items():
        assert rows[name]["reference"] == ("yes" if row.needs_reference else "no"), name
        assert rows[name]["single margin"] == ("yes" if row.single_margin else "no"), name
        assert rows[name]["paper"].startswith(row.paper), name


def test_empty_completion_does_not_divide_by_zero():
    lw, ll, rw, rl, _, _ = _random_batch(5, n=2)
    zeros = torch.zeros(2, dtype=torch.long)
    for name in ("ipo", "simpo", "cpo"):
        terms = margin_loss(name, lw, ll, rw, rl, zeros, zeros, HPARAMS)
        assert torch.isfinite(terms.loss).all() and torch.isfinite(terms.d_chosen).all()


@pytest.mark.parametrize(("loss_type", "name"), [("simpo", "simpo"), ("sigmoid", "cpo")])
def test_matches_trl_cpo_trainer_formulas(loss_type, name):
    """SimPO and CPO's margin term against TRL's (experimental) CPOTrainer.cpo_loss on the same log-probs.

    TRL's SimPO receives length-averaged log-probs (its `average_log_prob`); its CPO NLL is computed elsewhere, so
    only the margin term is compared for CPO (cpo_alpha = 0).
    """
    from trl.experimental.cpo import CPOTrainer

    lw, ll, rw, rl, len_w, len_l = _random_batch(6)
    fake_self = SimpleNamespace(
        alpha=0.0, beta=2.0, simpo_gamma=0.7, label_smoothing=0.0, loss_type=loss_type, accelerator=None
    )
    fake_self.accelerator = SimpleNamespace(device=lw.device)
    if name == "simpo":
        expected, _, _ = CPOTrainer.cpo_loss(fake_self, lw / len_w, ll / len_l)
    else:
        expected, _, _ = CPOTrainer.cpo_loss(fake_self, lw, ll)
    hparams = MarginHyperparameters(beta=2.0, simpo_gamma=0.7, cpo_alpha=0.0)
    ours = margin_loss(name, lw, ll, None, None, len_w, len_l, hparams).loss
    torch.testing.assert_close(ours, expected)


# ---- the first-order algebra (methods.md §4.1, §4.3, §4.5) ----


def _logprob_grads(log_prob_fns, theta):
    grads = []
    for fn in log_prob_fns:
        (g,) = torch.autograd.grad(fn(theta), theta)
        grads.append(g)
    return grads


def test_logits_model_single_token_is_safe():
    """§4.5: free logits over V=3, uniform p, y_w=0, y_l=1: ⟨g_w,g_l⟩ = −1/3, ‖g‖² = 2/3, ratio = −0.5."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    g_w, g_l = _logprob_grads([lambda t: t.log_softmax(0)[0], lambda t: t.log_softmax(0)[1]], theta)
    inner, nw, nl = g_w @ g_l, g_w @ g_w, g_l @ g_l
    assert inner.item() == pytest.approx(-1 / 3)
    assert nw.item() == pytest.approx(2 / 3) and nl.item() == pytest.approx(2 / 3)
    assert condition_ratio(inner, nw, nl).item() == pytest.approx(-0.5)
    assert cosine(inner, nw, nl).item() == pytest.approx(-0.5)


@pytest.mark.parametrize("shared", [1, 2, 3, 4])
def test_shared_token_tabular_model(shared):
    """§4.5: tabular model (one free logit vector per position), V=3 uniform, k shared tokens then one differing token:
    ratio = (2k − 1)/(2k + 2), i.e. 0.25 for k = 1 (inner 1/3, ‖g_w‖² 4/3)."""
    positions = shared + 1
    theta = torch.zeros(positions, 3, dtype=torch.float64, requires_grad=True)
    y_w = [0] * shared + [1]
    y_l = [0] * shared + [2]
    seq_logp = lambda y: lambda t: sum(t[i].log_softmax(0)[tok] for i, tok in enumerate(y))  # noqa: E731
    g_w, g_l = (g.flatten() for g in _logprob_grads([seq_logp(y_w), seq_logp(y_l)], theta))
    inner, nw, nl = g_w @ g_l, g_w @ g_w, g_l @ g_l
    if shared == 1:
        assert inner.item() == pytest.approx(1 / 3) and nw.item() == pytest.approx(4 / 3)
    assert condition_ratio(inner, nw, nl).item() == pytest.approx((2 * shared - 1) / (2 * shared + 2))


def test_condition_ratio_uses_the_smaller_norm_of_both_responses():
    """The reference script divides by ‖g_w‖² twice; ours takes min(‖g_w‖², ‖g_l‖²)."""
    assert condition_ratio(torch.tensor(2.0), torch.tensor(8.0), torch.tensor(4.0)).item() == 0.5
    assert condition_ratio(torch.tensor(2.0), torch.tensor(4.0), torch.tensor(8.0)).item() == 0.5


vectors = st.lists(st.floats(-3, 3, allow_nan=False, allow_subnormal=False), min_size=4, max_size=4)
weights = st.floats(0.01, 5.0)


@settings(max_examples=200, deadline=None)
@given(g_w=vectors, g_l=vectors, d_w=weights, d_l=weights)
def test_first_order_signs_match_the_conditions(g_w, g_l, d_w, d_l):
    """§4.5 property: for log π linear in θ (exactly first order), the change under θ' = θ + η(d_w g_w − d_l g_l)
    equals η·first_order_deltas, and its signs follow the two inequalities of §4.1."""
    g_w, g_l = torch.tensor(g_w, dtype=torch.float64), torch.tensor(g_l, dtype=torch.float64)
    inner, nw, nl = g_w @ g_l, g_w @ g_w, g_l @ g_l
    eta = 1e-2
    step = eta * (d_w * g_w - d_l * g_l)
    exact_w, exact_l = g_w @ step, g_l @ step  # log π(θ') − log π(θ) for a linear log π
    d64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    pred_w, pred_l = first_order_deltas(d64(d_w), d64(d_l), inner, nw, nl)
    torch.testing.assert_close(exact_w, eta * pred_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(exact_l, eta * pred_l, rtol=1e-9, atol=1e-12)
    margin = 1e-9  # skip ties on the boundary
    if abs(inner - (d_w / d_l) * nw) > margin:
        assert (pred_w > 0) == (inner < (d_w / d_l) * nw)
    if abs(inner - (d_l / d_w) * nl) > margin:
        assert (pred_l < 0) == (inner < (d_l / d_w) * nl)


@settings(max_examples=200, deadline=None)
@given(g_w=vectors, g_l=vectors, c=weights)
def test_normalized_update_never_lowers_chosen_or_raises_rejected(g_w, g_l, c):
    """§4.5: the update c(g_w/‖g_w‖ − g_l/‖g_l‖) gives Δlog π_w ≥ 0 ≥ Δlog π_l for any g_w, g_l and c ≥ 0."""
    g_w, g_l = torch.tensor(g_w, dtype=torch.float64), torch.tensor(g_l, dtype=torch.float64)
    inner, nw, nl = g_w @ g_l, g_w @ g_w, g_l @ g_l
    d_w, d_l = normalized_update_coefficients(torch.tensor(c, dtype=torch.float64), nw, nl)
    pred_w, pred_l = first_order_deltas(d_w, d_l, inner, nw, nl)
    assert pred_w >= -1e-12 and pred_l <= 1e-12
    if nw > 0 and nl > 0:  # the closed form c‖g‖(1 − cos)
        cos = inner / (nw.sqrt() * nl.sqrt())  # not sqrt(nw·nl): that product underflows for norms ~1e-89
        assert pred_w.item() == pytest.approx((c * nw.sqrt() * (1 - cos)).item(), abs=1e-9)


def test_normalized_surrogate_gradient_is_the_normalized_update():
    """−∇θ of the surrogate equals c·(g_w/‖g_w‖ − g_l/‖g_l‖) for log π linear in θ (g = ∇log π exactly)."""
    gen = torch.Generator().manual_seed(0)
    g_w, g_l = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.3], dtype=torch.float64)
    surrogate = normalized_pair_surrogate(
        (g_w @ theta).reshape(1), (g_l @ theta).reshape(1), c, g_w.norm().reshape(1), g_l.norm().reshape(1)
    )
    (grad,) = torch.autograd.grad(surrogate.sum(), theta)
    torch.testing.assert_close(-grad, c * (g_w / g_w.norm() - g_l / g_l.norm()))
    zero = normalized_pair_surrogate(torch.ones(1), torch.ones(1), torch.ones(1), torch.zeros(1), torch.zeros(1))
    assert torch.isfinite(zero).all()
