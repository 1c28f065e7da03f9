"""Tasks and their examples: the task registry, raw examples (GLUE, hub datasets, local files, the two
offline corpora), tokenisation and its cache, buckets and batches (and packing), the metrics each
task scores with, and the pipeline's entry point (`pipeline.load_task_data`).

Owns: tasks, sources, bbc_news, tweets, tokens, batching, packing, metrics, pipeline.
May import: the light core (spafit_jax.errors, methods). Never models, config, training or anything above
(the config's `data:` section arrives as `sources.DataSection`; its class is never imported here).
"""
