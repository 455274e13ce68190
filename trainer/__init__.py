"""Training interposers from pipeline/ datasets with Ray Train, evaluating them and publishing to the Hub.

    interposer train --data data/xl-v1 --src xl --dst v1 --out runs --name xl-v1
    interposer eval --model runs/xl-v1 --data data/xl-v1
    interposer publish --model runs/xl-v1 --repo me/xl-to-v1-interposer --dry-run
    interposer demo

The arithmetic (config, data sampler, losses, step, checkpoints, metrics) is plain torch; only `loop.py`,
`driver.py` and `demo.py` import Ray. May import `interposer` and `pipeline`.
"""
