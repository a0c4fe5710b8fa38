"""`cxrfast eval`: the published evaluation protocols (MGCA, MRM, MAE-CXR, MoCo-CXR).

Label fractions are drawn by patient from the shard folder's sample table, heads (linear probe) or
fine-tuned states are selected on validate only and scored once on test, and every AUC comes with a
bootstrap CI over patients.
Modules: tasks and policies (labels by name, uncertain labels), protocols (presets and knobs),
samples and draws, encoders and features (cached), head (training and selection), metrics,
results and summary (files and numbers), report (table, plots), linprobe (the engine; `probe()`
for an in-memory encoder), augment_probe (the published per-epoch probe), finetune (a trainer
run of `cxrfast.methods.finetune` per draw), compare; `python -m cxrfast.eval` is the CLI (the
deepspeed launcher's entry point).

Importing this package does not import torch; the modules that need it import it themselves.
"""
