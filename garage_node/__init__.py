"""garage-node: a gaming PC joins a regional GPU network by itself."""

__version__ = "0.1.0"
