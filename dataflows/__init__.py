"""One module per pattern; each builds a Dataflow from its settings."""
