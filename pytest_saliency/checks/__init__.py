"""The checks: one module per family of the papers' sanity checks, each stating its method and calling the
shared pieces (maps, comparisons, statistics, engine)."""
