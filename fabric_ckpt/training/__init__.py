"""What training loops call besides checkpoints, as Lightning Fabric has them: data loaders, seeding, collectives,
loggers, gradient clipping. ``Fabric`` delegates to these modules."""
