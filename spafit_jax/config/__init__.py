"""The config: its sections, fields, defaults, help and checks (`schema`), and YAML files merged in order
with dotted overrides, the shipped configs and the config's YAML (`files`).

Owns: schema, files.
May import: the light core, data (the owners the schema asks: tasks, batching). Never models, training or
anything above.
"""
