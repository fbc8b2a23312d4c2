"""The stages of a `gfattn pipeline` run, one module each, in the order `pipeline.run.driver._stages` runs
them: data (and record), model, tokenize (and checkpoint), finetune, de, analysis."""
