"""Preprocessing ops: each op's output, chains parsed from config strings, errors, seeded determinism, resumes."""

import dataclasses
import io
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from mmjax.data import audio_features, ops, pipeline
from mmjax.data.core import Dataset


def op(spec, context=None):
    """The single op of a one-op chain, bound (random or not)."""
    p = ops.plan(spec, context)
    return (p.prefix + p.suffix)[0]


def png(image, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------- image


def test_decode_png_jpeg_grey_and_arrays():
    np.testing.assert_array_equal(op("decode")(png(IMAGE)), IMAGE)  # PNG is lossless.
    grey = op("decode(channels=1)")(png(IMAGE))
    assert grey.shape == (6, 10, 1) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.fromarray(IMAGE).convert("L")))
    jpeg = op("decode")(png(IMAGE, "JPEG"))
    assert jpeg.shape == (6, 10, 3) and jpeg.dtype == np.uint8
    assert op("decode")(np.asarray(png(IMAGE), dtype=object)).shape == (6, 10, 3)  # TFDS's object scalar.
    assert op("decode")(IMAGE[..., 0]).shape == (6, 10, 3)  # A grey array is converted to RGB.
    np.testing.assert_array_equal(op("decode")(IMAGE), IMAGE)
    with pytest.raises(Exception, match="cannot identify image file"):
        op("decode")(b"not an image")


def test_resize_and_crops():
    constant = np.full((6, 10, 3), 77, np.uint8)
    out = op("resize(4)")(constant)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8 and np.all(out == 77)
    assert op("resize((3, 5))")(IMAGE).shape == (3, 5, 3)
    floats = op("resize(4)")(IMAGE.astype(np.float32) / 255)
    assert floats.shape == (4, 4, 3) and floats.dtype == np.float32
    assert op("resize_small(3)")(IMAGE).shape == (3, 5, 3)  # Aspect ratio kept.
    np.testing.assert_array_equal(op("center_crop(4)")(IMAGE), IMAGE[1:5, 3:7])
    padded = op("center_crop((8, 10), pad=1)")(IMAGE)
    assert padded.shape == (8, 10, 3) and np.all(padded[0] == 0) and np.array_equal(padded[1:7], IMAGE)
    crop = op("random_crop(4)")
    out = crop(IMAGE, np.random.default_rng(3))
    windows = [IMAGE[t : t + 4, c : c + 4] for t in range(3) for c in range(7)]
    assert any(np.array_equal(out, w) for w in windows)
    with pytest.raises(ValueError, match="smaller than the crop 8x8"):
        op("center_crop(8)")(IMAGE)
    inception = op("random_resized_crop(5)")
    assert inception(IMAGE, np.random.default_rng(0)).shape == (5, 5, 3)
    assert [o.name for o in inception.eval_ops()] == ["resize_small", "center_crop"]


def test_flips_normalize_and_randaugment():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(op("flip_lr(p=1.0)")(IMAGE, rng), IMAGE[:, ::-1])
    np.testing.assert_array_equal(op("flip_lr(p=0.0)")(IMAGE, rng), IMAGE)
    np.testing.assert_array_equal(op("flip_ud(p=1.0)")(IMAGE, rng), IMAGE[::-1])
    edges = op("normalize")(np.array([[[0, 255, 51]]], np.uint8))
    assert edges.dtype == np.float32
    np.testing.assert_allclose(edges, [[[-1.0, 1.0, -0.6]]], atol=1e-6)
    imagenet = op("normalize(mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 2.0))")(np.full((1, 1, 3), 255, np.uint8))
    np.testing.assert_allclose(imagenet, [[[1.0, 1.0, 0.5]]], atol=1e-6)
    with pytest.raises(ValueError, match="mean has 2 values but the input has shape"):
        op("normalize(mean=(0.5, 0.5))")(IMAGE)
    randaugment = op("randaugment(num_ops=3, magnitude=10)")
    outs = [randaugment(IMAGE, np.random.default_rng(s)) for s in range(6)]
    assert all(o.shape == IMAGE.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, IMAGE) for o in outs)
    np.testing.assert_array_equal(randaugment(IMAGE, np.random.default_rng(4)), outs[4])  # Seeded.
    np.testing.assert_array_equal(op("randaugment(num_ops=0)")(IMAGE, rng), IMAGE)
    assert op("randaugment")(IMAGE[..., :1], rng).shape == (6, 10, 1)
    with pytest.raises(ValueError, match="uint8 image of 1 or 3 channels"):
        randaugment(IMAGE.astype(np.float32), rng)


# ------------------------------------------------------------------------------------------------- audio


def _tone(hz, rate, seconds=0.5):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_resample_keeps_the_pitch_and_updates_the_sample_rate():
    chain = ops.plan("resample(16000)|log_mel(n_mels=8)", ops.Context(sample_rate=8000))
    resample, log_mel = chain.prefix
    assert resample.from_rate == 8000 and log_mel.sample_rate == 16000  # The context flows down the chain.
    out = resample(_tone(1000, 8000))
    assert out.dtype == np.float32 and out.shape == (8000,)
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / out.size - 1000) < 5
    assert op("resample(4000, from_rate=8000)")(_tone(1000, 8000)).shape == (2000,)
    with pytest.raises(ops.PreprocessError, match="input sample rate is unknown"):
        ops.plan("resample(16000)")


def test_crop_or_pad_and_random_crop_or_pad():
    wave = np.arange(1, 11, dtype=np.float32)
    np.testing.assert_array_equal(op("crop_or_pad(4)")(wave), [1, 2, 3, 4])
    np.testing.assert_array_equal(op("crop_or_pad(4, align='center')")(wave), [4, 5, 6, 7])
    np.testing.assert_array_equal(op("crop_or_pad(4, align='end')")(wave), [7, 8, 9, 10])
    np.testing.assert_array_equal(op("crop_or_pad(12, align='center')")(wave), [0, *range(1, 11), 0])
    random = op("random_crop_or_pad(4)")
    crops = {tuple(random(wave, np.random.default_rng(s)).astype(int).tolist()) for s in range(30)}
    assert len(crops) > 3 and all(c == tuple(range(c[0], c[0] + 4)) for c in crops)  # Contiguous windows.
    padded = random(wave[:2], np.random.default_rng(1))
    assert padded.shape == (4,) and sorted(padded[padded != 0].tolist()) == [1, 2]
    assert [(o.name, o.align) for o in random.eval_ops()] == [("crop_or_pad", "center")]


def test_log_mel_standardize_and_spec_augment():
    wave = _tone(440, 8000, 1.0)
    mel = op("log_mel(n_mels=20)", ops.Context(sample_rate=8000))(wave)
    # Defaults: 25 ms -> n_fft 256, hop 10 ms = 80 samples.
    expected = audio_features.log_mel_spectrogram(wave, 8000, n_fft=256, hop_length=80, n_mels=20)
    np.testing.assert_array_equal(mel, expected)
    assert mel.shape == (1 + (8000 - 256) // 80, 20) and mel.dtype == np.float32
    standard = op("standardize")(mel)
    assert abs(standard.mean()) < 1e-4 and abs(standard.std() - 1) < 1e-3
    augment = op("spec_augment(freq_masks=1, freq_width=5, time_masks=1, time_width=10, fill=-7.0)")
    before = standard.copy()
    masked = augment(standard, np.random.default_rng(2))
    np.testing.assert_array_equal(standard, before)  # The (possibly cached) input is not written.
    assert masked.shape == mel.shape
    full_rows = np.all(masked == -7.0, axis=1).sum()
    full_cols = np.all(masked == -7.0, axis=0).sum()
    assert 0 < full_rows + full_cols and full_rows <= 10 and full_cols <= 5
    assert np.array_equal(masked[masked != -7.0], standard[masked != -7.0])
    with pytest.raises(ops.PreprocessError, match="sample rate is unknown"):
        ops.plan("log_mel")


def test_mfcc_deltas_and_cmvn_ops():
    wave = _tone(440, 8000, 1.0) + 0.05 * np.random.default_rng(1).normal(size=8000).astype(np.float32)
    cepstra = op("mfcc(n_mels=20, n_mfcc=12, deltas=2, lifter=22)", ops.Context(sample_rate=8000))(wave)
    expected = audio_features.mfcc(wave, 8000, n_fft=256, hop_length=80, n_mels=20, n_mfcc=12, lifter=22)
    assert cepstra.shape == (1 + (8000 - 256) // 80, 36) and cepstra.dtype == np.float32
    np.testing.assert_array_equal(cepstra, audio_features.add_deltas(expected, 2))
    mel = op("log_mel(n_mels=20)", ops.Context(sample_rate=8000))(wave)
    np.testing.assert_array_equal(op("deltas(order=1, width=3)")(mel), audio_features.add_deltas(mel, 1, 3))
    normalised = op("cmvn")(cepstra)
    np.testing.assert_allclose(normalised.mean(0), 0, atol=1e-4)
    with pytest.raises(ops.PreprocessError, match=r"mfcc: n_mfcc=30 exceeds n_mels=20"):
        ops.plan("mfcc(n_mels=20, n_mfcc=30)", ops.Context(sample_rate=8000))
    with pytest.raises(ops.PreprocessError, match=r"mfcc: the sample rate is unknown here; give it as mfcc\("):
        ops.plan("mfcc")
    with pytest.raises(ValueError, match=r"deltas expects features \[frames, coefficients\]"):
        op("deltas")(wave)


# --------------------------------------------------------------------------------------------- text, label


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from mmjax.data.tokenization import save_tokenizer, train_tokenizer

    texts = ["a red circle", "a blue square to the left of a red circle", "two green crosses"] * 5
    return save_tokenizer(train_tokenizer(texts, vocab_size=100), str(tmp_path_factory.mktemp("tok")))


def test_tokenize_pads_truncates_and_uses_the_dataset_tokenizer(tokenizer_file):
    tokenize = op("tokenize(max_len=8)", ops.Context(tokenizer=tokenizer_file))
    ids = tokenize("a red circle")
    assert ids.dtype == np.int32 and ids.shape == (8,)
    assert ids[0] == 2 and ids[4] == 3 and np.all(ids[5:] == 0)  # [CLS] a red circle [SEP] [PAD]...
    np.testing.assert_array_equal(tokenize(b"a red circle"), ids)
    long = op("tokenize(max_len=4)", ops.Context(tokenizer=tokenizer_file))("a blue square to the left")
    assert long[0] == 2 and long[-1] == 3  # Truncated, the end token kept.
    assert tokenize(["a red circle", "two green crosses"]).shape == (2, 8)
    explicit = op(f"tokenize(max_len=8, tokenizer={tokenizer_file!r})")  # A path as a quoted argument.
    np.testing.assert_array_equal(explicit("a red circle"), ids)
    with pytest.raises(ops.PreprocessError, match="no tokenizer of its own"):
        ops.plan("tokenize")
    np.testing.assert_array_equal(op("pad_or_truncate(5)")(np.array([7, 8, 9])), [7, 8, 9, 0, 0])
    np.testing.assert_array_equal(op("pad_or_truncate(2, value=-1)")(np.array([7, 8, 9])), [7, 8])


def test_label_ops():
    np.testing.assert_array_equal(op("one_hot(4)")(2), [0, 0, 1, 0])
    assert op("one_hot(4)")(np.int64(1)).dtype == np.float32
    assert op("one_hot", ops.Context(num_classes=3))(0).shape == (3,)
    with pytest.raises(ValueError, match=r"class id 4 is outside \[0, 4\)"):
        op("one_hot(4)")(4)
    np.testing.assert_array_equal(op("multi_hot(4)")([0, 3]), [1, 0, 0, 1])
    np.testing.assert_array_equal(op("multi_hot(4)")([]), [0, 0, 0, 0])
    with pytest.raises(ops.PreprocessError, match=r"number of classes is unknown.*multi_hot\(NUM_CLASSES\)"):
        ops.plan("multi_hot")
    assert op("cast('int32')")(np.int64(3)).dtype == np.int32


# ------------------------------------------------------------------------------------------ parse, errors


def test_chain_from_a_config_string_is_split_into_deterministic_and_random_parts():
    p = ops.plan("decode|resize(40)|random_crop(32)|flip_lr|normalize")
    assert [o.name for o in p.prefix] == ["decode", "resize"]
    assert [o.name for o in p.suffix] == ["random_crop", "flip_lr", "normalize"]
    assert [o.name for o in p.eval_suffix] == ["center_crop", "normalize"]
    assert p.private_key == "_pre_augment/"  # The value before the random ops goes to augment.
    assert ops.plan("decode|normalize|flip_lr").private_key is None  # Evaluation keeps the value as it is.
    calls = ops.parse(" decode | tokenize(max_len=8, tokenizer='a|b.json') | resize((3, 4), method='nearest') ")
    assert [(c.name, c.args, dict(c.kwargs)) for c in calls] == [
        ("decode", (), {}), ("tokenize", (), {"max_len": 8, "tokenizer": "a|b.json"}),
        ("resize", ((3, 4),), {"method": "nearest"})]
    assert ops.parse("") == []


@pytest.mark.parametrize("spec, message", [
    ("decode|resise(32)", r"unknown preprocessing op 'resise'\. Did you mean 'resize'\? Valid names: .*center_crop"),
    ("resize", r"op 'resize': resize missing 1 required positional argument: 'size'; "
               r"signature: resize\(size, method='bilinear'\)"),
    ("flip_lr(q=1)", r"op 'flip_lr\(q=1\)': flip_lr got an unexpected keyword argument 'q'"),
    ("resize(-3)", r"op 'resize\(-3\)': resize: size must be a positive int, got -3"),
    ("resize(32, method='cubic')", r"op \"resize\(32, method='cubic'\)\": resize: method='cubic'; valid: nearest"),
    ("flip_lr(p=2)", r"op 'flip_lr\(p=2\)': flip_lr: p must be a probability in \[0, 1\], got 2"),
    ("resize(size)", r"op 'resize\(size\)': 'size' is not a literal; arguments must be Python literals"),
    ("resize(*[3])", r"op 'resize\(\*\[3\]\)': \* and \*\* are not allowed"),
    ("decode|resize(32", r"cannot parse 'decode\|resize\(32'.*was never closed"),
    ("decode|1", r"'1' is not an op"),
])
def test_errors_name_the_key_the_op_and_the_fix(spec, message):
    with pytest.raises(ops.PreprocessError, match=r"config data\.preprocess\['image'\]: " + message):
        ops.compose({"image": spec})


def test_an_op_that_fails_on_an_example_names_key_op_and_input():
    preprocess, _ = ops.compose({"image": "decode|center_crop(8)"})
    with pytest.raises(ops.PreprocessError, match=r"preprocess\['image'\]: op center_crop\(size=8\) failed on "
                                                  r"array of shape \(6, 10, 3\).*smaller than the crop"):
        preprocess({"image": png(IMAGE)})
    with pytest.raises(ops.PreprocessError, match=r"the example has no key 'image' \(keys: \['label'\]\)"):
        preprocess({"label": 1})


# ------------------------------------------------------------------------------ composition, determinism


CHAINS = {"image": "decode|resize(12)|random_crop(8)|flip_lr|normalize",
          "audio": "crop_or_pad(800)|log_mel(n_mels=8)|standardize|spec_augment(time_width=4, freq_width=2)",
          "label": "one_hot(3)"}
CONTEXT = {"audio": ops.Context(sample_rate=8000)}


def _examples(n=12, same=False):
    rng = np.random.default_rng(1)
    image, wave = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), rng.standard_normal(900).astype(np.float32)
    return [{"image": png(image if same else rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)),
             "audio": wave if same else rng.standard_normal(900).astype(np.float32),
             "label": i % 3, "id": i} for i in range(n)]


def test_composed_preprocess_and_augment_shapes_masks_and_pickling():
    preprocess, augment = ops.compose(CHAINS, CONTEXT, keep=("audio_mask",))
    example = _examples()[0]
    evaluated = preprocess(example)
    assert set(evaluated) == {"image", "audio", "label", "_pre_augment/image"}  # "id" is not kept.
    assert evaluated["image"].shape == (8, 8, 3) and evaluated["_pre_augment/image"].shape == (12, 12, 3)
    trained = augment(evaluated, np.random.default_rng(0))
    assert set(trained) == {"image", "audio", "label"}  # The private key is consumed.
    for key in trained:
        assert trained[key].shape == evaluated[key].shape and trained[key].dtype == evaluated[key].dtype, key
    # Pickled (as Grain workers get them), they compute the same.
    preprocess2, augment2 = pickle.loads(pickle.dumps((preprocess, augment)))
    again = augment2(preprocess2(example), np.random.default_rng(0))
    for key in trained:
        np.testing.assert_array_equal(again[key], trained[key])
    # A missing modality (mask 0): zeros of the same shape, in evaluation and training.
    absent = preprocess(example | {"audio_mask": np.float32(0.0)})
    assert absent["audio_mask"] == 0 and not absent["audio"].any() and absent["audio"].shape == (7, 8)
    assert not augment(absent, np.random.default_rng(0))["audio"].any()
    assert preprocess(example | {"audio_mask": np.float32(1.0)})["audio"].any()


def test_same_seed_and_index_same_augmentation_other_index_different():
    preprocess, augment = ops.compose(CHAINS, CONTEXT)
    examples = _examples(same=True)  # Identical examples: any difference comes from the augmentation.

    def stream(seed):
        return grain.MapDataset.source(examples).seed(seed).map(preprocess).random_map(augment)

    a, b, c = stream(7), stream(7), stream(8)
    for i in (0, 5):
        for key in ("image", "audio"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    assert not np.array_equal(a[0]["image"], a[5]["image"]) or not np.array_equal(a[0]["audio"], a[5]["audio"])
    assert not np.array_equal(a[3]["audio"], c[3]["audio"])


def _dataset(examples, preprocess, augment):
    return Dataset(name="ops_test", source=lambda split: examples, preprocess=preprocess, splits={"train": 12},
                   num_classes=3, modalities=("audio", "image"), augment=augment)


@pytest.mark.parametrize("cached", [False, True])
def test_resumed_pipeline_reproduces_the_augmented_batches(cached):
    preprocess, augment = ops.compose(CHAINS, CONTEXT, keep=())
    dataset = _dataset(_examples(), preprocess, augment)
    if cached:
        dataset = pipeline.cache_in_memory(dataset)
    iterator = iter(pipeline.train_dataset(dataset, "train", global_batch_size=4, seed=3))
    first = [next(iterator) for _ in range(4)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    resumed = iter(pipeline.train_dataset(dataset, "train", global_batch_size=4, seed=3))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert set(got) == {"image", "audio", "label"}
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Epoch 2 holds the same examples as epoch 1 but augmented anew.
    assert not np.array_equal(np.concatenate([b["image"] for b in first[:3]]),
                              np.concatenate([b["image"] for b in expected[-3:]]))


def test_evaluation_uses_the_deterministic_counterparts():
    preprocess, augment = ops.compose(CHAINS, CONTEXT)
    dataset = _dataset(_examples(), preprocess, augment)
    batch = next(pipeline.eval_batches(dataset, "train", global_batch_size=4))
    image = op("decode")(_examples()[0]["image"])
    centre = ops.plan("resize(12)|center_crop(8)|normalize").prefix
    expected = image
    for o in centre:
        expected = o(expected)
    np.testing.assert_allclose(batch["image"][0], expected, atol=1e-6)
    assert pipeline.input_spec(dataset, "train")["image"] == ((8, 8, 3), "float32")


def test_every_registered_op_is_a_frozen_dataclass_with_a_docstring():
    for name in ops.PREPROCESS_OPS.names():
        cls = ops.PREPROCESS_OPS.get(name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert cls.__doc__ and cls.name == name, name
