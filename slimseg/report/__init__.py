"""Human-readable and machine-readable summaries of slimseg's results."""
