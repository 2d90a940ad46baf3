"""The trainer: torchrun entry point, config, flow matching, engines (arrives with the trainer issue)."""
