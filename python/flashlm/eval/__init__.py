"""Evaluation of any model flashlm loads: log-likelihoods of continuations, benchmark tasks (multiple choice and
generation), perplexity, and lm-evaluation-harness interop (lm_eval_model.py, which needs the lm_eval package).

Each module is imported where it is used (`from flashlm.eval.perplexity import perplexity`), so that importing
the package loads nothing heavy.
"""
