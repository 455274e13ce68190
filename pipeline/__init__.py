"""Building paired latent datasets with Ray Data (sources -> tiles -> VAE encoders -> Parquet + manifest).

Not built yet: see the project's open issues. May import `interposer`, never the reverse.
"""
