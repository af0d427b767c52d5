"""Publishing: model cards and the upload of a model folder to the Hub."""
