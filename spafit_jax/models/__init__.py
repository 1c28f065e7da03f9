"""The encoders and their weights: the families (what differs between BERT, RoBERTa, DistilBERT,
DeBERTa-v2/v3, ModernBERT), the `flax.linen` models, weight files, Hugging Face model folders and
tokenizers, PEFT adapter folders.

Owns: families, weights, segments, bert, deberta, modernbert, hf, peft_io.
May import: the light core (spafit_jax.errors, methods, lora, masking, stratified, tree_paths). Never data,
config, training or anything above.
"""
