"""torchmetrics metrics specific to fine-grained classification (box IoU, parent-level accuracy)."""
