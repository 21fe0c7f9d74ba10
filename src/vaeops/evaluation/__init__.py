"""What evaluate computes: the importance-weighted bound."""
