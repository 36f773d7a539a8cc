"""flashlm.train: pretraining a GPT from raw text on flashlm kernels (data pipeline, optimizers, trainer)."""
