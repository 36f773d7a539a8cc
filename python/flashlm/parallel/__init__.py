"""Model parallelism, one file per scheme: pipeline stages and schedules in pipeline.py, context parallelism (ring
attention) in context.py."""
