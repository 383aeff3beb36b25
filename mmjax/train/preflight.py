"""Checks made before a run does any work: its workdir and the TFDS data dir its dataset builds into are writable.

A read-only directory used to surface as a long traceback ending in `OSError: [Errno 30]` once the dataset build,
the config or the first checkpoint tried to write; here it stops the run at once with one line naming the
directory (`RunRefused`). Light on purpose (no JAX, TFDS only inside `check_data_dir`).
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile


class RunRefused(SystemExit):
    """A run refused before it did anything (a busy or read-only workdir, a step count below the saved one, ...).

    A `SystemExit` carrying its message, so that the command line prints that one line (exit status 1) instead of
    a traceback: the message already says what to do. Library callers catch it by this type.
    """

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message

    def __str__(self) -> str:
        return self.message


def _reason(error: OSError) -> str:
    code = errno.errorcode.get(error.errno, error.errno) if error.errno else "?"
    return f"{error.strerror or error} (errno {code})"


def _nearest_existing(path: str) -> str:
    """`path` itself, or its closest ancestor that exists (what a `makedirs(path)` would have to write into)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe(directory: str) -> OSError | None:
    """The error of creating a file in `directory`, or None when that works (an unnamed temporary file: nothing is
    left behind, even if the process is killed)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as error:
        return error


def check_workdir_writable(workdir: str) -> None:
    """Creates `workdir` if needed and checks that files can be written in it; `RunRefused` names it otherwise."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError:
        raise RunRefused(f"workdir {workdir} exists and is not a directory; give a directory for --workdir") from None
    except OSError as error:
        where = _nearest_existing(os.path.dirname(workdir))
        raise RunRefused(f"workdir {workdir} cannot be created: {where} is not writable ({_reason(error)}); "
                         "give a writable --workdir") from None
    if not os.path.isdir(workdir):
        raise RunRefused(f"workdir {workdir} exists and is not a directory; give a directory for --workdir")
    error = _probe(workdir)
    if error is not None:
        raise RunRefused(f"workdir {workdir} is not writable ({_reason(error)}); give a writable --workdir")


def _builder_of(name: str):
    """The TFDS builder class that dataset `name` builds on first use (defined in the dataset's own module), or None
    for datasets that only read (the `files` builds, catalog data prepared elsewhere, synthetic data)."""
    from mmjax.data import datasets  # noqa: F401  (registers every dataset)
    from mmjax.data.tfds_builder import OfflineBuilder
    from mmjax.registry import DATASETS

    if name not in DATASETS:
        return None  # Reported by `get_dataset`, with the closest name.
    module = sys.modules.get(getattr(DATASETS.get(name), "__module__", ""))
    for value in vars(module).values() if module else ():
        if isinstance(value, type) and issubclass(value, OfflineBuilder) and value.__module__ == module.__name__:
            return value
    return None


def _built(root: str, builder) -> bool:
    """Whether `root` holds a prepared copy of `builder`'s current version (TFDS: NAME[/CONFIG]/VERSION/)."""
    version = str(builder.VERSION)
    base = os.path.join(root, builder.name)
    candidates = [os.path.join(base, version)]
    if os.path.isdir(base):
        candidates += [os.path.join(base, sub, version) for sub in os.listdir(base)]
    return any(os.path.isfile(os.path.join(c, "dataset_info.json")) for c in candidates)


def check_data_dir(data_config) -> None:
    """The TFDS data dir (`data.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets) must be writable when
    the dataset is built there on first use and is not built yet; a read-only one that already holds it is fine
    (nothing is written there). `RunRefused` names the directory otherwise."""
    builder = _builder_of(data_config.get("name", ""))
    if builder is None:
        return
    from mmjax.data.catalog import data_root

    root = os.path.abspath(data_root(data_config.get("data_dir") or None))
    if _built(root, builder):
        return
    where = _nearest_existing(root)
    error = _probe(where) if os.path.isdir(where) else OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    if error is not None:
        shown = root if where == root else f"{root} (its nearest existing folder {where})"
        raise RunRefused(
            f"the TFDS data dir {shown} is not writable ({_reason(error)}), and dataset {builder.name!r} "
            f"{builder.VERSION} is not built there yet, so it cannot be built; set --config.data.data_dir (or "
            "$TFDS_DATA_DIR) to a writable folder, or to one that already holds it"
        )
