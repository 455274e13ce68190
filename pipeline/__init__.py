"""Building paired latent datasets with Ray Data: sources -> 1024 px tiles -> several VAEs -> Parquet + manifest.

    interposer data build --images photos/ --space v1 --space xl --out data/v1-xl
    interposer data add-space --data data/v1-xl --space fx
    interposer data inspect data/v1-xl

`schema.py` is the dataset contract trainer/ reads; only `build.py` imports Ray. May import `interposer`,
never the reverse.
"""
