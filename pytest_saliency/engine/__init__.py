"""The speed engine: maps of many model states computed fast (activation replay, occlusion state stacks)
behind one interface."""
