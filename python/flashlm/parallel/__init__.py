"""Model parallelism, one file per scheme: context parallelism (ring attention) in context.py."""
