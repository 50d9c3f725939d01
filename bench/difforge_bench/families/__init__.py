"""Benchmark families, one module each, named like the op family everywhere else (cpp/, cuda/, tests/).

To add a family (formats, attention, kvcache, sampling):
1. write ``families/<name>.py`` defining ``FAMILY = Family(...)`` (see ``norm.py``): its shapes, and a
   function returning the cases of one (device, shape), each with our op, its baselines and a byte or
   FLOP model. Import difforge inside the implementation factories, so ``--list`` works without a build.
2. add ``"<name>"`` to ``MODULES`` below; the CLI, tables and output files pick it up from there.
"""

MODULES = ("norm", "attention", "kvcache", "formats", "sampling")
