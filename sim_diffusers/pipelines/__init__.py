from .pipeline_sim_one_step import SIMOneStepPipeline

__all__ = ["SIMOneStepPipeline"]
