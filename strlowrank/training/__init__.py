"""The training layer: optimizer groups by role, configs and the shared command-line flags,
the one training loop and its callbacks, checkpoints, distributed set-up and the budget
controller.

It imports the method layer only; ``strlowrank`` re-exports its public API. Its modules and the
rules between the layers: docs/ARCHITECTURE.md.
"""
