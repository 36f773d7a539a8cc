"""Evaluation: perplexity, benchmark tasks scored by log-likelihood or generation, and lm-evaluation-harness
interop. Each module is imported where it is used (lm_eval_model needs the lm_eval package)."""
