"""The serving runtime: the pieces between a model and its requests (block manager, sampling parameters and
sampler; scheduler and engine to come).

Importing this package loads no native code and no torch; each module imports what it needs.
"""
