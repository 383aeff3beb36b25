"""Experiments by name, loaded at run time: the one way the library reaches the `experiments` package.

An experiment is a module with `get_config()` and optionally `VARIANTS` (name -> config change, trained one after
the other), `METRICS` (the columns of their table), `PRESETS` (name -> overrides), `COMPILE_CACHE` (the default of
`--compile_cache`) and `run(config, workdir)` (by default: its variants through `compare.run_variants`, or one
`loop.run`). It is named `NAME`, `experiments.NAME` or by its file `path/to/NAME.py`, with `:PRESET` where a
preset is taken (`av_digits`, `experiments/clip_throughput.py:gpu`). Light on purpose: no JAX at import, as the
command line re-executes itself before JAX starts (`runtime.reexec_with_hugepages`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import ml_collections

from mmjax import cli

PACKAGE = "experiments"


class ExperimentError(ValueError):
    """An unknown experiment, file, variant or malformed experiment module; the message names it."""


def _package_dir() -> str:
    return os.path.abspath(importlib.import_module(PACKAGE).__path__[0])


def names() -> list[str]:
    """The experiments of the `experiments` package (its modules not starting with `_`), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules([_package_dir()]) if not m.name.startswith("_"))


def split(spec: str) -> tuple[str, str | None]:
    """`NAME:PRESET` -> (`NAME`, `PRESET`); `NAME` -> (`NAME`, None)."""
    target, _, preset = spec.partition(":")
    return target, preset or None


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _packaged(path: str) -> bool:
    """Whether the file `path` names a module of the package; `experiments/NAME.py` relative to another directory
    (not a file there) is still taken as that experiment."""
    directory = os.path.dirname(path)
    return directory == _package_dir() or (not os.path.exists(path) and os.path.basename(directory) == PACKAGE)


def resolve(target: str) -> str:
    """The name of a packaged experiment: `av_digits`, `experiments.av_digits` or `experiments/av_digits.py` ->
    `av_digits`; an unknown one, or a file outside the package, fails naming the experiments there."""
    name = target
    if _is_path(target):
        path = os.path.abspath(target)
        name = os.path.splitext(os.path.basename(path))[0]
        if not _packaged(path):
            raise ExperimentError(f"{target!r} is not an experiment module in {_package_dir()}; experiments: "
                                  + ", ".join(names()))
    elif name.startswith(PACKAGE + "."):
        name = name[len(PACKAGE) + 1:]
    if name not in names():
        raise ExperimentError(f"no experiment {name!r}; experiments: {', '.join(names())}")
    return name


def load(target: str) -> ModuleType:
    """The experiment module of `target` (a name, or a file: one outside the package is executed from there)."""
    if _is_path(target) and not _packaged(os.path.abspath(target)):
        if not os.path.isfile(target):
            raise ExperimentError(f"no file {target}")
        name = os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(f"{PACKAGE}.{resolve(target)}")
    if not callable(getattr(module, "get_config", None)):
        raise ExperimentError(f"{module.__name__} has no get_config()")
    return module


def config(
    module: ModuleType,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    variant: str | None = None,
) -> ml_collections.ConfigDict:
    """The config the experiment's command line resolves (the named preset, then `overrides`) and, with `variant`,
    that variant's config: what one of its runs trains."""
    config = cli.resolve_config(module.get_config, overrides, getattr(module, "PRESETS", None), preset)
    if variant is None:
        return config
    variants = getattr(module, "VARIANTS", None) or {}
    if variant not in variants:
        raise ExperimentError(f"unknown variant {variant!r} of {module.__name__}; valid: "
                              + (", ".join(variants) or "none (it defines no VARIANTS)"))
    return variants[variant](ml_collections.ConfigDict(config.to_dict()))


def runner(module: ModuleType) -> Callable[[ml_collections.ConfigDict, str], Any]:
    """The experiment's `run(config, workdir)`: its own, else its `VARIANTS` compared (`METRICS` columns), else one
    training run."""
    if callable(getattr(module, "run", None)):
        return module.run
    variants = getattr(module, "VARIANTS", None)

    def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
        if variants:
            from mmjax import compare

            return compare.run_variants(config, workdir, variants,
                                        metrics=getattr(module, "METRICS", compare.DEFAULT_METRICS))
        from mmjax.train import loop  # JAX only once running, after the CLI's re-exec (see cli.start).

        return loop.run(config, workdir)

    return run


def command(target: str, workdir: str, overrides: Sequence[str] = (), preset: str | None = None,
            python: str = sys.executable) -> list[str]:
    """The command line that runs a packaged experiment in a fresh process:
    `python -m experiments.NAME --workdir W [--preset P] --config.KEY=VALUE ...`."""
    preset_args = ["--preset", preset] if preset else []
    return [python, "-m", f"{PACKAGE}.{resolve(target)}", "--workdir", workdir, *preset_args,
            *(f"--config.{o}" for o in overrides)]


def main(module: ModuleType | str, argv: Sequence[str] | None = None) -> Any:
    """An experiment's command (`python -m experiments.NAME --workdir DIR ...`, see `cli.main`); an experiment ends
    with `if __name__ == "__main__": experiment.main(__name__)`."""
    if isinstance(module, str):
        module = sys.modules[module] if module in sys.modules else load(module)
    return cli.main(module.get_config, runner(module), argv, description=module.__doc__ or "",
                    presets=getattr(module, "PRESETS", None), compile_cache=getattr(module, "COMPILE_CACHE", False))
