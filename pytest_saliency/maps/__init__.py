"""Maps: attribution methods by name over captum (``methods``: what each method is; ``options``: the
values its options accept; ``targets``: the class a map explains; ``batching``: the memory budget;
``explainers``: the attribution API), their baselines, the cache of original maps, and the
post-processing presets that turn attributions into the maps the checks compare."""
