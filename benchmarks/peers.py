"""Benchmark: this library beside the tools a reader would pick instead, in one process.

Loss planes against loss-landscapes 3.0.6 (``planar_interpolation``, ``random_plane``) and
against the floor of any per-point method (a bare ``model(x)`` and loss per point, no weight
update at all); Hessian-vector products, the top eigenvalue, Hutchinson's trace and the top-5
eigenvalues against PyHessian 0.1. The model is the MNIST-1D MLP 40-100-100-10 (15,210
parameters) after a short SGD run, on 1,000 training points, one CPU thread.

Every case runs ``REPEATS`` times, interleaved round by round (one run of each case per round),
so that a slow spell of the machine hits all of them; best and median are printed, with the load
average before and after (the numbers are only as quiet as the machine). Before a ratio is
reported the compared numbers are checked to agree:

* the same two directions give the same plane (the peer's odd columns to ours, its even columns
  one β step on: ``planar_interpolation`` walks a serpentine and evaluates every even column one
  step off the grid, see below);
* the same 100 Rademacher probes give the same trace estimate;
* eigenvalues are compared with a reference (``eigsh`` at machine precision, a 40-vector basis),
  and each method's relative error is printed beside its time.

Notes on the peers (measured here, not taken from their documentation):

* loss-landscapes' ``planar_interpolation`` evaluates column ``i`` of an even index at
  ``β_{j+1}`` instead of ``β_j``, and with its default ``deepcopy_model=False`` it leaves the
  caller's model moved along both directions; it is run with ``deepcopy_model=True`` here (one
  deepcopy per call, part of its time). ``random_plane`` draws uniform, not Gaussian, directions.
  Neither computes the accuracy, which ``landscape.plane`` returns with the loss.
* The library's default loss where it only evaluates (``train.cross_entropy``) is
  ``F.cross_entropy`` computed as ``logsumexp − gather`` on a CPU below 16 classes, where torch's
  ``log_softmax`` kernel is a scalar loop; the peers are given ``F.cross_entropy``. Both are timed
  here: the plane and the HVP with ``loss_fn=F.cross_entropy`` show the share the loss makes, and
  the floor is timed with either loss.
* PyHessian's power iteration stops on the relative change of consecutive Rayleigh quotients,
  not on the error, so its ``tol=1e-6`` reaches about 1e-6 to 1e-5 relative error; its
  construction (one forward and a backward with ``create_graph=True``) is part of its time, as the
  first product (which builds the cached graph) is part of ours.

On a CUDA device (when present) the script also times the batched ``vmap`` plane against the
per-point loop and the HVP modes there.

    pip install -e .[bench]; python benchmarks/peers.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from landscape_lib import curvature as C
from landscape_lib import data, directions, landscape, models, train
from landscape_lib import params as P

STEPS = 41           # 41×41 planes
N_POINTS = 1000      # evaluation points
N_PROBES = 100       # Hutchinson probes
TOL = 1e-6           # eigenvalue tolerance (relative)


def _peers():
    try:
        import loss_landscapes
        import loss_landscapes.metrics
        import pyhessian
        import pyhessian.utils
    except ImportError as err:
        raise SystemExit(f"benchmarks/peers.py needs the peers: pip install -e .[bench] ({err})")
    return loss_landscapes, pyhessian


def trained_mlp(x, y, epochs=20):
    """The MLP after a short full-data SGD run (a trained network's Hessian: a separated top)."""
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(40,), n_classes=10, hidden=(100, 100))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for xb, yb in zip(x.split(100), y.split(100)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def interleaved(cases: dict, repeats: int, cpu: dict | None = None) -> dict[str, list[float]]:
    """Wall times per case (and, into ``cpu``, this process's CPU times: on a busy machine
    they are the steadier of the two)."""
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, f in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            times[k].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(k, []).append(time.process_time() - c0)
    return times


def plane_cases(ll, model, x, y, w, d1, d2):
    ax = landscape.grid(1.0, STEPS)
    h, R = float(ax[1] - ax[0]), float(ax[-1])

    def at(f):
        m = copy.deepcopy(model)
        P.load(m, {k: f(k) for k in w})
        return m

    start = at(lambda k: w[k] - R * d1[k] - R * d2[k])
    end1 = at(lambda k: w[k] - R * d1[k] - R * d2[k] + STEPS * h * d1[k])
    end2 = at(lambda k: w[k] - R * d1[k] - R * d2[k] + STEPS * h * d2[k])
    metric = ll.metrics.Loss(F.cross_entropy, x, y)

    @torch.no_grad()
    def floor():
        for _ in range(STEPS * STEPS):
            F.cross_entropy(model(x), y).item()

    @torch.no_grad()
    def floor_lib():
        for _ in range(STEPS * STEPS):
            train.cross_entropy(model(x), y).item()

    cases = {
        "plane: landscape.plane (loss + accuracy)": lambda: landscape.plane(model, w, d1, d2, ax, ax, x, y),
        "plane: loss-landscapes planar_interpolation": lambda: ll.planar_interpolation(
            start, end1, end2, metric, steps=STEPS, deepcopy_model=True),
        "plane: loss-landscapes random_plane": lambda: ll.random_plane(
            model, metric, distance=1.0, steps=STEPS, normalization="filter", deepcopy_model=True),
        "plane: floor, bare model(x) + loss per point": floor,
        "plane: landscape.plane, loss_fn=F.cross_entropy": lambda: landscape.plane(
            model, w, d1, d2, ax, ax, x, y, loss_fn=F.cross_entropy),
        "plane: floor with train.cross_entropy": floor_lib,
        "plane: landscape.plane, strategy vmap": lambda: landscape.plane(
            model, w, d1, d2, ax, ax, x, y, strategy="vmap"),
    }
    # the same plane, before any time is reported
    ours = landscape.plane(model, w, d1, d2, ax, ax, x, y).loss.T  # [α, β] like the peer
    theirs = cases["plane: loss-landscapes planar_interpolation"]()
    odd = np.abs(theirs[1::2] - ours[1::2]).max()
    even = np.abs(theirs[0::2, :-1] - ours[0::2, 1:]).max()
    scale = np.abs(ours).max()
    vm = np.abs(landscape.plane(model, w, d1, d2, ax, ax, x, y, strategy="vmap").loss.T - ours).max()
    checks = [f"plane vs planar_interpolation: odd columns {odd / scale:.1e}, even columns one β "
              f"step on {even / scale:.1e} (relative to the largest loss)",
              f"plane vmap vs loop: {vm / scale:.1e}"]
    assert max(odd, even) <= 1e-5 * scale, checks[0]
    assert vm <= 1e-4 * scale, checks[1]
    return cases, checks


def bn_plane_cases(x, y):
    """A BatchNorm MLP: planes with the running statistics kept, and re-estimated per point."""
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(40,), n_classes=10, hidden=(100, 100), norm="batch")
    model.train()
    with torch.no_grad():
        for xb in x.split(100):
            model(xb)
    model.eval()
    w = P.weights(model)
    g = torch.Generator().manual_seed(1)
    d1, d2 = directions.random(w, generator=g), directions.random(w, generator=g)
    ax = landscape.grid(1.0, 21)
    return {
        "BN plane 21×21: bn='keep'": lambda: landscape.plane(model, w, d1, d2, ax, ax, x, y),
        "BN plane 21×21: bn='recompute'": lambda: landscape.plane(
            model, w, d1, d2, ax, ax, x, y, bn="recompute", bn_data=x),
    }


def hessian_cases(ph, model, x, y):
    op = C.HVPOperator(model, x, y)
    n = op.n
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ref_hv = C.HVPOperator(model, x, y, mode="forward-over-reverse").mv(v)
    assert (op.mv(v) - ref_hv).norm() <= 1e-5 * ref_hv.norm()
    peer_model = copy.deepcopy(model)
    H = ph.hessian(peer_model, F.cross_entropy, data=(x, y), cuda=False)
    vs = [t.reshape(p.shape) for t, p in zip(P.from_vector(v, P.weights(model)).values(), H.params)]
    peer_hv = torch.cat([t.reshape(-1) for t in ph.utils.hessian_vector_product(H.gradsH, H.params, vs)])
    hv_err = float((peer_hv.double() - ref_hv).norm() / ref_hv.norm())
    assert hv_err <= 1e-5, hv_err

    ref = C.extremal_eigs(C.HVPOperator(model, x, y), k=5, tol=0.0, ncv=40).values[::-1]
    probes = [C._random_vector(n, "rademacher", g, torch.device("cpu"))
              for g in [torch.Generator().manual_seed(7)] for _ in range(N_PROBES)]
    errors: dict[str, float] = {}

    def lib_top():
        o = C.HVPOperator(model, x, y)
        r = C.lanczos(o, 100, tol=TOL, generator=torch.Generator().manual_seed(0))
        errors["top eigenvalue: lanczos, tol 1e-6"] = abs(r.ritz_values[-1] - ref[0]) / ref[0]
        errors["top eigenvalue: lanczos, tol 1e-6 (HVPs)"] = r.n_hvp

    def lib_eigsh():
        o = C.HVPOperator(model, x, y)
        r = C.extremal_eigs(o, k=1, tol=TOL)
        errors["top eigenvalue: eigsh, tol 1e-6"] = abs(r.values[-1] - ref[0]) / ref[0]
        errors["top eigenvalue: eigsh, tol 1e-6 (HVPs)"] = r.n_hvp

    def peer_top(top_n=1):
        torch.manual_seed(0)
        Hp = ph.hessian(copy.deepcopy(model), F.cross_entropy, data=(x, y), cuda=False)
        vals, _ = Hp.eigenvalues(maxIter=100, tol=TOL, top_n=top_n)
        key = "top eigenvalue: PyHessian, tol 1e-6" if top_n == 1 else "top-5: PyHessian, tol 1e-6"
        errors[key] = float(np.max(np.abs(np.sort(vals)[::-1] - ref[:top_n]) / ref[:top_n]))

    def lib_top5():
        o = C.HVPOperator(model, x, y)
        r = C.extremal_eigs(o, k=5, tol=TOL)
        errors["top-5: eigsh, tol 1e-6"] = float(np.max(np.abs(r.values[::-1] - ref) / ref))

    def lib_trace():
        o = C.HVPOperator(model, x, y)
        return sum(float(p.double() @ o.mv(p)) for p in probes) / len(probes)

    def peer_trace():
        Hp = ph.hessian(copy.deepcopy(model), F.cross_entropy, data=(x, y), cuda=False)
        names = list(P.weights(model))
        total = 0.0
        for p in probes:
            pv = [t.float() for t in P.from_vector(p.float(), P.weights(model)).values()]
            hv = ph.utils.hessian_vector_product(Hp.gradsH, Hp.params, pv)
            total += float(ph.utils.group_product(hv, pv))
        assert len(names) == len(Hp.params)
        return total / len(probes)

    t_lib, t_peer = lib_trace(), peer_trace()
    tr_err = abs(t_lib - t_peer) / abs(t_peer)
    assert tr_err <= 1e-5, (t_lib, t_peer)
    hv_peer = (H.gradsH, H.params, vs)
    op_torch_ce = C.HVPOperator(model, x, y, F.cross_entropy)
    cases = {
        "HVP ×20: HVPOperator.mv (auto)": lambda: [op.mv(v) for _ in range(20)],
        "HVP ×20: HVPOperator.mv, loss_fn=F.cross_entropy": lambda: [op_torch_ce.mv(v) for _ in range(20)],
        "HVP ×20: PyHessian hessian_vector_product": lambda: [
            ph.utils.hessian_vector_product(*hv_peer) for _ in range(20)],
        "top eigenvalue: lanczos, tol 1e-6": lib_top,
        "top eigenvalue: eigsh, tol 1e-6": lib_eigsh,
        "top eigenvalue: PyHessian, tol 1e-6": peer_top,
        "trace, 100 probes: HVPOperator": lib_trace,
        "trace, 100 probes: PyHessian": peer_trace,
        "top-5: eigsh, tol 1e-6": lib_top5,
        "top-5: PyHessian, tol 1e-6": lambda: peer_top(5),
    }
    checks = [f"HVP: auto mode {op.mode}, cached graph {op.cache_bytes / 2**20:.1f} MiB; PyHessian's "
              f"product vs ours {hv_err:.1e}", f"trace, same probes: {t_lib:.6g} vs {t_peer:.6g} "
              f"(relative difference {tr_err:.1e})", f"reference top-5: {np.round(ref, 6)}"]
    for mode in ("forward-over-reverse", "reverse-over-reverse"):
        o = C.HVPOperator(model, x, y, mode=mode)
        cases[f"HVP ×20: mode {mode}"] = lambda o=o: [o.mv(v) for _ in range(20)]
    return cases, checks, errors


RATIOS = [  # (what, ours, theirs, target: ours/theirs at most; None: shown, no target)
    ("plane vs loss-landscapes", "plane: landscape.plane (loss + accuracy)",
     "plane: loss-landscapes planar_interpolation", 1.0),
    ("plane vs the per-point floor", "plane: landscape.plane (loss + accuracy)",
     "plane: floor, bare model(x) + loss per point", 1.1),
    ("HVP vs PyHessian", "HVP ×20: HVPOperator.mv (auto)", "HVP ×20: PyHessian hessian_vector_product", 1.0),
    ("  same, both with F.cross_entropy", "HVP ×20: HVPOperator.mv, loss_fn=F.cross_entropy",
     "HVP ×20: PyHessian hessian_vector_product", None),
    ("  plane, F.cross_entropy, vs peer", "plane: landscape.plane, loss_fn=F.cross_entropy",
     "plane: loss-landscapes planar_interpolation", None),
    ("  plane vs floor, both our loss", "plane: landscape.plane (loss + accuracy)",
     "plane: floor with train.cross_entropy", None),
    ("top eigenvalue vs PyHessian", "top eigenvalue: lanczos, tol 1e-6", "top eigenvalue: PyHessian, tol 1e-6", 0.5),
    ("trace vs PyHessian", "trace, 100 probes: HVPOperator", "trace, 100 probes: PyHessian", 1.0),
    ("top-5 vs PyHessian", "top-5: eigsh, tol 1e-6", "top-5: PyHessian, tol 1e-6", 1.0),
]


def gpu_part(x, y, model, repeats):
    dev = torch.device("cuda")
    m = copy.deepcopy(model).to(dev)
    xg, yg = x.to(dev), y.to(dev)
    w = P.weights(m)
    g = torch.Generator().manual_seed(0)
    d1 = {k: t.to(dev) for k, t in directions.random({k: t.cpu() for k, t in w.items()}, generator=g).items()}
    d2 = {k: t.to(dev) for k, t in directions.random({k: t.cpu() for k, t in w.items()}, generator=g).items()}
    ax = landscape.grid(1.0, STEPS)

    def sync(f):
        def run():
            f()
            torch.cuda.synchronize()
        return run

    cases = {"GPU plane: vmap": sync(lambda: landscape.plane(m, w, d1, d2, ax, ax, xg, yg, strategy="vmap")),
             "GPU plane: loop": sync(lambda: landscape.plane(m, w, d1, d2, ax, ax, xg, yg, strategy="loop"))}
    v = torch.randn(sum(t.numel() for t in w.values()), device=dev)
    for mode in C.HVP_MODES[1:]:
        o = C.HVPOperator(m, xg, yg, mode=mode)
        cases[f"GPU HVP ×20: {mode}"] = sync(lambda o=o: [o.mv(v) for _ in range(20)])
    for f in cases.values():
        f()
    times = interleaved(cases, repeats)
    for k, t in times.items():
        print(f"{k:52s} best {min(t):8.4f} s  median {statistics.median(t):8.4f} s")
    ratio = min(times["GPU plane: loop"]) / min(times["GPU plane: vmap"])
    print(f"GPU: vmap plane is {ratio:.1f}× faster than the loop (target ≥ 10×): "
          f"{'ok' if ratio >= 10 else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ll, ph = _peers()
    torch.set_num_threads(1)
    ds = data.load("mnist1d")
    x, y = ds.train_subset(N_POINTS, seed=0)
    model = trained_mlp(ds.x_train, ds.y_train)
    w = P.weights(model)
    g = torch.Generator().manual_seed(0)
    d1, d2 = directions.random(w, generator=g), directions.random(w, generator=g)
    print(f"MLP 40-100-100-10 ({sum(t.numel() for t in w.values()):,} parameters), {N_POINTS} points, "
          f"{torch.get_num_threads()} thread, torch {torch.__version__}; load before "
          f"{os.getloadavg()[0]:.2f}")
    planes, checks_p = plane_cases(ll, model, x, y, w, d1, d2)
    hess, checks_h, errors = hessian_cases(ph, model, x, y)
    cases = {**planes, **bn_plane_cases(x, y), **hess}
    for f in cases.values():  # warm up
        f()
    cpu: dict[str, list[float]] = {}
    times = interleaved(cases, args.repeats, cpu)
    print("checks before timing:\n  " + "\n  ".join(checks_p + checks_h))
    print(f"\n{'case':52s} {'best':>9s} {'median':>10s} {'best CPU':>9s}  relative error")
    for k, t in times.items():
        err = errors.get(k)
        extra = "" if err is None else f"  {err:.1e}"
        if f"{k} (HVPs)" in errors:
            extra += f" ({errors[f'{k} (HVPs)']} HVPs)"
        print(f"{k:52s} {min(t):8.4f}s {statistics.median(t):9.4f}s {min(cpu[k]):8.4f}s{extra}")
    print(f"\n{'ratio of best times':34s} {'wall':>6s} {'CPU':>6s} {'target':>8s}")
    missed = 0
    for what, ours, theirs, target in RATIOS:
        r = min(times[ours]) / min(times[theirs])
        rc = min(cpu[ours]) / min(cpu[theirs])
        if target is None:  # shown for the reader, no target
            print(f"{what:34s} {r:6.2f} {rc:6.2f}")
            continue
        ok = r <= target
        missed += not ok
        print(f"{what:34s} {r:6.2f} {rc:6.2f} {'≤ ' + str(target):>8s}  {'ok' if ok else 'MISSED'} (wall)")
    print(f"load after {os.getloadavg()[0]:.2f}")
    if torch.cuda.is_available():
        gpu_part(x, y, model, args.repeats)
    else:
        print("no CUDA device: the GPU part (vmap plane vs loop, HVP modes on the GPU) did not run")
    raise SystemExit(1 if missed else 0)


if __name__ == "__main__":
    main()
