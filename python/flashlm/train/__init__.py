"""Training: the optimizer and, on top of it, the trainer. Importing this package loads nothing heavy;
import the submodules (flashlm.train.optim) for what you use."""
