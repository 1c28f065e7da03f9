"""After training: reloading a run folder (`run.load_run`, `LoadedRun.predict`), predicting on new
text, exporting to transformers / PEFT / Flax folders, and where these may write (`outputs`).

Owns: run, outputs, predicting, exporting.
May import: the light core, models, data, config, training. Never experiments or tpu.
"""
