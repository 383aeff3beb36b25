"""`python -m mmjax.bench --config experiments/NAME.py[:PRESET]`: the train-step benchmark (see mmjax.bench.step).

The convolution micro-benchmark is `python -m mmjax.bench.conv`.
"""

from mmjax.bench.step import main

if __name__ == "__main__":
    main()
