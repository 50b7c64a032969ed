"""Tests for landscape_lib.ensembles against scikit-learn (accuracy_score, log_loss,
brier_score_loss), hand-computed small cases (ECE, reliability bins, Brier, disagreement),
torch.mean, and a temperature recovered from synthetic logits."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

from landscape_lib import ensembles as E


def random_probs(n=200, k=5, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, k, (n,), generator=g)
    return (logits / temperature).softmax(1), y


# A hand-worked case: 6 predictions over 4 classes in 3 equal-width bins
# [0, 1/3], (1/3, 2/3], (2/3, 1].
HAND_PROBS = torch.tensor([[0.30, 0.25, 0.25, 0.20],   # conf .30, correct   -> bin 0
                           [0.25, 0.30, 0.25, 0.20],   # conf .30, wrong     -> bin 0
                           [0.50, 0.20, 0.20, 0.10],   # conf .50, correct   -> bin 1
                           [0.10, 0.60, 0.20, 0.10],   # conf .60, wrong     -> bin 1
                           [0.90, 0.05, 0.03, 0.02],   # conf .90, correct   -> bin 2
                           [0.05, 0.05, 0.10, 0.80]],  # conf .80, correct   -> bin 2
                          dtype=torch.float64)
HAND_Y = torch.tensor([0, 0, 0, 2, 0, 3])


def test_accuracy_matches_sklearn():
    p, y = random_probs()
    assert E.accuracy(p, y) == pytest.approx(accuracy_score(y.numpy(), p.argmax(1).numpy()))
    assert E.accuracy(HAND_PROBS, HAND_Y) == pytest.approx(4 / 6)


def test_nll_matches_sklearn_log_loss():
    for t in (0.5, 1.0, 3.0):
        p, y = random_probs(temperature=t, seed=int(t * 10))
        ref = log_loss(y.numpy(), p.numpy(), labels=list(range(p.shape[1])))
        assert E.nll(p, y) == pytest.approx(ref, rel=1e-10)
    assert E.nll(p.float(), y) == pytest.approx(ref, rel=1e-5)


def test_nll_clamps_zero_probabilities():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    y = torch.tensor([1, 0])
    assert E.nll(p, y) == pytest.approx((-np.log(1e-12) - np.log(0.5)) / 2, rel=1e-6)


def test_brier_hand_and_sklearn():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.2² + 0.5² + 0.7²) = 0.78
    assert E.brier(p, y) == pytest.approx((0.14 + 0.78) / 2)
    p, y = random_probs()
    ref = brier_score_loss(y.numpy(), p.numpy(), labels=list(range(p.shape[1])))
    assert E.brier(p, y) == pytest.approx(ref, rel=1e-10)


# Unequal bin counts 1, 2, 4, where the count-weighted ECE and the plain mean over bins differ.
UNEQUAL_PROBS = torch.tensor([[0.30, 0.25, 0.25, 0.20],   # conf .30, correct -> bin 0
                              [0.50, 0.20, 0.20, 0.10],   # conf .50, correct -> bin 1
                              [0.10, 0.60, 0.20, 0.10],   # conf .60, wrong   -> bin 1
                              [0.90, 0.05, 0.03, 0.02],   # conf .90, correct -> bin 2
                              [0.05, 0.05, 0.10, 0.80],   # conf .80, correct -> bin 2
                              [0.70, 0.10, 0.10, 0.10],   # conf .70, wrong   -> bin 2
                              [0.05, 0.75, 0.10, 0.10]],  # conf .75, wrong   -> bin 2
                             dtype=torch.float64)
UNEQUAL_Y = torch.tensor([0, 0, 2, 0, 3, 1, 0])


def test_reliability_and_ece_hand_example():
    r = E.reliability(HAND_PROBS, HAND_Y, n_bins=3)
    assert r["count"] == [2, 2, 2]
    assert r["confidence"] == pytest.approx([0.30, 0.55, 0.85])
    assert r["accuracy"] == pytest.approx([0.5, 0.5, 1.0])
    assert r["edges"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # ECE = Σ |B|/N · |acc − conf| = (2·0.2 + 2·0.05 + 2·0.15)/6
    assert E.ece(HAND_PROBS, HAND_Y, n_bins=3) == pytest.approx(0.8 / 6)
    # unequal counts: bins hold 1, 2, 4 points with gaps |1 − .3|, |.5 − .55|, |.5 − .7875|, so
    # ECE = (1·0.7 + 2·0.05 + 4·0.2875)/7 = 1.95/7 (the unweighted mean of the gaps is 0.3458)
    r = E.reliability(UNEQUAL_PROBS, UNEQUAL_Y, n_bins=3)
    assert r["count"] == [1, 2, 4]
    assert r["confidence"] == pytest.approx([0.30, 0.55, 0.7875])
    assert r["accuracy"] == pytest.approx([1.0, 0.5, 0.5])
    assert E.ece(UNEQUAL_PROBS, UNEQUAL_Y, n_bins=3) == pytest.approx(1.95 / 7, abs=1e-12)
    assert E.ece_from_bins(r) == pytest.approx(1.95 / 7, abs=1e-12)


@pytest.mark.parametrize("n_bins", [3, 10, 15, 25, 50, 100])
def test_reliability_puts_a_confidence_on_a_bin_edge_in_the_lower_bin(n_bins):
    """Bins are (m/n, (m+1)/n]: a confidence exactly m/n belongs to bin m − 1 for every m
    (with n = 25, (7/25)·25 rounds to 7.000000000000001, so ceil(c·n) − 1 would misfile it), 1.0
    to the last bin; the edges are the exact m/n."""
    ms = [m for m in range(1, n_bins + 1) if m / n_bins >= 0.25]
    conf = torch.tensor([m / n_bins for m in ms], dtype=torch.float64)
    probs = torch.stack([conf] + [(1 - conf) / 3] * 3, 1)
    r = E.reliability(probs, torch.zeros(len(ms), dtype=torch.long), n_bins=n_bins)
    assert r["edges"] == [m / n_bins for m in range(n_bins + 1)]
    for m in ms:
        assert r["count"][m - 1] == 1, m
        assert r["confidence"][m - 1] == m / n_bins
        assert r["edges"][m - 1] < m / n_bins <= r["edges"][m]
    assert sum(r["count"]) == len(ms)
    # a confidence just above an edge goes up one bin
    up = torch.tensor([[0.5 + 1e-12, 0.5 - 1e-12]], dtype=torch.float64)
    assert E.reliability(up, torch.zeros(1, dtype=torch.long), n_bins=2)["count"] == [0, 1]
    exact = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert E.reliability(exact, torch.zeros(1, dtype=torch.long), n_bins=2)["count"] == [1, 0]


def test_reliability_empty_bins_and_ece_against_a_loop():
    r = E.reliability(HAND_PROBS, HAND_Y, n_bins=10)
    assert sum(r["count"]) == 6 and r["count"][0] == 0
    assert np.isnan(r["accuracy"][0]) and np.isnan(r["confidence"][0])
    p, y = random_probs(n=500, seed=3)
    conf, pred = p.max(1)
    total = 0.0
    for m in range(15):  # a plain loop over bins (lo, hi]
        lo, hi = m / 15, (m + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.double().mean() * abs((pred[inside] == y[inside]).double().mean()
                                                  - conf[inside].mean())
    assert E.ece(p, y) == pytest.approx(float(total), abs=1e-12)


def test_metrics_bundle():
    out = E.metrics(HAND_PROBS, HAND_Y, n_bins=3)
    assert set(out) == {"acc", "nll", "ece", "brier"}
    assert out["ece"] == pytest.approx(0.8 / 6)


def test_disagreement_hand():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    b = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.1, 0.9], [0.4, 0.6]])
    c = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.1, 0.9], [0.4, 0.6]])
    assert E.disagreement(a, b) == pytest.approx(0.5)
    assert E.disagreement(a, c) == pytest.approx(0.75)
    assert E.disagreement(b, c) == pytest.approx(0.25)
    assert E.mean_disagreement([a, b, c]) == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert E.mean_disagreement([a]) == 0.0


def test_average_and_probability_averager_match_torch_mean():
    members = [random_probs(seed=s)[0] for s in range(4)]
    ref = torch.stack(members).mean(0)
    torch.testing.assert_close(E.average(members), ref)
    avg = E.ProbabilityAverager()
    for m in members:
        avg.add(m)
    assert avg.count == 4
    torch.testing.assert_close(avg.mean.double(), ref, rtol=0, atol=1e-7)


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    n, k, t_true = 20_000, 5, 2.5
    base = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(base.softmax(1), 1, generator=g).squeeze(1)
    # labels follow softmax(base); the model's logits are base·T, so the best T is ≈ t_true
    t = E.fit_temperature(base * t_true, y)
    assert t == pytest.approx(t_true, rel=0.05)
    # and scaling actually lowers the NLL
    assert E.nll((base * t_true / t).softmax(1), y) < E.nll((base * t_true).softmax(1), y)


def test_errors_name_the_problem():
    p, y = random_probs(n=10)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        E.accuracy(p[0], y)
    with pytest.raises(ValueError, match="labels must be"):
        E.nll(p, y[:5])
    with pytest.raises(ValueError, match="no predictions"):
        E.brier(p[:0], y[:0])
    with pytest.raises(ValueError, match="n_bins"):
        E.ece(p, y, n_bins=0)
    with pytest.raises(ValueError, match="at least one member"):
        E.average([])
    with pytest.raises(ValueError, match="shapes differ"):
        E.disagreement(p, p[:5])
    avg = E.ProbabilityAverager()
    with pytest.raises(ValueError, match="no member"):
        avg.mean
    avg.add(p)
    with pytest.raises(ValueError, match="shape"):
        avg.add(p[:5])


# --- members collected from a training run ---------------------------------------------------

def _members_run(members_kwargs, epochs=4, use="hook", lr_at=None):
    from landscape_lib import data, models, schedules, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    y = (x[:, 0] > 0).long()
    ds = data.Dataset("toy", x, y, x[:20], y[:20], 2)
    torch.manual_seed(0)
    net = models.MLP(3, (8,), 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    members = E.Members(ds.x_test, **members_kwargs)
    lrs, probs_at = [], {}

    def record(step, model, optimizer):
        lrs.append(optimizer.param_groups[0]["lr"])
        probs_at[step] = train.predict_proba(model, ds.x_test)

    sched = None if lr_at is None else schedules.per_batch(opt, lr_at, 4)
    kw = dict(on_step=[record, members.hook()]) if use == "hook" else dict(
        on_step=[record], callbacks=[members.callback()])
    train.fit(net, ds, optimizer=opt, epochs=epochs, batch_size=24, scheduler=sched,
              progress=False, eval_every=0, **kw)
    return members, lrs, probs_at


def test_members_at_epochs_are_the_models_at_those_epoch_ends():
    members, _, probs_at = _members_run(dict(epochs=[2, 4], keep_weights=True), use="callback")
    assert members.when == [2, 4] and len(members) == 2
    # 4 steps per epoch: the model at the end of epoch 2 is the one after step 8
    assert torch.equal(members.probs[0], probs_at[8]) and torch.equal(members.probs[1], probs_at[16])
    assert set(members.weights[0]) >= {"fc1.weight", "out.bias"}
    torch.testing.assert_close(members.mean(), (probs_at[8] + probs_at[16]) / 2)
    running = members.running()
    assert torch.equal(running[0], members.probs[0]) and torch.equal(running[1], members.mean())


def test_fge_members_sit_at_the_minimum_of_every_triangular_cycle():
    from landscape_lib import schedules

    lr_at = lambda e: schedules.triangular_lr(e, lr_max=0.1, lr_min=0.001, cycle=2)  # noqa: E731
    members = E.Members.fge(torch.zeros(1, 3), cycle=2, steps_per_epoch=4)
    assert (members.every, members.start) == (8, 4)
    m, lrs, probs_at = _members_run(dict(every=8, start=4), epochs=6, lr_at=lr_at)
    assert m.when == [4, 12, 20]
    # a member is taken when the schedule reaches its minimum α₂: the next step's lr
    assert [lrs[t] for t in m.when] == pytest.approx([0.001] * 3)
    assert min(lrs) == pytest.approx(0.001)
    assert all(torch.equal(p, probs_at[t]) for p, t in zip(m.probs, m.when))
    shifted = E.Members.fge(torch.zeros(1, 3), cycle=2, steps_per_epoch=4, start_epoch=10)
    assert shifted.start == 44


def test_members_at_listed_steps_and_bad_arguments():
    m, _, probs_at = _members_run(dict(steps=[1, 5]))
    assert m.when == [1, 5] and torch.equal(m.probs[1], probs_at[5])
    with pytest.raises(ValueError, match="exactly one of"):
        E.Members(torch.zeros(1, 3), epochs=[1], every=2)
    with pytest.raises(ValueError, match="exactly one of"):
        E.Members(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="every must be a positive integer"):
        E.Members(torch.zeros(1, 3), every=0)
    with pytest.raises(ValueError, match="use .hook"):
        E.Members(torch.zeros(1, 3), every=2).callback()
    with pytest.raises(ValueError, match="use .callback"):
        E.Members(torch.zeros(1, 3), epochs=[2]).hook()
    with pytest.raises(ValueError, match="whole number"):
        E.Members.fge(torch.zeros(1, 3), cycle=1.5, steps_per_epoch=3)


def test_kl_diversity_against_scipy_entropy():
    from scipy.stats import entropy

    g = torch.Generator().manual_seed(0)
    members = [torch.rand(6, 4, generator=g).softmax(1) for _ in range(3)]
    ref = np.mean([[entropy(members[i][n].numpy(), members[j][n].numpy()) for n in range(6)]
                   for i in range(3) for j in range(3) if i != j])
    assert E.mean_kl_diversity(members) == pytest.approx(ref, rel=1e-6)
    assert E.kl_divergence(members[0], members[0]) == pytest.approx(0.0, abs=1e-12)
    # KL is not symmetric: the ordered pairs matter
    assert E.kl_divergence(members[0], members[1]) != pytest.approx(E.kl_divergence(members[1], members[0]))
    assert E.mean_kl_diversity(members[:1]) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        E.kl_divergence(members[0], members[1][:3])


# --- exact and boundary cases found by mutation testing (CONTRIBUTING.md, "Mutation testing") ---

def test_error_messages_are_exact():
    p, y = random_probs(n=3, k=5)
    with pytest.raises(ValueError, match=r"^labels must be \[N\] = \[3\], got \(2,\)$"):
        E.nll(p, y[:2])
    with pytest.raises(ValueError, match="^no predictions to score$"):
        E.brier(p[:0], y[:0])
    with pytest.raises(ValueError, match="^an ensemble needs at least one member$"):
        E.average([])


def test_brier_with_a_class_no_label_uses():
    """K = 3 classes, labels only 0: Σ_k (p_k − 1[k = 0])² = 0.25 + 0.25 + 0 for (0.5, 0.5, 0)."""
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert E.brier(p, torch.tensor([0, 0])) == pytest.approx(0.25)


def test_reliability_default_bins_one_bin_and_a_zero_confidence():
    """15 bins by default: confidences 0.87 and 0.93 share bin 13 = (13/15, 14/15] (with 16
    bins they would not), so ECE = |0.5 − 0.9|; one bin is allowed (ECE = |accuracy − mean
    confidence|); a zero confidence goes to the first bin; a single prediction can be scored."""
    p = torch.tensor([[0.87, 0.13], [0.93, 0.07]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    r = E.reliability(p, y)
    assert len(r["count"]) == 15 and r["count"][13] == 2
    assert E.ece(p, y) == pytest.approx(0.4, abs=1e-12)
    assert E.ece(p, y, n_bins=16) == pytest.approx((0.13 + 0.93) / 2, abs=1e-12)
    assert E.metrics(p, y)["ece"] == pytest.approx(0.4, abs=1e-12)
    one = E.reliability(p, y, n_bins=1)
    assert one["count"] == [2] and one["edges"] == [0.0, 1.0]
    q, t = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), torch.tensor([1, 1, 1])
    assert E.ece(q, t, n_bins=1) == pytest.approx(abs(1 / 3 - (0.9 + 0.7 + 0.6) / 3), abs=1e-6)
    zero = E.reliability(torch.zeros(1, 2), torch.tensor([0]), n_bins=4)
    assert zero["count"] == [1, 0, 0, 0]
    assert E.ece(q[:1], t[:1], n_bins=2) == pytest.approx(0.9)  # one wrong prediction at 0.9


def test_two_members_disagree_and_diverge():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    b = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    assert E.mean_disagreement([a, b]) == 0.5
    # KL(a‖b) on row 1: 0.9 log 9 + 0.1 log(1/9) = 0.8 log 9; row 2: 0; symmetric here
    assert E.mean_kl_diversity([a, b]) == pytest.approx(0.8 * np.log(9) / 2, rel=1e-6)


class _Const(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.w.expand(x.shape[0], 2)


def test_members_hook_steps_defaults_and_validation():
    x, model = torch.zeros(3, 1), _Const()
    taken = []
    for kw in (dict(every=3, start=2), dict(every=2), dict(every=1)):
        m = E.Members(x, **kw)
        hook = m.hook()
        for step in range(1, 10):
            hook(step, model, None)
        taken.append(m.when)
    assert taken == [[2, 5, 8], [1, 3, 5, 7, 9], list(range(1, 10))]
    assert m.weights == []  # keep_weights defaults to False
    assert m.probs[0].shape == (3, 2)
    for kw in (dict(every=True), dict(every=2.0), dict(every=0)):
        with pytest.raises(ValueError, match="^every must be a positive integer"):
            E.Members(x, **kw)
    for start in (True, 2.0, 0):
        with pytest.raises(ValueError, match="^start must be a positive integer"):
            E.Members(x, every=1, start=start)
    with pytest.raises(ValueError, match="^say when to take members: exactly one of"):
        E.Members(x)
    with pytest.raises(ValueError, match=r"^these members are taken at steps: use \.hook\(\)"):
        E.Members(x, every=1).callback()
    with pytest.raises(ValueError, match=r"^these members are taken at epochs: use \.callback\(\)"):
        E.Members(x, epochs=[1]).hook()


def test_fge_members_with_the_shortest_cycle_keep_their_arguments():
    x = torch.zeros(2, 1)
    m = E.Members.fge(x, cycle=2, steps_per_epoch=1, keep_weights=True)  # a period of 2 steps
    assert m.x is x and m.every == 2 and m.start == 1 and m.keep_weights
    with pytest.raises(ValueError, match="whole number"):
        E.Members.fge(x, cycle=1, steps_per_epoch=1)
