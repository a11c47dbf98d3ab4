"""`python -m stages compare`: is the difference between two runs on the same test images real?

runs.py reads a run's per-image predictions at a git revision, an experiment or the workspace;
pairs.py pairs runs and summarises them (statistics from stages.stats); show.py prints them;
command.py picks the runs the command line names.
"""
