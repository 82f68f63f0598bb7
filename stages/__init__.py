"""One module per stage: `VERSION` and `run(cfg, inputs, out)`. No stage imports another stage."""
