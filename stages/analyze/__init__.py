"""The analyze stage and its parts.

    stage.py    reads the run's files, runs the probe, writes report.md, figures and scaling.json
    report.py   the report's Markdown sections and the lessons drawn from the numbers
    figures.py  the PNG figures (matplotlib)
    probe.py    the scaling probe: training steps timed at 1, 2, 4, ... devices with the core
"""
