"""sim_diffusers: distil PixArt-alpha into a one-step generator with Score Implicit Matching (SIM).

The pipeline is imported lazily so that the pure-torch modules (schedule, generator, losses) load without diffusers.
"""

__version__ = "0.1.0"

__all__ = ["SIMOneStepPipeline", "__version__"]


def __getattr__(name):
    if name == "SIMOneStepPipeline":
        from .pipelines import SIMOneStepPipeline

        return SIMOneStepPipeline
    raise AttributeError(f"module 'sim_diffusers' has no attribute {name!r}")
