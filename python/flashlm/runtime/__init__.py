"""The serving runtime: the pieces between a model and its requests (block manager, scheduler, sampling
parameters and sampler; the engine and model runner to come).

Importing this package loads no native code and no torch; each module imports what it needs.
"""
