"""The ground-truth benchmark: a tiny PixArt teacher of a world whose answer is known, distilled by the real trainer
and scored exactly (`python -m benchmarks.ground_truth.distill`; docs/ground_truth.md)."""
