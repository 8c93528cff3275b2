"""A coordinator's own app, shipped to the sites in its FAB (a test of what a site runs)."""
