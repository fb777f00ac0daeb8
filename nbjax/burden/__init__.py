"""The neural-burden metrics and the per-step tracker that computes them inside the step."""
