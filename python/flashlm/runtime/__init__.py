"""The serving runtime: the pieces between a model and its requests (engine, scheduler, block manager,
model runner and the native decoder stack it may run, sampler, speculative decoding), and simple_generate,
the plain window-recompute sampler. `flashlm.LLM` and `flashlm.SamplingParams` are the front door.

Importing this package loads no native code and no torch; each module imports what it needs.
"""
