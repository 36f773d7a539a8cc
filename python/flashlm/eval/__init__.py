"""Evaluation: perplexity (perplexity.py), log-likelihoods of continuations, benchmark tasks (multiple choice
and generation).

Each module is imported where it is used (`from flashlm.eval.perplexity import perplexity`,
`from flashlm.eval.loglikelihood import loglikelihoods`), so that importing the package loads nothing heavy.
"""
