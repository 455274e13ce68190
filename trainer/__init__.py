"""Training interposers from pipeline/ datasets with Ray Train (config, sampler, losses, step, checkpoints).

Not built yet: see the project's open issues. May import `interposer` and `pipeline`'s schema.
"""
