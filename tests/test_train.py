import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from landscape_lib import config, data, models, train


@pytest.fixture
def blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return data.Dataset("blobs", x[:150], y[:150], x[150:], y[150:], 2)


def _net():
    return models.MLP(2, (16,), 2)


def test_fit_learns_and_records(blobs):
    config.seed_everything(0)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    h = train.fit(net, blobs, optimizer=opt, epochs=5, batch_size=32, progress=False)
    assert len(h) == 5 and h["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert h["step"][-1] == 5 * 5
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h.last("test_acc") > 0.9
    ev = train.evaluate(net, blobs.x_test, blobs.y_test)
    with torch.no_grad():
        logits = net.eval()(blobs.x_test)
    assert ev["loss"] == pytest.approx(F.cross_entropy(logits, blobs.y_test).item(), rel=1e-6)
    with pytest.raises(KeyError, match="recorded keys"):
        h["nope"]


def test_same_seed_same_weights(blobs):
    outs = []
    for _ in range(2):
        config.seed_everything(3)
        net = _net()
        train.fit(net, blobs, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), epochs=2, progress=False)
        outs.append(torch.nn.utils.parameters_to_vector(net.parameters()))
    assert torch.equal(outs[0], outs[1])


def test_divergence_is_detected_with_a_clear_message(blobs):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=1e30)
    with pytest.raises(train.Diverged, match=r"epoch 1, step \d+; SGD with lr=1e\+30"):
        train.fit(net, blobs, optimizer=opt, epochs=3, progress=False)


def test_sgdr_scheduler_stepped_with_fractional_epochs(blobs):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2)
    seen = []
    train.fit(net, blobs, optimizer=opt, epochs=3, batch_size=50, scheduler=sched,
              scheduler_step="fractional", progress=False,
              on_step=[lambda step, m, o: seen.append(o.param_groups[0]["lr"])])
    # step i of epoch e runs at fractional epoch t = e + i/3; cycles [0,1) and [1,3)
    expected = []
    for e in range(3):
        for i in range(3):
            t = e + i / 3
            t_cur, t_i = (t, 1.0) if t < 1 else (t - 1, 2.0)
            expected.append(0.05 * (1 + math.cos(math.pi * t_cur / t_i)))
    assert seen == pytest.approx(expected, rel=1e-6)


def test_callbacks_add_to_the_record_and_bad_arguments(blobs):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    h = train.fit(net, blobs, optimizer=opt, epochs=2, progress=False, eval_every=0,
                  callbacks=[lambda e, m: {"double": 2 * e}])
    assert h["double"].tolist() == [2, 4]
    assert "test_acc" not in h.records[0]
    with pytest.raises(ValueError, match="valid choices: batch, epoch, fractional"):
        train.fit(net, blobs, optimizer=opt, epochs=1, scheduler_step="step", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train.fit(net, blobs, optimizer=opt, epochs=1, batch_size=0, progress=False)


def test_continuing_a_run(blobs):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    h = train.fit(net, blobs, optimizer=opt, epochs=2, progress=False)
    train.fit(net, blobs, optimizer=opt, epochs=1, progress=False, start_epoch=2, history=h)
    assert h["epoch"].tolist() == [1, 2, 3] and h["step"].tolist() == [2, 4, 6]


# --- the step and sampler seams ---------------------------------------------------------------

class Recorder(torch.nn.Module):
    """Wraps a model and records every input batch it sees in train mode."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.inner(x)


def _noise_augment(x, generator):
    return x + torch.randn(x.shape, generator=generator)


def test_sgd_through_the_seam_equals_a_hand_written_loop(blobs):
    """fit with the default sampler and step is plain minibatch SGD: a randperm per epoch from
    the generator, batches in order, zero_grad/backward/step, the scheduler once per batch."""
    config.seed_everything(1)
    a = _net()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=4, gamma=0.5)
    h = train.fit(a, blobs, optimizer=opt_a, epochs=3, batch_size=40, scheduler=sched,
                  generator=torch.Generator().manual_seed(9), progress=False, eval_every=0)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=4, gamma=0.5)
    g = torch.Generator().manual_seed(9)
    losses = []
    for _ in range(3):
        order = torch.randperm(150, generator=g)
        epoch_losses = []
        for idx in order.split(40):
            opt_b.zero_grad()
            loss = F.cross_entropy(b(blobs.x_train[idx]), blobs.y_train[idx])
            loss.backward()
            opt_b.step()
            sched_b.step()
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
    assert torch.equal(parameters_to_vector(a.parameters()), parameters_to_vector(b.parameters()))
    assert h["train_loss"] == pytest.approx(losses, rel=1e-6)
    assert h["step"].tolist() == [4, 8, 12] and h["batches"].tolist() == [4, 8, 12]
    assert h["effective_epochs"].tolist() == [1.0, 2.0, 3.0]


class TwoPass(torch.optim.Optimizer):
    """A closure optimizer in the style of SAM: evaluates the closure twice per step."""

    def __init__(self, params, lr=0.1, fresh=False):
        super().__init__(params, dict(lr=lr))
        self.fresh_batch_per_closure = fresh
        self.calls = 0

    @torch.no_grad()
    def step(self, closure):
        with torch.enable_grad():
            closure()
            loss = closure()
        self.calls += 2
        for g in self.param_groups:
            for p in g["params"]:
                p.add_(p.grad, alpha=-g["lr"])
        return loss


def test_two_closure_calls_see_one_augmented_batch_and_keep_the_batch_order(blobs):
    def run(make_opt):
        config.seed_everything(0)
        net = Recorder(_net())
        h = train.fit(net, blobs, optimizer=make_opt(net.parameters()), epochs=2, batch_size=50,
                      augment=_noise_augment, generator=torch.Generator().manual_seed(4),
                      augment_generator=torch.Generator().manual_seed(5), progress=False)
        return net.seen, h

    seen_sgd, h_sgd = run(lambda ps: torch.optim.SGD(ps, lr=0.1))
    seen_two, h_two = run(lambda ps: TwoPass(ps))
    assert len(seen_sgd) == 6 and len(seen_two) == 12
    for k in range(6):
        # both closure calls of step k see the same augmented inputs ...
        assert torch.equal(seen_two[2 * k], seen_two[2 * k + 1])
        # ... and they are exactly the inputs SGD sees at step k (same order, same augmentation)
        assert torch.equal(seen_two[2 * k], seen_sgd[k])
    # the augmentation really is random, drawn per batch
    assert not torch.equal(seen_sgd[0], blobs.x_train[:50])
    assert h_two["grad_evals"].tolist() == [6, 12] and h_two["effective_epochs"].tolist() == [2.0, 4.0]
    assert h_two["step"].tolist() == h_sgd["step"].tolist() == [3, 6]


def test_fresh_batch_closures_never_reuse_a_batch_within_an_epoch(blobs):
    """An optimizer asking for a fresh batch at every closure call consumes the stream: within an
    epoch every training point is used exactly once; a step that runs past the epoch's end takes
    its batches from the next epoch's order, and the scheduler steps once per batch consumed."""
    class Indexed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.seen = _net(), []

        def forward(self, x):
            self.seen.append(x[:, 2].long().tolist())
            return self.inner(x[:, :2])

    x = torch.cat([blobs.x_train, torch.arange(150.0)[:, None]], 1)  # column 2: the point's index
    ds = data.Dataset("indexed", x, blobs.y_train, torch.zeros(1, 3), blobs.y_test[:1], 2)
    net = Indexed()
    opt = TwoPass(net.parameters(), fresh=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda b: 1.0 / (1 + b))
    lrs = []
    h = train.fit(net, ds, optimizer=opt, epochs=2, batch_size=30, scheduler=sched,
                  eval_every=0, progress=False,
                  on_step=[lambda step, m, o: lrs.append(o.param_groups[0]["lr"])])
    batches = net.seen  # 5 batches per epoch, 2 per step
    # epoch 1: steps use batches (1,2) (3,4) (5, first of epoch 2); epoch 2: (2,3) (4,5)
    assert h["step"].tolist() == [3, 5] and h["batches"].tolist() == [6, 10]
    epoch1 = [i for b in batches[:5] for i in b]
    epoch2 = [i for b in batches[5:10] for i in b]
    assert sorted(epoch1) == list(range(150)) and sorted(epoch2) == list(range(150))
    # the lr used by each step: the scheduler stepped once per batch consumed before it (2 each)
    assert lrs == pytest.approx([0.1, 0.1 / 3, 0.1 / 5, 0.1 / 7, 0.1 / 9])
    assert h["grad_evals"].tolist() == [6, 10]


def test_a_custom_step_sees_the_batch_and_counts_its_gradients(blobs):
    seen = []

    def step(ctx):
        seen.append((ctx.epoch, ctx.step, len(ctx.batch.x), ctx.batch.index.tolist()))
        loss = ctx.backward()
        ctx.backward(ctx.next_batch())  # an extra evaluation on a fresh batch
        ctx.optimizer.step()
        return loss

    net = _net()
    h = train.fit(net, blobs, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), epochs=1,
                  batch_size=75, step=step, generator=torch.Generator().manual_seed(0),
                  progress=False)
    order = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    assert seen == [(1, 1, 75, order[:75].tolist())]
    assert h.last("grad_evals") == 2 and h.last("batches") == 2
    with pytest.raises(TypeError, match="step must be a function"):
        train.fit(net, blobs, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), epochs=1,
                  step="sam", progress=False)


def test_every_param_groups_learning_rate_is_recorded(blobs):
    net = _net()
    groups = [{"params": net[0].parameters(), "lr": 0.1},
              {"params": [p for n, p in net.named_parameters() if not n.startswith("fc1")], "lr": 0.01}]
    opt = torch.optim.SGD(groups, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda b: 1.0, lambda b: 0.5 ** b])
    h = train.fit(net, blobs, optimizer=opt, epochs=2, batch_size=150, scheduler=sched,
                  progress=False)
    np.testing.assert_allclose(h["lrs"], [[0.1, 0.005], [0.1, 0.0025]], rtol=1e-12)
    assert h["lr"].tolist() == pytest.approx([0.1, 0.1])


def test_poisson_sampler_draws_independent_inclusions():
    s = train.Poisson(0.1)
    g = torch.Generator().manual_seed(0)
    assert s.batches_per_epoch(1000) == 10
    sizes = [len(b) for _ in range(50) for b in s.epoch(1000, g)]
    # Binomial(1000, 0.1): mean 100, sd 9.5; the mean of 500 draws has sd 0.42
    assert abs(np.mean(sizes) - 100) < 2.0
    assert 70 < np.std(sizes) ** 2 < 115
    batch = s.epoch(1000, g)[0]
    assert len(set(batch.tolist())) == len(batch)  # no point twice within a batch
    assert train.Poisson.expected(50, 1000).rate == pytest.approx(0.05)
    assert train.Poisson(0.3).batches_per_epoch(10) == 3
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"sampling rate must lie in \(0, 1\]"):
            train.Poisson(bad)
    with pytest.raises(ValueError, match="exceeds"):
        train.Poisson.expected(2000, 1000)


def test_samplers_plug_into_fit(blobs):
    net = _net()
    h = train.fit(net, blobs, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), epochs=2,
                  sampler=train.Poisson(0.25), progress=False, eval_every=0)
    assert h["step"].tolist() == [4, 8]
    g = torch.Generator().manual_seed(3)
    sub = train.RandomSubsets(20, 7).epoch(150, g)
    assert len(sub) == 7 and all(len(b) == 20 and len(set(b.tolist())) == 20 for b in sub)
    with pytest.raises(ValueError, match="batches"):
        train.RandomSubsets(20, 0)
    with pytest.raises(ValueError, match="batch_size"):
        train.Shuffled(0)


# --- forks -------------------------------------------------------------------------------------

def _continue(model, opt, gen, ds, epochs=2):
    train.fit(model, ds, optimizer=opt, epochs=epochs, batch_size=32, generator=gen,
              progress=False, eval_every=0)
    return parameters_to_vector(model.parameters()), [b.clone() for b in model.buffers()]


def test_fork_continues_exactly_like_the_original(blobs):
    config.seed_everything(2)
    net = models.MLP(2, (16, 16), 2, norm="batch")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(7)
    _continue(net, opt, gen, blobs, epochs=1)
    f = train.fork(net, opt, gen)
    # the copy's optimizer trains the copy's parameters, not the original's
    own = {id(p) for p in f.model.parameters()}
    assert all(id(p) in own for g in f.optimizer.param_groups for p in g["params"])
    assert all(id(p) in own for p in f.optimizer.state)
    assert len(f.optimizer.state) == len(opt.state) > 0
    # the momentum buffers are copies, not shared (``load_state_dict(opt.state_dict())`` shares
    # them: the hand-made branches of chapters 06 and 09 did, so each branch moved the other's)
    for p, q in zip(net.parameters(), f.model.parameters()):
        a, b = opt.state[p]["momentum_buffer"], f.optimizer.state[q]["momentum_buffer"]
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    w_a, b_a = _continue(net, opt, gen, blobs)
    w_b, b_b = _continue(f.model, f.optimizer, f.generator, blobs)
    assert torch.equal(w_a, w_b) and all(torch.equal(x, y) for x, y in zip(b_a, b_b))
    # and it is a copy: the original moved on without touching it before
    g = train.fork(net, opt)
    assert g.generator is None
    with torch.no_grad():
        next(g.model.parameters()).add_(1.0)
    assert not torch.equal(next(g.model.parameters()), next(net.parameters()))


def test_fork_copies_a_wrapping_optimizer_and_rejects_foreign_parameters(blobs):
    from landscape_lib import averaging

    net = _net()
    opt = averaging.IterateAveraging(torch.optim.Adam(net.parameters(), lr=1e-2), start_step=2)
    gen = torch.Generator().manual_seed(0)
    _continue(net, opt, gen, blobs, epochs=1)
    f = train.fork(net, opt, gen)
    _continue(net, opt, gen, blobs)
    _continue(f.model, f.optimizer, f.generator, blobs)
    assert torch.equal(parameters_to_vector(opt.averaged_copy(net).parameters()),
                       parameters_to_vector(f.optimizer.averaged_copy(f.model).parameters()))
    other = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not parameters of the model"):
        train.fork(net, torch.optim.SGD([other], lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        train.fork(net, "sgd")


def test_a_fork_made_after_a_scheduler_steps_only_its_own_parameters(blobs):
    """LR schedulers patch ``optimizer.step`` on the instance with a weak reference to it; a
    copied patch would make the fork's optimizer step the original's parameters."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    gen = torch.Generator().manual_seed(0)
    train.fit(net, blobs, optimizer=opt, epochs=1, batch_size=50, scheduler=sched, generator=gen,
              progress=False, eval_every=0)
    before = parameters_to_vector(net.parameters()).clone()
    lr_before = opt.param_groups[0]["lr"]
    f = train.fork(net, opt, gen)
    _continue(f.model, f.optimizer, f.generator, blobs, epochs=1)
    assert torch.equal(parameters_to_vector(net.parameters()), before)
    assert not torch.equal(parameters_to_vector(f.model.parameters()), before)
    # a scheduler for the fork works on the fork
    sched2 = torch.optim.lr_scheduler.StepLR(f.optimizer, step_size=1, gamma=0.5)
    lr = f.optimizer.param_groups[0]["lr"]
    f.optimizer.step()
    sched2.step()
    assert f.optimizer.param_groups[0]["lr"] == pytest.approx(lr / 2)
    assert opt.param_groups[0]["lr"] == lr_before


# --- cross_entropy: F.cross_entropy, faster for few classes on a CPU ------------------------

@pytest.mark.parametrize("classes", [2, 10, 15, 16, 40])
def test_cross_entropy_equals_torch_in_value_gradient_and_hessian(classes):
    g = torch.Generator().manual_seed(classes)
    z = torch.randn(64, classes, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, classes, (64,), generator=g)
    ref = F.cross_entropy(z, y)
    assert torch.allclose(train.cross_entropy(z, y), ref, rtol=1e-12, atol=0)
    # logits far from zero: the log-sum-exp is shifted, nothing overflows
    big = z + 1e4
    assert torch.allclose(train.cross_entropy(big, y), F.cross_entropy(big, y), rtol=1e-10)
    zs = z[:6].clone()
    gr = torch.func.grad(lambda t: train.cross_entropy(t, y[:6]))(zs)
    assert torch.allclose(gr, torch.func.grad(lambda t: F.cross_entropy(t, y[:6]))(zs), atol=1e-12)
    h = torch.func.hessian(lambda t: train.cross_entropy(t, y[:6]))(zs)
    assert torch.allclose(h, torch.func.hessian(lambda t: F.cross_entropy(t, y[:6]))(zs), atol=1e-12)


def test_cross_entropy_under_vmap_equals_a_loop_over_models():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 30, 10, generator=g)
    y = torch.randint(0, 10, (30,), generator=g)
    batched = torch.func.vmap(train.cross_entropy, in_dims=(0, None))(z, y)
    assert torch.allclose(batched, torch.stack([F.cross_entropy(zi, y) for zi in z]), atol=1e-6)


def test_cross_entropy_passes_other_targets_and_shapes_to_torch():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 10, generator=g)
    p = torch.softmax(torch.randn(8, 10, generator=g), 1)       # probability targets
    assert torch.equal(train.cross_entropy(z, p), F.cross_entropy(z, p))
    z3, y3 = torch.randn(4, 10, 7, generator=g), torch.randint(0, 10, (4, 7), generator=g)
    assert torch.equal(train.cross_entropy(z3, y3), F.cross_entropy(z3, y3))
    with pytest.raises(RuntimeError):
        train.cross_entropy(z, torch.full((8,), 10))             # class index out of range
