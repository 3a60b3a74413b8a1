"""The planner's domain: runs as persisted state machines, their steps, ingest and the worker that drives them.

Plain Python: nothing here imports the web framework.
"""
