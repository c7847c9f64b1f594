# The pipeline module lives next to the generator and schedule it imports (sim_diffusers/pipeline_sim_one_step.py):
# a saved model folder carries copies of those files for stock diffusers, which resolves only sibling imports.
from ..pipeline_sim_one_step import SIMOneStepPipeline

__all__ = ["SIMOneStepPipeline"]
