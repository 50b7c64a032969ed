import math

import pytest
import torch
import torch.nn.functional as F

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


def test_closure_optimizers_run_through_the_same_loop(blobs):
    net = _net()
    opt = TwoPass(net.parameters())
    train.fit(net, blobs, optimizer=opt, epochs=1, batch_size=50, progress=False)
    assert opt.calls == 2 * 3
    # with fresh batches each closure call consumes a batch: 3 batches -> 2 steps
    net = _net()
    opt = TwoPass(net.parameters(), fresh=True)
    h = train.fit(net, blobs, optimizer=opt, epochs=1, batch_size=50, progress=False)
    assert h["step"][-1] == 2


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
