"""HTTP routes: a thin layer that turns requests into calls on the data plane."""
