"""Training losses against their written formulas (DESIGN.md §5), recomputed here with loops / numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.losses import (
    CLUB,
    DTProjector,
    EnergyHead,
    IsoMaxPlusHead,
    VOSLoss,
    VOSQueue,
    energy_margin_loss,
    feature_kd,
    fit_tied_gaussian,
    isomax_loss,
    logit_kd,
    oe_loss,
    vos_sample,
)

STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [-1.0, 0.5, 2.0]]
TEACHER = [[3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 2.5]]


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _lse(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


def _kl_teacher_student(student: list[list[float]], teacher: list[list[float]]) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = _softmax(s_row), _softmax(t_row)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return total / len(student)


# --------------------------------------------------------------------------- knowledge distillation


def test_logit_kd_is_batchmean_kl_teacher_to_student() -> None:
    got = logit_kd(_t(STUDENT), _t(TEACHER)).item()
    assert got == pytest.approx(_kl_teacher_student(STUDENT, TEACHER), rel=1e-9)
    # direction matters: KL(S ‖ T) is a different number on these rows
    assert got != pytest.approx(_kl_teacher_student(TEACHER, STUDENT), rel=1e-3)


def test_feature_kd_matches_formula() -> None:
    h_s = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -2.0]]
    dt_h_t = [[0.0, 0.0, 1.0, 1.0], [2.0, -1.0, 0.5, 0.0]]
    assert feature_kd(_t(h_s), _t(dt_h_t)).item() == pytest.approx(_kl_teacher_student(h_s, dt_h_t), rel=1e-9)


@pytest.mark.parametrize("kd", [logit_kd, feature_kd])
def test_kd_is_zero_when_equal_and_positive_otherwise(kd) -> None:
    x = _t(STUDENT)
    assert abs(kd(x, x.clone()).item()) < 1e-12
    assert abs(kd(x, x + 5.0).item()) < 1e-12  # softmax is shift invariant
    assert kd(x, _t(TEACHER)).item() > 1e-3


def test_kd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        logit_kd(torch.zeros(2, 3), torch.zeros(2, 4))


def test_dt_projector_layers_and_gradient_through_feature_kd() -> None:
    torch.manual_seed(0)
    dt = DTProjector(teacher_dim=6, student_dim=4)
    assert [type(m) for m in dt.net] == [nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.BatchNorm1d]
    assert dt.net[0].num_features == 6 and dt.net[3].num_features == 4
    h_t, h_s = torch.randn(5, 6), torch.randn(5, 4)
    projected = dt(h_t)
    assert projected.shape == (5, 4)
    # by hand (train mode: batch statistics, biased variance)
    bn_in = (h_t - h_t.mean(0)) / torch.sqrt(h_t.var(0, unbiased=False) + 1e-5)
    hidden = torch.relu(bn_in @ dt.net[1].weight.T + dt.net[1].bias)
    expected = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(projected, expected, atol=1e-5, rtol=1e-5)
    feature_kd(h_s, projected).backward()
    assert dt.net[1].weight.grad is not None and dt.net[1].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- CLUB


def _club_fixture() -> tuple[CLUB, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    club = CLUB(x_dim=3, y_dim=2, hidden_size=5).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64) * 2.0 + 1.0
    return club, x, y


def _mlp_numpy(seq: nn.Sequential, x: np.ndarray, tanh: bool) -> np.ndarray:
    w1, b1 = seq[0].weight.detach().numpy(), seq[0].bias.detach().numpy()
    w2, b2 = seq[2].weight.detach().numpy(), seq[2].bias.detach().numpy()
    out = np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2
    return np.tanh(out) if tanh else out


def test_club_mlps_are_two_layer_with_tanh_log_variance() -> None:
    club, x, _ = _club_fixture()
    mu, logvar = club.mu_logvar(x)
    np.testing.assert_allclose(mu.detach().numpy(), _mlp_numpy(club.mu, x.numpy(), tanh=False), rtol=1e-12)
    np.testing.assert_allclose(
        logvar.detach().numpy(), _mlp_numpy(club.logvar, x.numpy(), tanh=True), rtol=1e-12
    )
    assert logvar.abs().max() < 1.0
    assert isinstance(club.logvar[-1], nn.Tanh)


def test_club_forward_matches_formula_with_loops() -> None:
    club, x, y = _club_fixture()
    mu = _mlp_numpy(club.mu, x.numpy(), tanh=False)
    ell = _mlp_numpy(club.logvar, x.numpy(), tanh=True)
    yn = y.numpy()
    n, d_y = yn.shape
    total = 0.0
    for i in range(n):
        term = 0.0
        for d in range(d_y):
            var2 = 2.0 * math.exp(ell[i, d])
            term -= (mu[i, d] - yn[i, d]) ** 2 / var2
            term += sum((yn[j, d] - mu[i, d]) ** 2 for j in range(n)) / n / var2
        total += term
    assert club(x, y).item() == pytest.approx(total / n, rel=1e-9, abs=1e-12)


def test_club_gradient_matches_all_pairs_reference() -> None:
    club, x, y = _club_fixture()
    y = y.clone().requires_grad_(True)
    club(x, y).backward()
    grad_fast = y.grad.clone()
    y.grad = None
    mu, logvar = club.mu_logvar(x)  # the O(N²·D) form of the reference code
    positive = -((mu - y) ** 2) / (2 * logvar.exp())
    negative = -((y.unsqueeze(0) - mu.unsqueeze(1)) ** 2).mean(dim=1) / (2 * logvar.exp())
    (positive.sum(1) - negative.sum(1)).mean().backward()
    torch.testing.assert_close(grad_fast, y.grad, rtol=1e-9, atol=1e-12)


def test_club_log_likelihood_and_learning_loss() -> None:
    club, x, y = _club_fixture()
    mu = _mlp_numpy(club.mu, x.numpy(), tanh=False)
    ell = _mlp_numpy(club.logvar, x.numpy(), tanh=True)
    yn = y.numpy()
    per_row = [
        sum(
            -((yn[i, d] - mu[i, d]) ** 2) / (2 * math.exp(ell[i, d]))
            - ell[i, d] / 2
            - math.log(2 * math.pi) / 2
            for d in range(yn.shape[1])
        )
        for i in range(len(yn))
    ]
    assert club.log_likelihood(x, y).item() == pytest.approx(sum(per_row) / len(per_row), rel=1e-9)
    reference = torch.distributions.Normal(torch.tensor(mu), torch.tensor(np.exp(ell / 2))).log_prob(y)
    assert club.log_likelihood(x, y).item() == pytest.approx(reference.sum(1).mean().item(), rel=1e-9)
    assert club.learning_loss(x, y).item() == pytest.approx(-club.log_likelihood(x, y).item(), rel=1e-12)


def test_club_requires_paired_batches() -> None:
    club, x, y = _club_fixture()
    with pytest.raises(ValueError, match="same non-zero batch size"):
        club(x, y[:3])
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        club(x, torch.zeros(4, 5, dtype=torch.float64))
    assert abs(club(x[:1], y[:1]).item()) < 1e-12  # one pair: the two terms cancel


# --------------------------------------------------------------------------- outlier exposure / energy


OUT_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0]]


def test_oe_loss_matches_formula_and_uniform_cross_entropy() -> None:
    expected = sum(_lse(r) - sum(r) / len(r) for r in OUT_LOGITS) / len(OUT_LOGITS)
    logits = _t(OUT_LOGITS)
    assert oe_loss(logits).item() == pytest.approx(expected, rel=1e-12)
    uniform = torch.full_like(logits, 1.0 / logits.shape[1])
    assert oe_loss(logits).item() == pytest.approx(F.cross_entropy(logits, uniform).item(), rel=1e-12)


def test_oe_loss_minimum_is_log_k_at_constant_logits() -> None:
    # lse(f) − mean f = log K + KL(u ‖ softmax f): the minimum is log K, not 0
    k = 3
    assert oe_loss(_t([[2.0] * k, [-7.0] * k])).item() == pytest.approx(math.log(k), rel=1e-12)
    for row in OUT_LOGITS:
        if len(set(row)) > 1:
            assert oe_loss(_t([row])).item() > math.log(k) + 1e-3


def test_energy_margin_loss_matches_formula() -> None:
    logits_in = [[4.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    logits_out = [[1.0, 2.0, 0.0], [-3.0, -3.0, -3.0], [6.0, 0.0, 0.0]]
    m_in, m_out = -3.0, -1.5
    e_in = [-_lse(r) for r in logits_in]
    e_out = [-_lse(r) for r in logits_out]
    expected = sum(max(e - m_in, 0.0) ** 2 for e in e_in) / len(e_in) + sum(
        max(m_out - e, 0.0) ** 2 for e in e_out
    ) / len(e_out)
    assert expected > 0
    got = energy_margin_loss(_t(logits_in), _t(logits_out), m_in, m_out).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_energy_margin_loss_is_zero_inside_margins() -> None:
    m_in, m_out = -5.0, -1.0
    logits_in = _t([[10.0, 0.0, 0.0], [0.0, 8.0, 1.0]])  # E ≈ −10, −8: below m_in
    logits_out = _t([[-3.0, -3.0, -3.0], [0.0, -1.0, -2.0]])  # E ≈ 1.9, −0.41: above m_out
    assert energy_margin_loss(logits_in, logits_out, m_in, m_out).item() == 0.0


def test_energy_head_targets_id_one_outlier_zero() -> None:
    head = EnergyHead().double()
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[-0.5], [1.5]], dtype=torch.float64))
        head.linear.bias.copy_(torch.tensor([0.2, -0.3], dtype=torch.float64))
    logits_in = [[3.0, 0.0, 1.0], [2.0, 2.0, -1.0]]
    logits_out = [[0.0, 0.0, 0.0], [-2.0, 1.0, 0.0], [0.5, 0.5, 0.5]]
    rows = [(_lse(r), 1) for r in logits_in] + [(_lse(r), 0) for r in logits_out]
    losses = []
    for s, target in rows:
        z = [-0.5 * s + 0.2, 1.5 * s - 0.3]
        losses.append(_lse(z) - z[target])
    got = head(_t(logits_in), _t(logits_out)).item()
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    # with swapped targets the number would differ
    swapped = [_lse(z) - z[1 - t] for (s, t) in rows for z in [[-0.5 * s + 0.2, 1.5 * s - 0.3]]]
    assert got != pytest.approx(sum(swapped) / len(swapped), rel=1e-3)


# --------------------------------------------------------------------------- VOS


def test_vos_queue_fifo_overwrites_oldest() -> None:
    queue = VOSQueue(num_classes=2, dim=2, capacity=3)
    feats = torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]])
    queue.update(feats, torch.tensor([0, 0, 1]))
    assert queue.counts.tolist() == [2, 1] and not queue.ready()
    queue.update(torch.tensor([[2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]), torch.tensor([0, 0, 0]))
    assert queue.class_features(0)[:, 0].tolist() == [2.0, 3.0, 4.0]  # 0 and 1 were the oldest
    assert queue.counts.tolist() == [3, 1] and not queue.ready()
    # a batch larger than the queue keeps only its newest rows, in order
    many = torch.arange(10.0, 15.0).repeat(2, 1).T
    queue.update(many, torch.ones(5, dtype=torch.long))
    assert queue.class_features(1)[:, 0].tolist() == [12.0, 13.0, 14.0]
    assert queue.ready() and queue.seen.tolist() == [5, 6]
    assert set(queue.state_dict()) == {"features", "seen"}
    with pytest.raises(ValueError, match="labels must lie"):
        queue.update(feats, torch.tensor([0, 2, 1]))


def _clusters(k: int, c: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.arange(k, dtype=torch.float64)[:, None] * 20.0 * torch.ones(d, dtype=torch.float64)
    return centres[:, None, :] + torch.randn(k, c, d, generator=gen, dtype=torch.float64)


def test_fit_tied_gaussian_matches_numpy() -> None:
    feats = _clusters(3, 50, 4)
    means, cov = fit_tied_gaussian(feats, ridge=1e-4)
    z = feats.numpy()
    mu = z.mean(axis=1)
    centred = (z - mu[:, None, :]).reshape(-1, 4)
    np.testing.assert_allclose(means.numpy(), mu, rtol=1e-10)
    np.testing.assert_allclose(cov.numpy(), centred.T @ centred / len(centred) + 1e-4 * np.eye(4), rtol=1e-10)


def _gaussian_log_lik(points: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    diff = points - mu
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + len(mu) * math.log(2 * math.pi))


def test_vos_samples_have_lower_likelihood_than_queue_features() -> None:
    k, c, d = 3, 100, 4
    feats = _clusters(k, c, d)
    means, cov = (t.numpy() for t in fit_tied_gaussian(feats))
    samples = vos_sample(feats, n_samples=10000, keep=1, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (k, d)
    several = vos_sample(feats, n_samples=10000, keep=3, generator=torch.Generator().manual_seed(2))
    assert several.shape == (k * 3, d)
    for cls in range(k):
        queue_ll = _gaussian_log_lik(feats[cls].numpy(), means[cls], cov)
        one_ll = _gaussian_log_lik(samples[cls : cls + 1].numpy(), means[cls], cov)
        assert one_ll.item() < queue_ll.min()
        some_ll = _gaussian_log_lik(several[cls * 3 : cls * 3 + 3].numpy(), means[cls], cov)
        assert (some_ll < np.percentile(queue_ll, 1)).all()
        # class-major order: each virtual outlier sits nearest to its own class mean
        nearest = np.linalg.norm(
            several[cls * 3 : cls * 3 + 3].numpy()[:, None] - means[None], axis=2
        ).argmin(1)
        assert (nearest == cls).all()


def test_vos_sample_is_reproducible_with_a_generator() -> None:
    feats = _clusters(2, 20, 3).float()
    a = vos_sample(feats, n_samples=500, generator=torch.Generator().manual_seed(3))
    b = vos_sample(feats, n_samples=500, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_vos_weighted_energy_matches_formula_and_skips_non_positive_weights() -> None:
    loss = VOSLoss(num_classes=3).double()
    assert (loss.weight > 0).all()  # U(0, 1) init
    w = [0.5, -1.0, 2.0]
    with torch.no_grad():
        loss.weight.copy_(torch.tensor(w, dtype=torch.float64))
    logits = [[1.0, 2.0, 3.0], [0.0, 50.0, -1.0]]
    expected = [
        -math.log(sum(max(wk, 0.0) * math.exp(f) for wk, f in zip(w, row, strict=True))) for row in logits
    ]
    np.testing.assert_allclose(loss.weighted_energy(_t(logits)).detach().numpy(), expected, rtol=1e-12)
    # gradient is finite although relu(w_1) = 0
    logits_t = _t(logits).requires_grad_(True)
    loss.weighted_energy(logits_t).sum().backward()
    assert torch.isfinite(loss.weight.grad).all() and loss.weight.grad[1] == 0
    assert torch.isfinite(logits_t.grad).all()
    # with w = 1 it is the plain energy −lse(f)
    with torch.no_grad():
        loss.weight.fill_(1.0)
    np.testing.assert_allclose(
        loss.weighted_energy(_t(logits)).detach().numpy(), [-_lse(r) for r in logits], rtol=1e-12
    )


def test_vos_loss_is_ce_with_id_one_virtual_zero() -> None:
    loss = VOSLoss(num_classes=3).double()
    w = [0.3, 0.9, 1.2]
    with torch.no_grad():
        loss.weight.copy_(torch.tensor(w, dtype=torch.float64))
        loss.linear.weight.copy_(torch.tensor([[0.7], [-0.4]], dtype=torch.float64))
        loss.linear.bias.copy_(torch.tensor([-0.1, 0.6], dtype=torch.float64))
    logits_in = [[3.0, 0.0, 1.0], [1.0, 4.0, 0.0]]
    logits_virtual = [[0.0, 0.0, 0.0], [-1.0, 0.5, 0.0], [2.0, 2.0, 2.0]]
    terms = []
    for rows, target in ((logits_in, 1), (logits_virtual, 0)):
        for row in rows:
            neg_e = math.log(sum(wk * math.exp(f) for wk, f in zip(w, row, strict=True)))
            z = [0.7 * neg_e - 0.1, -0.4 * neg_e + 0.6]
            terms.append(_lse(z) - z[target])
    got = loss(_t(logits_in), _t(logits_virtual)).item()
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-12)


# --------------------------------------------------------------------------- IsoMax+


def test_isomax_plus_logits_loss_and_score_match_formula() -> None:
    torch.manual_seed(0)
    head = IsoMaxPlusHead(in_features=3, num_classes=4).double()
    assert head.prototypes.shape == (4, 3) and head.distance_scale.item() == 1.0
    with torch.no_grad():
        head.distance_scale.fill_(-2.0)  # |d_s| is used
    h = _t([[1.0, 0.0, 2.0], [-1.0, 3.0, 0.5]])
    protos = head.prototypes.detach().numpy()
    expected = np.zeros((2, 4))
    for i, row in enumerate(h.numpy()):
        h_hat = row / np.linalg.norm(row)
        for j, p in enumerate(protos):
            expected[i, j] = -2.0 * np.linalg.norm(h_hat - p / np.linalg.norm(p))
    z = head(h)
    np.testing.assert_allclose(z.detach().numpy(), expected, rtol=1e-10)
    assert (z <= 0).all()
    y = [2, 0]
    ce = sum(_lse(list(10.0 * expected[i])) - 10.0 * expected[i, y[i]] for i in range(2)) / 2
    assert isomax_loss(z, torch.tensor(y)).item() == pytest.approx(ce, rel=1e-10)
    assert isomax_loss(z, torch.tensor(y), entropic_scale=1.0).item() != pytest.approx(ce, rel=1e-3)
    from oodforge.scores import build_score  # the detector scores IsoMax+ with max_logit = max_j z_j

    np.testing.assert_allclose(build_score("max_logit")(z.detach()).numpy(), expected.max(axis=1), rtol=1e-6)


def test_isomax_plus_logits_nonpositive_on_random_features() -> None:
    torch.manual_seed(1)
    head = IsoMaxPlusHead(in_features=8, num_classes=5)
    z = head(torch.randn(16, 8))
    assert z.shape == (16, 5) and (z <= 0).all()
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        head(torch.randn(2, 7))


def test_club_q_networks_have_the_public_shapes() -> None:
    from trainer.losses.club import CLUB

    shallow, deep = CLUB(24, 16, 256, "mlp"), CLUB(64, 16, 256, "deep")
    widths = lambda seq: [m.out_features for m in seq if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert widths(shallow.mu) == [256, 16] and widths(shallow.logvar) == [256, 16]
    assert widths(deep.mu) == [32, 16, 256, 16] and widths(deep.logvar) == [256, 16]
    assert isinstance(deep.logvar[-1], torch.nn.Tanh)
    with pytest.raises(ValueError, match="unknown CLUB q network 'wide'"):
        CLUB(4, 4, 8, "wide")


def test_pair_by_class_matches_classes_first() -> None:
    from trainer.methods.oal import pair_by_class

    labels = torch.tensor([2, 0, 2, 5])
    rows = torch.arange(6.0).unsqueeze(1)  # row r holds the value r
    classes = torch.tensor([0, 2, 1, 2, 0, 1])
    paired, matched = pair_by_class(labels, rows, classes)
    assert paired.flatten().tolist() == [1.0, 0.0, 3.0, 2.0]  # class 5 has no row: the first unused (2)
    assert matched.tolist() == [True, True, True, False]
