"""Checkpoint save/load benchmarks: fabric_ckpt side by side with the disk, torch, Lightning Fabric and DCP.

``make bench`` (``python -m benchmarks``) measures every row of :func:`benchmarks.scenarios.plan` in fresh worker
processes and prints a Markdown report; see ``docs/performance.md``. Modules:

- ``workloads``: the GPT model + Adam state and the small-tensors module;
- ``checkpointers``: one adapter per library (the registry new libraries and modes are added to);
- ``storage``: where files go and page-cache control (the registry object stores are added to);
- ``scenarios``: the rows; ``runner`` + ``worker``: measuring them; ``memory``: RssAnon sampling;
- ``report``: ratios and Markdown; ``system``: machine facts; ``cli``: the command line.
"""
