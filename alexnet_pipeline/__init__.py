"""alexnet-pipeline: AlexNet (Krizhevsky et al., 2012) on ImageNet, with a DALI data pipeline.

    from alexnet_pipeline import train_loader, eval_loader

The loaders are imported on first use, so that `alexnet-prep` never pays for importing DALI and torch.
"""

__version__ = "0.1.0"
__all__ = ["train_loader", "eval_loader", "__version__"]


def __getattr__(name):
    if name in ("train_loader", "eval_loader"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
