"""Learning from use: feedback becomes training data, a gated candidate, a promoted model version."""
