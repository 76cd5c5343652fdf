"""memplan's clients: the networks of the source papers, built as real, trainable users of memplan."""
