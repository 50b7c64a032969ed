import copy
import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from landscape_lib import directions, landscape, models, params

from conftest import ROOT


@pytest.fixture
def problem():
    torch.manual_seed(0)
    net = models.MLP(6, (8, 8), 3, norm="batch").eval()
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    params.recompute_bn(net, x)
    w = params.weights(net)
    g = torch.Generator().manual_seed(1)
    return net, w, directions.random(w, generator=g), directions.random(w, generator=g), x, y


def _manual(net, point, x, y, bn_data=None):
    """Loss and accuracy at ``point`` with ``load_state_dict``; with ``bn_data``, BatchNorm
    statistics re-estimated by torch's own ``swa_utils.update_bn`` (not the library's)."""
    m = copy.deepcopy(net)
    m.load_state_dict(point, strict=False)
    if bn_data is not None:
        update_bn([(bn_data,)], m)
    m.eval()
    with torch.no_grad():
        out = m(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_plane_equals_a_per_point_reference(problem, strategy):
    net, w, d1, d2, x, y = problem
    a, b = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    s = landscape.plane(net, w, d1, d2, a, b, x, y, strategy=strategy, chunk_size=4)
    assert s.loss.shape == (3, 5)
    for j, bb in enumerate(b):
        for i, aa in enumerate(a):
            loss, acc = _manual(net, {k: w[k] + aa * d1[k] + bb * d2[k] for k in w}, x, y)
            assert s.loss[j, i] == pytest.approx(loss, rel=1e-5)
            assert s.acc[j, i] == pytest.approx(acc)


def test_recompute_mode_re_estimates_bn_at_every_point(problem):
    net, w, d1, _, x, y = problem
    alphas = [-1.0, 0.0, 0.7]
    bn_x = x[:20]  # statistics from other inputs than the evaluation batch
    ln = landscape.line(net, w, d1, alphas, x, y, bn="recompute", bn_data=bn_x)
    kept = landscape.line(net, w, d1, alphas, x, y, bn="keep")
    for i, a in enumerate(alphas):
        point = {k: w[k] + a * d1[k] for k in w}
        loss, acc = _manual(net, point, x, y, bn_data=bn_x)
        assert ln.loss[i] == pytest.approx(loss, rel=1e-5)
        assert ln.acc[i] == pytest.approx(acc)
        assert kept.loss[i] == pytest.approx(_manual(net, point, x, y)[0], rel=1e-5)
    assert not np.allclose(ln.loss, kept.loss)
    # the model's own statistics are untouched
    assert torch.allclose(params.forward(net, w, x), net(x))


def test_states_path_carries_buffers(problem):
    net, w, _, _, x, y = problem
    a = params.state(net)
    b = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in a.items()}
    pts = landscape.states(net, [params.lerp(a, b, t) for t in (0.0, 1.0)], x, y)
    assert pts.loss[0] == pytest.approx(_manual(net, a, x, y)[0], rel=1e-6)
    assert pts.loss[1] == pytest.approx(_manual(net, b, x, y)[0], rel=1e-6)


@pytest.mark.parametrize("call,err,match", [
    (lambda p: landscape.line(p[0], p[1], p[2], [], p[4], p[5]), ValueError, "at least one point"),
    (lambda p: landscape.grid(0.0, 5), ValueError, "radius must be positive"),
    (lambda p: landscape.grid(-1.0, 5), ValueError, "radius must be positive"),
    (lambda p: landscape.grid(1.0, 0), ValueError, "at least one point"),
    (lambda p: landscape.line(p[0], p[1], p[2], [0.0], p[4], p[5], strategy="gpu"), ValueError,
     "valid strategies: auto, loop, vmap"),
    (lambda p: landscape.line(p[0], p[1], p[2], [0.0], p[4], p[5], bn="train"), ValueError,
     "valid bn modes: keep, recompute"),
    (lambda p: landscape.line(p[0], p[1], p[2], [0.0], p[4], p[5], bn="recompute"), ValueError, "bn_data"),
    (lambda p: landscape.line(p[0], p[1], p[2], [0.0], p[4], p[5], bn="recompute", bn_data=p[4],
                              strategy="vmap"), ValueError, "strategy 'loop'"),
    (lambda p: landscape.line(p[0], p[1], p[2], [np.nan], p[4], p[5]), ValueError, "non-finite"),
    (lambda p: landscape.states(p[0], [], p[4], p[5]), ValueError, "at least one point"),
])
def test_bad_input_is_rejected_with_the_choices(problem, call, err, match):
    with pytest.raises(err, match=match):
        call(problem)


def test_shape_metrics_on_hand_cases():
    assert landscape.max_rise([3, 2, 2.5, 1, 1.2]) == pytest.approx(0.5)
    assert landscape.max_rise([3, 2, 1]) == 0.0
    assert landscape.is_monotone([3, 2, 2.0005, 1], tol=1e-3)
    assert not landscape.is_monotone([3, 2, 2.1, 1], tol=1e-3)
    a = np.linspace(0, 1, 5)
    assert landscape.barrier(a, 1 + 4 * a * (1 - a)) == pytest.approx(1.0)  # bump of 1 at the middle
    assert landscape.barrier(a, 2 - a) == pytest.approx(0.0)  # the chord itself
    with pytest.raises(ValueError, match="endpoints"):
        landscape.barrier(np.linspace(0.1, 1, 4), np.ones(4))


def test_barrier_ignores_alphas_outside_the_unit_interval():
    """Points beyond the endpoints (α < 0 or α > 1, as on an extended line) are not part of the
    path between the two solutions: a high loss there is no barrier. Unsorted alphas, unequal
    endpoint losses: chord 1 + 2α, so the bumps at 0.25 and 0.5 are 1.0 and 2.0."""
    alphas = [-0.5, 1.0, 0.25, 1.5, 0.0, 0.5, -1e-3]
    values = [50.0, 3.0, 2.5, 40.0, 1.0, 4.0, 30.0]
    assert landscape.barrier(alphas, values) == pytest.approx(2.0, abs=1e-12)
    # everything inside below the chord: the barrier is 0 (the endpoints themselves)
    assert landscape.barrier([-1.0, 0.0, 0.5, 1.0, 2.0], [9.0, 1.0, 0.5, 1.0, 9.0]) == pytest.approx(0.0)


def test_grid_values():
    np.testing.assert_array_equal(landscape.grid(2.0, 5), [-2.0, -1.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(landscape.grid(0.5, 2), [-0.5, 0.5])
    g = landscape.grid(1.5, 4)
    assert g.shape == (4,) and g[0] == -1.5 and g[-1] == 1.5 and 0.0 not in g
    np.testing.assert_allclose(np.diff(g), 1.0, rtol=1e-12)
    g = landscape.grid(3.0, 41)
    assert g[20] == 0.0 and np.allclose(g, -g[::-1], rtol=0, atol=1e-15)  # symmetric, 0 in the middle
    np.testing.assert_allclose(np.diff(g), 0.15, rtol=1e-12)


def test_nonconvex_fraction_on_analytic_surfaces():
    axis = np.linspace(-1, 1, 11)
    aa, bb = np.meshgrid(axis, axis)
    bowl = landscape.Surface(axis, axis, aa ** 2 + 2 * bb ** 2, np.zeros_like(aa))
    saddle = landscape.Surface(axis, axis, aa ** 2 - bb ** 2, np.zeros_like(aa))
    egg = landscape.Surface(axis, axis, np.cos(6 * aa) + np.cos(6 * bb), np.zeros_like(aa))
    assert landscape.nonconvex_fraction(bowl) == 0.0
    assert landscape.nonconvex_fraction(saddle) == 1.0
    # cos(6a)+cos(6b) is convex only where both cosines are negative (|6a|, |6b| in (π/2, 3π/2))
    exact = np.mean((np.cos(6 * aa[1:-1, 1:-1]) > 0) | (np.cos(6 * bb[1:-1, 1:-1]) > 0))
    assert landscape.nonconvex_fraction(egg) == pytest.approx(exact, abs=0.1)


@pytest.mark.parametrize("c,rel,expected", [(0.0, 0.05, 0.0), (3.0, 0.05, 0.0), (4.5, 0.05, 0.0),
                                            (4.5, 0.0, 1.0), (4.8, 0.05, 1.0), (5.0, 0.05, 1.0),
                                            (-5.0, 0.05, 1.0)])
def test_nonconvex_fraction_with_a_mixed_derivative(c, rel, expected):
    """f = α² + 4β² + c·αβ on a grid with different spacings in α (0.2) and β (2/3): Hessian
    [[2, c], [c, 8]], eigenvalues 5 ± √(9 + c²) (central differences are exact on a quadratic).
    c = 3: λ_min ≈ 0.76 > 0; c = 4.5: λ_min ≈ −0.41, inside the tolerance 0.05·λ_max ≈ 0.52
    (counted non-convex only with rel = 0); c = 4.8: λ_min ≈ −0.66 < −0.53."""
    alphas, betas = np.linspace(-1, 1, 11), np.linspace(-2, 2, 7)
    aa, bb = np.meshgrid(alphas, betas)
    surf = landscape.Surface(alphas, betas, aa ** 2 + 4 * bb ** 2 + c * aa * bb, np.zeros_like(aa))
    lam_min, lam_max = 5 - np.sqrt(9 + c * c), 5 + np.sqrt(9 + c * c)
    assert (lam_min < -rel * abs(lam_max)) == bool(expected)  # the hand classification
    assert landscape.nonconvex_fraction(surf, rel=rel) == expected


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: vmap cannot batch ``if tensor``."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return h if h.mean() > 0 else -h


class _ItemScaled(torch.nn.Module):
    """``.item()`` on a weight-dependent tensor."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return h / (1.0 + abs(h.detach().abs().max().item()))


class _MaskedMean(torch.nn.Module):
    """Boolean-mask indexing (an output whose shape depends on the values)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        return h - h[h > 0].sum() / h.numel()


@pytest.mark.parametrize("cls,reason", [(_Branchy, "data-dependent control flow"),
                                        (_ItemScaled, ".item()"),
                                        (_MaskedMean, "dynamic shape")])
def test_vmap_falls_back_to_the_loop_with_a_warning(cls, reason):
    torch.manual_seed(0)
    net = cls().eval()
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    w = params.weights(net)
    g = torch.Generator().manual_seed(1)
    d1, d2 = (directions.random(w, norm="none", generator=g) for _ in range(2))
    a, b = np.linspace(-1, 1, 3), np.linspace(-1, 1, 2)
    with pytest.warns(landscape.VmapFallbackWarning, match=rf"cannot batch {cls.__name__} .*") as rec:
        s = landscape.plane(net, w, d1, d2, a, b, x, y, strategy="vmap", chunk_size=4)
    assert len(rec) == 1 and reason in str(rec[0].message)
    assert rec[0].filename == __file__  # the warning points at the caller, not the library
    for j, bb in enumerate(b):
        for i, aa in enumerate(a):
            loss, acc = _manual(net, {k: w[k] + aa * d1[k] + bb * d2[k] for k in w}, x, y)
            assert s.loss[j, i] == pytest.approx(loss, rel=1e-6)
            assert s.acc[j, i] == pytest.approx(acc)


def test_vmap_does_not_hide_other_errors(problem):
    """A model error (inputs of the wrong width) is raised as it is, with no fallback."""
    net, w, d1, _, x, y = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error", landscape.VmapFallbackWarning)
        with pytest.raises(RuntimeError, match=r"size|shape"):  # bmm under vmap
            landscape.line(net, w, d1, [0.0, 1.0], x[:, :4], y, strategy="vmap")


def test_benchmark_plane_matches_the_plain_loop():
    """The benchmark's methods compute the same plane as a point-by-point reference written here
    (hand-built axis and Gaussian directions, not ``grid``/``directions.random``; its timings are
    in benchmarks/plane.py, not asserted in a unit test)."""
    spec = importlib.util.spec_from_file_location("bench", str(ROOT / "benchmarks" / "plane.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    net, center, _, _, _, x, y = bench.problem("cpu", n=3)
    x, y = x[:200], y[:200]
    g = torch.Generator().manual_seed(11)
    d1 = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in center.items()}
    d2 = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in center.items()}
    axis = np.array([-1.0, -0.4, 0.0, 0.3, 1.0])
    ref = np.empty((5, 5))
    for j, b in enumerate(axis):  # rows: β (d2), columns: α (d1)
        for i, a in enumerate(axis):
            m = copy.deepcopy(net)
            with torch.no_grad():
                for k, p in m.named_parameters():
                    p.copy_(center[k] + float(a) * d1[k] + float(b) * d2[k])
                ref[j, i] = F.cross_entropy(m(x), y).item()
    assert np.ptp(ref) > 0.1 and not np.allclose(ref, ref.T, rtol=1e-3)  # a transposition shows
    for mode in ("loop", "library", "vmap"):
        out = bench.run(mode, net, center, d1, d2, axis, x, y)
        np.testing.assert_allclose(out, ref, rtol=1e-4)


@pytest.mark.slow
def test_a_plane_sharded_over_two_gloo_ranks_equals_the_one_process_plane(tmp_path):
    """torchrun --nproc-per-node 2 (gloo): each rank evaluates its block of the grid, all_gather
    gives both ranks the whole plane, and it equals the plane computed here in one process."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc-per-node", "2", str(ROOT / "benchmarks" / "plane_distributed.py"),
        "--points", "9", "--repeats", "1", "--out", str(tmp_path / "planes.npz")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = np.load(tmp_path / "planes.npz")
    spec = importlib.util.spec_from_file_location("plane_bench", ROOT / "benchmarks" / "plane.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    net, center, d1, d2, axis, x, y = bench.problem("cpu", 9)
    here = landscape.plane(net, center, d1, d2, axis, axis, x, y)
    np.testing.assert_allclose(got["many_loss"], here.loss, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got["many_acc"], here.acc)
    assert "2 rank(s) (gloo)" in proc.stdout


def test_a_process_group_without_torch_distributed_is_an_error():
    net = models.MLP(3, (4,), 2)
    w = params.weights(net)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        landscape.line(net, w, w, [0.0, 1.0], torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                       group=object())


def test_nonconvex_fraction_is_a_lower_bound_of_the_full_hessian_test():
    """L(θ) = ½ θᵀ diag(1, 2, −3) θ has negative curvature everywhere (λ_min(∇²L) = −3), but a
    slice through the two positive axes is a convex bowl: the slice test sees 0. A slice that
    contains the negative axis, even through non-orthogonal, unnormalised directions, sees it
    at every point (a negative eigenvalue of Dᵀ∇²L D is one of ∇²L's directions)."""
    hess = np.diag([1.0, 2.0, -3.0])
    axis = np.linspace(-1, 1, 9)
    aa, bb = np.meshgrid(axis, axis)

    def slice_of(d1, d2):
        pts = aa[..., None] * np.asarray(d1) + bb[..., None] * np.asarray(d2)
        return landscape.Surface(axis, axis, 0.5 * np.einsum("...i,ij,...j->...", pts, hess, pts),
                                 np.zeros_like(aa))

    assert landscape.nonconvex_fraction(slice_of([1, 0, 0], [0, 1, 0])) == 0.0
    assert landscape.nonconvex_fraction(slice_of([1, 0, 0], [0, 0, 1])) == 1.0
    assert landscape.nonconvex_fraction(slice_of([2.0, 0.5, 0.0], [0.3, 0.0, 1.5])) == 1.0


def test_vmap_cannot_batch_reads_the_three_messages():
    yes = ["vmap: It looks like you're calling .item() on a Tensor",
           "Batching rule not implemented for aten::nonzero",
           "aten::foo does not yet have a batching rule"]
    for msg in yes:
        assert landscape._vmap_cannot_batch(RuntimeError(msg)), msg
    for err in [RuntimeError("mat1 and mat2 shapes cannot be multiplied (vmap: no)"),
                RuntimeError("batching rule not implemented"), ValueError("vmap: x"),
                RuntimeError("VMAP: x")]:
        assert not landscape._vmap_cannot_batch(err), err


def test_resolve_strategy_per_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert landscape.resolve_strategy("auto", cuda, "keep") == "vmap"
    assert landscape.resolve_strategy("auto", cpu, "keep") == "loop"
    assert landscape.resolve_strategy("vmap", cpu, "keep") == "vmap"
    assert landscape.resolve_strategy("loop", cuda, "keep") == "loop"
    assert landscape.resolve_strategy("auto", cuda, "recompute") == "loop"
    assert landscape.resolve_strategy("loop", cuda, "recompute") == "loop"
    with pytest.raises(ValueError) as err:
        landscape.resolve_strategy("vmap", cuda, "recompute")
    assert str(err.value) == ("bn='recompute' runs the model in train mode at every point and needs "
                              "strategy 'loop' (or 'auto')")


def test_grid_of_one_point_and_coefficients_as_floats(problem):
    np.testing.assert_array_equal(landscape.grid(2.0, 1), [-2.0])
    net, w, d1, d2, x, y = problem
    ln = landscape.line(net, w, d1, [[0, 1]], x, y)  # ints, nested: a flat float axis
    assert ln.alphas.dtype == np.float64 and ln.alphas.tolist() == [0.0, 1.0] and ln.loss.shape == (2,)
    s = landscape.plane(net, w, d1, d2, [0, 1], [-1, 0, 1], x, y)
    assert s.alphas.tolist() == [0.0, 1.0] and s.betas.tolist() == [-1.0, 0.0, 1.0]


def test_exact_error_messages(problem):
    net, w, d1, d2, x, y = problem
    cases = [
        (lambda: landscape.line(net, w, d1, [], x, y), "alphas is empty: a grid needs at least one point"),
        (lambda: landscape.line(net, w, d1, [0.0, np.inf], x, y), "alphas contains non-finite values"),
        (lambda: landscape.plane(net, w, d1, d2, [], [0.0], x, y), "alphas is empty: a grid needs at least one point"),
        (lambda: landscape.plane(net, w, d1, d2, [0.0], [], x, y), "betas is empty: a grid needs at least one point"),
        (lambda: landscape.plane(net, w, d1, d2, [0.0], [np.nan], x, y), "betas contains non-finite values"),
        (lambda: landscape.plane(net, w, d1, d2, [np.nan], [0.0], x, y), "alphas contains non-finite values"),
        (lambda: landscape.evaluate(net, w, [d1], np.zeros(3), x, y),
         "coeffs must have shape [points, 1], got (3,)"),
        (lambda: landscape.evaluate(net, w, [d1, d2], np.zeros((3, 1)), x, y),
         "coeffs must have shape [points, 2], got (3, 1)"),
        (lambda: landscape.evaluate(net, w, [d1], np.zeros((0, 1)), x, y),
         "no points to evaluate: a grid needs at least one point"),
        (lambda: landscape.line(net, w, d1, [0.0], x, y, bn="recompute"),
         "bn='recompute' needs bn_data (training inputs to re-estimate statistics)"),
        (lambda: landscape.states(net, [w], x, y, bn="recompute"),
         "bn='recompute' needs bn_data (training inputs to re-estimate statistics)"),
        (lambda: landscape.states(net, [w], x, y, bn="train"),
         "unknown bn mode 'train'; valid bn modes: keep, recompute"),
        (lambda: landscape.line(net, w, d1, [0.0], x, y, strategy="gpu"),
         "unknown strategy 'gpu'; valid strategies: auto, loop, vmap"),
        (lambda: landscape.line(net, w, d1, [0.0], x, y, group=object()),
         "a process group was given but torch.distributed is not initialised (call "
         "torch.distributed.init_process_group, e.g. under torchrun)"),
        (lambda: landscape.line(net, w, d1, [0.0], x, y, strategy="vmap", chunk_size=0),
         "chunk_size must be >= 1, got 0"),
        (lambda: landscape.max_rise([]), "empty path"),
        (lambda: landscape.is_monotone([1.0], tol=-1e-9), "tolerance must be non-negative, got -1e-09"),
        (lambda: landscape.barrier([0.0, 0.5, 1.0], [1.0, 2.0]),
         "barrier needs matching alphas and values with at least two points"),
        (lambda: landscape.barrier([0.0], [1.0]),
         "barrier needs matching alphas and values with at least two points"),
        (lambda: landscape.barrier([0.0, 0.5, 0.9], [1.0, 2.0, 1.0]),
         "barrier needs the endpoints α = 0 and α = 1 among the alphas"),
        (lambda: landscape.barrier([0.0, 0.5, 1.0 + 2e-9], [1.0, 2.0, 1.0]),
         "barrier needs the endpoints α = 0 and α = 1 among the alphas"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message, message
    nope = {f"nope{i}": torch.zeros(2) for i in range(6)}  # six bad keys: the message names five
    with pytest.raises(KeyError) as err:
        landscape.line(net, w, {**d1, **nope}, [0.0], x, y)
    assert err.value.args[0] == "direction has keys the centre lacks: ['nope0', 'nope1', 'nope2', 'nope3', 'nope4']"
    with pytest.raises(KeyError) as err:
        landscape.line(net, {**w, **nope}, d1, [0.0], x, y)
    assert err.value.args[0] == ("the centre has keys that are not parameters or buffers of the model: "
                                 "['nope0', 'nope1', 'nope2', 'nope3', 'nope4']; valid names include "
                                 "['fc1.weight', 'fc1.bias', 'bn1.weight', 'bn1.bias', 'fc2.weight']")
    bogus = {**w, "nope.weight": torch.zeros(2)}
    with pytest.raises(KeyError, match=r"the centre has keys that are not parameters or buffers of the "
                                       r"model: \['nope.weight'\]; valid names include \['fc1.weight', 'fc1.bias'"):
        landscape.line(net, bogus, d1, [0.0], x, y)


def test_shape_summaries_at_their_boundaries():
    assert landscape.max_rise([2.0]) == 0.0
    assert landscape.is_monotone([1.0, 1.0, 0.5], tol=0.0)  # equal steps are allowed at tol = 0
    assert landscape.is_monotone([1.0, 1.25], tol=0.25) and not landscape.is_monotone([1.0, 1.5], tol=0.25)
    assert landscape.is_monotone([1.0, 1.0009]) and not landscape.is_monotone([1.0, 1.0011])  # tol 1e-3
    assert landscape.barrier([0.0, 1.0], [1.0, 3.0]) == 0.0  # the two endpoints only
    # endpoints found within 1e-9 of 0 and 1
    assert landscape.barrier([1e-9, 0.5, 1.0], [1.0, 5.0, 1.0]) == pytest.approx(4.0, rel=1e-6)
    assert landscape.barrier([0.0, 0.5, 1.0 - 1e-9], [1.0, 5.0, 1.0]) == pytest.approx(4.0, rel=1e-6)
    axis = np.linspace(-1, 1, 3)
    aa, bb = np.meshgrid(axis, axis)
    # the smallest grid: one interior point
    assert landscape.nonconvex_fraction(landscape.Surface(axis, axis, aa ** 2 - bb ** 2, aa)) == 1.0
    for rows, cols in [(2, 3), (3, 2), (2, 2)]:
        with pytest.raises(ValueError, match="^non-convex fraction needs a grid of at least 3×3 points$"):
            landscape.nonconvex_fraction(landscape.Surface(np.linspace(-1, 1, cols), np.linspace(-1, 1, rows),
                                                           np.zeros((rows, cols)), np.zeros((rows, cols))))
    # α² alone: λ_min = 0 exactly, on the boundary of rel = 0 (not counted), counted below it
    axis = np.linspace(-1, 1, 5)
    aa, bb = np.meshgrid(axis, axis)
    valley = landscape.Surface(axis, axis, aa ** 2, aa)
    assert landscape.nonconvex_fraction(valley, rel=0.0) == 0.0
    assert landscape.nonconvex_fraction(valley, rel=-1e-6) == 1.0


def test_three_directions_and_the_line_and_plane_keep_their_axes(problem):
    """Three directions (the prefix sum then holds two), coefficients that revisit a prefix,
    and ones that are zero: every point equals the reference."""
    net, w, d1, d2, x, y = problem
    d3 = directions.random(w, generator=torch.Generator().manual_seed(7))
    coeffs = np.array([[0.5, -0.5, 0.3], [0.5, -0.5, 0.0], [0.5, 0.2, 0.3], [0.0, 0.2, 0.3],
                       [0.0, 0.0, 0.0], [0.5, -0.5, -1.0], [-1.0, -0.5, 0.3]])
    pts = landscape.evaluate(net, w, [d1, d2, d3], coeffs, x, y, strategy="loop")
    for p, (a, b, c) in enumerate(coeffs):
        loss, acc = _manual(net, {k: w[k] + a * d1[k] + b * d2[k] + c * d3[k] for k in w}, x, y)
        assert pts.loss[p] == pytest.approx(loss, rel=1e-5) and pts.acc[p] == pytest.approx(acc)
    ln = landscape.line(net, w, d1, [0.25, -0.5], x, y)
    np.testing.assert_array_equal(ln.alphas, [0.25, -0.5])
    s = landscape.plane(net, w, d1, d2, [0.25], [-0.5, 0.5], x, y,
                        loss_fn=lambda out, t: F.cross_entropy(out, t) * 0 + 1.5)
    np.testing.assert_array_equal(s.alphas, [0.25])
    np.testing.assert_array_equal(s.betas, [-0.5, 0.5])
    np.testing.assert_array_equal(s.loss, [[1.5], [1.5]])  # the keyword reached evaluate


def test_tied_weights_and_shared_buffers_given_by_a_state_dict():
    """A centre taken from ``state_dict`` names a weight shared by two layers (and a BatchNorm
    used twice) under both names: every name is a slot of the model, and the point equals
    ``load_state_dict`` of that dict."""
    torch.manual_seed(0)
    lin1, lin2, bn = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
    lin2.weight = lin1.weight
    net = torch.nn.Sequential(lin1, bn, torch.nn.Tanh(), lin2, bn).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
    x, y = torch.randn(30, 4), torch.randint(0, 4, (30,))
    center = {k: v.clone() for k, v in net.state_dict().items()}
    assert "3.weight" in center and "4.running_mean" in center
    # (an alias moved by two different directions would be ambiguous: only unshared names move)
    d = {k: torch.randn(v.shape) for k, v in center.items() if k in ("0.bias", "3.bias", "0.weight")}
    ln = landscape.line(net, center, d, [0.0, 0.5], x, y, strategy="loop")
    for i, a in enumerate([0.0, 0.5]):
        point = {k: v + a * d[k] if k in d else v for k, v in center.items()}
        point["3.weight"] = point["0.weight"]  # one tensor: it moves in both layers
        assert ln.loss[i] == pytest.approx(_manual(net, point, x, y)[0], rel=1e-6)
    assert ln.loss[1] != ln.loss[0]


@pytest.mark.parametrize("cls,reason", [(_Branchy, "data-dependent control flow"), (_MaskedMean, "dynamic shape")])
def test_vmap_strategy_runs_vmap_and_warns_when_it_falls_back(cls, reason):
    """The fallback is announced (the warning's origin is checked in the test above, which the
    mutation run deselects): so ``strategy='vmap'`` did try ``vmap``."""
    torch.manual_seed(0)
    net = cls().eval()
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    w = params.weights(net)
    d = directions.random(w, norm="none", generator=torch.Generator().manual_seed(1))
    pattern = rf"torch.func.vmap cannot batch {cls.__name__} \(.*\); evaluating point by point \(strategy='loop'\)"
    with pytest.warns(landscape.VmapFallbackWarning, match=pattern) as rec:
        ln = landscape.line(net, w, d, [0.0, 1.0], x, y, strategy="vmap")
    assert len(rec) == 1 and reason in str(rec[0].message)
    assert ln.loss[0] == pytest.approx(_manual(net, w, x, y)[0], rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", landscape.VmapFallbackWarning)
        landscape.line(net, w, d, [0.0, 1.0], x, y, strategy="loop")  # no vmap, no warning


def test_states_accuracy_by_hand_and_the_model_is_left_alone():
    # W = I: logits = x, predictions (0, 1, 0) for labels (0, 0, 0), accuracy 2/3; W = the swap:
    # predictions (1, 0, 1), accuracy 1/3
    net = torch.nn.Linear(2, 2, bias=False)
    w0 = net.weight.detach().clone()
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.zeros(3, dtype=torch.long)
    pts = landscape.states(net, [{"weight": torch.eye(2)}, {"weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}], x, y)
    assert isinstance(pts.acc, np.ndarray) and pts.acc.tolist() == pytest.approx([2 / 3, 1 / 3], rel=1e-6)
    np.testing.assert_allclose(pts.loss, [F.cross_entropy(x, y).item(), F.cross_entropy(x.flip(1), y).item()],
                               rtol=1e-6)
    assert torch.equal(net.weight.detach(), w0)  # evaluated on a deep copy


def test_states_recompute_re_estimates_bn_at_each_point(problem):
    net, w, d1, _, x, y = problem
    pts = [params.lerp(w, {k: w[k] + d1[k] for k in w}, t) for t in (0.0, 1.0)]
    got = landscape.states(net, pts, x, y, bn="recompute", bn_data=x[:20])
    want = [_manual(net, p, x, y, bn_data=x[:20]) for p in pts]
    np.testing.assert_allclose(got.loss, [lo for lo, _ in want], rtol=1e-5)
    np.testing.assert_allclose(got.acc, [a for _, a in want], rtol=1e-6)
    with pytest.raises(ValueError, match=r"^no points to evaluate: a path needs at least one point$"):
        landscape.states(net, [], x, y)


def test_vmap_with_chunks_of_one_and_a_direction_on_some_tensors(problem):
    net, w, d1, _, x, y = problem
    part = {k: v for k, v in d1.items() if k.endswith("weight")}  # biases left alone
    assert set(part) != set(w)
    vm = landscape.line(net, w, part, [0.0, 0.5, 1.0], x, y, strategy="vmap", chunk_size=1)
    for i, a in enumerate([0.0, 0.5, 1.0]):
        point = {k: v + a * part[k] if k in part else v for k, v in w.items()}
        lo, acc = _manual(net, point, x, y)
        assert vm.loss[i] == pytest.approx(lo, rel=1e-5) and vm.acc[i] == pytest.approx(acc)


def tied_net(n):
    """Linear–tanh–linear with the second weight tied to the first, its state_dict centre (which
    names the tied weight twice, ``0.weight`` and ``2.weight``) and ``n`` points."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    lin2.weight = lin1.weight
    net = torch.nn.Sequential(lin1, torch.nn.Tanh(), lin2).eval()
    x, y = torch.randn(n, 4), torch.randint(0, 4, (n,))
    return net, {k: v.clone() for k, v in net.state_dict().items()}, x, y


def test_vmap_on_a_tied_weight_named_twice_equals_the_loop():
    # the centre (a state_dict) names lin1's weight under both layers; the direction moves the
    # unshared biases only, so every strategy sees one unambiguous point
    net, center, x, y = tied_net(20)
    assert "2.weight" in center
    d = {k: torch.randn(center[k].shape) for k in ("0.bias", "2.bias")}
    vm = landscape.line(net, center, d, [0.0, 0.5], x, y, strategy="vmap")
    for i, a in enumerate([0.0, 0.5]):
        point = {k: v + a * d[k] if k in d else v for k, v in center.items()}
        assert vm.loss[i] == pytest.approx(_manual(net, point, x, y)[0], rel=1e-5)
    assert vm.loss[1] != vm.loss[0]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_tied_weight_moves_as_one_tensor_in_lines_and_planes(strategy):
    """lin2.weight is lin1.weight, named twice by the state_dict centre. One tensor, so a direction
    that names either alias moves it in both layers, and along a plane it moves by α·d1 + β·d2
    even when d1 and d2 name different aliases (the point is built by hand and loaded with
    ``load_state_dict``, both names set to the one value)."""
    net, center, x, y = tied_net(30)
    g = torch.Generator().manual_seed(1)
    d1 = {k: torch.randn(center[k].shape, generator=g) for k in ("0.weight", "0.bias")}
    d2 = {k: torch.randn(center[k].shape, generator=g) for k in ("2.weight", "2.bias")}
    kw = {"strategy": strategy}
    ln = landscape.line(net, center, d1, [0.0, 0.5, 1.0], x, y, **kw)
    sf = landscape.plane(net, center, d1, d2, [0.0, 0.5], [-0.5, 0.5], x, y, **kw)
    for i, a in enumerate([0.0, 0.5, 1.0]):
        point = dict(center, **{"0.bias": center["0.bias"] + a * d1["0.bias"]})
        point["0.weight"] = point["2.weight"] = center["0.weight"] + a * d1["0.weight"]
        assert ln.loss[i] == pytest.approx(_manual(net, point, x, y)[0], rel=1e-5)
    for j, b in enumerate([-0.5, 0.5]):
        for i, a in enumerate([0.0, 0.5]):
            point = dict(center, **{"0.bias": center["0.bias"] + a * d1["0.bias"],
                                    "2.bias": center["2.bias"] + b * d2["2.bias"]})
            point["0.weight"] = point["2.weight"] = (center["0.weight"] + a * d1["0.weight"]
                                                     + b * d2["2.weight"])
            assert sf.loss[j, i] == pytest.approx(_manual(net, point, x, y)[0], rel=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_state_dict_centre_with_integer_buffers(problem, strategy):
    # a centre taken from state_dict() holds BatchNorm's int64 num_batches_tracked: it is held as
    # it is at every point; the plane is the load_state_dict reference's
    net, w, d1, d2, x, y = problem
    center = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert any(not v.is_floating_point() for v in center.values())
    a, b = np.array([-0.5, 0.0, 1.0]), np.array([0.25, -1.0])
    s = landscape.plane(net, center, d1, d2, a, b, x, y, strategy=strategy)
    for j, bb in enumerate(b):
        for i, aa in enumerate(a):
            point = {k: (v + aa * d1[k] + bb * d2[k]) if k in d1 else v for k, v in center.items()}
            loss, acc = _manual(net, point, x, y)
            assert s.loss[j, i] == pytest.approx(loss, rel=1e-5)
            assert s.acc[j, i] == pytest.approx(acc)
    # a direction cannot move an integer tensor, in either strategy
    k = next(k for k, v in center.items() if not v.is_floating_point())
    with pytest.raises(ValueError, match=f"a direction moves '{k}', an integer tensor"):
        landscape.line(net, center, {**d1, k: torch.ones_like(center[k])}, [0.0, 1.0], x, y, strategy=strategy)
    # an all-zero entry for it moves nothing and is accepted
    zero = landscape.line(net, center, {**d1, k: torch.zeros_like(center[k])}, [1.0], x, y, strategy=strategy)
    moved = {kk: (v + d1[kk]) if kk in d1 else v for kk, v in center.items()}
    assert zero.loss[0] == pytest.approx(_manual(net, moved, x, y)[0], rel=1e-5)


def test_vmap_needs_a_floating_point_tensor_to_move(problem):
    net, _, _, _, x, y = problem
    center = {k: v for k, v in net.state_dict().items() if not v.is_floating_point()}
    with pytest.raises(ValueError, match=r"^the centre has no floating-point tensor to move$"):
        landscape.line(net, center, {}, [0.0], x, y, strategy="vmap")


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_direction_naming_both_aliases_moves_the_tied_weight_by_their_sum(strategy):
    # d names the tied weight as 0.weight (a) and as 2.weight (b): the shared tensor moves by a + b
    net, center, x, y = tied_net(20)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    ln = landscape.line(net, center, {"0.weight": a, "2.weight": b}, [1.0], x, y, strategy=strategy)
    point = {**center, "0.weight": center["0.weight"] + a + b, "2.weight": center["0.weight"] + a + b}
    assert ln.loss[0] == pytest.approx(_manual(net, point, x, y)[0], rel=1e-5)
