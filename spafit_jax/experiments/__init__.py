"""Comparing runs: an experiment file read into a grid of runs, the `select:` search on a dev split,
the protocol report with paired-bootstrap intervals, finished runs read and tabled, the pictures and
the report's files.

Owns: grid, devsplit, selection, choices, seedruns, expstate, protocol_report, protocol_files, protocol_plots,
intervals, evidence, tables, pictures, reporting.
May import: the light core, models, data, config, training, after_training. Never tpu.
"""
