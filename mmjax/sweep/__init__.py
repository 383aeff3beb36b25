"""Hyper-parameter sweeps over any experiment: a grid (or a random search), one workdir per trial, a leaderboard.

Command:

    python -m mmjax.sweep --base av_digits --workdir /tmp/sweep \\
        --grid 'optimizer.lr=[1e-3,3e-4]' --grid 'model.modality_dropout=[0.0,0.2]' \\
        [--random N [--seed S]] [--metric SPLIT/NAME] [--mode max|min] [--dry_run] [--compile_cache]
        [--preset NAME] [--config.KEY=VALUE ...]

- `--base`: an experiment module name (`av_digits`) or its file (`experiments/av_digits.py`).
- `--grid 'KEY=[v1,v2,...]'` (repeatable): the trials are the Cartesian product of all grids, in the order given
  (the last grid varies fastest). Each value is parsed to the key's type exactly as `--config.KEY=value` is, so an
  unknown key or a wrong value stops before anything trains. Values holding commas go in quotes or brackets:
  `--grid "model.encoders.audio.features=[(16,32),(32,64)]"`, `--grid "variants=['early,late','image']"`; a
  group is replaced whole by dict literals: `--grid "model.encoders.image=[{'name':'small_cnn'},{'name':'vit'}]"`.
  A base experiment's variants may set swept keys themselves (av_digits' variants set `model.fusion`, the
  image/audio ones drop an encoder): the sweep warns, and records in sweep.json, when a run's saved config.json
  holds another value than the trial's.
- `--random N` (with `--seed S`, default 0): N trials sampled instead of the product. A grid may then also be a
  distribution: `loguniform(a,b)` or `uniform(a,b)` (float keys; samples rounded to 4 significant digits),
  `randint(a,b)` (int keys; a and b included). `choice(v1,v2,...)` is the same as `[v1,v2,...]`. With only lists,
  N distinct combinations are drawn. Without `--random` a distribution is an error.
- `--config.KEY=VALUE`: fixed overrides applied to every trial (before the grid's), e.g. shorter runs;
  `--preset NAME`: a named preset of the base experiment (its `PRESETS`), applied before them.
- `--metric SPLIT/NAME`, `--mode max|min`: what ranks the trials. Default: the base config's
  `checkpoint.best_metric` and `checkpoint.best_mode` (`validation/accuracy`, max, for av_digits): choose
  hyper-parameters on validation, not test; the leaderboard shows the test value next to it. Without a default
  mode, names like loss/mae/rmse/mse are minimised and the others maximised.
- `--dry_run`: print the trials and exit.
- `--compile_cache`: JAX's persistent compilation cache in `WORKDIR/jax_cache`. Only the programs that a swept
  value changes (e.g. the train step, for the learning rate) are compiled again: tiny AV-Digits trials took 26, 11
  and 8 s instead of ~20 s each (2 shared CPU cores), with identical results.

Each trial runs, one after the other in this process, through the base experiment's run (its own
`run(config, workdir)`, or its variants one after the other; see `mmjax.experiment`) in
`WORKDIR/trial_NNN_<key>=<value>...`. Writes:

- `WORKDIR/sweep.json`: the sweep definition (base, grids, random/seed, fixed overrides), each trial's overrides,
  status and result summary (scalar metrics per split for each variant), and the ranked leaderboard;
- `WORKDIR/leaderboard.md` and `leaderboard.csv` (after every trial, and printed at the end): one row per trial x
  variant (a `run` returning `{"variants": {...}}`, like av_digits or text_intents, gives a row per variant; a
  plain loop.run result one row; av_digits_tasks `task/variant` rows), best first: rank, trial, variant, the swept
  values, the metric, the other scalar metrics of its split, the metric on the other splits, step time;
- `WORKDIR/leaderboard.png`: the metric against the swept value when one numeric key is swept (log x for ranges
  spanning 10x or more), otherwise a bar chart of the rows.

Re-running the same command resumes: finished trials are read back from sweep.json (not trained again; delete
a trial's workdir to re-run it), an interrupted trial resumes from its checkpoints, the others run. A different
definition on the same workdir is refused with the differences (nothing is touched); `--metric` and `--mode`
may change, which only re-ranks. SIGTERM/SIGINT during a trial saves its checkpoint and exits with status 75.
fusion_benchmark cannot be swept (its result is a methods x seeds table, not per-split metrics).

Example: a short (100-step) early-fusion run at three learning rates (80 s on 2 shared CPU cores, seed 0, jax
0.10.2; the 600-step results are in the av_digits docstring). It prints and writes this leaderboard.md:

    python -m mmjax.sweep --base av_digits --workdir /tmp/sweep --grid 'optimizer.lr=[3e-3,1e-3,3e-4]' \\
        --config.variants=early --config.train.num_steps=100 --config.train.eval_every_steps=100

    | rank | trial | variant | optimizer.lr | validation/accuracy | validation/loss | validation/macro_f1 | test/accuracy | step_time_s |
    |---|---|---|---|---|---|---|---|---|
    | 1 | 1 | early | 0.003 | 0.9385 | 0.1514 | 0.9380 | 0.9500 | 0.0687 |
    | 2 | 2 | early | 0.001 | 0.9330 | 0.2220 | 0.9327 | 0.9472 | 0.0696 |
    | 3 | 3 | early | 0.0003 | 0.8939 | 0.5527 | 0.8939 | 0.8889 | 0.0397 |
    best: trial 1 optimizer.lr=0.003 [early], validation/accuracy 0.9385; its config: python -m experiments.av_digits
    --workdir DIR --config.variants=early --config.train.num_steps=100 --config.train.eval_every_steps=100
    --config.optimizer.lr=3e-3

Modules: `grid` (grids, distributions, trials), `leaderboard` (ranking; Markdown, CSV, plot), `engine` (the sweep's
definition, workdir and run), `command` (this command line).
"""  # noqa: E501 (the example leaderboard's rows)
