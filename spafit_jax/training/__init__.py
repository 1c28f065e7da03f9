"""Training a model: what trains (`plan`), the optimizer, the pure steps and their mesh / pmap drivers,
compiling, the frozen-stratum cache, checkpoints, the loop, the run folder and its lock, metrics logs,
results.json, the trainer's model and task (`loading`) and `trainer.train_and_evaluate`.

Owns: plan, optimizer, steps, parallel, compiling, frozen, checkpoint, loop, loading, rundir, runlock,
metricslog, results, trainer.
May import: the light core, models, data, config. Never after_training, experiments or tpu.
"""
