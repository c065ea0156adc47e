"""Recipe-style baselines: faithful reimplementations of the ModelZoo scripts, for comparison only."""
