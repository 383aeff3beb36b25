"""`python -m mmjax.sweep`: a hyper-parameter sweep over any experiment (see `mmjax.sweep`)."""

from mmjax.sweep.command import main

if __name__ == "__main__":
    main()
