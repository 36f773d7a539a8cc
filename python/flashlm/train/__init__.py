"""flashlm.train: pretraining a GPT from raw text on flashlm kernels (data pipeline, optimizers, trainer).
Importing this package loads nothing heavy; import the submodules (flashlm.train.data, flashlm.train.optim)
for what you use."""
