"""`python -m mmjax.bench --config experiments/NAME.py[:PRESET]`: the train-step benchmark (see mmjax.bench.train_step).

The convolution micro-benchmark is `python -m mmjax.bench.convolution`.
"""

from mmjax.bench.train_step import main

if __name__ == "__main__":
    main()
