"""Maps: attribution methods by name over captum, their options and baselines, and the post-processing
presets that turn attributions into the maps the checks compare."""
