"""The allocator-only simulator: workloads, the compare experiment, sweep, report and demo."""
