"""Benchmarks of sim_diffusers, run as modules from the repository root (`python -m benchmarks.<script>`); not
installed. One command per script: benchmarks/README.md."""
