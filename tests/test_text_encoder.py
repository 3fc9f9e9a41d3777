import socket
import sys

import numpy as np
import pytest

from synergen_core.config import TextEncoderConfig
from synergen_core.text_encoder import item_text, load_text_encoder


@pytest.fixture(scope="module")
def encoder():
    # any connection attempt during the load fails the test: the default encoder must work offline
    real_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("the text encoder tried to reach the network")

    socket.socket.connect = no_network
    try:
        yield load_text_encoder(TextEncoderConfig())
    finally:
        socket.socket.connect = real_connect


def test_wordllama_loads_offline_and_embeds_unit_rows(encoder):
    x = encoder.encode(["OPI nail lacquer, red", "argan oil shampoo", "x"])
    assert encoder.dim == 256
    assert x.shape == (3, 256) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 256)


def test_related_texts_are_closer_than_unrelated(encoder):
    a, b, c = encoder.encode(["red nail polish", "pink nail lacquer", "cordless hair dryer"])
    assert a @ b > a @ c + 0.1


def test_encoding_is_deterministic(encoder):
    texts = ["Maybelline mascara black", "Neutrogena sunscreen SPF 50"]
    again = load_text_encoder(TextEncoderConfig()).encode(texts)
    np.testing.assert_array_equal(encoder.encode(texts), encoder.encode(texts))
    np.testing.assert_array_equal(encoder.encode(texts), again)


def test_empty_text_embeds_to_zeros_not_nan(encoder):
    # an empty text has no tokens: its raw embedding is the zero vector, which normalizing must leave at
    # zero (0 / 0 would be NaN, and a NaN row poisons every dot product the index computes with it)
    x = encoder.encode(["", "argan oil shampoo", ""])
    assert x.shape == (3, encoder.dim) and x.dtype == np.float32
    assert not np.isnan(x).any()
    np.testing.assert_array_equal(x[[0, 2]], 0.0)
    # the zero rows are the empty texts only: a text beside them still embeds to a unit row
    assert np.linalg.norm(x[1]) == pytest.approx(1.0, abs=1e-5)


def test_sentence_transformers_branch_names_package_and_path(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails whether installed or not
    model_dir = tmp_path / "all-MiniLM-L6-v2"
    with pytest.raises(ImportError) as e:
        load_text_encoder(TextEncoderConfig(kind="sentence_transformers", path=model_dir))
    assert "sentence-transformers" in str(e.value) and str(model_dir) in str(e.value)


def test_sentence_transformers_needs_a_path():
    with pytest.raises(ValueError, match="text_encoder.path"):
        load_text_encoder(TextEncoderConfig(kind="sentence_transformers"))


def test_item_text_is_deterministic_and_skips_missing_fields():
    text = item_text(
        title="  OPI  Nail\tLacquer ", categories=[["Beauty", "Nails"], ["Beauty", "Polish"]],
        description="A long description " * 10, brand=float("nan"), max_description_chars=20,
    )
    assert text == "OPI Nail Lacquer. Categories: Beauty, Nails, Polish. A long description A"
    assert item_text(brand="OPI", categories="Nails") == "Brand: OPI. Categories: Nails"
    assert item_text(title="x", description="long", max_description_chars=0) == "x"
    assert item_text() == ""
    assert item_text(title=123, categories=np.array(["a", "a", None], dtype=object)) == "123. Categories: a"
