"""The data contract of Arus: envelopes, payloads, sensor catalogue, reference data.

This package imports nothing else of Arus; every other package depends on it.
"""
