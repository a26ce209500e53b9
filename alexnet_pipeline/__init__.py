"""alexnet-pipeline: AlexNet (Krizhevsky et al., 2012) on ImageNet, with a DALI data pipeline."""

__version__ = "0.1.0"
