"""Classic baselines: the building blocks the field's standard descriptions name, on AV-Digits and Intents.

AV-Digits (image + speech, 10 digits): a VGG-11 image encoder (batch norm, channels 16-32-64-128-128 for 8x8
digits) and a bidirectional LSTM over 13 MFCCs with deltas and delta-deltas (39 per frame, CMVN), trained as
* `vgg`: image only; `lstm_mfcc`: audio only;
* `concat`: early fusion of the two encoders' features;
* `film`: serial fusion: the LSTM's speech features scale and shift every VGG conv's channels (FiLM);
* late fusion with classical classifiers: an SVM and a random forest per modality on the trained `vgg` and
  `lstm_mfcc` encoders' features, fused by probability averaging and by voting (`mmjax.evaluate.classical`).

Intents (text, 8 intents, held-out phrasings in test): a word-level tokenizer and Word2Vec (gensim, skip-gram) trained
on the training split's text, then a bidirectional LSTM classifier whose embedding table is initialised from those
vectors (`lstm_word2vec`, `train.init_from = {"encoders_text/embed": "word_vectors:..."}`) or at random
(`lstm_random`).

Command (needs gensim: `pip install -e ".[word2vec]"`; builds the datasets on first use; tiny run:
tests/test_experiments.py):

    python -m experiments.classic_baselines --workdir /tmp/classic

Writes WORKDIR/summary.md and summary.json (the table below), each model's run in WORKDIR/av_digits/<variant> and
WORKDIR/intents/<variant>, and WORKDIR/intents/word2vec/ (tokenizer.json, vectors.txt). Test split results (seed 0,
jax 0.10.2, 2 AMD EPYC cores shared with other jobs; 5 min 29 s wall-clock with the datasets already built;
Word2Vec covered 100% of the 438-word training vocabulary):

    | dataset | model (test) | accuracy | macro_f1 | roc_auc |
    |---|---|---|---|---|
    | AV-Digits | vgg | 0.7917 | 0.7919 | 0.9529 |
    | AV-Digits | lstm_mfcc | 0.7139 | 0.7163 | 0.9412 |
    | AV-Digits | concat | 0.8750 | 0.8751 | 0.9913 |
    | AV-Digits | film | 0.8000 | 0.8003 | 0.9696 |
    | AV-Digits | late svm average (vgg + lstm_mfcc features) | 0.8028 | 0.7981 | — |
    | AV-Digits | late svm vote (vgg + lstm_mfcc features) | 0.8028 | 0.7981 | — |
    | AV-Digits | late random forest average (vgg + lstm_mfcc features) | 0.8472 | 0.8453 | — |
    | AV-Digits | late random forest vote (vgg + lstm_mfcc features) | 0.8444 | 0.8428 | — |
    | Intents | lstm_word2vec | 0.8333 | 0.8338 | 0.9875 |
    | Intents | lstm_random | 0.7850 | 0.7916 | 0.9675 |

The modern models of experiments.av_digits (small CNN, spectrogram CNN: 0.8611 / 0.8611, early fusion 0.9639) and
experiments.text_intents (MiniLM 0.9883 frozen, a 2-layer transformer from scratch 0.7983) are in README "Classic
baselines".
"""

from __future__ import annotations

import json
import os

import ml_collections

from experiments import av_digits, text_intents
from mmjax import compare, experiment  # Light on purpose: the trainer (and JAX) are imported to run, after start-up.

METRICS = ("accuracy", "macro_f1", "roc_auc")
WORD2VEC_DIR = os.path.join("intents", "word2vec")  # Relative to the workdir: tokenizer.json, vectors.txt.


def get_config() -> ml_collections.ConfigDict:
    config = av_digits.get_config()  # Optimizer, schedule (600 steps of batch 64) and evaluation as av_digits.
    config.name = "classic_baselines"
    config.variants = ("vgg", "lstm_mfcc", "concat", "film")
    config.data.audio = dict(n_fft=256, hop_length=160, n_mels=40, features="mfcc", n_mfcc=13, deltas=2)
    config.model.encoders = dict(
        image=dict(name="vgg", depth=11, width=16, batch_norm=True, hidden=(128,), dropout=0.1),
        audio=dict(name="rnn", cell="lstm", hidden=64, bidirectional=True, pool="last", dropout=0.1),
    )
    config.film = dict(name="film", target="image", output="film")  # The `film` variant's fusion.
    config.classical = dict(classifiers=("svm", "random_forest"))  # Empty: no classical late fusion.
    config.intents = dict(
        variants=("lstm_word2vec", "lstm_random"),
        vocab_size=2000,  # Word-level tokenizer: the most frequent training words, the others [UNK].
        word2vec=dict(vector_size=100, window=5, epochs=30, min_count=1),
        encoder=dict(name="rnn", cell="lstm", hidden=128, bidirectional=True, pool="mean", dropout=0.2),
        num_steps=300,
        batch_size=32,
        lr=2e-3,
    )
    return config


AV_VARIANTS = {
    "vgg": compare.unimodal("image"),
    "lstm_mfcc": compare.unimodal("audio"),
    "concat": compare.fusion("concat"),
    "film": lambda config: compare.fusion(**config.film.to_dict())(config),
}


def intents_config(config: ml_collections.ConfigDict, tokenizer: str, vectors: str) -> ml_collections.ConfigDict:
    """The Intents runs' config: text_intents' data and evaluation with the word tokenizer and the LSTM."""
    from mmjax.data.tokenization import load_tokenizer

    text = text_intents.get_config()
    for key in ("scratch_encoder", "scratch_tokenizer", "variant_lr"):
        del text[key]
    options = config.intents
    text.name = f"{config.name}/intents"
    text.seed = config.seed
    text.variants = tuple(options.variants)
    text.data.update(data_dir=config.data.data_dir, tokenizer=tokenizer, batch_size=options.batch_size)
    encoder = dict(options.encoder.to_dict(), vocab_size=load_tokenizer(tokenizer).get_vocab_size(),
                   embed_dim=options.word2vec.vector_size)
    text.model.encoders = {"text": encoder}
    text.model.head = dict(name="classifier", hidden=(), dropout=0.1)
    text.train.update(num_steps=options.num_steps, frozen=(), init_from={})
    text.optimizer.lr = options.lr
    text.word_vectors = f"word_vectors:{vectors}"
    return text


def _with_word2vec(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.train.init_from = {"encoders_text/embed": config.word_vectors}
    return config


INTENTS_VARIANTS = {"lstm_word2vec": _with_word2vec, "lstm_random": lambda config: config}


def word_vectors(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
    """The word-level tokenizer and Word2Vec vectors trained on Intents' training text (kept when already there, so
    a resumed run uses the same ones): their paths."""
    from mmjax.data import intents
    from mmjax.data.core import build_on_process_zero
    from mmjax.data.tokenization import load_tokenizer, save_tokenizer, train_tokenizer
    from mmjax.nn.word_vectors import train_word2vec

    directory = os.path.join(os.path.abspath(workdir), WORD2VEC_DIR)
    tokenizer, vectors = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "vectors.txt")

    def build() -> tuple[str, str]:
        if not os.path.exists(vectors):
            builder = intents.build(config.data.data_dir or None)
            source = intents.TextSource(builder.as_data_source(split="train"))
            texts = [source[i]["text"] for i in range(len(source))]
            if not os.path.exists(tokenizer):
                save_tokenizer(train_tokenizer(texts, kind="word", vocab_size=config.intents.vocab_size), tokenizer)
            w2v = config.intents.word2vec
            train_word2vec(texts, load_tokenizer(tokenizer), vectors + ".partial", vector_size=w2v.vector_size,
                           window=w2v.window, epochs=w2v.epochs, min_count=w2v.min_count, seed=config.seed)
            os.replace(vectors + ".partial", vectors)
        return tokenizer, vectors

    return build_on_process_zero(build)


def classical_late_fusion(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """SVM / random forest per modality on the trained unimodal encoders' features, late-fused (test split)."""
    from mmjax.evaluate import classical
    from mmjax.evaluate.features import extract_features
    from mmjax.train.workdir import load_trained

    train, test, train_y, test_y = {}, {}, None, None
    for modality, variant in (("image", "vgg"), ("audio", "lstm_mfcc")):
        setup, state = load_trained(os.path.join(workdir, variant))
        features, train_y = extract_features(setup, state, config.data.train_split)
        train[modality] = features[modality]
        features, test_y = extract_features(setup, state, "test")
        test[modality] = features[modality]
    result = classical.classical_late_fusion(train, train_y, test, test_y, tuple(config.classical.classifiers),
                                             seed=config.seed, num_classes=config.model.num_classes)
    return {f"{kind}_{combine}": result[kind][combine] for kind in result for combine in ("average", "vote")}


def _cell(metrics: dict, name: str) -> str:
    return f"{metrics[name]:.4f}" if name in metrics else "—"


def results_table(rows: list[tuple[str, str, dict]]) -> str:
    """Markdown: one row per (dataset, model), the test metrics of METRICS."""
    lines = ["| dataset | model (test) | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    lines += [f"| {dataset} | {model} | " + " | ".join(_cell(m, k) for k in METRICS) + " |"
              for dataset, model, m in rows]
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str):
    from mmjax import reporting

    config = ml_collections.ConfigDict(config.to_dict())
    rows = []
    av_dir = os.path.join(workdir, "av_digits")
    av = ml_collections.ConfigDict(config.to_dict())
    for key in ("film", "classical", "intents"):
        del av[key]
    av.film = config.film
    result = compare.run_variants(av, av_dir, AV_VARIANTS, metrics=METRICS)
    if result.get("preempted"):
        return result
    rows += [("AV-Digits", name, r["splits"]["test"]) for name, r in result["variants"].items()]
    if config.classical.classifiers and {"vgg", "lstm_mfcc"} <= set(config.variants):
        for name, metrics in classical_late_fusion(config, av_dir).items():
            rows.append(("AV-Digits", f"late {name.replace('_', ' ')} (vgg + lstm_mfcc features)", metrics))
    if config.intents.variants:
        tokenizer, vectors = word_vectors(config, workdir)
        result = compare.run_variants(intents_config(config, tokenizer, vectors), os.path.join(workdir, "intents"),
                                      INTENTS_VARIANTS, metrics=METRICS)
        if result.get("preempted"):
            return result
        rows += [("Intents", name, r["splits"]["test"]) for name, r in result["variants"].items()]
    table = results_table(rows)
    reporting.console("\n" + table)
    if reporting.is_primary():
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump([{"dataset": d, "model": m, **{k: v for k, v in s.items() if isinstance(v, (int, float))}}
                       for d, m, s in rows], f, indent=2)
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    experiment.main(__name__)
