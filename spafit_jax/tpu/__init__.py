"""Ahead of a TPU: the chips and topologies (`specs`) and compiling the trainer's steps for a topology on
this CPU (`ahead`), without a TPU; an epoch of a length distribution estimated from those programs (`epoch`).

Owns: specs, ahead, epoch.
May import: the light core, models, data, config, training. Never after_training or experiments.
"""
