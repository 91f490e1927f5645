"""The model side of the data flow: which layers a check randomizes (``layers``), how a layer is
randomized under a restoring context (``randomize``), and the cache of trained seed models (``cache``)."""
