"""`validate` on Keras sequence models: LSTM / GRU / SimpleRNN + MultiHeadAttention (causal)
+ LayerNormalization, Conv1D + pooling, and the added losses, against Keras' own float64
gradients; a wrong `tf.custom_gradient` inside them is caught at the right layers."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
layers = keras.layers

from graddiag.reference import validate  # noqa: E402
from graddiag.reference.importers.torch_fx import UnsupportedOpError  # noqa: E402
from graddiag.reference.validate import TOLERANCES  # noqa: E402

#: Engine float64 vs Keras float64 twin: the same math, summed in another order.
F64_RTOL = 1e-10
RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 5, 4)).astype("float32")
LABELS = np.array([0, 1, 2])
SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.custom_gradient
def wrong_square(x):
    return x * x, lambda g: 3 * g * x  # should be 2


class WrongSquare(layers.Layer):
    def call(self, x):
        return wrong_square(x)


def sequence_model(cell, custom=None, **cell_kwargs):
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 4))
    h = cell(8, return_sequences=True, name="rnn", **cell_kwargs)(inp)
    a = layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attn")(h, h, use_causal_mask=True)
    h = layers.LayerNormalization(name="norm")(layers.Add()([h, a]))
    if custom is not None:
        h = custom(h)
    h = layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, layers.Dense(3, name="head")(h))


def assert_clean(report):
    assert report.ok, [f.message for f in report.findings]
    assert {a.layer for a in report.layers} == {"rnn", "attn", "norm", "head"}
    for a in report.layers:
        assert a.max_rel_err_f64 is not None and a.max_rel_err_f64 <= F64_RTOL, a
        assert a.max_rel_err <= TOLERANCES["float32"], a


def test_lstm_with_causal_attention_and_layer_norm_validates_clean():
    report = validate(sequence_model(layers.LSTM), X, SPARSE_CE, LABELS)
    assert_clean(report)
    assert len(next(a for a in report.layers if a.layer == "attn").parameters) == 8


@pytest.mark.parametrize(
    ("cell", "kwargs"),
    [
        (layers.GRU, {}),
        (layers.GRU, {"reset_after": False}),
        (layers.SimpleRNN, {}),
    ],
    ids=["gru", "gru-reset-before", "simple-rnn"],
)
def test_other_recurrent_cells_validate_clean(cell, kwargs):
    assert_clean(validate(sequence_model(cell, **kwargs), X, SPARSE_CE, LABELS))


def test_wrong_custom_gradient_after_the_attention_is_caught_upstream_only():
    report = validate(sequence_model(layers.LSTM, WrongSquare()), X, SPARSE_CE, LABELS)
    errors = {f.layer for f in report.findings if f.severity == "error"}
    assert any("WrongSquare" in e for e in errors)
    assert {"rnn", "attn", "norm"} <= errors
    assert "head" not in errors


def test_conv1d_and_pooling_validate_clean():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 2))
    h = layers.Conv1D(3, 3, padding="same", activation="relu", name="conv_a")(inp)
    h = layers.AveragePooling1D(2)(layers.Conv1D(3, 2, strides=2, name="conv_b")(h))
    h = layers.GlobalMaxPooling1D()(layers.MaxPooling1D(1)(h))
    model = keras.Model(inp, layers.Dense(2, name="head")(h))
    x = RNG.standard_normal((4, 8, 2)).astype("float32")
    report = validate(model, x, "mae", RNG.standard_normal((4, 2)).astype("float32"))
    assert report.ok, [f.message for f in report.findings]
    assert all(a.max_rel_err_f64 <= F64_RTOL for a in report.layers)


def test_binary_crossentropy_from_logits_matches_keras():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    y = (RNG.random((5, 3)) > 0.5).astype("float32")
    x = RNG.standard_normal((5, 4)).astype("float32")
    report = validate(model, x, keras.losses.BinaryCrossentropy(from_logits=True), y)
    assert report.ok, [f.message for f in report.findings]
    assert report.loss == pytest.approx(report.framework_loss, rel=TOLERANCES["float32"])


def test_binary_crossentropy_on_probabilities_is_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="sigmoid")])
    with pytest.raises(UnsupportedOpError, match="from_logits=True"):
        validate(
            model, np.ones((2, 4), "float32"), "binary_crossentropy", np.ones((2, 3), "float32")
        )


def test_rnn_options_the_engine_does_not_replay_are_named():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 4))
    model = keras.Model(inp, layers.LSTM(3, go_backwards=True, name="back")(inp))
    with pytest.raises(UnsupportedOpError, match="`back`: go_backwards=True"):
        validate(model, X, "mse", np.ones((3, 3), "float32"))


def test_an_internal_error_while_replaying_names_the_layer(monkeypatch):
    from graddiag.reference.importers import keras as importer

    def broken(*args, **kwargs):
        raise IndexError("boom")

    monkeypatch.setitem(importer.LAYERS, "LayerNormalization", broken)
    with pytest.raises(UnsupportedOpError, match=r"layer `norm` \(LayerNormalization\).*boom"):
        validate(sequence_model(layers.LSTM), X, SPARSE_CE, LABELS)


def test_an_embedding_that_masks_is_named_not_silently_replayed_unmasked():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,), dtype="int32")
    h = layers.Embedding(7, 4, mask_zero=True, name="embed")(inp)
    model = keras.Model(inp, layers.Dense(2)(layers.LSTM(3)(h)))
    x = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 6, 1]], dtype="int32")
    with pytest.raises(UnsupportedOpError, match="`embed`: mask_zero=True"):
        validate(model, x, "mse", np.ones((2, 2), "float32"))
