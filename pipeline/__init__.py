"""overopt's shared libraries: config, runner and cache, models, scoring, records, the tiny world."""
