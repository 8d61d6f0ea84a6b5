"""protoc output: written only by `make proto`, never by hand."""
