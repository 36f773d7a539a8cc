"""The serving runtime: the pieces between a model and its requests (engine, scheduler, block manager,
model runner and the native decoder stack it may run, sampler, speculative decoding), and simple_generate,
the plain window-recompute sampler. `flashlm.LLM` and `flashlm.SamplingParams` are the front door.

Importing this package loads no native code and no torch; each module imports what it needs.
"""

# Re-exported names, imported on first use (so the package itself stays light).
_LAZY = {"StructuredOutputsParams": "flashlm.runtime.structured", "Logprob": "flashlm.runtime.outputs"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashlm.runtime' has no attribute {name!r}")
