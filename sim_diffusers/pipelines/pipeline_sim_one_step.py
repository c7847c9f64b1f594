# The module moved to sim_diffusers/pipeline_sim_one_step.py; this import path keeps working for existing code.
from ..pipeline_sim_one_step import SIMOneStepPipeline

__all__ = ["SIMOneStepPipeline"]
