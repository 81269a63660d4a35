"""mgff: two-stage fine-grained classification with multi-granularity feature fusion."""

__version__ = "0.1.0"
