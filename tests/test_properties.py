"""Property-based tests (hypothesis): invariants that must hold for every drawn shape and value.

* filter normalisation gives each filter of the direction the norm of the matching filter of the
  weights and keeps its orientation (Li et al. 2018);
* the per-example gradients of ``privacy.per_sample_grads`` sum to the gradient of the summed
  loss (any batch size, number of views, chunk size);
* ``params.to_vector``/``from_vector`` are inverse to each other;
* the ECE lies in [0, 1], and with one bin it is |accuracy − mean confidence|;
* ``viz.contour_levels`` are equally spaced from the smallest to the largest value;
* a FiLM ensemble whose members are copies of one model (``init="copy"``) gives every member
  that model's output, for any width, depth, norm, member count and batch, in train and eval mode.

Each property runs 30 derandomised examples (reproducible, no example database needed).
"""
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from landscape_lib import directions, ensembles, film, models, params, privacy, viz

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def weight_and_direction(draw):
    """A weight tensor of 2 (Linear) or 4 (conv) dimensions and a direction of its shape."""
    out = draw(st.integers(1, 5))
    rest = draw(st.sampled_from([(draw(st.integers(1, 4)),),
                                 (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))]))
    shape = (out, *rest)
    w = draw(hnp.arrays(np.float64, shape, elements=finite))
    d = draw(hnp.arrays(np.float64, shape, elements=finite))
    return torch.from_numpy(w), torch.from_numpy(d)


@PROPERTY
@given(weight_and_direction(), st.integers(1, 4))
def test_filter_normalisation_preserves_each_filters_norm(wd, bias_len):
    w, d = wd
    d_rows = d.reshape(d.shape[0], -1)
    assume(bool((d_rows.norm(dim=1) > 1e-3).all()))  # a Gaussian filter is never (almost) zero
    weights = {"layer.weight": w, "layer.bias": torch.linspace(-1, 1, bias_len, dtype=torch.float64)}
    direction = {"layer.weight": d, "layer.bias": torch.ones(bias_len, dtype=torch.float64)}
    out = directions.normalize(direction, weights, norm="filter")
    o_rows, w_rows = out["layer.weight"].reshape(w.shape[0], -1), w.reshape(w.shape[0], -1)
    torch.testing.assert_close(o_rows.norm(dim=1), w_rows.norm(dim=1), rtol=1e-6, atol=1e-8)
    # each filter is a non-negative multiple of the drawn one (same orientation)
    cos = (o_rows * d_rows).sum(1) / (d_rows.norm(dim=1) * o_rows.norm(dim=1)).clamp_min(1e-300)
    nonzero = w_rows.norm(dim=1) > 0
    torch.testing.assert_close(cos[nonzero], torch.ones_like(cos[nonzero]), rtol=0, atol=1e-9)
    assert torch.count_nonzero(out["layer.bias"]) == 0  # biases ignored by default
    assert out["layer.weight"].shape == w.shape


@PROPERTY
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(0, 2 ** 31 - 1))
def test_per_sample_gradients_sum_to_the_batch_gradient(batch, dim, views, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(batch * views, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (batch * views,), generator=g)
    per = privacy.per_sample_grads(model, x, y, views=views, chunk_size=min(chunk, batch))
    # example i's gradient is the mean over its views, so Σ_i g_i = ∇ Σ_rows ℓ / K
    total = F.cross_entropy(model(x), y, reduction="sum") / views
    ref = torch.autograd.grad(total, list(model.parameters()))
    for (name, p), r in zip(model.named_parameters(), ref):
        assert per[name].shape == (batch, *p.shape)
        torch.testing.assert_close(per[name].sum(0), r, rtol=1e-10, atol=1e-12)


@PROPERTY
@given(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
       st.integers(0, 2 ** 31 - 1))
def test_to_vector_and_from_vector_round_trip(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    d = {f"p{i}": torch.randn(tuple(s), generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}
    v = params.to_vector(d)
    assert v.numel() == sum(int(np.prod(s)) for s in shapes)
    back = params.from_vector(v, d)
    assert list(back) == list(d)
    for k in d:
        assert back[k].shape == d[k].shape and torch.equal(back[k], d[k])
    u = torch.randn(v.numel(), generator=g, dtype=torch.float64)
    assert torch.equal(params.to_vector(params.from_vector(u, d)), u)


@PROPERTY
@given(st.integers(1, 40), st.integers(2, 6), st.integers(1, 30), st.floats(0.1, 10.0),
       st.integers(0, 2 ** 31 - 1))
def test_ece_lies_in_the_unit_interval_and_one_bin_is_the_calibration_gap(n, k, n_bins, temp, seed):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, k, generator=g, dtype=torch.float64) * temp).softmax(1)
    y = torch.randint(0, k, (n,), generator=g)
    e = ensembles.ece(probs, y, n_bins=n_bins)
    assert 0.0 <= e <= 1.0
    r = ensembles.reliability(probs, y, n_bins=n_bins)
    assert sum(r["count"]) == n
    conf, pred = probs.max(1)
    gap = abs(float((pred == y).double().mean()) - float(conf.mean()))
    assert abs(ensembles.ece(probs, y, n_bins=1) - gap) < 1e-12
    assert e >= gap - 1e-12  # finer bins never hide a global gap (triangle inequality)


@PROPERTY
@given(hnp.arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(2, 6)),
                  elements=st.floats(1e-3, 1e3, allow_nan=False)),
       st.integers(2, 30), st.booleans())
def test_contour_levels_are_equally_spaced_from_min_to_max(values, n_levels, log):
    assume(values.max() > values.min() * (1 + 1e-6))
    lv = viz.contour_levels(values, n_levels, log=log)
    lo, hi = (np.log10(values.min()), np.log10(values.max())) if log else (values.min(), values.max())
    assert lv.log is log
    assert abs(lv.start - lo) <= 1e-12 * max(1.0, abs(lo))
    assert abs(lv.end - hi) <= 1e-12 * max(1.0, abs(hi))
    assert abs(lv.start + (n_levels - 1) * lv.size - lv.end) <= 1e-9 * max(1.0, abs(hi - lo))
    assert lv.size > 0


@PROPERTY
@given(in_dim=st.integers(1, 6), hidden=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       n_classes=st.integers(2, 4), norm=st.sampled_from(["batch", "layer"]),
       members=st.integers(1, 4), batch=st.integers(2, 5), train=st.booleans(), seed=st.integers(0, 2**16))
def test_a_film_ensemble_of_identical_members_is_the_single_model(in_dim, hidden, n_classes, norm, members,
                                                                   batch, train, seed):
    torch.manual_seed(seed)
    net = models.MLP(in_dim, tuple(hidden), n_classes, norm=norm)
    with torch.no_grad():  # parameters and running statistics away from their initial values
        for p in net.parameters():
            p.normal_()
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    ens = film.FiLMEnsemble(net, members, init="copy")
    ens.train(train)
    net.train(train)
    x = torch.randn(batch, in_dim)
    out, ref = ens(x), net(x)  # float32: the members' batched products round differently
    assert out.shape == (members, batch, n_classes)
    for m in range(members):
        torch.testing.assert_close(out[m], ref, rtol=1e-5, atol=1e-5)
