"""The paper's experiment grid: running it, its records and its report."""
