"""The analyze stage and its parts (files in, report out; the probe stage, stages/probe.py, times the devices).

    stage.py    reads the run's files and the probe's, writes report.md and the figures
    report.py   the report's Markdown sections and the lessons drawn from the numbers
    figures.py  the PNG figures (matplotlib)
"""
