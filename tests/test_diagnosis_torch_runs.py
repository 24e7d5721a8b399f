"""Real (small, CPU) PyTorch runs: graddiag stays silent on healthy training of many kinds and, on
broken training, names the right kind, layer and step -- and `graddiag.analyze` of the logs agrees."""

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graddiag.analysis import analyze  # noqa: E402
from graddiag.clip import GlobalNormClip  # noqa: E402
from graddiag.torch import GradientMonitor  # noqa: E402


def loud(mon):
    """Warnings and errors (info findings such as `frozen` by requires_grad=False are fine)."""
    return [f for f in mon.findings if f.severity != "info"]


def of_kind(mon, kind):
    return [f for f in mon.findings if f.kind == kind]


def fit(model, opt, batch, loss_fn, steps, monitor=None, sched=None, **kw):
    """A plain loop with the monitor hooking `opt.step()`."""
    mon = monitor or GradientMonitor(model, opt, every=1, **kw)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(g, step)).backward()
        opt.step()
        if sched is not None:
            sched.step()
    mon.close()
    return mon


# ------------------------------------------------------------------------------ healthy runs
class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


@pytest.mark.slow
def test_healthy_resnet_with_batchnorm_and_sgd_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        ResBlock(8),
        ResBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    w = torch.randn(3 * 8 * 8, 4)

    def batch(g, _):
        x = torch.randn(32, 3, 8, 8, generator=g)
        return x, (x.flatten(1) @ w).argmax(1)

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = fit(model, opt, batch, lambda m, x, y: F.cross_entropy(m(x), y), 60)
    assert loud(mon) == []


class PreLNTransformer(nn.Module):
    def __init__(self, vocab=40, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 12, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, t):
        return self.head(self.norm(self.encoder(self.embed(t) + self.pos)))


def test_healthy_pre_ln_transformer_with_warmup_and_cosine():
    torch.manual_seed(0)
    model = PreLNTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps, warm = 80, 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
        ),
    )

    def batch(g, _):
        t = torch.randint(0, 40, (16, 13), generator=g)
        t[:, 1::2] = (t[:, ::2][:, :6] + 1) % 40  # learnable structure
        return t[:, :12], t[:, 1:]

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x).reshape(-1, 40), y.reshape(-1))

    mon = fit(model, opt, batch, loss_fn, steps, sched=sched)
    assert loud(mon) == []


class CharLSTM(nn.Module):
    def __init__(self, vocab=30, d=16, hidden=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, t):
        return self.head(self.lstm(self.embed(t))[0])


def lm_batch(g, _, vocab=30):
    t = torch.randint(0, vocab, (16, 21), generator=g)
    t[:, 1:] = torch.where(t[:, 1:] < 20, (t[:, :-1] * 7 + 3) % vocab, t[:, 1:])
    return t[:, :-1], t[:, 1:]


def lm_loss(m, x, y, vocab=30):
    return F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))


def test_healthy_lstm_with_clipping():
    torch.manual_seed(0)
    model = CharLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mon = fit(model, opt, lm_batch, lm_loss, 80, clip=GlobalNormClip(0.5))
    assert loud(mon) == []


def test_healthy_tiny_gan_one_monitor_per_model():
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    D = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    mon_g, mon_d = GradientMonitor(G, opt_g, every=1), GradientMonitor(D, opt_d, every=1)
    g = torch.Generator().manual_seed(0)
    bce = nn.functional.binary_cross_entropy_with_logits
    for _ in range(100):
        real = torch.randn(32, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])
        fake = G(torch.randn(32, 4, generator=g))
        opt_d.zero_grad()
        d_loss = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        bce(D(fake), torch.ones(32, 1)).backward()
        opt_g.step()
    mon_g.close()
    mon_d.close()
    assert loud(mon_g) == [] and loud(mon_d) == []


class VAE(nn.Module):
    def __init__(self, d=64, z=8):
        super().__init__()
        self.enc = nn.Linear(d, 32)
        self.mu, self.logvar = nn.Linear(32, z), nn.Linear(32, z)
        self.dec1, self.dec2 = nn.Linear(z, 32), nn.Linear(32, d)

    def forward(self, x):
        h = F.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        zz = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec2(F.relu(self.dec1(zz))), mu, logvar


def test_healthy_vae_with_sum_reduced_loss():
    """Sum reduction over a batch of 512 x 64 pixels: gradient norms in the thousands from step 0,
    which Adam does not care about (the old absolute `exploding` threshold fired at step 0)."""
    torch.manual_seed(0)
    model = VAE()
    protos = torch.rand(4, 64)

    def batch(g, _):
        i = torch.randint(0, 4, (512,), generator=g)
        return ((protos[i] + 0.1 * torch.rand(512, 64, generator=g)) > 0.5).float(), None

    def loss_fn(m, x, _):
        logits, mu, logvar = m(x)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        return rec - 0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp())

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = fit(model, opt, batch, loss_fn, 60)
    assert mon.history[0].global_norm > 1e3
    assert loud(mon) == []


def test_healthy_frozen_backbone_fine_tuning():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(32, 1))
    opt = torch.optim.Adam(model[1].parameters(), lr=1e-3)

    def batch(g, _):
        x = torch.randn(32, 16, generator=g)
        return x, x[:, :1]

    mon = fit(model, opt, batch, lambda m, x, y: F.mse_loss(m(x), y), 40)
    assert loud(mon) == []
    assert {f.kind for f in mon.findings} == {"frozen"}  # info: requires_grad=False


def test_healthy_weight_tying_and_a_large_embedding():
    """A tied LM head (the embedding matrix is used twice, counted once) over a 20k-token vocabulary
    of which a batch touches a few hundred rows."""
    torch.manual_seed(0)
    vocab, d = 20_000, 16

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.mix = nn.Linear(d, d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t):
            return self.head(torch.tanh(self.mix(self.embed(t))))

    model = TiedLM()

    def batch(g, _):
        t = torch.randint(0, 500, (8, 9), generator=g) * 37 % vocab
        return t[:, :-1], t[:, 1:]

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = fit(model, opt, batch, loss_fn, 30)
    assert loud(mon) == []


class TinyMoE(nn.Module):
    """Top-1 routing; `route` overrides the router with a given expert per sample."""

    def __init__(self, d=16, n=4):
        super().__init__()
        self.router = nn.Linear(d, n)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, d)) for _ in range(n)
        )
        self.head = nn.Linear(d, 1)

    def forward(self, x, route=None):
        p = self.router(x).softmax(-1)
        pick = p.argmax(-1) if route is None else route
        gate = p.gather(1, pick[:, None])
        out = torch.zeros_like(x)
        for i, e in enumerate(self.experts):
            sel = pick == i
            if sel.any():
                out[sel] = e(x[sel]) * gate[sel]
        return self.head(x + out)


def test_healthy_tiny_mixture_of_experts_top1():
    torch.manual_seed(0)
    model = TinyMoE()

    def batch(g, _):
        x = torch.randn(64, 16, generator=g)
        return x, x[:, :1] * x[:, 1:2]

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mon = fit(model, opt, batch, lambda m, x, y: F.mse_loss(m(x), y), 60)
    assert loud(mon) == []


# ------------------------------------------------------------------------------ broken runs
def deep_sigmoid(logdir=None, depth=10, steps=30):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(depth - 1):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def batch(g, _):
        x = torch.randn(64, 16, generator=g)
        return x, torch.sin(x[:, :1])

    return fit(model, opt, batch, lambda m, x, y: F.mse_loss(m(x), y), steps, logdir=logdir)


def test_deep_sigmoid_mlp_vanishing_on_the_right_layers():
    mon = deep_sigmoid()
    norms = torch.tensor([list(s.grad_norm) for s in mon.history]).median(0).values
    ratio = norms / norms.max()
    reported = {f.layer for f in of_kind(mon, "vanishing")}
    tiny = {mon.layers[i] for i in range(len(ratio)) if ratio[i] < 1e-4}
    learning = {mon.layers[i] for i in range(len(ratio)) if ratio[i] > 1e-2}
    assert len(tiny) >= 5 and tiny <= reported  # every layer under 1e-4 of the top
    assert not reported & learning
    assert {f.step for f in of_kind(mon, "vanishing")} == {9}
    assert {f.kind for f in loud(mon)} == {"vanishing"}


def lr_too_high(logdir=None, lr=1.0, steps=12):
    """An MLP trained with SGD + momentum and `monitor.step(loss)` (no optimizer hooking); 0.02
    trains it well, 1.0 is 50x that."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    mon = GradientMonitor(model, every=1, logdir=logdir)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        opt.zero_grad()
        loss = F.mse_loss(model(x), x[:, :4].sum(1, keepdim=True))
        loss.backward()
        mon.step(loss)
        opt.step()
    mon.close()
    return mon


def test_learning_rate_50x_too_high_is_found_in_the_first_steps():
    mon = lr_too_high()
    norm = [f for f in loud(mon) if f.kind in ("spike", "exploding")]
    assert norm and min(f.step for f in norm) <= 3
    (div,) = of_kind(mon, "divergence")
    assert div.step <= 3 and div.severity == "error"
    kinds = [f.kind for f in loud(mon)]
    assert len(kinds) == len(set(kinds))  # one finding per episode, not one per step
    assert loud(lr_too_high(lr=0.02, steps=40)) == []


def dead_relu(logdir=None, steps=30):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every unit of the second ReLU is dead
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(g, _):
        x = torch.randn(32, 16, generator=g)
        return x, x[:, :1]

    return fit(model, opt, batch, lambda m, x, y: F.mse_loss(m(x), y), steps, logdir=logdir)


def test_dead_relu_layer_is_dead_not_frozen_or_detached():
    mon = dead_relu()
    got = {(f.kind, f.layer, f.step) for f in loud(mon)}
    # '2' feeds the dead ReLU; '0' sits behind it, so its gradient is exactly zero too
    assert got == {("dead", "0", 19), ("dead", "2", 19)}


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(16, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(torch.relu(self.proj(torch.relu(self.enc(x)).detach())))


def detached_branch(logdir=None, steps=25):
    torch.manual_seed(0)
    model = Detached()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(g, _):
        x = torch.randn(32, 16, generator=g)
        return x, x[:, :1]

    return fit(model, opt, batch, lambda m, x, y: F.mse_loss(m(x), y), steps, logdir=logdir)


def test_detached_branch_names_the_cut_point():
    mon = detached_branch()
    (f,) = loud(mon)
    assert (f.kind, f.layer, f.step) == ("detached", "enc", 19)
    assert "stops at 'proj'" in f.message


def starved_expert(logdir=None, steps=60):
    """Samples of a rare category (3% of them) go to expert 3: most batches have none."""
    torch.manual_seed(0)
    model = TinyMoE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = GradientMonitor(model, opt, every=1, logdir=logdir)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 16, generator=g)
        rare = torch.rand(16, generator=g) < 0.03
        route = torch.where(rare, 3, torch.randint(0, 3, (16,), generator=g))
        opt.zero_grad()
        F.mse_loss(model(x, route), x[:, :1]).backward()
        opt.step()
    mon.close()
    return mon


def test_starved_expert_is_info_with_its_rate_not_detached():
    mon = starved_expert()
    assert loud(mon) == []
    starved = of_kind(mon, "starved")
    assert {f.layer for f in starved} == {"experts.3.0", "experts.3.2"}
    assert all(0.1 <= f.value < 0.95 and f.severity == "info" for f in starved)


def zero_every_other_step(logdir=None, steps=40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)

    def batch(g, step):
        x = torch.randn(32, 16, generator=g)
        return x, x[:, :1], float(step % 2)  # the loss is masked out on every other step

    def loss_fn(m, x, y, keep):
        return F.mse_loss(m(x), y) * keep

    return fit(model, opt, batch, loss_fn, steps, logdir=logdir)


def test_all_zero_gradient_every_other_step():
    mon = zero_every_other_step()
    (f,) = loud(mon)
    assert (f.kind, f.layer, f.step) == ("zero_gradient", None, 19)
    assert f.value == pytest.approx(0.5)


# ------------------------------------------------------------------------------ post hoc
@pytest.mark.parametrize(
    "make",
    [deep_sigmoid, lr_too_high, dead_relu, detached_branch, starved_expert, zero_every_other_step],
)
def test_posthoc_analysis_agrees_with_the_live_monitor(tmp_path, make):
    mon = make(logdir=str(tmp_path / "run"))
    assert mon.findings
    post = analyze(str(tmp_path)).findings

    def key(f):
        return (f.kind, f.layer, f.step, f.severity)

    assert sorted(map(key, post)) == sorted(map(key, mon.findings))
