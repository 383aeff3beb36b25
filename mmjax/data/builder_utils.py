"""Pieces shared by mmjax's own TFDS builders."""

from __future__ import annotations

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
