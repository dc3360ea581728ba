"""Where training data come from: activations of a model's sites, captured once per forward.

``source`` (the BatchSource protocol and the in-memory source), ``capture`` (the one
forward-and-keep), ``shuffle`` (bucketed shuffling, shared by every source), ``store`` (the
on-disk layout, manifest and reader), ``writer`` (shard files and progress records), ``harvest``
(model → store, any number of ranks) and ``online`` (model → batches, no disk).  Nothing here
imports from training.
"""
