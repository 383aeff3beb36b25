"""Pieces shared by mmjax's TFDS builders: array_record output, byte-identical rebuilds, build-once, split sizes."""

from __future__ import annotations

import sys
import time

import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.proto import tf_example_pb2


class CanonicalExampleWriter(tfds_writer.ExampleWriter):
    """Re-serialises every tf.Example with its feature map sorted by key, then writes.

    TFDS serialises with protobuf's default map order, which under the upb backend
    changes from process to process; sorting makes rebuilt files byte-identical.
    """

    def write(self, path, examples):
        return super().write(path, ((key, canonical_bytes(data)) for key, data in examples))


def canonical_bytes(serialized: bytes) -> bytes:
    example = tf_example_pb2.Example()
    example.ParseFromString(serialized)
    return example.SerializeToString(deterministic=True)


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: array_record by default (random access without TensorFlow), canonical writer."""

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

    def _example_writer(self) -> tfds_writer.ExampleWriter:
        """TFDS's writer with canonical serialisation, for byte-identical rebuilds."""
        return CanonicalExampleWriter(file_format=self.info.file_format)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Builds `builder`'s dataset unless it is already there (progress on stderr); returns the builder."""
    if builder.is_prepared():
        print(f"{builder.name}: already built at {builder.data_dir}", file=sys.stderr)
        return builder
    print(f"{builder.name}: building {builder.VERSION} into {builder.data_dir}", file=sys.stderr)
    start = time.perf_counter()
    builder.download_and_prepare()
    print(f"{builder.name}: built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return builder


def split_sizes(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
    """``{split: number of examples}`` of a prepared builder (a `Dataset`'s ``splits``)."""
    return {name: info.num_examples for name, info in builder.info.splits.items()}
