"""Model builders and loaders: policy (PM), reward model (RM), renderer; real and tiny alike."""
