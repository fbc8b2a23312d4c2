"""Input data: counts and obs of the user's file, the task design (labels, filter, split), the gene
dictionaries, the synthetic sci-Plex-like generator and the fixed-length variant."""
