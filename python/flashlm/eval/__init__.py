"""Evaluation of any model flashlm loads: perplexity (perplexity.py), and what builds on the engine's
log-likelihoods. Each module is imported on its own: `from flashlm.eval.perplexity import perplexity`."""
