"""Research instruments of sim_diffusers: one-off experiments on the ground-truth world and a 2-D harness, kept
apart from the product and not installed. What each one asks, and whether it is still live: research/README.md."""
