"""`graddiag.validate` agrees with torch on the models of the diagnosis examples."""

import pytest

torch = pytest.importorskip("torch")

import graddiag  # noqa: E402


def _models():
    import frozen_detached
    import healthy
    import nan_layer
    import vanishing

    torch.manual_seed(0)
    return {
        "healthy": healthy.build(),
        "vanishing": vanishing.build(),
        "nan_layer": nan_layer.Net(),
        "frozen_detached": frozen_detached.Net(),
    }


@pytest.mark.parametrize("name", ["healthy", "vanishing", "nan_layer", "frozen_detached"])
def test_example_models_validate(name):
    model = _models()[name]
    torch.manual_seed(1)
    report = graddiag.validate(
        model, torch.randn(8, 16), torch.nn.functional.mse_loss, torch.randn(8, 1)
    )
    assert report.ok, report.findings
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {a.layer for a in report.layers} >= trainable - {"aux"}  # aux is never called
    assert report.loss == pytest.approx(report.framework_loss, rel=1e-5)
