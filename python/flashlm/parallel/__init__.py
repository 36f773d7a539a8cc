"""flashlm.parallel: model parallelism, one file per scheme (pipeline.py: pipeline stages and schedules)."""
