"""The continuous-batching scheduler, its request and row state, and what a run measured."""
