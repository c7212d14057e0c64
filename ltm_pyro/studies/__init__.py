"""Studies: what an experiment computes, so its script is only a command line."""
