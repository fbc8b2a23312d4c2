"""What a run says: the end-of-run summary and the thesis's figures."""
