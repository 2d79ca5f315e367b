"""The evaluation layer: benchmark runs over TEdBench-layout folders, scoring of outside edits, the metrics and
the report.

``data`` (pairs of a dataset), ``plan`` (settings, presets, jobs), ``runfolder`` (the resumable run folder),
``bench`` (running jobs), ``score`` (edits made elsewhere), ``report`` (plots and tables) are torch-free at
import, so that commands validate everything before a model loads; ``metrics`` imports torch.
"""
