"""The pre-training loop's parts: DeepSpeed settings, LR schedule, data, checkpoints, metrics, loop.

`cxrfast/train.py` builds these objects and hands them to `loop.train`; each file is one part.
"""
