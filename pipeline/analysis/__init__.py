"""What the models attend to and use: the streaming attention engine, per-gene tables and
statistics, DE, key scores, attribution, in-silico deletion and the randomisation cascade."""
