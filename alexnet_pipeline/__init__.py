"""alexnet-pipeline: AlexNet (Krizhevsky et al., 2012) on ImageNet, with a DALI data pipeline.

    from alexnet_pipeline import train_loader, eval_loader     # the paper's augmentation, on DALI
    from alexnet_pipeline import load_model, predict           # a trained network, used

Everything is imported on first use, so that `alexnet-prep` never pays for importing DALI and torch.
"""

__version__ = "0.2.0"
__all__ = ["train_loader", "eval_loader", "load_model", "predict", "__version__"]
_WHERE = {"train_loader": "pipeline", "eval_loader": "pipeline", "load_model": "inference", "predict": "inference"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
