"""mmjax: multimodal models in JAX. `pip install -e .` (main) or `pip install -e ".[test]"` (with tests)."""

from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Multimodal encoders, fusion and data-parallel training in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmjax", "mmjax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Ranges that were tested: jax 0.10.2 on CPU here; GPU machines carry jax 0.11.x.
        "jax>=0.10.2,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        "array-record>=0.8,<0.9",
        "importlib_resources>=6,<8",  # tensorflow-datasets needs it to build datasets, but does not declare it.
        "grain>=0.2.18,<0.3",
        "einops>=0.8,<0.9",
        "ml_collections>=1.1,<1.2",
        "numpy>=2.0,<3",
        "scipy>=1.13,<2",
        "scikit-learn>=1.5,<2",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.9,<4",
        "pillow>=10,<14",  # Image decode/resize/RandAugment (mmjax.data.ops, build, catalog); 13.0 tested.
        "tqdm>=4.60,<5",  # Progress of python -m mmjax.data.build (also a TFDS dependency); 4.70 tested.
        "espeakng-loader>=0.2.4,<0.3",
        "tokenizers>=0.21,<0.24",
        "safetensors>=0.5,<0.9",
        "flatbuffers>=24.3,<26",  # jax.export serialization (python -m mmjax.export); 25.12.19 tested.
        "optuna>=5.1,<6",  # Parallel sweeps (mmjax.sweep.study) on a SQLite / SQLAlchemy study; 5.1.0 tested.
        "submitit>=1.5,<2",  # SLURM jobs with requeue on pre-emption (mmjax.launch); 1.5.4 tested.
        "sacrebleu>=2.4,<3",  # BLEU-4 of generated captions (mmjax.evaluate.captioning); 2.6.0 tested.
        "pycocoevalcap>=1.2,<1.3",  # CIDEr-D of generated captions (the COCO caption evaluation code); 1.2 tested.
        "jiwer>=4.0,<5",  # Word error rate of transcripts (mmjax.evaluate.transcription); 4.0.0 tested.
    ],
    extras_require={
        # -n auto: one worker per core; lint-imports checks the layers (.importlinter), ruff the style (ruff.toml).
        # gensim: the word-vector tests; python_speech_features: the reference MFCCs and deltas (tests only);
        # faiss-cpu: the approximate-search tests (the search extra).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "import-linter>=2.16,<3", "ruff>=0.17,<0.18",
                 "gensim>=4.4,<4.5", "python_speech_features>=0.6,<0.7", "faiss-cpu>=1.9,<1.16"],
        # Approximate nearest-neighbour search (python -m mmjax.search index --ann, query --ann, bench);
        # 1.15.1 tested (with numpy 2.4). Exact search needs nothing beyond jax.
        "search": ["faiss-cpu>=1.9,<1.16"],
        # Word2Vec training and word2vec/GloVe files (mmjax.nn.word_vectors, experiments.classic_baselines);
        # 4.4.0 tested (with numpy 2.4, scipy 1.17).
        "word2vec": ["gensim>=4.4,<4.5"],
        # Only to prepare or convert TFDS catalog data (`tfds build ...`, `tfds convert_format ...`, see
        # mmjax.data.catalog); training reads array_record without TensorFlow. Not installed or tested here.
        "tfrecord": [
            "tensorflow-cpu>=2.19,<3; sys_platform != 'darwin'",
            "tensorflow>=2.19,<3; sys_platform == 'darwin'",  # No tensorflow-cpu wheels for macOS.
        ],
    },
)
