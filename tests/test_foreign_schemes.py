"""Foreign gradient logs (plain `SummaryWriter` schemes) are mapped to layers by default."""

import math

import pytest
from typer.testing import CliRunner

from graddiag.analysis import analyze
from graddiag.cli import app
from graddiag.reader import read

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, list(args))


torch = pytest.importorskip("torch")
pytest.importorskip("tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

NAN_STEP = 3
#: Histograms store float64 sums of squares of float32 gradients: the norm matches closely.
HIST_RTOL = 1e-5


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = torch.nn.Linear(6, 8)
        self.linear2 = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.linear2(torch.relu(self.linear1(x)))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x):
        for b in self.encoder.layers:
            x = x + b(x)
        return self.head(x)


def train(logdir, steps=12, scalars="grad_norm/{}", hist=None, nan_layer=None, weights=False):
    """A real tiny training run logging its gradients with torch's `SummaryWriter`.

    Returns {step: {layer: true gradient norm}}."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = SummaryWriter(logdir)
    truth = {}
    for step in range(steps):
        x = torch.randn(32, 6)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if nan_layer is not None and step >= NAN_STEP:
            for n, p in model.named_parameters():
                if n == nan_layer + ".weight":
                    p.grad.view(-1)[0] = math.nan  # one NaN element
        sq = {}
        for n, p in model.named_parameters():
            layer = n.rsplit(".", 1)[0]
            sq[layer] = sq.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
            if scalars:
                w.add_scalar(scalars.format(n), p.grad.norm().item(), step)
            if hist:
                w.add_histogram(hist.format(n), p.grad, step)
            if weights:
                w.add_histogram(f"weights/{n}", p.detach(), step)
        w.add_scalar("loss", loss.item(), step)
        truth[step] = {k: math.sqrt(v) for k, v in sq.items()}
        if nan_layer is None:
            opt.step()
    w.close()
    return truth


LAYERS = {
    "encoder.layers.0.linear1",
    "encoder.layers.0.linear2",
    "encoder.layers.1.linear1",
    "encoder.layers.1.linear2",
    "head",
}


def test_grad_norm_scalars_with_a_nan_are_reported_at_the_right_step_and_layer(tmp_path):
    d = str(tmp_path)
    train(d, nan_layer="encoder.layers.1.linear2")
    report = analyze(d)
    (run,) = report.runs
    assert set(run.layers) == LAYERS
    nf = [f for f in report.findings if f.kind == "nonfinite"]
    assert nf and (nf[0].step, nf[0].layer) == (NAN_STEP, "encoder.layers.1.linear2")
    assert run.first_nonfinite() == {"step": NAN_STEP, "layer": "encoder.layers.1.linear2"}
    assert cli("analyze", d, "--fail-on", "error").exit_code == 1


def test_healthy_grad_norm_scalars_give_no_warnings(tmp_path):
    d = str(tmp_path)
    train(d)
    report = analyze(d)
    assert set(report.runs[0].layers) == LAYERS
    assert [f for f in report.findings if f.severity != "info"] == []
    assert cli("analyze", d, "--fail-on", "warning").exit_code == 0


def test_slashed_parameter_names_map_to_layers(tmp_path):
    d = str(tmp_path)
    train(d, scalars="grad_norm/{}", steps=3)
    df = read(d)
    assert set(df[df.stat == "grad_norm"].layer) == LAYERS


@pytest.mark.parametrize("scheme", ["{}.grad", "{}/grad", "gradients/{}"])
def test_gradient_histograms_give_the_true_layer_norms(tmp_path, scheme):
    d = str(tmp_path)
    truth = train(d, scalars=None, hist=scheme, weights=True)
    df = read(d)
    g = df[df.stat == "grad_norm"]
    assert set(g.layer) == LAYERS  # weights/<param> histograms are not gradients
    for row in g.itertuples():
        assert row.value == pytest.approx(truth[row.step][row.layer], rel=HIST_RTOL)


def test_a_parameter_logged_as_scalar_and_histogram_is_counted_once(tmp_path):
    d = str(tmp_path)
    truth = train(d, hist="{}.grad")
    g = read(d).query("stat == 'grad_norm'")
    for row in g.itertuples():
        assert row.value == pytest.approx(truth[row.step][row.layer], rel=HIST_RTOL)


def test_nan_gradient_histograms_are_nonfinite(tmp_path):
    d = str(tmp_path)
    train(d, scalars=None, hist="{}.grad", nan_layer="head")
    nf = [f for f in analyze(d).findings if f.kind == "nonfinite"]
    assert nf and (nf[0].step, nf[0].layer) == (NAN_STEP, "head")


def test_loss_and_weight_histograms_are_not_gradients(tmp_path):
    d = str(tmp_path)
    w = SummaryWriter(d)
    for step in range(5):
        w.add_scalar("loss", math.nan if step >= 2 else 1.0, step)
        w.add_histogram("weights/fc.weight", torch.randn(4, 4), step)
        w.add_scalar("train/loss", 1.0, step)
    w.close()
    assert cli("analyze", d).exit_code == 2  # no gradient tags: an input error, not an all-clear


def test_global_grad_norm_scalars_are_the_whole_model_norm(tmp_path):
    d = str(tmp_path)
    w = SummaryWriter(d)
    for step in range(3):
        w.add_scalar("train/grad_norm", 2.5, step)
        w.add_scalar("grad_norm/fc.weight", 1.5, step)
        w.add_scalar("grad_norm/fc.weight/max", 9.0, step)  # another statistic: kept as is
    w.close()
    df = read(d)
    g = df[df.stat == "grad_norm"]
    assert set(g.layer) == {"", "fc"}
    assert (g[g.layer == ""].value == 2.5).all() and (g[g.layer == "fc"].value == 1.5).all()
    assert "grad_norm/fc.weight/max" in set(df.stat)
