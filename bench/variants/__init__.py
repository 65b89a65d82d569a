"""Bench-only ways of sending TFTP DATA blocks, measured against the product's data path.

Run ``python3 -m bench.variants.run``; see bench/variants/README.md.
"""
