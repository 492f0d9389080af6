"""Data: sources -> Parquet shards -> Ray Data multi-crop stream (and a torch Dataset twin for bench)."""
