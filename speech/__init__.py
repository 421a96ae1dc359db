"""Speech track: Speech Commands data, a synthetic keyword generator, features, GRU models."""
